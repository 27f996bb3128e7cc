"""Storage behind an `ExpertLibrary`: one small interface addressed by URL.

A plain path or ``file://`` URL gives `LocalStorage` (atomic renames, fsync); any other URL (``memory://``,
``s3://``, ``hf://`` …) gives `FsspecStorage` through fsspec, where its plugin is installed.

Every relative path either storage is given goes through `moerge.experts.paths.contain` first: a path from a
catalog row or an expert's JSON that would leave the library (absolute, ``..``, a symlink out) is refused with
`UnsafePathError` before anything is read, written or deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from moerge.experts.paths import contain


class Storage(Protocol):
    """Files addressed by ``/``-separated paths relative to the library root."""

    url: str

    def read_bytes(self, rel: str) -> bytes: ...
    def write_bytes(self, rel: str, data: bytes) -> None: ...
    def exists(self, rel: str) -> bool: ...
    def listdir(self, rel: str) -> list[str]: ...
    def delete(self, rel: str) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def makedirs(self, rel: str) -> None: ...
    def local_path(self, rel: str = "") -> Path | None: ...


class LocalStorage:
    """A folder on the local disk. Writes go to a temporary file, are fsynced, then renamed into place."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        self._deferred: list[Path] | None = None  # inside `deferred_sync`: what still needs an fsync

    @contextlib.contextmanager
    def deferred_sync(self) -> Iterator[None]:
        """Writes and renames inside the block skip their own fsyncs; `sync` (which the block's owner calls
        before relying on them, e.g. before a catalog commit) makes them all durable at once. For thousands of
        files, one ``syncfs`` instead of an fsync per file and per rename."""
        outer = self._deferred
        self._deferred = [] if outer is None else outer
        try:
            yield
        finally:
            if outer is None:
                self._deferred = None

    def sync(self) -> None:
        """Make every write and rename deferred so far durable (``syncfs`` of the library's file system where
        available, else an fsync of each file and folder)."""
        pending, self._deferred = self._deferred, ([] if self._deferred is not None else None)
        if not pending:
            return
        if not _syncfs(self.root):
            for path in dict.fromkeys(pending):
                _fsync_path(path)

    def _p(self, rel: str, follow: bool = True) -> Path:
        return contain(self.root, rel, what=self.url, follow=follow)  # type: ignore[return-value]

    def read_bytes(self, rel: str) -> bytes:
        return self._p(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        # a fresh file (never one planted in the library, nor a link's target), renamed over the old one
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self._deferred is None:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self._deferred is not None:
                self._deferred += [path, path.parent]
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def exists(self, rel: str) -> bool:
        return self._p(rel).exists()

    def listdir(self, rel: str) -> list[str]:
        p = self._p(rel)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []

    def delete(self, rel: str) -> None:
        p = self._p(rel, follow=False)
        if p.is_symlink():  # a link inside the library: remove the link, never what it points to
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()

    def rename(self, src: str, dst: str) -> None:
        dst_path = self._p(dst, follow=False)
        dst_path.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self._p(src, follow=False), dst_path)
        if self._deferred is not None:
            self._deferred.append(dst_path.parent)
        else:
            _fsync_dir(dst_path.parent)

    def makedirs(self, rel: str) -> None:
        self._p(rel).mkdir(parents=True, exist_ok=True)

    def local_path(self, rel: str = "") -> Path | None:
        return self._p(rel)


class FsspecStorage:
    """Any fsspec filesystem (object stores, the HF Hub, ``memory://`` for tests). Renames are copies on
    stores without them, so a crash mid-add can leave an orphan folder that `ExpertLibrary.verify` reports."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:  # an unknown protocol, or its plugin is not installed
            from moerge.errors import LibraryError

            raise LibraryError(
                f"{url}: cannot open this URL ({e}); use a local folder, or install the fsspec plugin for it."
            ) from None

    def _p(self, rel: str) -> str:
        return contain(self.root, rel, what=self.url)  # type: ignore[return-value]

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        parent = self._p(rel).rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(self._p(rel), data)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._p(rel))

    def listdir(self, rel: str) -> list[str]:
        if not self.fs.isdir(self._p(rel)):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(rel), detail=False))

    def delete(self, rel: str) -> None:
        if self.fs.exists(self._p(rel)):
            self.fs.rm(self._p(rel), recursive=True)

    def rename(self, src: str, dst: str) -> None:
        self.fs.mv(self._p(src), self._p(dst), recursive=True)

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self._p(rel), exist_ok=True)

    def local_path(self, rel: str = "") -> Path | None:
        return None


def storage_for(url: str | Path) -> Storage:
    """`LocalStorage` for paths and ``file://`` URLs, `FsspecStorage` for every other scheme."""
    s = str(url)
    parsed = urlparse(s)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalStorage(parsed.path if parsed.scheme == "file" else s)
    return FsspecStorage(s)


def _syncfs(path: Path) -> bool:
    """``syncfs(2)`` on the file system holding ``path`` (Linux); False where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return fn(fd) == 0
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    if path.is_dir():
        _fsync_dir(path)
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
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
