"""Containment and atomic output folders: the two rules every read, write and delete of moerge follows.

- `contain(root, rel)` is the one function that turns a path *read from data* (a catalog row, a file name in
  an expert's JSON, an artifact key, an expert name) into a path under ``root``. It refuses absolute paths,
  ``..``, empty or odd components and — on the local disk — symlinks that lead out of ``root``. Both storages
  (`LocalStorage`, `FsspecStorage`) and every writer outside a library (exports) go through it.
- `atomic_output_dir(out)` is how an output folder is written (merges, exports): into a temporary sibling
  that is renamed into place once complete, so a failed or interrupted run leaves ``out`` as it was. An
  existing non-empty ``out`` is refused unless ``overwrite``, and never replaced when it is (or holds) one of
  the inputs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from moerge.errors import OutputExistsError, UnsafePathError

# one path component as moerge writes them (expert folders, file names, artifact kinds / hashes / names)
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_SPECIAL = re.compile(r"^\.[A-Za-z0-9_][A-Za-z0-9_.\-]*$")  # .staging, .adapter.json.123.tmp


def _check_relative(rel: object, what: str) -> str:
    if not isinstance(rel, str):
        raise UnsafePathError(f"{what}: expected a relative path, got {type(rel).__name__} {rel!r}.")
    if rel == "":
        return rel
    parts = rel.split("/")
    if len(rel) > 4096 or "\\" in rel or "\x00" in rel or rel.startswith("/") or ":" in parts[0]:
        raise UnsafePathError(f"{what}: {rel!r} is not a relative path inside the folder; refused.")
    for part in parts:
        if part in ("", ".", "..") or not (_COMPONENT.match(part) or _SPECIAL.match(part)) or len(part) > 255:
            raise UnsafePathError(
                f"{what}: {rel!r} has the component {part!r}, which could leave the folder (or is not a name "
                "moerge writes); refused."
            )
    return str(PurePosixPath(rel))


def contain(root: str | Path, rel: str, *, what: str = "path", follow: bool = True) -> Path | str:
    """``root``/``rel`` if it stays inside ``root``, else `UnsafePathError` (nothing is touched).

    ``root`` is a `Path` for the local disk (symlinks are resolved: one leading out of ``root`` is refused) or a
    ``str`` for an fsspec store (no symlinks there; the check is on the path itself). ``rel`` is ``/``-separated.
    ``follow=False`` resolves only the parent: for operations on the entry itself (deleting or renaming a link
    acts on the link, never on what it points to).
    """
    rel = _check_relative(rel, what)
    if isinstance(root, str):
        return f"{root.rstrip('/')}/{rel}" if rel else root
    path = root / rel if rel else root
    if rel and not _links_in(root, rel, follow):
        # no component of ``rel`` (checked above: no "..", ".", or empty part) is a symlink, so the real path is
        # the real root joined with ``rel``: inside the root. A few lstat calls instead of resolving two paths.
        return path
    real_root = root.resolve()
    real = path.resolve() if follow or not rel else path.parent.resolve() / path.name
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(
            f"{what}: {path} leads to {real} (through a symlink), outside {real_root}; refused. A library "
            "holds no symlinks that leave it; replace the link by the file itself."
        )
    return path


def _links_in(root: Path, rel: str, follow: bool) -> bool:
    """Whether a component of ``rel`` under ``root`` that exists is a symlink (the last one only when
    ``follow``). Components after the first missing one do not exist, so cannot be links."""
    parts = rel.split("/")
    cur = str(root)
    for part in parts if follow else parts[:-1]:
        cur = f"{cur}/{part}"
        try:
            mode = os.lstat(cur).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError:
            return True  # cannot tell: take the resolving path
        if stat.S_ISLNK(mode):
            return True
    return False


def check_name(name: object, what: str) -> str:
    """A single path component (an expert folder, a file name): `UnsafePathError` unless it is one."""
    if not isinstance(name, str) or "/" in name:
        raise UnsafePathError(f"{what}: {name!r} is not a plain name; refused.")
    return _check_relative(name, what)


# ------------------------------------------------------------------------------------ atomic output folders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _holds(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output_dir(
    out: str | Path,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
    libraries: Iterable[str | Path | None] = (),
) -> Path:
    """Refuse ``out`` when it is (or holds) an input, lies inside a library, is a file, or is a non-empty folder
    without ``overwrite``. Returns ``out`` with symlinks resolved. Nothing is created."""
    out = Path(out).expanduser()
    real = out.resolve()
    for lib in libraries:
        if lib is None or "://" in str(lib) or not Path(lib).expanduser().exists():
            continue
        root = Path(lib).expanduser().resolve()
        if root in real.parents:
            raise OutputExistsError(
                f"{out}: the output folder lies inside the library {lib}; a library holds only what moerge puts "
                "there. Choose a folder outside it."
            )
    inputs = [*inputs, *libraries]
    for inp in inputs:
        if inp is None or "://" in str(inp):
            continue
        src = Path(inp).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if _holds(real, src):
            raise OutputExistsError(
                f"{out}: the output folder is (or holds) the input {inp}; writing there would destroy the input. "
                "Choose another output folder."
            )
    if real.exists() or real.is_symlink():
        if not real.is_dir():
            raise OutputExistsError(
                f"{out}: exists and is not a folder; choose a folder name for the output."
            )
        if not overwrite and any(real.iterdir()):
            raise OutputExistsError(
                f"{out}: the output folder is not empty; choose a new folder, or pass --overwrite "
                "(overwrite=True) to replace it once the new output is complete."
            )
    return real


@contextlib.contextmanager
def atomic_output_dir(
    out: str | Path,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
    libraries: Iterable[str | Path | None] = (),
) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out`` to write into; on success it replaces ``out`` (renamed into
    place), on any error it is removed and ``out`` is untouched. See `check_output_dir` for what is refused."""
    real = check_output_dir(out, overwrite=overwrite, inputs=inputs, libraries=libraries)
    parent = real.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(parent, real.name)
    tmp = parent / f".{real.name}.moerge-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _replace_dir(tmp, real)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(parent)


def _replace_dir(tmp: Path, real: Path) -> None:
    if real.is_dir() and not any(real.iterdir()):
        real.rmdir()
    if not real.exists():
        os.rename(tmp, real)
        return
    old = real.parent / f".{real.name}.moerge-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(real, old)
    try:
        os.rename(tmp, real)
    except BaseException:
        os.rename(old, real)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_dead_temporaries(parent: Path, name: str) -> None:
    """Temporary folders of earlier runs for the same output whose process is gone (killed mid-write)."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.moerge-(?:tmp|old)-(\d+)-[0-9a-f]{{8}}$")
    with contextlib.suppress(OSError):
        for p in parent.iterdir():
            m = pattern.match(p.name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))) and p.is_dir():
                if "moerge-old" in p.name and not (parent / name).exists():
                    continue  # a replaced output whose successor never landed: leave it for the user
                shutil.rmtree(p, ignore_errors=True)
