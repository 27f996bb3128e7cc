"""The numpy engine: `linear` and `task_arithmetic` merges of full checkpoints, without importing torch.

Why a second engine: starting Python and importing torch takes 1.5 s, which on small models is most of a merge
(8 fine-tunes of a 27M Llama: 1.5 of 2.4 s), and these two methods — weighted sums — are the commonest merges.
`moerge.merge` picks this engine when it can run the merge (``engine: auto``, the default) and the torch engine
(`moerge.merging.checkpoint`) otherwise; ``engine: numpy`` / ``torch`` force one (`why_not` names what the numpy
engine cannot do). Everything around the arithmetic is shared with the torch engine: the config and parameter
validation (gradients and filters included), `CheckpointReader`, `check_compatible`, the planned streaming shard
writer, the output folder written atomically, `write_model_files` and the model card.

What it runs: methods ``linear`` and ``task_arithmetic``, computed in float32 (``dtype`` unset or float32), on
local transformers folders (no ``MODEL+LORA`` references, GGUF files or hub ids; no slices, output tokenizer,
statistics or LoRA experts). Inputs stored in float32, float16, bfloat16 or float64 are read into float32
(exactly, except float64, rounded to nearest); outputs are stored in float32, float16, float64 or bfloat16, each
rounded to nearest even as torch's casts do (bfloat16 by its bit pattern: numpy has no bfloat16).

Tensors are merged model by model into a running sum, so memory holds the sum, one model's tensor and the
base's (buffers as large as the largest tensor, reused), not the N inputs stacked as in the torch engine.
The arithmetic follows mergekit's (``mergekit/merge_methods/linear.py``, ``generalized_task_arithmetic.py``):
products wᵢ·xᵢ rounded to float32 and summed in model order, divided by Σwᵢ (with normalize), times λ, plus the
base. torch's vectorised sum uses that order too except at a few columns per thread (its tail loop groups the
models differently), so results equal mergekit's and the torch engine's to float32 round-off
(``tests/merging/test_numpy_engine.py``, ``tests/compat/test_mergekit_compat.py``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moerge.errors import MalformedConfigError
from moerge.experts.paths import atomic_output_dir
from moerge.merging.config import MergeConfig, check_param_ranges, parse_size
from moerge.merging.folders import (
    CheckpointReader,
    check_compatible,
    nonfinite_input,
    nonfinite_merged,
    num_layers,
    write_model_files,
)
from moerge.merging.registry import MethodSpec, resolve_params
from moerge.merging.st_io import FLOAT_DTYPES, ITEMSIZE, StreamingShardWriter, plan_shards

METHODS = ("linear", "task_arithmetic")
STORED = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
BLOCK = 1 << 15  # entries per step of `accumulate`: x, base and the sum's blocks stay in L2
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # bfloat16: its bits, converted by hand


def why_not(spec: MethodSpec, cfg: MergeConfig) -> str | None:
    """Why the numpy engine cannot run this (already planned) merge, or None when it can."""
    if spec.name not in METHODS:
        return f"merge method {spec.name!r} (it runs {' and '.join(METHODS)})"
    if sys.byteorder != "little":  # safetensors is little-endian; the engine reinterprets bits in place
        return "a big-endian machine"
    if cfg.is_lora:
        return "LoRA experts"
    if cfg.slices is not None:
        return "slices"
    if cfg.tokenizer_spec() is not None:
        return "an output tokenizer (tokenizer_source / tokenizer)"
    if cfg.dtype not in (None, "float32"):
        return f"computing in {cfg.dtype} (it computes in float32)"
    for ref in [m.model for m in cfg.models] + ([cfg.base_model] if cfg.base_model else []):
        if not Path(ref).is_dir():
            return f"{ref} (a MODEL+LORA reference, GGUF file or hub id; it reads local model folders)"
    return None


def use_numpy_engine(spec: MethodSpec, cfg: MergeConfig, engine: str) -> bool:
    """The engine choice: ``auto`` takes numpy where it can; ``numpy`` refuses, naming why, where it cannot."""
    if engine == "torch":
        return False
    reason = why_not(spec, cfg)
    if engine == "numpy" and reason is not None:
        raise MalformedConfigError(
            f"engine: numpy cannot run this merge ({reason}); use engine: auto (or torch)."
        )
    return reason is None


# ------------------------------------------------------------------------------------------------ conversions


def read_float32(reader: CheckpointReader, key: str, out: np.ndarray, scratch: Scratch | None = None) -> None:
    """Tensor ``key`` of ``reader`` into the flat float32 array ``out``: float32 read in place, float16 and
    bfloat16 widened exactly, float64 rounded to nearest (through a buffer of ``scratch`` when given)."""
    dtype = reader.dtype(key)
    if dtype == "F32":
        reader.read_into(key, out.view(np.uint8).data)
        return
    raw = scratch.get("raw", out.size, _NUMPY[dtype]) if scratch else np.empty(out.size, _NUMPY[dtype])
    reader.read_into(key, raw.view(np.uint8).data)
    if dtype == "BF16":  # a bfloat16 is the top half of a float32
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = raw


class Scratch:
    """Flat buffers reused for every tensor (the running sum, one model's tensor, the base's, a raw read), each
    as large as the largest tensor: memory is touched once, not once per tensor and model."""

    def __init__(self, largest: int) -> None:
        self.largest = largest
        self._buffers: dict[tuple[str, str], np.ndarray] = {}

    def get(self, name: str, size: int, dtype: Any = np.float32) -> np.ndarray:
        key = (name, np.dtype(dtype).str)
        if key not in self._buffers:
            self._buffers[key] = np.empty(self.largest, dtype=dtype)
        return self._buffers[key][:size]


def to_stored(x: np.ndarray, dtype: str, overwrite: bool = False) -> np.ndarray:
    """Float32 ``x`` in safetensors ``dtype`` (round to nearest even; finite inputs). ``overwrite`` lets the
    bfloat16 rounding use ``x`` as scratch."""
    if dtype == "F32":
        return x
    if dtype == "BF16":  # torch's float → bfloat16: add 0x7FFF plus the lowest kept bit, keep the top half
        bits = (x if overwrite else x.copy()).reshape(-1).view(np.uint32)
        carry = bits >> 16
        carry &= 1
        carry += np.uint32(0x7FFF)
        bits += carry
        return np.ascontiguousarray(bits.view("<u2")[1::2]).reshape(x.shape)  # little-endian: the high halves
    with np.errstate(over="ignore"):  # beyond float16's range: ±Inf, as torch's cast (and mergekit's output)
        return x.astype(_NUMPY[dtype])


def finite(x: np.ndarray) -> bool:
    """No NaN or Inf in ``x``: a finite sum implies finite entries; only a non-finite sum needs the full check."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(x.sum(dtype=np.float32))) or bool(np.isfinite(x).all())


