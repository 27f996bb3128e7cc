"""Artifacts kept outside an expert library: `ArtifactOverlay` is a library seen through a separate folder that
receives every artifact written through it, so computing routing signatures (the benchmark, by default) never
modifies the user's library.

The folder has a library's ``artifacts/<kind>/<config hash>/<expert>.safetensors (+ .json)`` layout; each record
also carries the digest of the expert's files it was computed from (`ExpertLibrary.expert_digest`), so an
artifact of an expert since replaced reads as missing. Reads look in the library first, then in the folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.experts.library import ExpertLibrary, artifact_rel, write_artifact
from moerge.experts.schema import parse_json_bytes
from moerge.experts.storage import LocalStorage

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

__all__ = ["ArtifactOverlay", "default_artifacts_dir"]


def default_artifacts_dir(library: ExpertLibrary) -> Path:
    """``$MOERGE_CACHE/artifacts/<hash of the library's URL>`` (``~/.cache/moerge`` without MOERGE_CACHE)."""
    root = Path(os.environ.get("MOERGE_CACHE") or Path.home() / ".cache" / "moerge")
    return root / "artifacts" / hashlib.sha256(str(library.url).encode()).hexdigest()[:16]


class ArtifactOverlay:
    """``library`` with its artifacts written to ``folder`` instead: experts and the library's own artifacts
    are read from ``library`` (never written); artifacts put through the overlay go to ``folder``. Anything
    else is the library's (``overlay.get(name)``, ``overlay.names()``, ``overlay.url`` …)."""

    def __init__(self, library: ExpertLibrary, folder: str | Path):
        self.library = library
        self.storage = LocalStorage(folder)
        self.folder = self.storage.root

    def __getattr__(self, name: str) -> Any:
        if name == "library":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.library, name)

    def __contains__(self, name: object) -> bool:
        return name in self.library

    def __len__(self) -> int:
        return len(self.library)

    def __iter__(self) -> Iterator[str]:
        return iter(self.library)

    def __repr__(self) -> str:
        return f"ArtifactOverlay({self.library.url!r}, artifacts in {str(self.folder)!r})"

    def _digest(self, expert: str | None) -> str | None:
        return self.library.expert_digest(expert) if expert is not None else None

    def _record(self, rel: str, expert: str | None) -> dict[str, Any] | None:
        """The folder's record of ``rel`` when it exists and matches the expert's current files."""
        try:
            raw = self.storage.read_bytes(rel + ".json")
        except FileNotFoundError:
            return None
        meta = parse_json_bytes(raw, f"{self.folder}/{rel}.json")
        if not isinstance(meta, dict) or meta.get("expert_digest") != self._digest(expert):
            return None  # another expert's (replaced since), or not ours: recomputed and overwritten
        return meta

    def has_artifact(self, kind: str, config: dict[str, Any], expert: str | None) -> bool:
        if self.library.has_artifact(kind, config, expert):
            return True
        rel = artifact_rel(kind, config, expert)
        return self._record(rel, expert) is not None and self.storage.exists(rel + ".safetensors")

    def get_artifact(
        self, kind: str, config: dict[str, Any], expert: str | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        got = self.library.get_artifact(kind, config, expert)
        if got is not None:
            return got
        from moerge.experts.peft_io import load_safetensors

        rel = artifact_rel(kind, config, expert)
        meta = self._record(rel, expert)
        if meta is None:
            return None
        try:
            data = self.storage.read_bytes(rel + ".safetensors")
        except FileNotFoundError:
            return None
        info = meta.get("info")
        return load_safetensors(data, f"{self.folder}/{rel}.safetensors"), info if isinstance(
            info, dict
        ) else {}

    def put_artifact(
        self,
        kind: str,
        config: dict[str, Any],
        expert: str | None,
        tensors: dict[str, torch.Tensor],
        info: dict[str, Any] | None = None,
    ) -> None:
        """Store an artifact in the overlay's folder (the library is left as it is)."""
        digest = self._digest(expert)  # also refuses an expert the library does not hold
        record = {
            "kind": kind,
            "config": config,
            "expert": expert,
            "info": info or {},
            "expert_digest": digest,
        }
        write_artifact(self.storage, artifact_rel(kind, config, expert), tensors, record)
