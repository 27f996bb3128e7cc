"""`ExpertLibrary`: where experts live.

Layout of a library (the same on every storage)::

    moerge-library.json                 format version, base model id and fingerprint (and its tensor shapes)
    experts/<name>-<id>/                one PEFT folder per expert (adapter_config.json,
                                        adapter_model.safetensors) or a dense delta (delta_model.safetensors),
                                        plus moerge_expert.json (metadata + checksums)
    artifacts/<kind>/<config-hash>/<expert>.safetensors (+ .json)   derived data (signatures, gates …)
    catalog.sqlite                      the catalog (local libraries; remote ones keep it in a local cache)
    catalog.sqlite.lock                 the write lock (holds the pid of the last writer)
    quarantine/                         what `verify --repair` could not account for (never deleted)
    admission/probe.jsonl               the admission policy's neutral probe set (when a policy has one)

The catalog is the source of truth: an expert exists once its catalog row is committed. Adding writes the
expert into a staging folder, then, holding the library's write lock, renames it into ``experts/`` and
commits the row. A process killed at any point leaves either the old library or the new one; leftovers
(staging folders, unreferenced expert folders) are invisible, reported by `verify`, and with ``repair`` staging
folders are removed, complete experts missing from the catalog are added back (the catalog is rebuilt from the
experts' own JSON) and anything else is moved to ``quarantine/``.

A library is data from strangers: every folder and file name read from the catalog or an expert's JSON is
checked (`moerge.experts.paths.contain`) before anything is read, written or deleted, and an expert's files are
checked against their checksums when loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from moerge.errors import (
    AdmissionRefusedError,
    AdmissionRequiredError,
    BaseModelMismatchError,
    ChecksumMismatchError,
    ExpertExistsError,
    ExpertNotFoundError,
    InputNotFoundError,
    LibraryError,
    LibraryLockedError,
    MalformedConfigError,
    MoergeError,
    ShapeMismatchError,
    UnsafePathError,
)
from moerge.experts.formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DENSE_WEIGHTS,
    EXPERT_FILES,
    FORMAT_VERSION,
    METADATA_FILE,
)
from moerge.experts.metadata import ExpertMetadata
from moerge.experts.paths import atomic_output_dir, check_name, contain
from moerge.experts.schema import explain, parse_expert_record, parse_json_bytes, parse_library_info
from moerge.experts.storage import LocalStorage, Storage, storage_for

if TYPE_CHECKING:  # torch is imported only by the operations that touch weights
    import torch

    from moerge.experts.admission import AdmissionPolicy, AdmissionReport
    from moerge.experts.expert import Expert

LIBRARY_FILE = "moerge-library.json"
CATALOG_FILE = "catalog.sqlite"
QUARANTINE = "quarantine"
LIBRARY_ARTIFACT = "_library"
DEFAULT_LOCK_TIMEOUT_S = 10.0
_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,200}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}$")  # artifact kinds, hashes and file names
# (path, size, mtime_ns, inode) -> sha256 of files already checked in this process
_VERIFIED: dict[tuple[str, int, int, int], str] = {}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experts (
    name TEXT PRIMARY KEY,
    folder TEXT NOT NULL,
    kind TEXT NOT NULL,
    task TEXT,
    domain TEXT,
    base_model TEXT,
    base_fingerprint TEXT,
    created_at TEXT,
    metadata TEXT NOT NULL,
    checksums TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS experts_task ON experts(task);
CREATE TABLE IF NOT EXISTS tags (name TEXT NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (name, tag));
CREATE INDEX IF NOT EXISTS tags_tag ON tags(tag);
CREATE TABLE IF NOT EXISTS modules (module TEXT PRIMARY KEY, d_in INTEGER NOT NULL, d_out INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS admissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    decision TEXT NOT NULL,
    at TEXT NOT NULL,
    report TEXT NOT NULL
);
"""


