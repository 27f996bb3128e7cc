"""The Hugging Face Hub as a place experts and libraries come from and go to (through ``huggingface_hub``).

- ``org/adapter[@revision]`` names a Hub repo (a branch, tag or commit after ``@``); `snapshot` fetches it into
  the Hub cache (``HF_HUB_CACHE``) — from the cache alone when ``HF_HUB_OFFLINE=1`` — and returns the folder.
- `add_from_hub`: a repo holding a PEFT adapter (or a dense delta folder) is added like a local folder.
- `push`: one expert as a standalone PEFT adapter repo (``PeftModel.from_pretrained("org/name")`` loads it), or a
  whole library (``moerge-library.json``, ``experts/``, ``artifacts/``; never the catalog, which is rebuilt).
- `pull`: a library repo's experts (all, or one) into a local library. What comes from the Hub is data from
  strangers and is checked as a local library is: only the files a library holds are copied out of the cache
  (each path checked by `moerge.experts.paths.contain`, symlinks must stay inside the repo's cache folder), the
  catalog is rebuilt from the experts' own JSON (strict schema, checksums, loadable weights), and every expert
  enters the target library through `ExpertLibrary.add` (base fingerprint and shapes checked).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import (
    BaseModelMismatchError,
    HubError,
    LibraryError,
    MalformedConfigError,
    MoergeError,
    UnsafePathError,
)
from moerge.experts.formats import ADAPTER_CONFIG, DENSE_WEIGHTS, EXPERT_FILES, METADATA_FILE
from moerge.experts.metadata import EXPERT_NAME_PATTERN
from moerge.experts.paths import contain

if TYPE_CHECKING:
    from moerge.experts.library import ExpertLibrary
    from moerge.experts.metadata import ExpertMetadata

_PART = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}"
_HUB_REF = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9_.\-/]{{0,199}}))?$")
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}$")
LIBRARY_FILE = "moerge-library.json"
# what a library repo holds (all that `pull` reads from it)
LIBRARY_PATTERNS = [LIBRARY_FILE, "experts/*/*", "artifacts/*/*/*"]
# what an adapter repo holds that moerge reads (a PEFT adapter or a dense delta, and moerge's metadata)
ADAPTER_FILES = (*EXPERT_FILES, METADATA_FILE)


@dataclass(frozen=True)
class HubRef:
    """A Hub repo id with an optional revision: ``org/name`` or ``org/name@revision``."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_ref(text: str) -> HubRef | None:
    """``org/name[@revision]`` as a `HubRef`; None when ``text`` does not have that form."""
    m = _HUB_REF.match(text)
    if m is None or ".." in m.group("repo") or (m.group("rev") and ".." in m.group("rev")):
        return None
    return HubRef(m.group("repo"), m.group("rev"))


def hub_ref_or_none(source: str | Path) -> HubRef | None:
    """A `HubRef` when ``source`` is not an existing path and reads as ``org/name[@revision]``."""
    text = str(source)
    if Path(text).expanduser().exists():
        return None
    return parse_hub_ref(text)


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (checked at each call, so tests and users can set it late)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise MoergeError("the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def _cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def _explain(e: Exception, ref: HubRef, doing: str) -> HubError:
    name = type(e).__name__
    first = (str(e).splitlines() or [name])[0][:200]
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        where = "offline (HF_HUB_OFFLINE=1)" if offline() else "and the Hub cannot be reached"
        return HubError(
            f"{ref}: not in the Hub cache ({_cache_dir() or 'the default cache'}) {where}; download it where the "
            f"network is reachable (hf download {ref.repo_id}"
            f"{f' --revision {ref.revision}' if ref.revision else ''}) or point HF_HUB_CACHE at a cache holding it."
        )
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return HubError(
            f"{ref}: no such repo, or no access to it ({first}); check the id and log in (hf auth login)."
        )
    if name == "RevisionNotFoundError":
        return HubError(
            f"{ref}: no revision {ref.revision!r} in the repo; give a branch, tag or commit it has."
        )
    return HubError(f"{ref}: {doing} failed ({name}: {first}).")


def snapshot(ref: HubRef, allow_patterns: list[str] | None = None) -> Path:
    """The local folder of ``ref`` in the Hub cache (downloaded if needed and allowed). Its name is the commit."""
    hub = _hub()
    try:
        path = hub.snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            cache_dir=_cache_dir(),
            local_files_only=offline(),
            allow_patterns=allow_patterns,
        )
    except (OSError, ValueError) as e:  # huggingface_hub's errors are OSError / ValueError subclasses
        raise _explain(e, ref, "downloading") from None
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):
            raise _explain(e, ref, "downloading") from None
        raise
    return Path(path)


