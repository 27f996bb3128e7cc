"""Minimal streaming safetensors I/O: read one tensor with ``pread`` (no memory map, so reading N models does not
grow the resident set by N file sizes), and write shards whose header is planned up front so every tensor goes to
disk the moment it is merged. The format is the public safetensors layout: an 8-byte little-endian header length,
a JSON header ``{name: {dtype, shape, data_offsets}}`` padded with spaces to 8 bytes, then the raw data.

Everything here works on safetensors dtype names and bytes; torch is imported only by `read_tensor` and
`StreamingShardWriter.write` (the numpy engine never calls them)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from moerge.errors import MalformedConfigError

if TYPE_CHECKING:
    import torch

ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"BF16"`` → ``torch.bfloat16``)."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }[st_dtype]  # fmt: skip


@functools.cache
def _torch_to_st() -> dict[torch.dtype, str]:
    return {torch_dtype(k): k for k in ITEMSIZE}


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype name of a torch dtype (``torch.float32`` → ``"F32"``)."""
    name = _torch_to_st().get(dtype)
    if name is None:
        raise MalformedConfigError(f"dtype {dtype} cannot be stored by moerge's merge (use a float dtype).")
    return name


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


MAX_HEADER_BYTES = 100_000_000


def _bad(path: Path, why: str) -> MalformedConfigError:
    return MalformedConfigError(
        f"{path}: not a valid safetensors file ({why}); re-save it with safetensors (save_pretrained)."
    )


def _int_list(v: Any, n: int | None = None) -> bool:
    return (
        isinstance(v, list)
        and (n is None or len(v) == n)
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**62 for x in v)
    )


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensor entries (absolute offsets) and the ``__metadata__`` of a safetensors file. Everything in the
    header is checked before it is used: the length against the file, each tensor's dtype, shape and byte range
    (inside the data, of the size its dtype and shape need), so a hostile header is one `MalformedConfigError`."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise _bad(path, "truncated: no header")
        (n,) = struct.unpack("<Q", raw)
        if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
            raise _bad(path, f"a header of {n} bytes in a file of {size} bytes")
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"the header is not JSON: {str(e)[:100]}") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _bad(path, "__metadata__ is not a map of strings")
    base = 8 + n
    data_len = size - base
    entries = {}
    for k, v in header.items():
        if not isinstance(v, dict) or not isinstance(v.get("dtype"), str):
            raise _bad(path, f"tensor {k[:80]!r} has no dtype")
        if v["dtype"] not in ITEMSIZE:
            raise _bad(path, f"tensor {k[:80]!r} has dtype {v['dtype'][:20]!r}, which moerge does not merge")
        shape, offsets = v.get("shape"), v.get("data_offsets")
        if not isinstance(shape, list) or not isinstance(offsets, list):
            raise _bad(path, f"tensor {k[:80]!r} has no shape or data_offsets")
        if not _int_list(shape) or len(shape) > 16 or not _int_list(offsets, 2):
            raise _bad(path, f"tensor {k[:80]!r} has a malformed shape or data_offsets")
        start, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        itemsize = ITEMSIZE[v["dtype"]]
        if not start <= end <= data_len or end - start != numel * itemsize:
            raise _bad(
                path,
                f"tensor {k[:80]!r}: bytes {start}..{end} do not hold a {v['dtype']}{tuple(shape)} inside the data",
            )
        entries[k] = TensorEntry(path, v["dtype"], tuple(shape), base + start, base + end)
    return entries, meta


def read_into(entry: TensorEntry, fd: int, buffer: memoryview) -> None:
    """Read one tensor's bytes with ``os.preadv`` into ``buffer`` (exactly ``end - start`` bytes)."""
    nbytes = entry.end - entry.start
    if buffer.nbytes != nbytes:
        raise ValueError(f"{entry.file}: a buffer of {buffer.nbytes} bytes for a tensor of {nbytes}")
    if nbytes and os.preadv(fd, [buffer], entry.start) != nbytes:
        raise MalformedConfigError(f"{entry.file}: truncated tensor data")


