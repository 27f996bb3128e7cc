"""Stacked factors: every expert's LoRA factors of one module in one memory-mapped safetensors file.

A library-level artifact (kind ``stacked_factors``) written once per (expert set, module)::

    artifacts/stacked_factors/<config-hash>/_library.safetensors    A  [E, R, d_in]   (scaling folded in)
                                                                    Bt [E, R, d_out]  (B transposed)
    artifacts/stacked_factors/<config-hash>/_library.json           the record: module, experts' digest, shapes

The layout is `moerge.model.expert_layer.stack_factors`'s (experts of smaller rank zero-padded to R, an expert
without the module all zeros), so a paged expert layer reads rows of these tensors where a pre-stacked one
holds them all in memory. `open_stacked` maps the file (``numpy.memmap``, copy-on-write, never written): reading
expert ``e`` touches only its pages. The config hash covers the module, the expert names in routing order and
each expert's digest (its files' checksums), so replacing an expert makes a new artifact, never a stale read.

Paging needs a local library (a file to map); a remote one is refused with the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moerge.errors import LibraryError
from moerge.experts.formats import ADAPTER_WEIGHTS
from moerge.experts.library import ExpertLibrary, artifact_rel

STACKED_KIND = "stacked_factors"
_HEADER = struct.Struct("<Q")


@dataclass
class StackedFactors:
    """One module's factors of E experts, memory-mapped: ``A [E, R, d_in]``, ``Bt [E, R, d_out]`` (CPU tensors
    over the file's pages; reading rows reads only those pages)."""

    module: str
    A: torch.Tensor
    Bt: torch.Tensor
    path: Path

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]


def experts_digest(library: ExpertLibrary, names: Sequence[str]) -> str:
    """A digest of an ordered expert set: names and each expert's files (it changes when one is replaced)."""
    h = hashlib.sha256()
    for n in names:
        h.update(f"{n}\0{library.expert_digest(n)}\n".encode())
    return h.hexdigest()[:32]


def stacked_config(module: str, digest: str) -> dict[str, Any]:
    """The artifact key: the module and the expert set (whose files fix the ranks and shapes)."""
    return {"version": 1, "module": module, "experts": digest, "dtype": "float32"}


def library_modules(library: ExpertLibrary) -> dict[str, tuple[int, int]]:
    """``{module: (d_in, d_out)}`` of every LoRA module the library's experts adapt (from the catalog)."""
    return {m: dims for m, dims in library.module_dims().items() if dims[1] > 0}


def _local_root(library: ExpertLibrary) -> Path:
    root = library.storage.local_path("")
    if root is None:
        raise LibraryError(
            f"{library.url}: paged expert factors are memory-mapped from local files; pull the library to a "
            "local folder (`moerge library pull`) or attach with paging off (PagingConfig(mode='off'))."
        )
    return root


def _max_rank(library: ExpertLibrary, names: Sequence[str]) -> int:
    """The largest LoRA rank among ``names``, from their safetensors headers (a sizing pass: the factors
    themselves are read, checked against their checksums, when the file is written)."""
    R = 1
    for n in names:
        entry = library._entry(n)
        data = library.storage.read_bytes(f"{entry.rel}/{ADAPTER_WEIGHTS}")
        (size,) = _HEADER.unpack_from(data, 0)
        header = json.loads(data[8 : 8 + size])
        for key, info in header.items():
            if "lora_A" in key or "lora_embedding_A" in key:
                R = max(R, int(info["shape"][0]))
    return R


def ensure_stacked_factors(
    library: ExpertLibrary,
    names: Sequence[str],
    modules: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, StackedFactors]:
    """The stacked factors of ``names`` (routing order) for ``modules`` (default: every module of the library),
    written as library artifacts where missing (each expert read once, its checksums checked), then mapped."""
    _local_root(library)
    dims = library_modules(library)
    wanted = list(modules) if modules is not None else list(dims)
    unknown = [m for m in wanted if m not in dims]
    if unknown:
        raise LibraryError(
            f"{library.url}: no expert of the library adapts module {unknown[0]}; pick modules the experts adapt."
        )
    digest = experts_digest(library, names)
    found = {m: _find(library, m, digest) for m in wanted}
    todo = [m for m in wanted if found[m] is None]
    if todo:
        _write(library, names, {m: dims[m] for m in todo}, digest, progress)
        found = {m: _find(library, m, digest) for m in wanted}
    return {m: _open(library, m, f) for m, f in found.items() if f is not None}


def _find(library: ExpertLibrary, module: str, digest: str) -> dict[str, Any] | None:
    """The config of the stacked-factors artifact of ``module`` for this expert set, if it was written."""
    cfg = stacked_config(module, digest)
    return cfg if library.has_artifact(STACKED_KIND, cfg, None) else None


