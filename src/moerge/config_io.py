"""Reading configuration files: one place for YAML parsing and its error messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moerge.errors import InputNotFoundError, MalformedConfigError, MoergeError


def read_yaml_mapping(path: str | Path, expected: str = "a mapping") -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping; errors name the file (``expected`` says what it should hold)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:  # includes tags that would build Python objects: safe_load refuses them
        raise MalformedConfigError(f"{path}: not valid YAML ({e}).") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise MalformedConfigError(f"{path}: not a YAML text file ({str(e)[:100]}).") from None
    if not isinstance(data, dict):
        raise MalformedConfigError(f"{path}: expected {expected}.")
    return data


def iter_jsonl(
    path: str | Path, error: type[MoergeError] = MalformedConfigError
) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed object)`` for each non-blank line of a JSONL file; a line that is not JSON
    raises ``error`` naming ``file:line``. The caller checks that the file exists (its message says what for)."""
    path = Path(path)
    lineno = 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line.") from e
                except (RecursionError, ValueError) as e:
                    raise error(
                        f"{path}:{lineno}: not valid JSON ({str(e)[:80]}); fix or remove that line."
                    ) from None
    except UnicodeDecodeError:
        raise error(f"{path}:{lineno + 1}: not UTF-8 text; JSONL files are UTF-8.") from None
