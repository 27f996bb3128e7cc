"""Reading configuration files: one place for YAML parsing and its error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moerge.errors import MalformedConfigError


def read_yaml_mapping(path: str | Path, expected: str = "a mapping") -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping; errors name the file (``expected`` says what it should hold)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MalformedConfigError(f"{path}: not valid YAML ({e}).") from e
    if not isinstance(data, dict):
        raise MalformedConfigError(f"{path}: expected {expected}.")
    return data