# ------------------------------------------------------------------------------------------------ arithmetic


def accumulate(acc: np.ndarray, x: np.ndarray, w: float, first: bool, base: np.ndarray | None = None) -> None:
    """One model's term of Σᵢ wᵢ·(xᵢ − base) into ``acc``, in float32 as mergekit: the difference and the
    product rounded, then added (the first term is stored). ``x`` is overwritten. Blocks of `BLOCK` entries keep
    the three steps in the CPU's cache."""
    wf = np.float32(w)
    for a in range(0, x.size, BLOCK):
        xs, out = x[a : a + BLOCK], acc[a : a + BLOCK]
        if base is not None:
            np.subtract(xs, base[a : a + BLOCK], out=xs)
        if first:
            np.multiply(xs, wf, out=out)
        else:
            np.multiply(xs, wf, out=xs)
            out += xs


def _sum_float32(values: Sequence[float]) -> np.float32:
    s = np.float32(0.0)
    for v in values:
        s = np.float32(s + np.float32(v))
    return s


def finish_linear(acc: np.ndarray, weight: Sequence[float], *, normalize: bool = True) -> np.ndarray:
    """``linear`` from ``acc`` = Σ wᵢθᵢ: divided by Σ wᵢ with ``normalize`` (unless that sum is ~0)."""
    if normalize:
        s = _sum_float32(weight)
        if abs(s) > 1e-12:
            acc /= s
    return acc


def finish_task_arithmetic(
    acc: np.ndarray, weight: Sequence[float], base: np.ndarray, *, scale: float = 1.0, normalize: bool = False
) -> np.ndarray:
    """``task_arithmetic`` from ``acc`` = Σ wᵢ(θᵢ − θ₀): θ₀ + λ·acc (acc divided by Σ wᵢ with ``normalize``)."""
    if normalize:
        s = _sum_float32(weight)
        if abs(s) >= 1e-8:
            acc /= s
    if scale != 1:
        acc *= np.float32(scale)
    acc += base
    return acc


# ---------------------------------------------------------------------------------------------------- engine