def _write(
    library: ExpertLibrary,
    names: Sequence[str],
    dims: dict[str, tuple[int, int]],
    digest: str,
    progress: Callable[[int, int], None] | None,
) -> None:
    root = _local_root(library)
    R = _max_rank(library, names)
    E = len(names)
    open_files: dict[str, tuple[Any, Path, Path, int, int]] = {}  # module -> (fd, tmp, final, a_off, b_off)
    try:
        for m, (d_in, d_out) in dims.items():
            rel = artifact_rel(STACKED_KIND, stacked_config(m, digest), None)
            final = root / f"{rel}.safetensors"
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
            a_bytes, b_bytes = E * R * d_in * 4, E * R * d_out * 4
            header = {
                "__metadata__": {"format": "pt", "module": m},
                "A": {"dtype": "F32", "shape": [E, R, d_in], "data_offsets": [0, a_bytes]},
                "Bt": {"dtype": "F32", "shape": [E, R, d_out], "data_offsets": [a_bytes, a_bytes + b_bytes]},
            }
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            os.write(fd, _HEADER.pack(len(raw)) + raw)
            start = 8 + len(raw)
            os.ftruncate(fd, start + a_bytes + b_bytes)  # unwritten rows read as zeros: no update
            open_files[m] = (fd, tmp, final, start, start + a_bytes)
        for e, name in enumerate(names):
            expert = library.get(name)
            for m, (fd, _, _, a_off, b_off) in open_files.items():
                lm = expert.lora.get(m)
                if lm is None:
                    continue
                if lm.rank > R:
                    raise LibraryError(
                        f"{library.url}: expert {name!r} changed while its factors were stacked; retry."
                    )
                d_in, d_out = dims[m]
                A = torch.zeros(R, d_in)
                Bt = torch.zeros(R, d_out)
                A[: lm.rank] = lm.A.float() * lm.scaling
                Bt[: lm.rank] = lm.B.float().T
                os.pwrite(fd, A.numpy().tobytes(), a_off + e * R * d_in * 4)
                os.pwrite(fd, Bt.numpy().tobytes(), b_off + e * R * d_out * 4)
            if progress is not None:
                progress(e + 1, E)
        for m, (fd, tmp, final, _, _) in open_files.items():
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, final)
            d_in, d_out = dims[m]
            record = {
                "kind": STACKED_KIND,
                "config": stacked_config(m, digest),
                "expert": None,
                "info": {"module": m, "experts": E, "rank": R, "d_in": d_in, "d_out": d_out},
            }
            rel = artifact_rel(STACKED_KIND, stacked_config(m, digest), None)
            library.storage.write_bytes(f"{rel}.json", json.dumps(record, indent=2).encode())
        open_files = {}
    finally:
        for fd, tmp, _, _, _ in open_files.values():
            os.close(fd)
            tmp.unlink(missing_ok=True)


def _open(library: ExpertLibrary, module: str, config: dict[str, Any]) -> StackedFactors:
    rel = artifact_rel(STACKED_KIND, config, None)
    path = library.storage.local_path(f"{rel}.safetensors")
    assert path is not None  # a local library (checked by the caller)
    return open_stacked(path, module)


def _random_access(mm: np.memmap) -> None:
    """No read-ahead on the map: a call reads scattered experts' rows, and the kernel's read-ahead around each
    would page in (and count in the process's RSS) most of the file."""
    raw = getattr(mm, "_mmap", None)
    advice = getattr(mmap, "MADV_RANDOM", None)
    if raw is not None and advice is not None:
        with contextlib.suppress(OSError, ValueError):
            raw.madvise(advice)


def open_stacked(path: str | Path, module: str = "") -> StackedFactors:
    """Map a stacked-factors safetensors file (``A``, ``Bt``, float32) without reading it."""
    path = Path(path)
    with open(path, "rb") as f:
        (size,) = _HEADER.unpack(f.read(8))
        if size > 1 << 20:
            raise LibraryError(
                f"{path}: not a stacked-factors file (header of {size} bytes); delete it to rebuild."
            )
        header = json.loads(f.read(size))
    start = 8 + size
    tensors = {}
    for key in ("A", "Bt"):
        info = header.get(key)
        if not isinstance(info, dict) or info.get("dtype") != "F32":
            raise LibraryError(
                f"{path}: not a stacked-factors file (no float32 {key}); delete it to rebuild."
            )
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        if len(shape) != 3 or end - begin != 4 * int(np.prod(shape)):
            raise LibraryError(f"{path}: tensor {key} does not fit its shape; delete the file to rebuild it.")
        # copy-on-write: the file is never written through this map; torch wants a writable array
        mm = np.memmap(path, dtype=np.float32, mode="c", offset=start + begin, shape=shape)
        _random_access(mm)
        tensors[key] = torch.from_numpy(mm)
    return StackedFactors(module, tensors["A"], tensors["Bt"], path)


__all__ = [
    "STACKED_KIND",
    "StackedFactors",
    "ensure_stacked_factors",
    "experts_digest",
    "library_modules",
    "open_stacked",
]