def base_folder(base_model: str, download: bool = False) -> Path | None:
    """The local folder of a base model given as a folder or a Hub id: the folder itself, or the Hub snapshot
    (its config and safetensors weights) — from the cache alone unless ``download``; None when not at hand."""
    if Path(base_model).expanduser().is_dir():
        return Path(base_model).expanduser()
    ref = parse_hub_ref(base_model)
    if ref is None:
        return None
    if not download:
        hub = _hub()
        try:
            return Path(
                hub.snapshot_download(
                    ref.repo_id, revision=ref.revision, cache_dir=_cache_dir(), local_files_only=True
                )
            )
        except Exception:  # not cached: the caller records the id alone
            return None
    return snapshot(ref, allow_patterns=["*.json", "*.safetensors"])


def _commit_of(folder: Path) -> str:
    return folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else "unknown"


def _safe_expert_name(repo_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", repo_id.split("/", 1)[1])[:128]
    if not re.match(EXPERT_NAME_PATTERN, name):
        name = "hub-" + name
    return name[:128]


# ------------------------------------------------------------------------------------------------------ add
def add_from_hub(
    library: ExpertLibrary, ref: HubRef, name: str | None = None, overwrite: bool = False, **metadata: Any
) -> ExpertMetadata:
    """Add the PEFT adapter (or dense-delta folder) of Hub repo ``ref`` to ``library``; the expert is named after
    the repo unless ``name`` is given, and records where it came from (``extra["source"]``)."""
    from moerge.experts.peft_io import read_peft_folder

    folder = snapshot(ref, allow_patterns=[*ADAPTER_FILES])
    if not (folder / ADAPTER_CONFIG).is_file() and not (folder / DENSE_WEIGHTS).is_file():
        if (folder / LIBRARY_FILE).is_file():
            raise MalformedConfigError(
                f"{ref}: the repo holds a moerge library, not one adapter; pull from it: "
                f"`moerge library pull {ref} LIBRARY [--expert NAME]`."
            )
        raise MalformedConfigError(
            f"{ref}: the repo holds no {ADAPTER_CONFIG} at its top level; give the repo of a PEFT adapter "
            "(saved with model.save_pretrained / push_to_hub)."
        )
    staged = Path(tempfile.mkdtemp(prefix="moerge-hub-"))
    try:  # copy out of the cache: only plain files that resolve inside the repo's own cache folder
        _copy_files(folder, staged, [f for f in ADAPTER_FILES if (folder / f).exists()], str(ref))
        extra = dict(metadata.pop("extra", None) or {})
        extra["source"] = f"hub:{ref.repo_id}@{_commit_of(folder)}"
        if name is None and not _stored_name(staged):
            name = _safe_expert_name(ref.repo_id)  # else the name moerge pushed it under
        expert = read_peft_folder(staged, name=name, **metadata)
        expert.metadata.extra = {**expert.metadata.extra, **extra}
        return library.add(expert, overwrite=overwrite, source=str(ref))
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _stored_name(folder: Path) -> str | None:
    """The expert name in a folder's ``moerge_expert.json`` (validated), if it has one."""
    from moerge.experts.peft_io import read_json
    from moerge.experts.schema import parse_stored_metadata

    f = folder / METADATA_FILE
    return parse_stored_metadata(read_json(f), str(f)).get("name") if f.is_file() else None


def _copy_files(snap: Path, dest: Path, rels: list[str], what: str) -> None:
    """Copy ``rels`` (``/``-separated, each checked) from a cache snapshot into ``dest``. A file must be a plain
    file or a link into the same repo's cache folder (``blobs/``), never one leading elsewhere."""
    repo_root = snap.parent.parent.resolve()  # models--org--name/
    for rel in rels:
        src = contain(snap, rel, what=f"{what}: {rel}", follow=False)
        real = Path(src).resolve()
        if repo_root not in real.parents or not real.is_file():
            raise UnsafePathError(
                f"{what}: {rel} leads to {real}, outside the repo's cache folder {repo_root} (or is not a file); "
                "refused. Delete that cache entry and download the repo again."
            )
        target = Path(contain(dest, rel, what=f"{what}: {rel}"))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, target)