def merge_checkpoints(
    spec: MethodSpec,
    models: list[str | Path],
    base_model: str | Path | None,
    out: str | Path,
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    *,
    out_dtype: str | None = None,
    shard_size: int | str = "2GB",
    recipe: dict[str, Any] | None = None,
    copy_tokenizer: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path | None] | None = None,
) -> Path:
    """`moerge.merging.checkpoint.merge_checkpoints` for ``linear`` / ``task_arithmetic`` on local folders,
    computed with numpy: the same output folder (shards, index, config, tokenizer, model card), written
    atomically; ``out_dtype`` is the stored dtype (default: each tensor's own dtype in the base)."""
    out = Path(out)
    readers = [CheckpointReader(m) for m in models]
    base = CheckpointReader(base_model) if base_model is not None else None
    try:
        check_compatible(([base] if base else []) + readers)
        sources = [*models, *([base_model] if base_model is not None else []), *(inputs or [])]
        with atomic_output_dir(out, overwrite=overwrite, inputs=sources) as tmp:
            _merge_into(spec, readers, base, tmp, global_params, per_model, out_dtype, shard_size, progress)
            ref = base or readers[0]
            write_model_files(ref.folder, tmp, out_dtype, recipe, copy_tokenizer)
    finally:
        for r in readers + ([base] if base else []):
            r.close()
    return out


def _merge_into(
    spec: MethodSpec,
    readers: list[CheckpointReader],
    base: CheckpointReader | None,
    out: Path,
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    out_dtype: str | None,
    shard_size: int | str,
    progress: Callable[[str, int, int], None] | None,
) -> None:
    ref = base or readers[0]
    keys = ref.names()
    layers = num_layers(ref)

    def stored(key: str) -> str:
        own = ref.dtype(key)
        return STORED[out_dtype] if out_dtype and own in FLOAT_DTYPES else own

    writer = StreamingShardWriter(
        out, plan_shards([(k, stored(k), ref.shape(k)) for k in keys], parse_size(shard_size))
    )
    scratch = Scratch(max((math.prod(ref.shape(k)) for k in keys), default=0))
    try:
        for done, key in enumerate(keys, 1):
            shape = ref.shape(key)
            if (
                ref.dtype(key) not in FLOAT_DTYPES
            ):  # integer buffers: taken from the base, as the torch engine
                raw = bytearray(math.prod(shape) * ITEMSIZE[ref.dtype(key)])
                ref.read_into(key, memoryview(raw))
                writer.write_bytes(key, ref.dtype(key), shape, memoryview(raw))
            else:
                merged = _merge_tensor(
                    spec, readers, base, key, shape, scratch, global_params, per_model, layers
                )
                data = to_stored(merged, stored(key), overwrite=True)
                writer.write_bytes(key, stored(key), shape, data.reshape(-1).view(np.uint8).data)
            if progress:
                progress(key, done, len(keys))
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def _merge_tensor(
    spec: MethodSpec,
    readers: list[CheckpointReader],
    base: CheckpointReader | None,
    key: str,
    shape: tuple[int, ...],
    scratch: Scratch,
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    layers: int,
) -> np.ndarray:
    """Tensor ``key`` merged, model by model: one model's tensor in memory at a time besides the sum."""
    m = math.prod(shape)
    g, pm = resolve_params(spec, global_params, per_model, key, layers)
    if g is not global_params:  # values that vary by tensor: checked where they apply
        check_param_ranges(spec.name, g, pm, where=f"tensor {key}")
    weight = [p["weight"] for p in pm]
    acc, x = scratch.get("sum", m), scratch.get("model", m)
    b = None
    if base is not None:
        b = scratch.get("base", m)
        read_float32(base, key, b, scratch)
    with np.errstate(over="ignore", invalid="ignore"):
        for i, r in enumerate(readers):
            read_float32(r, key, x, scratch)
            accumulate(acc, x, weight[i], i == 0, b)
        if spec.name == "linear":
            merged = finish_linear(acc, weight, normalize=g["normalize"])
        else:
            assert b is not None  # task_arithmetic requires a base (plan() refuses a config without one)
            merged = finish_task_arithmetic(acc, weight, b, scale=g["scale"], normalize=g["normalize"])
    if not finite(merged):  # NaN and Inf reach the result (0·Inf is NaN), so inputs are read again only now
        bad = [
            src.folder
            for src in ([base] if base is not None else []) + readers
            if not _finite_input(src, key, x)
        ]
        raise nonfinite_input(bad[0], key) if bad else nonfinite_merged(key)
    return merged.reshape(shape)


def _finite_input(reader: CheckpointReader, key: str, buffer: np.ndarray) -> bool:
    read_float32(reader, key, buffer)
    return finite(buffer)