def read_tensor(entry: TensorEntry, fd: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with ``os.pread``; into ``out`` (same dtype and numel) when given, without a copy."""
    import torch

    nbytes = entry.end - entry.start
    dtype = torch_dtype(entry.dtype)
    if (
        out is not None
        and out.dtype == dtype
        and out.is_contiguous()
        and out.numel() * out.element_size() == nbytes
    ):
        read_into(entry, fd, memoryview(out.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
        return out
    buf = bytearray(nbytes)
    read_into(entry, fd, memoryview(buf))
    t = torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
    t = t.reshape(entry.shape)
    if out is not None:
        out.copy_(t)
        return out
    return t


def _header_bytes(items: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in items:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@dataclass
class PlannedShard:
    name: str
    items: list[tuple[str, str, tuple[int, ...], int]]  # (tensor, st dtype, shape, nbytes) in write order


def plan_shards(
    items: list[tuple[str, str, tuple[int, ...]]],
    max_bytes: int,
    single_name: str = "model.safetensors",
) -> list[PlannedShard]:
    """Group tensors ``(name, safetensors dtype, shape)`` (in order) into shards of at most ``max_bytes`` (a
    bigger tensor gets a shard of its own)."""
    groups: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
    size = 0
    for name, dtype, shape in items:
        nbytes = ITEMSIZE[dtype]
        for d in shape:
            nbytes *= d
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, dtype, tuple(shape), nbytes))
        size += nbytes
    n = len(groups)
    names = [single_name] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [PlannedShard(nm, g) for nm, g in zip(names, groups)]


class StreamingShardWriter:
    """Writes planned shards tensor by tensor (in plan order); files appear under their final names on ``finish``."""

    def __init__(self, out: Path, shards: list[PlannedShard], metadata: dict[str, str] | None = None):
        self.out, self.shards, self.meta = out, shards, {"format": "pt", **(metadata or {})}
        self._order = [(si, it) for si, s in enumerate(shards) for it in s.items]
        self._pos = 0
        self._file: BinaryIO | None = None
        self._shard = -1

    def _tmp(self, si: int) -> Path:
        return self.out / (self.shards[si].name + ".partial")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (a torch tensor of the planned dtype and shape)."""
        import torch

        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self.write_bytes(name, st_dtype(tensor.dtype), tuple(tensor.shape), memoryview(data))  # type: ignore[arg-type]

    def write_bytes(self, name: str, dtype: str, shape: tuple[int, ...], data: memoryview) -> None:
        """Write the next planned tensor from its raw bytes (safetensors ``dtype``, little-endian)."""
        si, (exp_name, exp_dtype, exp_shape, nbytes) = self._order[self._pos]
        if name != exp_name or tuple(shape) != exp_shape or dtype != exp_dtype or data.nbytes != nbytes:
            raise RuntimeError(
                f"writer expected {exp_name} {exp_dtype}{exp_shape}, got {name} {dtype}{tuple(shape)}"
            )
        if si != self._shard:
            if self._file is not None:
                self._file.close()
            self._file = open(self._tmp(si), "wb")  # noqa: SIM115
            self._file.write(_header_bytes(self.shards[si].items, self.meta))
            self._shard = si
        assert self._file is not None
        if nbytes:
            self._file.write(data)
        self._pos += 1

    def finish(self) -> list[Path]:
        if self._pos != len(self._order):
            raise RuntimeError(f"writer finished after {self._pos} of {len(self._order)} tensors")
        if self._file is not None:
            self._file.close()
        paths = []
        for si, s in enumerate(self.shards):
            self._tmp(si).replace(self.out / s.name)
            paths.append(self.out / s.name)
        if len(self.shards) > 1:
            total = sum(it[3] for s in self.shards for it in s.items)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {it[0]: s.name for s in self.shards for it in s.items},
            }
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return paths

    def abort(self) -> None:
        """Close and remove the partial shards; never raises (it runs while another error propagates, e.g. a
        full disk, where closing the file fails too)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        for si in range(len(self.shards)):
            with contextlib.suppress(OSError):
                self._tmp(si).unlink(missing_ok=True)
