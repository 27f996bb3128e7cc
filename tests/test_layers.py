"""Data flows one way through the packages (docs/architecture.md): a package may import the ones below it in
`LAYERS`, never one above — also not lazily inside a function. This test reads every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "moerge"

# bottom → top; packages on one line may not import each other either (none does today)
LAYERS = [
    ["errors"],
    ["config_io", "entrypoints", "executor", "progress", "tables"],
    ["experts"],
    ["backbones"],
    ["transforms"],
    ["routing"],
    ["model"],
    ["train"],
    ["pool"],
    ["compose"],
    ["recipes"],
    ["merging"],
    ["bench"],
    ["plugins"],
    ["serve"],
    ["cli"],
    ["__main__"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def unit(module: str) -> str:
    """``moerge.routing.call`` → ``routing``; ``moerge.errors`` → ``errors``."""
    return module.split(".")[1] if module.count(".") else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = ".".join(rel.parts[:-1]) if path.name != "__init__.py" else ".".join(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("moerge"):
                if name == "moerge":  # from moerge import routing, …
                    out += [(node.lineno, f"moerge.{a.name}") for a in node.names]
                else:
                    out.append((node.lineno, name))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("moerge.")]
    return out


def test_every_package_is_in_a_layer():
    units = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if not p.name.startswith("_")}
    units.discard("py")
    assert units <= set(RANK), f"add {sorted(units - set(RANK))} to LAYERS (and docs/architecture.md)"


def test_imports_point_down_the_layers():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        here = unit(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        if here == "__init__":  # moerge/__init__.py: lazy re-exports by name only
            continue
        for lineno, name in imports(path):
            there = unit(name)
            if there in ("__init__", here):
                continue
            if RANK[there] > RANK[here] or (RANK[there] == RANK[here] and there != here):
                upward.append(f"{path.relative_to(SRC.parent)}:{lineno}: {here} imports {name}")
    assert not upward, "imports against the data flow:\n" + "\n".join(upward)
