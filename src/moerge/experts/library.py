"""`ExpertLibrary`: where experts live.

Layout of a library (the same on every storage)::

    moerge-library.json                 format version, base model id and fingerprint
    experts/<name>-<id>/                one PEFT folder per expert (adapter_config.json,
                                        adapter_model.safetensors) or a dense delta (delta_model.safetensors),
                                        plus moerge_expert.json (metadata + checksums)
    artifacts/<kind>/<config-hash>/<expert>.safetensors (+ .json)   derived data (signatures, gates …)
    catalog.sqlite                      the catalog (local libraries; remote ones keep it in a local cache)

The catalog is the source of truth: an expert exists once its catalog row is committed. Adding writes the
expert into a staging folder, then, holding the catalog's write lock, renames it into ``experts/`` and
commits the row. A process killed at any point leaves either the old library or the new one; leftovers
(staging folders, unreferenced expert folders) are invisible and are cleaned by the next writer.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from moerge.errors import (
    BaseModelMismatchError,
    ExpertExistsError,
    ExpertNotFoundError,
    LibraryError,
    MalformedConfigError,
    ShapeMismatchError,
)
from moerge.experts.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DENSE_WEIGHTS, METADATA_FILE
from moerge.experts.metadata import ExpertMetadata
from moerge.experts.storage import LocalStorage, Storage, storage_for

if TYPE_CHECKING:  # torch is imported only by the operations that touch weights
    import torch

    from moerge.experts.expert import Expert

LIBRARY_FILE = "moerge-library.json"
CATALOG_FILE = "catalog.sqlite"
FORMAT_VERSION = 1
LIBRARY_ARTIFACT = "_library"

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
"""