# ------------------------------------------------------------------------------------------------------ push
def push(
    library: ExpertLibrary,
    repo_id: str,
    expert: str | None = None,
    *,
    private: bool = False,
    message: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload one expert (a standalone PEFT adapter folder) or the whole library to Hub repo ``repo_id``
    (created if absent). A library push mirrors the library: experts and artifacts no longer in it are deleted
    from the repo. Returns the commit's URL (or what the Hub client returned)."""
    ref = parse_hub_ref(repo_id)
    if ref is None or ref.revision:
        raise MalformedConfigError(
            f"{repo_id!r} is not a Hub repo id (org/name); give the branch with --revision."
        )
    hub = _hub()
    with tempfile.TemporaryDirectory(prefix="moerge-push-") as tmp:
        if expert is not None:
            folder = library.export_peft(expert, Path(tmp) / "expert")
            delete: list[str] | None = None
            msg = message or f"moerge: expert {expert}"
        else:
            folder = Path(tmp) / "library"
            stage_library(library, folder)
            delete = [LIBRARY_FILE, "experts/**", "artifacts/**"]
            msg = message or f"moerge: library of {len(library)} experts"
        api = hub.HfApi()
        try:
            api.create_repo(repo_id, exist_ok=True, private=private)
            info = api.upload_folder(
                folder_path=str(folder),
                repo_id=repo_id,
                commit_message=msg,
                revision=revision,
                delete_patterns=delete,
            )
        except (OSError, ValueError) as e:
            raise _explain(e, HubRef(repo_id, revision), "uploading") from None
        except Exception as e:
            if type(e).__module__.startswith("huggingface_hub"):
                raise _explain(e, HubRef(repo_id, revision), "uploading") from None
            raise
    return str(getattr(info, "commit_url", info))


def stage_library(library: ExpertLibrary, out: Path, names: list[str] | None = None) -> Path:
    """Write a self-contained copy of ``library`` (or of some experts) into the new folder ``out``: its
    ``moerge-library.json``, each expert's files checked against their checksums, and the artifacts of those
    experts and of the library. No catalog: whoever opens the copy rebuilds it from the experts' JSON."""
    out.mkdir(parents=True)
    (out / LIBRARY_FILE).write_text(json.dumps(library.info, indent=2))
    chosen = names if names is not None else library.names()
    for name in chosen:
        folder, files = library.expert_files(name)
        for fname, data in files.items():
            target = Path(contain(out, f"experts/{folder}/{fname}", what=f"expert {name!r}"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    from moerge.experts.library import LIBRARY_ARTIFACT

    wanted = set(chosen) | {LIBRARY_ARTIFACT}
    for kind, digest, owner in library.list_artifacts():
        if owner not in wanted:
            continue
        for ext in (".json", ".safetensors"):
            rel = f"artifacts/{kind}/{digest}/{owner}{ext}"
            if library.storage.exists(rel):
                target = Path(contain(out, rel, what="artifact"))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(library.storage.read_bytes(rel))
    return out


# ------------------------------------------------------------------------------------------------------ pull
def pull(
    ref: HubRef, library: str | Path, expert: str | None = None, overwrite: bool = False
) -> list[ExpertMetadata]:
    """Add the experts of the library in Hub repo ``ref`` (all, or the one named ``expert``) to the local
    ``library`` (created, with the remote's base model, when absent). A repo holding one PEFT adapter is added
    as with `add_from_hub`. Every expert is validated (schema, checksums, weights, base) before any is added."""
    from moerge.experts.library import LIBRARY_ARTIFACT, ExpertLibrary
    from moerge.experts.storage import storage_for

    snap = snapshot(ref, allow_patterns=[*LIBRARY_PATTERNS, *ADAPTER_FILES])
    target_exists = storage_for(library).exists(LIBRARY_FILE)
    if not (snap / LIBRARY_FILE).is_file():
        if (snap / ADAPTER_CONFIG).is_file() or (snap / DENSE_WEIGHTS).is_file():
            lib = ExpertLibrary.open(library) if target_exists else ExpertLibrary.create(library)
            return [add_from_hub(lib, ref, name=expert, overwrite=overwrite)]
        raise MalformedConfigError(
            f"{ref}: the repo holds neither a moerge library ({LIBRARY_FILE}) nor an adapter."
        )
    with tempfile.TemporaryDirectory(prefix="moerge-pull-") as tmp:
        copy = Path(tmp) / "library"
        copy.mkdir()
        _copy_files(snap, copy, _library_files(snap, str(ref)), str(ref))
        remote = ExpertLibrary.open(
            copy
        )  # strict moerge-library.json; the catalog is rebuilt from the experts
        try:
            report = remote.verify()  # folders the rebuilt catalog did not take in, and why
            problems = [*report.problems, *report.leftovers]
            names = [expert] if expert is not None else remote.names()
            if expert is not None and expert not in remote:
                raise LibraryError(
                    f"{ref}: the library has no expert named {expert!r}; it has: "
                    f"{', '.join(remote.names()[:20]) or 'none'}."
                )
            if problems:
                raise LibraryError(
                    f"{ref}: refused, nothing was added: {'; '.join(problems[:3])}. The repo's library is damaged "
                    "or was edited by hand; ask its owner to push it again with `moerge library push`."
                )
            experts = [remote.get(n) for n in names]  # checksums, weights and metadata checked here
            if target_exists:
                lib = ExpertLibrary.open(library)
                fp, theirs = lib.base_fingerprint, remote.base_fingerprint
                if fp and theirs and fp != theirs:
                    raise BaseModelMismatchError(
                        f"{ref}: the library's experts are for base {remote.base_model or theirs} ({theirs}); "
                        f"{lib.url} holds experts for {lib.base_model or fp} ({fp}). Pull into a new library."
                    )
            else:
                lib = ExpertLibrary.create(
                    library,
                    base_model=remote.base_model,
                    base_fingerprint=remote.base_fingerprint,
                    base_shapes=remote.base_shapes,
                )
            source = f"hub:{ref.repo_id}@{_commit_of(snap)}"
            added = []
            for e in experts:
                e.metadata.extra = {**e.metadata.extra, "source": source}
                added.append(lib.add(e, overwrite=overwrite, source=f"{ref}: expert {e.name!r}"))
            wanted = set(names) | ({LIBRARY_ARTIFACT} if expert is None else set())
            for kind, digest, owner in remote.list_artifacts():
                if owner in wanted:
                    for ext in (".json", ".safetensors"):
                        rel = f"artifacts/{kind}/{digest}/{owner}{ext}"
                        if remote.storage.exists(rel):
                            lib.storage.write_bytes(rel, remote.storage.read_bytes(rel))
            return added
        finally:
            remote.close()


def _library_files(snap: Path, what: str) -> list[str]:
    """The files of a library repo that a library holds, by the names moerge writes; anything else is ignored."""
    rels = [LIBRARY_FILE]
    allowed = {*EXPERT_FILES, METADATA_FILE}
    for folder in sorted(p.name for p in (snap / "experts").iterdir()) if (snap / "experts").is_dir() else []:
        if not _SAFE.match(folder) or not (snap / "experts" / folder).is_dir():
            continue
        rels += [
            f"experts/{folder}/{f.name}" for f in (snap / "experts" / folder).iterdir() if f.name in allowed
        ]
    art = snap / "artifacts"
    for kind in sorted(p.name for p in art.iterdir()) if art.is_dir() else []:
        for digest in sorted(p.name for p in (art / kind).iterdir()) if (art / kind).is_dir() else []:
            folder = art / kind / digest
            if _SAFE.match(kind) and _SAFE.match(digest) and folder.is_dir():
                rels += [
                    f"artifacts/{kind}/{digest}/{f.name}"
                    for f in folder.iterdir()
                    if _SAFE.match(f.name) and f.name.endswith((".json", ".safetensors"))
                ]
    return rels


__all__ = [
    "HubRef",
    "add_from_hub",
    "base_folder",
    "hub_ref_or_none",
    "offline",
    "parse_hub_ref",
    "pull",
    "push",
    "snapshot",
    "stage_library",
]