@dataclass
class VerifyReport:
    """What `ExpertLibrary.verify` found. ``ok`` is true when no catalogued expert is damaged.

    ``leftovers`` are entries the catalog does not use (staging folders of interrupted adds, expert folders
    without a catalog row); ``repaired`` says what ``repair=True`` did (rows rebuilt or dropped, experts added
    back, folders moved to quarantine)."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Entry:
    """One catalog row, checked: a safe folder, its metadata and its checksums."""

    name: str
    folder: str
    rel: str  # experts/<folder>
    metadata: ExpertMetadata
    checksums: dict[str, str]


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able config, used to key artifacts."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def artifact_rel(kind: str, config: dict[str, Any], expert: str | None) -> str:
    """``artifacts/<kind>/<config hash>/<expert or _library>``: where an artifact lives (without extension)."""
    if not isinstance(kind, str) or not kind.replace("_", "").replace("-", "").isalnum():
        raise MalformedConfigError(f"artifact kind {kind!r}: use letters, digits, '-' and '_' only.")
    return f"artifacts/{kind}/{config_hash(config)}/{expert or LIBRARY_ARTIFACT}"


def write_artifact(storage: Any, rel: str, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """Write an artifact at ``rel``: its tensors, then its JSON ``record`` (an artifact counts once both exist)."""
    from safetensors.torch import save

    storage.write_bytes(
        rel + ".safetensors", save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    )
    storage.write_bytes(rel + ".json", json.dumps(record, default=str).encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lock_timeout() -> float:
    """Seconds a writer waits for the library's lock (``MOERGE_LOCK_TIMEOUT``, default 10)."""
    try:
        return max(0.0, float(os.environ.get("MOERGE_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT_S


def base_shapes_of(folder: str | Path) -> dict[str, list[int]]:
    """``{tensor name: shape}`` of a transformers folder's safetensors files, from their headers only."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise InputNotFoundError(f"{folder}: no *.safetensors weights to read the base model's shapes from")
    shapes: dict[str, list[int]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118
                    shapes[key] = list(sf.get_slice(key).get_shape())
        except (SafetensorError, ValueError, OSError) as e:
            raise MalformedConfigError(f"{f}: not a readable safetensors file ({e}).") from None
    return shapes


class ExpertRef:
    """An expert of a library by name: its metadata at hand, its weights loaded (and checked) on each access of
    ``lora`` / ``dense`` and not kept — what a paged attach hands to recipes, so that computing a signature
    for 10,000 experts holds one expert's weights at a time."""

    def __init__(self, library: ExpertLibrary, metadata: ExpertMetadata):
        self.library = library
        self.metadata = metadata

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def kind(self) -> str:
        return self.metadata.kind

    def load(self) -> Expert:
        return self.library.get(self.name)

    @property
    def lora(self) -> dict[str, Any]:
        return self.load().lora

    @property
    def dense(self) -> dict[str, Any]:
        return self.load().dense

    def __repr__(self) -> str:
        return f"ExpertRef({self.name!r} in {self.library.url})"


class ExpertLibrary:
    """A catalogued collection of experts sharing one base model. Open with `create` or `open`."""

    def __init__(self, storage: Storage, info: dict[str, Any], *, recover: bool = False):
        self.storage = storage
        self.info = info
        self.read_only = False
        self._lock_depth = 0
        self.recovered_catalog: str | None = None  # where `recover=True` moved a damaged catalog
        self._catalog_path = self._catalog_location()
        fresh = self._catalog_path != ":memory:" and not Path(self._catalog_path).exists()
        self._conn = self._connect(recover)
        if not isinstance(storage, LocalStorage):
            self._sync_remote_catalog()
        elif fresh and self.storage.listdir("experts"):
            # a local library whose catalog file is gone: rebuild it from the experts' own JSON
            if self.read_only:
                self._adopt_orphans(self._conn, [])
            else:
                with self._write() as c:
                    self._adopt_orphans(c, [])

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        url: str | Path,
        base_model: str | None = None,
        base_fingerprint: str | None = None,
        exist_ok: bool = False,
        base_shapes: dict[str, list[int]] | None = None,
    ) -> ExpertLibrary:
        """Create an empty library at ``url`` (a folder path or an fsspec URL). ``base_shapes``
        (``{tensor name: shape}``, see `base_shapes_of`) makes every add check its modules against the base."""
        storage = storage_for(url)
        if storage.exists(LIBRARY_FILE):
            if not exist_ok:
                raise LibraryError(
                    f"{storage.url}: a library already exists here; open it or pass exist_ok=True."
                )
            return cls.open(url)
        if isinstance(storage, LocalStorage) and storage.root.exists() and any(storage.root.iterdir()):
            raise LibraryError(
                f"{storage.url}: the folder is not empty; choose a new folder for the library."
            )
        storage.makedirs("experts")
        info = {"format": FORMAT_VERSION, "base_model": base_model, "base_fingerprint": base_fingerprint}
        if base_shapes:
            info["base_shapes"] = {k: [int(d) for d in v] for k, v in base_shapes.items()}
        storage.write_bytes(LIBRARY_FILE, json.dumps(info, indent=2).encode())
        return cls(storage, info)

    @classmethod
    def open(cls, url: str | Path, *, recover: bool = False) -> ExpertLibrary:
        """Open an existing library. A read-only one opens for reading. ``recover=True`` (what
        ``moerge library verify --repair`` does) moves an unreadable catalog to ``quarantine/`` and starts a new one
        (`verify` with ``repair=True`` then rebuilds it from the experts' JSON)."""
        storage = storage_for(url)
        if not storage.exists(LIBRARY_FILE):
            raise LibraryError(
                f"{storage.url}: not a moerge library (no {LIBRARY_FILE}); create one with "
                f"`moerge library init {url}`."
            )
        where = f"{storage.url}/{LIBRARY_FILE}"
        try:
            info = parse_library_info(parse_json_bytes(storage.read_bytes(LIBRARY_FILE), where), where)
        except MalformedConfigError as e:
            raise LibraryError(f"{e} (the library file is corrupt)") from None
        if info.get("format", 0) > FORMAT_VERSION:
            raise LibraryError(
                f"{storage.url}: library format {info['format']} is newer than this moerge; upgrade."
            )
        return cls(storage, info, recover=recover)

    @property
    def url(self) -> str:
        return self.storage.url

    @property
    def base_model(self) -> str | None:
        return self.info.get("base_model")

    @property
    def base_fingerprint(self) -> str | None:
        return self.info.get("base_fingerprint")

    @property
    def base_shapes(self) -> dict[str, list[int]] | None:
        return self.info.get("base_shapes") or None

    # ------------------------------------------------------------------ admission
    @property
    def admission_policy(self) -> AdmissionPolicy | None:
        """The library's admission policy (None: experts are added after the integrity and base checks only)."""
        from moerge.experts.admission import AdmissionPolicy

        raw = self.info.get("admission")
        return None if raw is None else AdmissionPolicy.model_validate(raw)

    def set_admission_policy(
        self, policy: AdmissionPolicy | None, probe_rows: list[dict[str, str]] | None = None
    ) -> None:
        """Set (or with None, remove) the admission policy. ``probe_rows`` (``{"text": …}`` or prompt/completion
        rows) become the library's neutral probe set, ``admission/probe.jsonl``, kept with its checksum; without
        them a policy keeps the probe set it had."""
        from moerge.experts.admission import PROBE_FILE, ProbeSet, digest_rows, probe_bytes

        with self._write():
            if policy is None:
                self.info.pop("admission", None)
            else:
                if probe_rows is not None:
                    if not probe_rows:
                        raise MalformedConfigError("the probe set holds no rows; give at least one.")
                    data = probe_bytes(probe_rows)
                    self.storage.write_bytes(PROBE_FILE, data)
                    probe = ProbeSet(sha256=digest_rows(data), rows=len(probe_rows))
                    policy = policy.model_copy(update={"probe": probe})
                elif policy.probe is None and (old := self.admission_policy) is not None:
                    policy = policy.model_copy(update={"probe": old.probe})
                self.info["admission"] = policy.model_dump(mode="json")
            self.storage.write_bytes(LIBRARY_FILE, json.dumps(self.info, indent=2).encode())

    def probe_rows(self) -> list[dict[str, str]]:
        """The policy's probe set, checked against its checksum ([] when the policy has none)."""
        from moerge.experts.admission import digest_rows

        policy = self.admission_policy
        if policy is None or policy.probe is None:
            return []
        try:
            data = self.storage.read_bytes(policy.probe.path)
        except FileNotFoundError:
            data = b""
        if digest_rows(data) != policy.probe.sha256:
            raise ChecksumMismatchError(
                f"{self.url}/{policy.probe.path}: the probe set is missing or does not match its checksum; set it "
                f"again (`moerge library policy {self.url} --probe FILE.jsonl`)."
            )
        rows = []
        for i, line in enumerate(data.decode("utf-8").splitlines()):
            row = parse_json_bytes(line.encode(), f"{self.url}/{policy.probe.path} line {i + 1}")
            if not isinstance(row, dict) or not all(isinstance(v, str) for v in row.values()):
                raise MalformedConfigError(
                    f"{self.url}/{policy.probe.path} line {i + 1}: not a row of strings."
                )
            rows.append(row)
        return rows

    def check_compatible(self, expert: Expert, where: str | None = None) -> None:
        """The checks every add makes before writing: integrity (shapes, NaN), base fingerprint, module shapes."""
        where = where or f"expert {expert.name!r}"
        expert.check(where)
        self._check_base(expert, where)
        self._check_module_shapes(expert, where)

    def log_admission(self, report: AdmissionReport, c: sqlite3.Connection | None = None) -> None:
        """Record an admission decision in the catalog (refusals too: the library's experts are unchanged)."""
        row = (report.expert, report.decision, report.at, report.model_dump_json())
        if c is not None:
            c.execute("INSERT INTO admissions (name, decision, at, report) VALUES (?,?,?,?)", row)
            return
        with self._write() as w:
            w.execute("INSERT INTO admissions (name, decision, at, report) VALUES (?,?,?,?)", row)

    def admissions(self, name: str | None = None) -> list[AdmissionReport]:
        """The catalog's admission log, oldest first (of one expert name when given)."""
        from moerge.experts.admission import AdmissionReport

        sql, args = "SELECT report FROM admissions", ()
        if name is not None:
            sql, args = sql + " WHERE name = ?", (name,)
        try:
            rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
        except sqlite3.OperationalError:  # a read-only catalog from before admission existed
            return []
        out = []
        for (raw,) in rows:
            try:
                out.append(AdmissionReport.model_validate_json(raw))
            except ValidationError:
                continue  # an edited row: not a report
        return out

    def _catalog_location(self) -> str:
        local = self.storage.local_path(CATALOG_FILE)
        if local is not None:
            return str(local)
        cache = Path(os.environ.get("MOERGE_CACHE", Path.home() / ".cache" / "moerge")) / "catalogs"
        cache.mkdir(parents=True, exist_ok=True)
        return str(cache / f"{hashlib.sha256(self.storage.url.encode()).hexdigest()[:16]}.sqlite")

    def _writable(self) -> bool:
        root = self.storage.local_path("")
        if root is None:
            return True
        catalog = Path(self._catalog_path)
        return os.access(root, os.W_OK) and (not catalog.exists() or os.access(catalog, os.W_OK))

    def _connect(self, recover: bool) -> sqlite3.Connection:
        """Open the catalog: read-write with WAL, or read-only where the library cannot be written."""
        path = self._catalog_path
        if self.storage.local_path("") is not None:  # SQLite follows links: none may lead out of the library
            for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
                self.storage.local_path(CATALOG_FILE + suffix)
        if not self._writable():
            self.read_only = True
            return self._connect_read_only(path)
        try:
            conn = self._fresh_catalog()
            conn.execute("SELECT name, folder, metadata, checksums FROM experts LIMIT 1").fetchall()
            return conn
        except sqlite3.DatabaseError as e:
            if not isinstance(e, sqlite3.OperationalError):
                return self._catalog_damaged(e, recover)
            if "readonly" in str(e) or "unable to open" in str(e):
                self.read_only = True
                return self._connect_read_only(path)
            if "locked" in str(e):
                raise LibraryLockedError(
                    f"{self.url}: the catalog is locked by another process ({e}); wait for it and retry."
                ) from None
            return self._catalog_damaged(e, recover)

    def _connect_read_only(self, path: str) -> sqlite3.Connection:
        if not Path(path).exists():  # nothing to read: an in-memory catalog, rebuilt from the experts' JSON
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            conn.executescript(_SCHEMA)
            return conn
        last: Exception | None = None
        for query in ("mode=ro", "immutable=1"):  # immutable: a WAL catalog on a read-only file system
            try:
                conn = sqlite3.connect(
                    f"{Path(path).as_uri()}?{query}", uri=True, isolation_level=None, check_same_thread=False
                )
                conn.execute("SELECT name, folder, metadata, checksums FROM experts LIMIT 1").fetchall()
                return conn
            except sqlite3.DatabaseError as e:
                last = e
        raise LibraryError(
            f"{self.url}: the catalog {path} cannot be read ({last}); the library is read-only here, so it cannot "
            "be repaired in place: copy the library somewhere writable and run `moerge library verify COPY --repair`."
        )

    def _fresh_catalog(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._catalog_path, timeout=lock_timeout(), isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        return conn

    def _catalog_damaged(self, e: Exception, recover: bool) -> sqlite3.Connection:
        if self.storage.local_path("") is None:  # a remote library's catalog is a local cache: start it again
            for suffix in ("", "-wal", "-shm"):
                Path(self._catalog_path + suffix).unlink(missing_ok=True)
            return self._fresh_catalog()
        if not recover:
            raise LibraryError(
                f"{self.url}: the catalog {self._catalog_path} is damaged ({e}); run "
                f"`moerge library verify {self.url} --repair` to rebuild it from the experts' own files."
            ) from None
        # move the damaged catalog (and its WAL files) aside, never delete it, and start an empty one
        stamp = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.storage.makedirs(QUARANTINE)
        qdir = self.storage.local_path(QUARANTINE)
        for suffix in ("", "-wal", "-shm"):
            if self.storage.exists(CATALOG_FILE + suffix):
                self.storage.rename(CATALOG_FILE + suffix, f"{QUARANTINE}/{CATALOG_FILE}{suffix}.{stamp}")
        self.recovered_catalog = str(qdir)
        return self._fresh_catalog()

    def _sync_remote_catalog(self) -> None:
        """Rebuild the local catalog cache of a remote library from its experts' metadata files."""
        with self._write() as c:
            c.execute("DELETE FROM experts")
            c.execute("DELETE FROM tags")
            seen: dict[str, str] = {}
            for folder in self.storage.listdir("experts"):
                record = self._folder_record(folder)
                if record is None:
                    continue  # a half-written or foreign folder: invisible (verify reports it)
                md = record.metadata
                if md.name in seen and seen[md.name] >= md.created_at:
                    continue  # two folders claim one name: the newer wins, verify reports the other
                if md.name in seen:
                    c.execute("DELETE FROM experts WHERE name=?", (md.name,))
                    c.execute("DELETE FROM tags WHERE name=?", (md.name,))
                seen[md.name] = md.created_at
                self._insert_row(c, md, folder, dict(record.checksums))

    # ------------------------------------------------------------------ locking
    def _lock_path(self) -> str:
        return self._catalog_path + ".lock"

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """The library's write lock (an ``flock`` across processes), waiting at most `lock_timeout` seconds."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: SQLite's own lock serialises writers
            yield
            return
        try:
            fd = os.open(self._lock_path(), os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise LibraryError(f"{self.url}: cannot open the lock file {self._lock_path()} ({e}).") from None
        deadline = time.monotonic() + lock_timeout()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LibraryLockedError(self._locked_message(fd)) from None
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _locked_message(self, fd: int) -> str:
        try:
            pid = int(os.pread(fd, 32, 0).decode().strip() or "0")
        except (OSError, ValueError):
            pid = 0
        holder = f"process {pid}" if pid else "another process"
        state = "" if not pid or _pid_alive(str(pid)) else " (which has exited: retry)"
        return (
            f"{self.url}: the library is locked by {holder}{state}; waited {lock_timeout():g} s. Wait for it to "
            f"finish (or stop it if it hangs: kill {pid or 'PID'}) and retry; MOERGE_LOCK_TIMEOUT sets the wait."
        )

    def _require_writable(self) -> None:
        if self.read_only:
            raise LibraryError(
                f"{self.url}: the library is read-only here (no write permission); it can be listed, shown, "
                "verified and exported, not changed. Copy it somewhere writable to change it."
            )

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the library's lock (across processes)."""
        self._require_writable()
        with self._lock():
            c = self._conn
            try:
                c.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise LibraryLockedError(
                    f"{self.url}: the catalog is locked ({e}); another program holds it. Retry when it is done."
                ) from None
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            else:
                c.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM experts").fetchone()[0]

    def __contains__(self, name: object) -> bool:
        return self._row(str(name)) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"ExpertLibrary({self.url!r}, experts={len(self)})"

    def _row(self, name: str) -> tuple | None:
        return self._conn.execute(
            "SELECT folder, metadata, checksums FROM experts WHERE name=?", (name,)
        ).fetchone()

    def _require(self, name: str) -> tuple:
        row = self._row(name)
        if row is None:
            close = [n for n in self.names() if fnmatch.fnmatch(n, f"*{name}*")][:5]
            hint = (
                f" Did you mean: {', '.join(close)}?"
                if close
                else " `moerge library list` shows what is there."
            )
            raise ExpertNotFoundError(f"{self.url}: no expert named {name!r}.{hint}")
        return row

    def _damaged_row(self, name: str, what: str) -> LibraryError:
        return LibraryError(
            f"{self.url}: the catalog row of {name!r} {what}; the catalog was edited or damaged. Run "
            f"`moerge library verify {self.url} --repair` to rebuild it from the experts' own files."
        )

    def _expert_rel(self, folder: object, name: str) -> str:
        """``experts/<folder>`` for a folder name read from the catalog; `UnsafePathError` for anything else."""
        if not isinstance(folder, str) or not _FOLDER.match(folder):
            raise UnsafePathError(
                f"{self.url}: the catalog row of {name!r} names the folder {folder!r}, which is not a folder inside "
                f"experts/; nothing was read, written or deleted there. Run `moerge library verify {self.url} "
                "--repair` to rebuild the catalog from the experts' own files."
            )
        rel = f"experts/{folder}"
        self.storage.exists(rel)  # resolves it: a symlink leading out of the library is refused here
        return rel

    def _parse_checksums(self, raw: object, name: str) -> dict[str, str]:
        try:
            sums = json.loads(raw) if isinstance(raw, str) else None
        except (ValueError, RecursionError):
            sums = None
        if (
            not isinstance(sums, dict)
            or not sums
            or any(
                k not in EXPERT_FILES or not isinstance(v, str) or not _SHA256.match(v)
                for k, v in sums.items()
            )
        ):
            raise self._damaged_row(
                name, f"holds checksums {str(raw)[:80]!r} for files an expert does not have"
            )
        return sums

    def _parse_metadata(self, raw: object, name: str) -> ExpertMetadata:
        try:
            md = ExpertMetadata.model_validate_json(raw if isinstance(raw, (str, bytes)) else "null")
        except ValidationError as e:
            raise self._damaged_row(name, f"holds invalid metadata ({explain(e, limit=1)})") from None
        if md.name != name:
            raise self._damaged_row(name, f"holds the metadata of {md.name!r}")
        return md

    def _entry(self, name: str) -> _Entry:
        folder, meta_json, checksums = self._require(name)
        rel = self._expert_rel(folder, name)
        if not self.storage.exists(rel):
            raise LibraryError(
                f"{self.url}: the folder of expert {name!r} ({rel}) is missing; remove the expert "
                f"(`moerge library rm {self.url} {name}`) or run `moerge library verify {self.url} --repair`."
            )
        return _Entry(
            name, folder, rel, self._parse_metadata(meta_json, name), self._parse_checksums(checksums, name)
        )

    def list(
        self,
        task: str | None = None,
        tag: str | None = None,
        base_model: str | None = None,
        kind: str | None = None,
        name: str | None = None,
    ) -> list[ExpertMetadata]:
        """Experts' metadata, sorted by name, filtered by task, tag, base model, kind or a name glob."""
        sql = "SELECT name, metadata FROM experts"
        where, args = ["typeof(name) = 'text'"], []
        for col, val in (("task", task), ("base_model", base_model), ("kind", kind)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if tag is not None:
            where.append("name IN (SELECT name FROM tags WHERE tag = ?)")
            args.append(tag)
        if name is not None:
            where.append("name GLOB ?")
            args.append(name)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY name"
        return [self._parse_metadata(r[1], r[0]) for r in self._conn.execute(sql, args)]

    def names(self, **filters: Any) -> list[str]:
        if not filters:
            return [
                r[0]
                for r in self._conn.execute(
                    "SELECT name FROM experts WHERE typeof(name)='text' ORDER BY name"
                )
            ]
        return [m.name for m in self.list(**filters)]

    def tasks(self) -> list[str]:
        return [
            r[0]
            for r in self._conn.execute(
                "SELECT DISTINCT task FROM experts WHERE task IS NOT NULL ORDER BY task"
            )
        ]

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """``{module: (d_in, d_out)}`` of every module the experts adapt, as recorded by the adds (a dense
        delta's parameter reads ``(numel, 0)``)."""
        rows = self._conn.execute("SELECT module, d_in, d_out FROM modules ORDER BY module")
        return {m: (int(i), int(o)) for m, i, o in rows}

    def get_metadata(self, name: str) -> ExpertMetadata:
        return self._parse_metadata(self._require(name)[1], name)

    def _stat_key(self, rel: str) -> tuple[str, int, int, int] | None:
        local = self.storage.local_path(rel)
        if local is None:
            return None
        try:
            st = local.stat()
        except OSError:
            return None
        return (str(local), st.st_size, st.st_mtime_ns, st.st_ino)

    def _read_checked(self, entry: _Entry, fname: str) -> bytes:
        """An expert file's bytes, checked against the catalog's checksum (skipped when this process already
        checked the file and its size, mtime and inode are unchanged)."""
        rel = f"{entry.rel}/{check_name(fname, self.url)}"
        digest = entry.checksums.get(fname)
        if digest is None:
            raise self._damaged_row(entry.name, f"has no checksum for {fname}")
        before = self._stat_key(rel)
        try:
            data = self.storage.read_bytes(rel)
        except FileNotFoundError:
            raise LibraryError(
                f"{self.url}: expert {entry.name!r}: {rel} is missing; restore it or remove the expert "
                f"(`moerge library rm {self.url} {entry.name}`)."
            ) from None
        if before is not None and _VERIFIED.get(before) == digest and self._stat_key(rel) == before:
            return data
        if _sha256(data) != digest:
            raise ChecksumMismatchError(
                f"{self.url}: expert {entry.name!r}: {rel} does not match its checksum (corrupted or edited since it "
                f"was added). Run `moerge library verify {self.url}`, then restore the file or re-add the expert."
            )
        if before is not None and self._stat_key(rel) == before:
            _VERIFIED[before] = digest
        return data

    def get(self, name: str) -> Expert:
        """Load an expert's weights and metadata (its files checked against their checksums)."""
        from moerge.experts.expert import Expert
        from moerge.experts.peft_io import load_safetensors, lora_modules_from_peft

        entry = self._entry(name)
        md = entry.metadata
        where = f"{self.url}/{entry.rel}"
        if md.kind == "dense":
            dense = load_safetensors(self._read_checked(entry, DENSE_WEIGHTS), f"{where}/{DENSE_WEIGHTS}")
            expert = Expert(metadata=md, dense=dense)
        else:
            config = parse_json_bytes(self._read_checked(entry, ADAPTER_CONFIG), f"{where}/{ADAPTER_CONFIG}")
            weights = load_safetensors(
                self._read_checked(entry, ADAPTER_WEIGHTS), f"{where}/{ADAPTER_WEIGHTS}"
            )
            lora = lora_modules_from_peft(config, weights, source=f"{where}/{ADAPTER_CONFIG}")
            carried = {k: config[k] for k in ("task_type", "base_model_name_or_path") if config.get(k)}
            expert = Expert(metadata=md, lora=lora, peft_config=carried)
        expert.check(f"{self.url}: expert {name!r}")
        return expert

    def ref(self, name: str) -> ExpertRef:
        """The expert ``name`` without loading its weights (`ExpertRef`)."""
        return ExpertRef(self, self.get_metadata(name))

    def refs(self, names: Sequence[str] | None = None) -> list[ExpertRef]:
        """`ExpertRef` of ``names`` (default: every expert), from the catalog alone."""
        if names is None:
            return [ExpertRef(self, md) for md in self.list()]
        return [self.ref(n) for n in names]

    def get_many(self, names: list[str] | None = None) -> list[Expert]:
        return [self.get(n) for n in (names if names is not None else self.names())]

    # ------------------------------------------------------------------ adding
    def add(
        self,
        expert: Expert,
        overwrite: bool = False,
        source: str | None = None,
        admission: AdmissionReport | None = None,
    ) -> ExpertMetadata:
        """Validate and add an expert atomically. Refuses a taken name unless ``overwrite``.

        A library with an admission policy refuses an add without an ``admission`` report (made by
        `moerge.train.screen.admit_expert`, which then calls this); the report is stored in the expert's
        metadata (``extra["admission"]``) and logged in the catalog in the same transaction."""
        return self.add_many([expert], overwrite=overwrite, sources=[source], admissions=[admission])[0]

    def add_many(
        self,
        experts: Sequence[Expert],
        overwrite: bool = False,
        sources: Sequence[str | None] | None = None,
        admissions: Sequence[AdmissionReport | None] | None = None,
    ) -> list[ExpertMetadata]:
        """Validate and add several experts in one transaction: all of them land, or none does.

        Every expert gets the checks `add` makes (weights, metadata, base model, module shapes — also against
        each other), all are staged, then one write transaction moves each folder into ``experts/`` and commits
        their rows together; a failure (or a kill) anywhere leaves the library as it was. Much faster than one
        `add` per expert for thousands of experts (one lock, one commit, one fsync of the catalog)."""
        experts = list(experts)
        where_of = [
            (sources[i] if sources is not None and i < len(sources) else None) or f"expert {e.name!r}"
            for i, e in enumerate(experts)
        ]
        reports = list(admissions) if admissions is not None else [None] * len(experts)
        for j, (expert, where, admission) in enumerate(zip(experts, where_of, reports, strict=True)):
            experts[j] = self._with_admission(expert, where, admission)
        seen: dict[str, str] = {}
        batch_dims: dict[str, tuple[int, int]] = {}
        first_base: tuple[str, str] | None = None  # a library without a base adopts the batch's first
        for expert, where in zip(experts, where_of, strict=True):
            self._validate_new(expert, where, overwrite, batch_dims)
            fp = expert.metadata.base_fingerprint
            if self.base_fingerprint is None and fp:
                first_base = first_base or (fp, where)
                if fp != first_base[0]:
                    raise BaseModelMismatchError(
                        f"{where}: trained on another base model (fingerprint {fp}) than {first_base[1]} "
                        f"({first_base[0]}) in the same add; a library holds experts of one base model."
                    )
            if expert.name in seen:
                raise ExpertExistsError(
                    f"{where}: the name {expert.name!r} is given twice in one add ({seen[expert.name]} too); "
                    "give each expert its own name."
                )
            seen[expert.name] = where
        if not experts:
            return []
        self._require_writable()
        batch = f".staging/{os.getpid()}-{uuid.uuid4().hex[:8]}"
        deferred = getattr(self.storage, "deferred_sync", None)
        with deferred() if deferred is not None and len(experts) > 1 else contextlib.nullcontext():
            return self._add_staged(experts, where_of, overwrite, batch, reports)

    def _with_admission(self, expert: Expert, where: str, admission: AdmissionReport | None) -> Expert:
        """The expert with its admission report in its metadata; refused without one under a policy."""
        if admission is None and self.info.get("admission") is not None:
            raise AdmissionRequiredError(
                f"{self.url}: the library has an admission policy, so {where} must pass it: add with "
                f"`moerge library add {self.url} SOURCE --eval EVAL.jsonl` (or moerge.train.screen.admit_expert)."
            )
        if admission is None:
            return expert
        if not admission.admitted or admission.expert != expert.name:
            raise AdmissionRefusedError(
                f"{where}: the admission report is for {admission.expert!r} and says {admission.decision!r}; "
                "only an admitted expert is added."
            )
        extra = {**expert.metadata.extra, "admission": admission.model_dump(mode="json")}
        return dataclasses.replace(expert, metadata=expert.metadata.model_copy(update={"extra": extra}))

    def _add_staged(
        self,
        experts: list[Expert],
        where_of: list[str],
        overwrite: bool,
        batch: str,
        reports: list[AdmissionReport | None],
    ) -> list[ExpertMetadata]:
        # (expert, staged folder, final folder, checksums, where)
        planned: list[tuple[Expert, str, str, dict[str, str], str]] = []
        try:
            for i, (expert, where) in enumerate(zip(experts, where_of, strict=True)):
                files = self._serialise(expert)
                checksums = {fname: _sha256(data) for fname, data in files.items()}
                files[METADATA_FILE] = json.dumps(
                    {
                        "format": FORMAT_VERSION,
                        "metadata": expert.metadata.model_dump(mode="json"),
                        "checksums": checksums,
                    },
                    indent=2,
                ).encode()
                staged = f"{batch}/{i}"
                for fname, data in files.items():
                    self.storage.write_bytes(f"{staged}/{fname}", data)
                planned.append((expert, staged, f"{expert.name}-{uuid.uuid4().hex[:8]}", checksums, where))
            self._sync()  # every staged file durable before any is moved into place
        except BaseException:
            self.storage.delete(batch)
            raise
        replaced: list[tuple[str, str]] = []  # (old folder, name) of overwritten experts
        try:
            with self._write() as c:
                for (expert, staged, folder, checksums, where), admission in zip(
                    planned, reports, strict=True
                ):
                    row = c.execute("SELECT folder FROM experts WHERE name=?", (expert.name,)).fetchone()
                    if row is not None and not overwrite:
                        raise ExpertExistsError(
                            f"{self.url}: an expert named {expert.name!r} was added meanwhile ({where}); pass "
                            "overwrite=True."
                        )
                    if row is not None:
                        replaced.append((self._expert_rel(row[0], expert.name).split("/", 1)[1], expert.name))
                    self._move_into_place(staged, f"experts/{folder}")
                    if row is not None:
                        c.execute("DELETE FROM tags WHERE name=?", (expert.name,))
                        c.execute("DELETE FROM experts WHERE name=?", (expert.name,))
                    self._insert_row(c, expert.metadata, folder, checksums)
                    self._record_module_shapes(c, expert, where)
                    if admission is not None:
                        self.log_admission(admission, c)
                    if self.base_fingerprint is None and expert.metadata.base_fingerprint:
                        self._adopt_base(expert.metadata)
                self._sync()  # the renames durable before the rows commit
        except BaseException:
            self.storage.delete(batch)
            for _, _, folder, _, _ in planned:
                if not self._folder_referenced(folder):
                    self.storage.delete(f"experts/{folder}")
            replaced = []
            raise
        self.storage.delete(batch)
        for old, name in replaced:
            self._discard_folder(old, name)
            self._drop_artifacts(name)
        return [e.metadata for e in experts]

    def _sync(self) -> None:
        sync = getattr(self.storage, "sync", None)
        if sync is not None:
            sync()

    def _validate_new(
        self, expert: Expert, where: str, overwrite: bool, batch_dims: dict[str, tuple[int, int]]
    ) -> None:
        """The checks an add makes before writing anything; ``batch_dims`` carries the module shapes of the
        experts validated before this one in the same add."""
        expert.check(where)
        try:  # what is stored must read back as it was written
            ExpertMetadata.model_validate_json(expert.metadata.model_dump_json())
        except (ValidationError, ValueError, TypeError) as e:
            raise MalformedConfigError(
                f"{where}: the expert's metadata cannot be stored as JSON ({e})."
            ) from None
        self._check_base(expert, where)
        self._check_module_shapes(expert, where, batch_dims)
        for module, lm in expert.lora.items():
            batch_dims.setdefault(module, (lm.d_in, lm.d_out))
        if not overwrite and expert.name in self:
            raise ExpertExistsError(
                f"{self.url}: an expert named {expert.name!r} already exists ({where}); choose another name or "
                "pass overwrite=True (--overwrite)."
            )

    def add_peft(
        self,
        folder: str | Path,
        name: str | None = None,
        task: str | None = None,
        overwrite: bool = False,
        **metadata: Any,
    ) -> ExpertMetadata:
        """Import a PEFT LoRA adapter folder (safetensors only)."""
        from moerge.experts.peft_io import read_peft_folder

        expert = read_peft_folder(folder, name=name, task=task, **metadata)
        return self.add(expert, overwrite=overwrite, source=str(folder))

    def add_folder(
        self, folder: str | Path, overwrite: bool = False, **metadata: Any
    ) -> list[ExpertMetadata]:
        """Import every PEFT adapter folder directly under ``folder`` (named after its sub-folder)."""
        from moerge.experts.peft_io import is_peft_folder, read_peft_folder, refuse_pickles

        folder = Path(folder)
        if not folder.is_dir():
            raise InputNotFoundError(f"{folder}: no such folder")
        subs = sorted(
            p for p in folder.iterdir() if p.is_dir() and (is_peft_folder(p) or (p / DENSE_WEIGHTS).exists())
        )
        if not subs:
            if is_peft_folder(folder):
                return [self.add_peft(folder, overwrite=overwrite, **metadata)]
            for p in sorted(folder.iterdir()):
                if p.is_dir():
                    refuse_pickles(p)
            raise MalformedConfigError(
                f"{folder}: holds no PEFT adapter folders (sub-folders with {ADAPTER_CONFIG})."
            )
        experts = [read_peft_folder(p, **metadata) for p in subs]  # validate all before adding any
        return [self.add(e, overwrite=overwrite, source=str(p)) for e, p in zip(experts, subs)]

    def _serialise(self, expert: Expert) -> dict[str, bytes]:
        from safetensors.torch import save

        from moerge.experts.peft_io import peft_config_for, peft_state_dict_for

        if expert.kind == "dense":
            return {
                DENSE_WEIGHTS: save({k: v.contiguous() for k, v in expert.dense.items()}, {"format": "pt"})
            }
        config = peft_config_for(expert)
        return {
            ADAPTER_CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
            ADAPTER_WEIGHTS: save(peft_state_dict_for(expert), {"format": "pt"}),
        }

    def _move_into_place(self, staging: str, final: str) -> None:
        self.storage.rename(staging, final)

    def _folder_referenced(self, folder: str) -> bool:
        return self._conn.execute("SELECT 1 FROM experts WHERE folder=?", (folder,)).fetchone() is not None

    def _insert_row(self, c: sqlite3.Connection, md: ExpertMetadata, folder: str, checksums: dict) -> None:
        c.execute(
            "INSERT INTO experts VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                md.name,
                folder,
                md.kind,
                md.task,
                md.domain,
                md.base_model,
                md.base_fingerprint,
                md.created_at,
                md.model_dump_json(),
                json.dumps(checksums),
            ),
        )
        c.executemany("INSERT OR IGNORE INTO tags VALUES (?,?)", [(md.name, t) for t in md.tags])

    def _check_base(self, expert: Expert, where: str) -> None:
        fp = expert.metadata.base_fingerprint
        if self.base_fingerprint and fp and fp != self.base_fingerprint:
            raise BaseModelMismatchError(
                f"{where}: trained on another base model (fingerprint {fp}, base {expert.metadata.base_model!r}); "
                f"this library holds experts for {self.base_model or 'another base'} ({self.base_fingerprint}). "
                "Add it to a library for its own base model."
            )

    def _adopt_base(self, md: ExpertMetadata) -> None:
        self.info["base_fingerprint"] = md.base_fingerprint
        self.info["base_model"] = self.info.get("base_model") or md.base_model
        self.storage.write_bytes(LIBRARY_FILE, json.dumps(self.info, indent=2).encode())

    def record_base_shapes(self, shapes_or_folder: dict[str, list[int]] | str | Path) -> None:
        """Record the base model's tensor shapes (a dict, or a transformers folder read with `base_shapes_of`):
        from then on every add checks that each module exists in the base with a fitting shape."""
        shapes = shapes_or_folder if isinstance(shapes_or_folder, dict) else base_shapes_of(shapes_or_folder)
        with self._write():
            self.info["base_shapes"] = {k: [int(d) for d in v] for k, v in shapes.items()}
            self.storage.write_bytes(LIBRARY_FILE, json.dumps(self.info, indent=2).encode())

    def _check_module_shapes(
        self, expert: Expert, where: str, batch_dims: dict[str, tuple[int, int]] | None = None
    ) -> None:
        base = self.base_shapes
        if base:
            self._check_against_base(expert, where, base)
            return
        stored = {m: (i, o) for m, i, o in self._conn.execute("SELECT module, d_in, d_out FROM modules")}
        known = {**(batch_dims or {}), **stored}
        for module, lm in expert.lora.items():
            if module in known and known[module] != (lm.d_in, lm.d_out):
                raise ShapeMismatchError(
                    f"{where}: module {module} maps {lm.d_in}→{lm.d_out} features, but this library's experts map "
                    f"{known[module][0]}→{known[module][1]} there; the adapter was made for a different model."
                )
        for param, t in expert.dense.items():
            if param in known and known[param] != (t.numel(), 0):
                raise ShapeMismatchError(
                    f"{where}: dense delta {param} has a different shape from the library's."
                )
        mine = set(expert.lora) | set(expert.dense)
        if known and not (mine & set(known)):
            roots = {m.split(".", 1)[0] for m in known}
            if not {m.split(".", 1)[0] for m in mine} & roots:
                raise ShapeMismatchError(
                    f"{where}: none of its modules ({sorted(mine)[0]} …) is under {', '.join(sorted(roots))}, where "
                    "this library's experts adapt the base model; it was made for another model. If it is for the "
                    "same base, record the base's shapes (`moerge library init LIB --base-model FOLDER`, or "
                    "lib.record_base_shapes(FOLDER)) and add it again."
                )

    def _check_against_base(self, expert: Expert, where: str, base: dict[str, list[int]]) -> None:
        hint = "the adapter was made for another base model; add it to a library for its own base."
        for module, lm in sorted(expert.lora.items()):
            shape = base.get(f"{module}.weight")
            if shape is None:
                raise ShapeMismatchError(
                    f"{where}: module {module} does not exist in this library's base model "
                    f"({self.base_model or 'recorded shapes'}); {hint}"
                )
            want = list(lm.weight_shape)
            layout = " (embedding)" if lm.embedding else " (fan_in_fan_out)" if lm.fan_in_fan_out else ""
            if list(shape) != want:
                raise ShapeMismatchError(
                    f"{where}: module {module}: the base weight has shape {tuple(shape)}, the LoRA gives "
                    f"{tuple(want)}{layout}; {hint}"
                )
        for param, t in sorted(expert.dense.items()):
            shape = base.get(param)
            if shape is None or list(shape) != list(t.shape):
                got = "does not exist" if shape is None else f"has shape {tuple(shape)}"
                raise ShapeMismatchError(
                    f"{where}: dense delta {param} {tuple(t.shape)}: the base tensor {got}; {hint}"
                )

    def _record_module_shapes(self, c: sqlite3.Connection, expert: Expert, where: str) -> None:
        rows = [(m, lm.d_in, lm.d_out) for m, lm in expert.lora.items()]
        rows += [(p, t.numel(), 0) for p, t in expert.dense.items()]
        c.executemany("INSERT OR IGNORE INTO modules VALUES (?,?,?)", rows)

    # ------------------------------------------------------------------ changing
    def rename(self, old: str, new: str) -> None:
        """Rename an expert (its artifacts follow)."""
        entry = self._entry(old)
        md = entry.metadata.model_copy(update={"name": new})
        try:
            md = ExpertMetadata(**md.model_dump())
        except ValidationError as e:
            raise MalformedConfigError(f"invalid expert name {new!r}: {e.errors()[0]['msg']}") from e
        with self._write() as c:
            if c.execute("SELECT 1 FROM experts WHERE name=?", (new,)).fetchone():
                raise ExpertExistsError(f"{self.url}: an expert named {new!r} already exists.")
            c.execute("UPDATE experts SET name=?, metadata=? WHERE name=?", (new, md.model_dump_json(), old))
            c.execute("UPDATE tags SET name=? WHERE name=?", (new, old))
            self._write_metadata_file(entry.rel, md, entry.checksums)
        self._move_artifacts(old, new)

    def update_metadata(self, name: str, **fields: Any) -> ExpertMetadata:
        """Change metadata fields (task, tags, scores, …); not the name (use `rename`)."""
        if "name" in fields or "kind" in fields:
            raise MalformedConfigError("use rename() to change a name; the kind of an expert cannot change.")
        entry = self._entry(name)
        current = entry.metadata.model_dump()
        current.update(fields)
        try:
            md = ExpertMetadata(**current)
        except ValidationError as e:
            raise MalformedConfigError(f"invalid metadata for {name!r}: {e.errors()[0]['msg']}") from e
        with self._write() as c:
            c.execute(
                "UPDATE experts SET task=?, domain=?, base_model=?, metadata=? WHERE name=?",
                (md.task, md.domain, md.base_model, md.model_dump_json(), name),
            )
            c.execute("DELETE FROM tags WHERE name=?", (name,))
            c.executemany("INSERT INTO tags VALUES (?,?)", [(name, t) for t in md.tags])
            self._write_metadata_file(entry.rel, md, entry.checksums)
        return md

    def _write_metadata_file(self, rel: str, md: ExpertMetadata, checksums: dict) -> None:
        blob = {"format": FORMAT_VERSION, "metadata": md.model_dump(mode="json"), "checksums": checksums}
        self.storage.write_bytes(f"{rel}/{METADATA_FILE}", json.dumps(blob, indent=2).encode())

    def remove(self, name: str) -> None:
        """Remove an expert and its artifacts."""
        folder = self._require(name)[0]
        self._expert_rel(folder, name)  # refuse a row naming anything but a folder in experts/
        with self._write() as c:
            c.execute("DELETE FROM experts WHERE name=?", (name,))
            c.execute("DELETE FROM tags WHERE name=?", (name,))
        self._discard_folder(folder, name)
        self._drop_artifacts(name)

    def _discard_folder(self, folder: str, name: str) -> None:
        """Delete ``experts/<folder>`` once no row uses it — only if it is ``name``'s (its own JSON says so, or
        it has none); a folder holding another expert is left for `verify --repair` to account for."""
        if self._folder_referenced(folder):
            return
        record = self._folder_record(folder)
        if record is not None and record.metadata.name != name:
            return
        self.storage.delete(f"experts/{folder}")

    # ------------------------------------------------------------------ checking & exporting
    def _folder_record(self, folder: str):
        """The validated ``moerge_expert.json`` of ``experts/<folder>``, or None (missing, foreign, invalid)."""
        if not _FOLDER.match(folder):
            return None
        try:
            raw = self.storage.read_bytes(f"experts/{folder}/{METADATA_FILE}")
            return parse_expert_record(parse_json_bytes(raw, METADATA_FILE), METADATA_FILE)
        except (OSError, MoergeError):
            return None

    def _inspect_folder(self, folder: str) -> tuple[Any, str | None]:
        """``(record, None)`` for a complete expert folder (valid JSON, files matching it), else ``(record or
        None, why not)``."""
        if not _FOLDER.match(folder):
            return None, "not a folder name moerge writes"
        record = self._folder_record(folder)
        if record is None:
            return None, f"no valid {METADATA_FILE}"
        for fname, digest in record.checksums.items():
            try:
                data = self.storage.read_bytes(f"experts/{folder}/{fname}")
            except (OSError, MoergeError):
                return record, f"{fname} is missing"
            if _sha256(data) != digest:
                return record, f"{fname} does not match its checksum"
        return record, None

    def verify(self, repair: bool = False) -> VerifyReport:
        """Check every expert's files against its checksums, and what else is in ``experts/`` and ``.staging/``.

        With ``repair``: catalog rows naming unsafe or missing folders are dropped, rows that disagree with an
        intact expert folder are rebuilt from its JSON, complete experts missing from the catalog are added back,
        other unaccounted-for folders are moved to ``quarantine/`` (never deleted), and staging folders of dead
        processes are removed. The returned report is the state after repairing, with ``repaired`` listing what
        was done."""
        if repair:
            actions = self._repair()
            report = self.verify()
            report.repaired = actions
            return report
        report = VerifyReport()
        referenced: set[str] = set()
        rows = self._conn.execute(
            "SELECT name, folder, metadata, checksums FROM experts ORDER BY name"
        ).fetchall()
        for name, folder, meta_json, checksums in rows:
            report.checked += 1
            if not isinstance(name, str):
                report.problems.append(f"a catalog row has no valid name ({name!r}); --repair drops it")
                continue
            try:
                rel = self._expert_rel(folder, name)
                referenced.add(folder)
                self._parse_metadata(meta_json, name)
                sums = self._parse_checksums(checksums, name)
            except MoergeError as e:
                report.problems.append(f"{name}: {e}")
                continue
            record = self._folder_record(folder)
            if record is not None and record.metadata.name != name:
                report.problems.append(
                    f"{name}: the catalog row names {rel}, which holds expert {record.metadata.name!r} "
                    "(--repair drops the row)"
                )
                continue
            for fname, digest in sums.items():
                try:
                    data = self.storage.read_bytes(f"{rel}/{fname}")
                except (FileNotFoundError, NotADirectoryError):
                    report.problems.append(f"{name}: {rel}/{fname} is missing")
                    continue
                except (OSError, MoergeError) as e:
                    report.problems.append(f"{name}: {rel}/{fname} cannot be read ({e})")
                    continue
                if _sha256(data) != digest:
                    report.problems.append(
                        f"{name}: {rel}/{fname} does not match its checksum (corrupted or edited)"
                    )
        catalogued = {r[0] for r in rows}
        for folder in self.storage.listdir("experts"):
            if folder in referenced:
                continue
            record, why = self._inspect_folder(folder)
            if why is None and record.metadata.name not in catalogued:
                report.leftovers.append(
                    f"experts/{folder}: a complete expert {record.metadata.name!r} missing from the catalog "
                    "(--repair adds it back)"
                )
            elif why is None:
                report.leftovers.append(
                    f"experts/{folder}: a copy of {record.metadata.name!r} the catalog does not use "
                    "(--repair moves it to quarantine/)"
                )
            else:
                report.leftovers.append(f"experts/{folder}: {why} (--repair moves it to quarantine/)")
        report.leftovers += [f".staging/{s}" for s in self.storage.listdir(".staging")]
        return report

    def _repair(self) -> list[str]:
        actions: list[str] = []
        with self._write() as c:
            for (rowid,) in c.execute("SELECT rowid FROM experts WHERE typeof(name) != 'text'").fetchall():
                c.execute("DELETE FROM experts WHERE rowid=?", (rowid,))
                actions.append(f"dropped a catalog row without a valid name (row {rowid})")
            rows = c.execute("SELECT name, folder, metadata, checksums FROM experts ORDER BY name").fetchall()
            for name, folder, meta_json, checksums in rows:
                try:
                    rel = self._expert_rel(folder, name)
                except UnsafePathError:
                    self._drop_row(c, name)
                    actions.append(
                        f"dropped the catalog row of {name!r}: it named {folder!r}, outside experts/"
                    )
                    continue
                if not self.storage.exists(rel):
                    self._drop_row(c, name)
                    actions.append(f"dropped the catalog row of {name!r}: its folder {rel} is gone")
                    continue
                row_sums = self._row_checksums_if_valid(name, meta_json, checksums)
                if row_sums is not None and self._files_match(rel, row_sums):
                    record = self._folder_record(folder)
                    if record is not None and record.metadata.name != name:
                        self._drop_row(c, name)  # the folder is another expert's, by its own JSON
                        actions.append(
                            f"dropped the catalog row of {name!r}: {rel} holds expert {record.metadata.name!r}"
                        )
                        continue
                    if record is None or dict(record.checksums) != row_sums:
                        md = self._parse_metadata(meta_json, name)
                        self._write_metadata_file(rel, md, row_sums)
                        actions.append(f"rewrote {rel}/{METADATA_FILE} from the catalog row of {name!r}")
                    continue
                record, why = self._inspect_folder(folder)
                if why is None and record.metadata.name == name:
                    self._drop_row(c, name)
                    self._insert_row(c, record.metadata, folder, dict(record.checksums))
                    actions.append(f"rebuilt the catalog row of {name!r} from {rel}/{METADATA_FILE}")
                elif why is None:  # the folder holds another expert: the row is wrong
                    self._drop_row(c, name)
                    actions.append(
                        f"dropped the catalog row of {name!r}: {rel} holds expert {record.metadata.name!r}"
                    )
                # else: the expert's files are damaged; nothing to rebuild them from (verify reports it)
            referenced = {r[0] for r in c.execute("SELECT folder FROM experts")}
            orphans = [f for f in self.storage.listdir("experts") if f not in referenced]
            self._adopt_orphans(c, orphans, actions)
            for s in self.storage.listdir(".staging"):
                pid = s.split("-", 1)[0]
                if pid.isdigit() and _pid_alive(pid):
                    continue
                with contextlib.suppress(UnsafePathError):
                    self.storage.delete(f".staging/{s}")
                    actions.append(f"removed .staging/{s} (an interrupted add)")
        return actions

    def _row_checksums_if_valid(
        self, name: str, meta_json: object, checksums: object
    ) -> dict[str, str] | None:
        try:
            self._parse_metadata(meta_json, name)
            return self._parse_checksums(checksums, name)
        except MoergeError:
            return None

    def _files_match(self, rel: str, sums: dict[str, str]) -> bool:
        for fname, digest in sums.items():
            try:
                if _sha256(self.storage.read_bytes(f"{rel}/{fname}")) != digest:
                    return False
            except (OSError, MoergeError):
                return False
        return True

    def _drop_row(self, c: sqlite3.Connection, name: str) -> None:
        c.execute("DELETE FROM experts WHERE name=?", (name,))
        c.execute("DELETE FROM tags WHERE name=?", (name,))

    def _adopt_orphans(
        self, c: sqlite3.Connection, folders: list[str] | None, actions: list[str] | None = None
    ) -> None:
        """Add complete expert folders missing from the catalog back into it (newest first per name); move every
        other unaccounted-for folder to quarantine (when ``actions`` is given, i.e. while repairing)."""
        if not folders:
            referenced = {r[0] for r in c.execute("SELECT folder FROM experts")}
            folders = [f for f in self.storage.listdir("experts") if f not in referenced]
        found = []
        for folder in folders:
            record, why = self._inspect_folder(folder)
            if why is None and self._loads(folder, record):
                found.append((record.metadata.created_at, folder, record))
            elif actions is not None:
                self._quarantine(folder, actions, why or "does not load as a valid expert")
        for _, folder, record in sorted(found, key=lambda t: t[0], reverse=True):
            name = record.metadata.name
            taken = c.execute("SELECT 1 FROM experts WHERE name=?", (name,)).fetchone()
            if taken:
                if actions is not None:
                    self._quarantine(folder, actions, f"an older or unused copy of {name!r}")
                continue
            self._insert_row(c, record.metadata, folder, dict(record.checksums))
            if actions is not None:
                actions.append(f"added {name!r} back to the catalog from experts/{folder}")

    def _loads(self, folder: str, record: Any) -> bool:
        """Whether an intact folder also passes the checks an add makes (config, shapes, finite weights)."""
        from moerge.experts.expert import Expert
        from moerge.experts.peft_io import load_safetensors, lora_modules_from_peft

        base = f"experts/{folder}"
        try:
            if record.metadata.kind == "dense":
                expert = Expert(
                    record.metadata,
                    dense=load_safetensors(self.storage.read_bytes(f"{base}/{DENSE_WEIGHTS}"), base),
                )
            else:
                config = parse_json_bytes(self.storage.read_bytes(f"{base}/{ADAPTER_CONFIG}"), base)
                weights = load_safetensors(self.storage.read_bytes(f"{base}/{ADAPTER_WEIGHTS}"), base)
                expert = Expert(record.metadata, lora=lora_modules_from_peft(config, weights, base))
            expert.check(base)
        except (MoergeError, OSError):
            return False
        return True

    def _quarantine(self, folder: str, actions: list[str], why: str) -> None:
        """Move ``experts/<folder>`` to ``quarantine/`` (never deleted) and say so in ``actions``."""
        if not _FOLDER.match(folder):
            actions.append(f"left experts/{folder!r} alone: {why}, and its name is not one moerge writes")
            return
        dest = f"{QUARANTINE}/{folder}"
        if self.storage.exists(dest):
            dest += f"-{uuid.uuid4().hex[:6]}"
        self.storage.rename(f"experts/{folder}", dest)
        actions.append(f"moved experts/{folder} to {dest}: {why}")

    def expert_files(self, name: str) -> tuple[str, dict[str, bytes]]:
        """``(folder, {file name: bytes})`` of an expert as stored: its files, checked against their checksums,
        and its ``moerge_expert.json`` record (what a copy of the library needs to rebuild its catalog row)."""
        entry = self._entry(name)
        files = {fname: self._read_checked(entry, fname) for fname in entry.checksums}
        record = {
            "format": FORMAT_VERSION,
            "metadata": entry.metadata.model_dump(mode="json"),
            "checksums": entry.checksums,
        }
        files[METADATA_FILE] = json.dumps(record, indent=2).encode()
        return entry.folder, files

    def export_peft(self, name: str, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Copy an expert out as a standalone PEFT folder (``PeftModel.from_pretrained`` loads it). Its files are
        checked against their checksums; the folder appears complete or not at all."""
        entry = self._entry(name)
        out = Path(out_dir)
        with atomic_output_dir(out, overwrite=overwrite, libraries=[self.storage.local_path("")]) as tmp:
            for fname in entry.checksums:
                target = contain(tmp, check_name(fname, f"{self.url}: expert {name!r}"), what=str(out))
                Path(target).write_bytes(self._read_checked(entry, fname))
            (tmp / METADATA_FILE).write_text(
                json.dumps(
                    {"format": FORMAT_VERSION, "metadata": entry.metadata.model_dump(mode="json")}, indent=2
                )
            )
        return out

    # ------------------------------------------------------------------ artifacts
    def expert_digest(self, name: str) -> str:
        """A digest of an expert's files (from the catalog's checksums): it changes when the expert is
        replaced, so artifacts kept outside the library can tell they are stale."""
        checksums = self._parse_checksums(self._require(name)[2], name)
        return _sha256(json.dumps(checksums, sort_keys=True).encode())[:32]

    def put_artifact(
        self,
        kind: str,
        config: dict[str, Any],
        expert: str | None,
        tensors: dict[str, torch.Tensor],
        info: dict[str, Any] | None = None,
    ) -> None:
        """Store derived data for an expert (or the library, ``expert=None``) under (kind, config)."""
        if expert is not None:
            self._require(expert)
        record = {"kind": kind, "config": config, "expert": expert, "info": info or {}}
        write_artifact(self.storage, artifact_rel(kind, config, expert), tensors, record)

    def get_artifact(
        self, kind: str, config: dict[str, Any], expert: str | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        from moerge.experts.peft_io import load_safetensors

        rel = artifact_rel(kind, config, expert)
        try:
            meta = parse_json_bytes(self.storage.read_bytes(rel + ".json"), f"{self.url}/{rel}.json")
            tensors = load_safetensors(
                self.storage.read_bytes(rel + ".safetensors"), f"{self.url}/{rel}.safetensors"
            )
        except FileNotFoundError:
            return None
        info = meta.get("info", {}) if isinstance(meta, dict) else None
        if not isinstance(info, dict):
            raise MalformedConfigError(
                f"{self.url}/{rel}.json: not an artifact record; delete it to recompute it."
            )
        return tensors, info

    def has_artifact(self, kind: str, config: dict[str, Any], expert: str | None) -> bool:
        rel = artifact_rel(kind, config, expert)
        return self.storage.exists(rel + ".json") and self.storage.exists(rel + ".safetensors")

    def list_artifacts(self, kind: str | None = None) -> list[tuple[str, str, str]]:
        """``(kind, config_hash, expert)`` triples (entries with names moerge does not write are skipped)."""
        out = []
        for k in [kind] if kind else self.storage.listdir("artifacts"):
            if not _SAFE.match(k):
                continue
            for h in self.storage.listdir(f"artifacts/{k}"):
                if not _SAFE.match(h):
                    continue
                out += [
                    (k, h, f[: -len(".json")])
                    for f in self.storage.listdir(f"artifacts/{k}/{h}")
                    if f.endswith(".json") and _SAFE.match(f)
                ]
        return out

    def _drop_artifacts(self, expert: str) -> None:
        for k, h, e in self.list_artifacts():
            if e == expert:
                for ext in (".json", ".safetensors"):
                    self.storage.delete(f"artifacts/{k}/{h}/{e}{ext}")

    def _move_artifacts(self, old: str, new: str) -> None:
        for k, h, e in self.list_artifacts():
            if e == old:
                for ext in (".safetensors", ".json"):
                    if self.storage.exists(f"artifacts/{k}/{h}/{old}{ext}"):
                        self.storage.rename(f"artifacts/{k}/{h}/{old}{ext}", f"artifacts/{k}/{h}/{new}{ext}")


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def open_or_create(url: str | Path) -> ExpertLibrary:
    """Open the library at ``url``, creating it if absent."""
    storage = storage_for(url)
    return ExpertLibrary.open(url) if storage.exists(LIBRARY_FILE) else ExpertLibrary.create(url)


__all__ = ["ExpertLibrary", "VerifyReport", "base_shapes_of", "config_hash", "open_or_create"]