@dataclass
class VerifyReport:
    """What `ExpertLibrary.verify` found. ``ok`` is true when no expert is damaged."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # staging folders / unreferenced expert folders

    @property
    def ok(self) -> bool:
        return not self.problems


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able config, used to key artifacts."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ExpertLibrary:
    """A catalogued collection of experts sharing one base model. Open with `create` or `open`."""

    def __init__(self, storage: Storage, info: dict[str, Any]):
        self.storage = storage
        self.info = info
        self._catalog_path = self._catalog_location()
        self._conn = sqlite3.connect(
            self._catalog_path, timeout=120, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        if not isinstance(storage, LocalStorage):
            self._sync_remote_catalog()

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        url: str | Path,
        base_model: str | None = None,
        base_fingerprint: str | None = None,
        exist_ok: bool = False,
    ) -> ExpertLibrary:
        """Create an empty library at ``url`` (a folder path or an fsspec URL)."""
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
        storage.write_bytes(LIBRARY_FILE, json.dumps(info, indent=2).encode())
        return cls(storage, info)

    @classmethod
    def open(cls, url: str | Path) -> ExpertLibrary:
        """Open an existing library."""
        storage = storage_for(url)
        if not storage.exists(LIBRARY_FILE):
            raise LibraryError(
                f"{storage.url}: not a moerge library (no {LIBRARY_FILE}); create one with "
                f"`moerge library init {url}`."
            )
        try:
            info = json.loads(storage.read_bytes(LIBRARY_FILE))
        except json.JSONDecodeError as e:
            raise LibraryError(f"{storage.url}/{LIBRARY_FILE}: corrupt ({e}).") from e
        if info.get("format", 0) > FORMAT_VERSION:
            raise LibraryError(
                f"{storage.url}: library format {info['format']} is newer than this moerge; upgrade."
            )
        return cls(storage, info)

    @property
    def url(self) -> str:
        return self.storage.url

    @property
    def base_model(self) -> str | None:
        return self.info.get("base_model")

    @property
    def base_fingerprint(self) -> str | None:
        return self.info.get("base_fingerprint")

    def _catalog_location(self) -> str:
        local = self.storage.local_path(CATALOG_FILE)
        if local is not None:
            return str(local)
        cache = Path(os.environ.get("MOERGE_CACHE", Path.home() / ".cache" / "moerge")) / "catalogs"
        cache.mkdir(parents=True, exist_ok=True)
        return str(cache / f"{hashlib.sha256(self.storage.url.encode()).hexdigest()[:16]}.sqlite")

    def _sync_remote_catalog(self) -> None:
        """Rebuild the local catalog cache of a remote library from its experts' metadata files."""
        with self._write() as c:
            c.execute("DELETE FROM experts")
            c.execute("DELETE FROM tags")
            for folder in self.storage.listdir("experts"):
                try:
                    stored = json.loads(self.storage.read_bytes(f"experts/{folder}/{METADATA_FILE}"))
                    md = ExpertMetadata(**stored["metadata"])
                except (FileNotFoundError, KeyError, ValueError, ValidationError):
                    continue  # a half-written folder: invisible
                self._insert_row(c, md, folder, stored.get("checksums", {}))

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the catalog's lock (across processes)."""
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
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

    def list(
        self,
        task: str | None = None,
        tag: str | None = None,
        base_model: str | None = None,
        kind: str | None = None,
        name: str | None = None,
    ) -> list[ExpertMetadata]:
        """Experts' metadata, sorted by name, filtered by task, tag, base model, kind or a name glob."""
        sql = "SELECT metadata FROM experts"
        where, args = [], []
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
        return [ExpertMetadata.model_validate_json(r[0]) for r in self._conn.execute(sql, args)]

    def names(self, **filters: Any) -> list[str]:
        if not filters:
            return [r[0] for r in self._conn.execute("SELECT name FROM experts ORDER BY name")]
        return [m.name for m in self.list(**filters)]

    def tasks(self) -> list[str]:
        return [
            r[0]
            for r in self._conn.execute(
                "SELECT DISTINCT task FROM experts WHERE task IS NOT NULL ORDER BY task"
            )
        ]

    def get_metadata(self, name: str) -> ExpertMetadata:
        return ExpertMetadata.model_validate_json(self._require(name)[1])

    def get(self, name: str) -> Expert:
        """Load an expert's weights and metadata."""
        from safetensors.torch import load

        from moerge.experts.expert import Expert
        from moerge.experts.peft_io import lora_modules_from_peft

        folder, meta_json, _ = self._require(name)
        md = ExpertMetadata.model_validate_json(meta_json)
        base = f"experts/{folder}"
        if md.kind == "dense":
            return Expert(metadata=md, dense=load(self.storage.read_bytes(f"{base}/{DENSE_WEIGHTS}")))
        config = json.loads(self.storage.read_bytes(f"{base}/{ADAPTER_CONFIG}"))
        weights = load(self.storage.read_bytes(f"{base}/{ADAPTER_WEIGHTS}"))
        lora = lora_modules_from_peft(config, weights, source=f"{self.url}/{base}/{ADAPTER_CONFIG}")
        carried = {k: config[k] for k in ("task_type", "base_model_name_or_path") if config.get(k)}
        return Expert(metadata=md, lora=lora, peft_config=carried)

    def get_many(self, names: list[str] | None = None) -> list[Expert]:
        return [self.get(n) for n in (names if names is not None else self.names())]

    # ------------------------------------------------------------------ adding
    def add(self, expert: Expert, overwrite: bool = False, source: str | None = None) -> ExpertMetadata:
        """Validate and add an expert atomically. Refuses a taken name unless ``overwrite``."""
        where = source or f"expert {expert.name!r}"
        expert.check(where)
        self._check_base(expert, where)
        self._check_module_shapes(expert, where)
        if not overwrite and expert.name in self:
            raise ExpertExistsError(
                f"{self.url}: an expert named {expert.name!r} already exists ({where}); choose another name or "
                "pass overwrite=True (--overwrite)."
            )
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
        staging = self._stage(files)
        folder = f"{expert.name}-{uuid.uuid4().hex[:8]}"
        old_folder = None
        try:
            with self._write() as c:
                row = c.execute("SELECT folder FROM experts WHERE name=?", (expert.name,)).fetchone()
                if row is not None and not overwrite:
                    raise ExpertExistsError(
                        f"{self.url}: an expert named {expert.name!r} was added meanwhile ({where}); pass overwrite=True."
                    )
                old_folder = row[0] if row else None
                self._move_into_place(staging, f"experts/{folder}")
                if old_folder is not None:
                    c.execute("DELETE FROM tags WHERE name=?", (expert.name,))
                    c.execute("DELETE FROM experts WHERE name=?", (expert.name,))
                self._insert_row(c, expert.metadata, folder, checksums)
                self._record_module_shapes(c, expert, where)
                if self.base_fingerprint is None and expert.metadata.base_fingerprint:
                    self._adopt_base(expert.metadata)
        except BaseException:
            self.storage.delete(staging)
            if not self._folder_referenced(folder):
                self.storage.delete(f"experts/{folder}")
            raise
        if old_folder is not None:
            self.storage.delete(f"experts/{old_folder}")
            self._drop_artifacts(expert.name)
        return expert.metadata

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
            raise FileNotFoundError(f"{folder}: no such folder")
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

    def _stage(self, files: dict[str, bytes]) -> str:
        staging = f".staging/{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for fname, data in files.items():
            self.storage.write_bytes(f"{staging}/{fname}", data)
        return staging

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

    def _check_module_shapes(self, expert: Expert, where: str) -> None:
        known = dict(
            ((m, (i, o)) for m, i, o in self._conn.execute("SELECT module, d_in, d_out FROM modules"))
        )
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

    def _record_module_shapes(self, c: sqlite3.Connection, expert: Expert, where: str) -> None:
        rows = [(m, lm.d_in, lm.d_out) for m, lm in expert.lora.items()]
        rows += [(p, t.numel(), 0) for p, t in expert.dense.items()]
        c.executemany("INSERT OR IGNORE INTO modules VALUES (?,?,?)", rows)

    # ------------------------------------------------------------------ changing
    def rename(self, old: str, new: str) -> None:
        """Rename an expert (its artifacts follow)."""
        folder, meta_json, checksums = self._require(old)
        md = ExpertMetadata.model_validate_json(meta_json).model_copy(update={"name": new})
        try:
            md = ExpertMetadata(**md.model_dump())
        except ValidationError as e:
            raise MalformedConfigError(f"invalid expert name {new!r}: {e.errors()[0]['msg']}") from e
        with self._write() as c:
            if c.execute("SELECT 1 FROM experts WHERE name=?", (new,)).fetchone():
                raise ExpertExistsError(f"{self.url}: an expert named {new!r} already exists.")
            c.execute("UPDATE experts SET name=?, metadata=? WHERE name=?", (new, md.model_dump_json(), old))
            c.execute("UPDATE tags SET name=? WHERE name=?", (new, old))
            self._write_metadata_file(folder, md, json.loads(checksums))
        self._move_artifacts(old, new)

    def update_metadata(self, name: str, **fields: Any) -> ExpertMetadata:
        """Change metadata fields (task, tags, scores, …); not the name (use `rename`)."""
        if "name" in fields or "kind" in fields:
            raise MalformedConfigError("use rename() to change a name; the kind of an expert cannot change.")
        folder, meta_json, checksums = self._require(name)
        current = ExpertMetadata.model_validate_json(meta_json).model_dump()
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
            self._write_metadata_file(folder, md, json.loads(checksums))
        return md

    def _write_metadata_file(self, folder: str, md: ExpertMetadata, checksums: dict) -> None:
        blob = {"format": FORMAT_VERSION, "metadata": md.model_dump(mode="json"), "checksums": checksums}
        self.storage.write_bytes(f"experts/{folder}/{METADATA_FILE}", json.dumps(blob, indent=2).encode())

    def remove(self, name: str) -> None:
        """Remove an expert and its artifacts."""
        folder = self._require(name)[0]
        with self._write() as c:
            c.execute("DELETE FROM experts WHERE name=?", (name,))
            c.execute("DELETE FROM tags WHERE name=?", (name,))
        self.storage.delete(f"experts/{folder}")
        self._drop_artifacts(name)

    # ------------------------------------------------------------------ checking & exporting
    def verify(self, repair: bool = False) -> VerifyReport:
        """Check every expert's files against its checksums; report (and with ``repair``, delete) leftovers."""
        report = VerifyReport()
        referenced = set()
        for name, folder, checksums in self._conn.execute(
            "SELECT name, folder, checksums FROM experts ORDER BY name"
        ):
            referenced.add(folder)
            report.checked += 1
            for fname, digest in json.loads(checksums).items():
                rel = f"experts/{folder}/{fname}"
                try:
                    data = self.storage.read_bytes(rel)
                except FileNotFoundError:
                    report.problems.append(f"{name}: {rel} is missing")
                    continue
                if _sha256(data) != digest:
                    report.problems.append(f"{name}: {rel} does not match its checksum (corrupted or edited)")
        for folder in self.storage.listdir("experts"):
            if folder not in referenced:
                report.leftovers.append(f"experts/{folder}")
        report.leftovers += [f".staging/{s}" for s in self.storage.listdir(".staging")]
        if repair and report.leftovers:
            with self._write():  # holding the lock: nobody is between rename and commit
                for rel in report.leftovers:
                    if rel.startswith(".staging/") and _pid_alive(rel.split("/", 1)[1].split("-", 1)[0]):
                        continue
                    if rel.startswith("experts/") and self._folder_referenced(rel.split("/", 1)[1]):
                        continue
                    self.storage.delete(rel)
        return report

    def export_peft(self, name: str, out_dir: str | Path) -> Path:
        """Copy an expert out as a standalone PEFT folder (``PeftModel.from_pretrained`` loads it)."""
        folder, meta_json, checksums = self._require(name)
        md = ExpertMetadata.model_validate_json(meta_json)
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()):
            raise LibraryError(f"{out}: the output folder is not empty; choose an empty or new folder.")
        out.mkdir(parents=True, exist_ok=True)
        for fname in json.loads(checksums):
            (out / fname).write_bytes(self.storage.read_bytes(f"experts/{folder}/{fname}"))
        (out / METADATA_FILE).write_text(
            json.dumps({"format": FORMAT_VERSION, "metadata": md.model_dump(mode="json")}, indent=2)
        )
        return out

    # ------------------------------------------------------------------ artifacts
    def _artifact_rel(self, kind: str, config: dict[str, Any], expert: str | None) -> str:
        if not kind.replace("_", "").replace("-", "").isalnum():
            raise MalformedConfigError(f"artifact kind {kind!r}: use letters, digits, '-' and '_' only.")
        return f"artifacts/{kind}/{config_hash(config)}/{expert or LIBRARY_ARTIFACT}"

    def put_artifact(
        self,
        kind: str,
        config: dict[str, Any],
        expert: str | None,
        tensors: dict[str, torch.Tensor],
        info: dict[str, Any] | None = None,
    ) -> None:
        """Store derived data for an expert (or the library, ``expert=None``) under (kind, config)."""
        from safetensors.torch import save

        if expert is not None:
            self._require(expert)
        rel = self._artifact_rel(kind, config, expert)
        self.storage.write_bytes(
            rel + ".safetensors", save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        )
        self.storage.write_bytes(
            rel + ".json",
            json.dumps(
                {"kind": kind, "config": config, "expert": expert, "info": info or {}}, default=str
            ).encode(),
        )

    def get_artifact(
        self, kind: str, config: dict[str, Any], expert: str | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        from safetensors.torch import load

        rel = self._artifact_rel(kind, config, expert)
        try:
            meta = json.loads(self.storage.read_bytes(rel + ".json"))
            tensors = load(self.storage.read_bytes(rel + ".safetensors"))
        except FileNotFoundError:
            return None
        return tensors, meta.get("info", {})

    def has_artifact(self, kind: str, config: dict[str, Any], expert: str | None) -> bool:
        rel = self._artifact_rel(kind, config, expert)
        return self.storage.exists(rel + ".json") and self.storage.exists(rel + ".safetensors")

    def list_artifacts(self, kind: str | None = None) -> list[tuple[str, str, str]]:
        """``(kind, config_hash, expert)`` triples."""
        out = []
        for k in [kind] if kind else self.storage.listdir("artifacts"):
            for h in self.storage.listdir(f"artifacts/{k}"):
                out += [
                    (k, h, f[: -len(".json")])
                    for f in self.storage.listdir(f"artifacts/{k}/{h}")
                    if f.endswith(".json")
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
                    self.storage.rename(f"artifacts/{k}/{h}/{old}{ext}", f"artifacts/{k}/{h}/{new}{ext}")


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def open_or_create(url: str | Path) -> ExpertLibrary:
    """Open the library at ``url``, creating it if absent."""
    storage = storage_for(url)
    return ExpertLibrary.open(url) if storage.exists(LIBRARY_FILE) else ExpertLibrary.create(url)


__all__ = ["ExpertLibrary", "VerifyReport", "config_hash", "open_or_create"]
