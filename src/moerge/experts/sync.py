"""``moerge library push LIB URL`` / ``pull URL LIB``: copy a library's missing experts (and their artifacts) to
another library at any fsspec URL — a local folder, another machine's path (``sftp://``, ``ssh://``), an object
store (``s3://``, ``gcs://`` …) where the user has the fsspec driver.

Only what the destination lacks is copied; each copied expert goes through the destination's own `add`
(validated, base-checked, atomic: staged, then renamed into place and committed) and must arrive with the very
checksums the source recorded. An expert is *present* at the destination when its catalog row exists and its
files match their checksums; a half-copied one (a push killed mid-way on a store without atomic renames) is not
present and is copied again, over the broken copy. So a killed push, rerun, ends with every expert exactly once.
An expert of the same name but other contents is a conflict: reported, left alone unless ``overwrite``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from moerge.errors import BaseModelMismatchError, ChecksumMismatchError, LibraryError, MoergeError
from moerge.experts.library import LIBRARY_ARTIFACT, ExpertLibrary
from moerge.experts.storage import storage_for

LIBRARY_FILE = "moerge-library.json"


@dataclass
class SyncReport:
    """What a push/pull did: experts ``copied``, already ``present``, ``repaired`` (a broken copy replaced),
    ``conflicts`` (same name, other contents; left alone), and the number of artifact files copied."""

    source: str
    destination: str
    copied: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    artifacts: int = 0


def is_url(text: str) -> bool:
    """Whether ``text`` names an fsspec location (``scheme://…`` or a filesystem path) rather than a Hub repo id
    (``org/name``): a scheme, or a path starting with ``/``, ``./``, ``../`` or ``~``, or an existing folder."""
    import os

    return "://" in text or text.startswith(("/", "./", "../", "~")) or os.path.isdir(text)


def open_destination(url: str, like: ExpertLibrary) -> ExpertLibrary:
    """The library at ``url``, created with ``like``'s base model when absent; refused when its base differs."""
    storage = storage_for(url)
    if not storage.exists(LIBRARY_FILE):
        return ExpertLibrary.create(
            url,
            base_model=like.base_model,
            base_fingerprint=like.base_fingerprint,
            base_shapes=like.base_shapes,
        )
    dest = ExpertLibrary.open(url)
    if dest.base_fingerprint and like.base_fingerprint and dest.base_fingerprint != like.base_fingerprint:
        raise BaseModelMismatchError(
            f"{dest.url} holds experts for base {dest.base_model} ({dest.base_fingerprint}), {like.url} for "
            f"{like.base_model} ({like.base_fingerprint}); sync libraries of one base model only."
        )
    return dest


def _checksums(lib: ExpertLibrary, name: str) -> dict[str, str]:
    return dict(lib._entry(name).checksums)


def _state(dest: ExpertLibrary, name: str, want: dict[str, str]) -> str:
    """``missing``, ``present`` (same checksums, files intact), ``broken`` (a row whose files do not match), or
    ``conflict`` (an intact expert with other contents)."""
    if name not in dest:
        return "missing"
    try:
        _, files = dest.expert_files(name)  # reads and checks every file against the recorded checksums
    except (ChecksumMismatchError, LibraryError, OSError, MoergeError):
        return "broken"
    del files
    return "present" if _checksums(dest, name) == want else "conflict"


def sync(
    source: ExpertLibrary,
    dest: ExpertLibrary,
    names: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    on_expert: Callable[[str, str], None] | None = None,
) -> SyncReport:
    """Copy ``source``'s experts (all, or ``names``) that ``dest`` lacks, then the artifacts of the experts both
    now hold (and the library-level ones). ``on_expert(name, what)`` is called after each expert (progress)."""
    report = SyncReport(source.url, dest.url)
    if dest.storage.local_path("") is not None and dest.verify().leftovers:
        # what a killed copy left (a staging folder; a complete expert moved in but not committed): repair
        # removes the first and adds the second back, so the rerun neither recopies nor duplicates it
        dest.verify(repair=True)
    chosen = list(names) if names is not None else source.names()
    for name in chosen:
        want = _checksums(source, name)
        state = _state(dest, name, want)
        if state == "present":
            report.present.append(name)
        elif state == "conflict" and not overwrite:
            report.conflicts.append(name)
        else:
            expert = source.get(name)  # checked against the source's checksums
            dest.add(expert, overwrite=state != "missing", source=f"{source.url}: expert {name!r}")
            got = _checksums(dest, name)
            if got != want:
                raise ChecksumMismatchError(
                    f"{dest.url}: expert {name!r} arrived with checksums {got}, the source recorded {want}; "
                    "the copy is not byte-identical — report this as a bug."
                )
            dest.expert_files(name)  # read back from the destination and checked
            (report.repaired if state in ("broken", "conflict") else report.copied).append(name)
        if on_expert is not None:
            on_expert(name, state)
    report.artifacts = _copy_artifacts(source, dest, set(chosen) - set(report.conflicts))
    return report


def _copy_artifacts(source: ExpertLibrary, dest: ExpertLibrary, names: set[str]) -> int:
    """Copy the artifact files of ``names`` and of the library that ``dest`` lacks; the record (``.json``) is
    written after the tensors, so a killed copy leaves an artifact ``dest`` does not see (and recopies)."""
    copied = 0
    for kind, digest, owner in source.list_artifacts():
        if owner != LIBRARY_ARTIFACT and owner not in names:
            continue
        base = f"artifacts/{kind}/{digest}/{owner}"
        if dest.storage.exists(base + ".json") and dest.storage.exists(base + ".safetensors"):
            continue
        if not source.storage.exists(base + ".safetensors"):
            continue
        for ext in (".safetensors", ".json"):
            dest.storage.write_bytes(base + ext, source.storage.read_bytes(base + ext))
            copied += 1
    return copied


def push(library: str, url: str, names: Sequence[str] | None = None, **kw: Any) -> SyncReport:
    """Copy the missing experts of the local (or any) library ``library`` to the library at ``url``."""
    src = ExpertLibrary.open(library)
    return sync(src, open_destination(url, src), names, **kw)


def pull(url: str, library: str, names: Sequence[str] | None = None, **kw: Any) -> SyncReport:
    """Copy the missing experts of the library at ``url`` into ``library`` (created when absent)."""
    src = ExpertLibrary.open(url)
    return sync(src, open_destination(library, src), names, **kw)
