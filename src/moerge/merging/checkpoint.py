"""Full-checkpoint merges, streamed tensor by tensor.

Inputs are transformers folders with (sharded) safetensors weights. For each output tensor the engine reads that
one tensor from every input with ``pread`` straight into its slot of an ``[N, *shape]`` float32 buffer (no memory
map, nothing else loaded), merges, casts and writes it to its output shard at once: the output shards' headers are
planned before the first tensor is merged. Peak memory is therefore about one stacked tensor (N inputs) plus the
method's temporaries, not N whole models and not even one output shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moerge.errors import MalformedConfigError, ShapeMismatchError
from moerge.experts.paths import atomic_output_dir
from moerge.merging.config import TokenizerSpec, check_param_ranges, parse_size
from moerge.merging.folders import (
    INDEX,
    SINGLE,
    CheckpointReader,
    TensorSource,
    check_compatible,
    nonfinite_input,
    nonfinite_merged,
    num_layers,
    split_lora_reference,
    write_model_files,
)
from moerge.merging.registry import MethodSpec, merge_tensor, resolve_params
from moerge.merging.st_io import StreamingShardWriter, plan_shards, st_dtype, torch_dtype

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. A finite sum implies finite entries (NaN and ±Inf propagate through a sum), and
    costs a tenth of ``isfinite(t).all()``; only a non-finite sum (NaN/Inf, or an overflow) needs the full check."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


class LoraAppliedReader:
    """A model with a PEFT LoRA adapter merged into its weights as they are read: W + scaling·B·A in float32 for
    every adapted module, as PEFT's ``merge_and_unload``, which mergekit's ``model+lora`` runs
    (``mergekit/common.py`` ``ModelReference.merged``)."""

    def __init__(self, reader: CheckpointReader, adapter: str | Path):
        from moerge.experts.peft_io import read_peft_folder

        self.inner, self.folder, self.config = reader, reader.folder, reader.config
        expert = read_peft_folder(adapter)
        self.deltas = {}
        for module, lm in expert.lora.items():
            key = module + ".weight"
            if key not in reader.entries or tuple(reader.shape(key)) != tuple(lm.weight_shape):
                raise ShapeMismatchError(
                    f"{adapter}: adapts {module} (weight {tuple(lm.weight_shape)}), which {reader.folder} lacks or "
                    "holds in another shape; apply an adapter trained on that model."
                )
            self.deltas[key] = lm

    def names(self) -> list[str]:
        return self.inner.names()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(key)

    def dtype(self, key: str) -> str:
        return self.inner.dtype(key)

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if key not in self.deltas:
            return self.inner.get(key, out)
        w = self.inner.get(key).float() + self.deltas[key].delta_for_weight().float()
        if out is None:
            return w.to(SAFETENSORS_DTYPES.get(self.dtype(key), torch.float32))
        return out.copy_(w)

    def close(self) -> None:
        self.inner.close()


def open_model(ref: str | Path) -> CheckpointReader | LoraAppliedReader:
    """A reader for a model reference: a folder (or GGUF file, or hub id), or ``MODEL+LORA``."""
    from moerge.backbones.loading import model_folder

    model, lora = split_lora_reference(ref)
    reader = CheckpointReader(model_folder(model))
    return reader if lora is None else LoraAppliedReader(reader, lora)


class ShardWriter:
    """Collects output tensors and writes a safetensors shard whenever the next tensor would pass ``max_bytes``;
    ``finish`` names the shards ``model-0000i-of-0000n.safetensors`` and writes the index (or one
    ``model.safetensors`` when everything fit in one shard)."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + n > self.max_bytes:
            self.flush()
        self.current[key] = tensor.contiguous()
        self.current_bytes += n
        self.total += n

    def flush(self) -> None:
        if not self.current:
            return
        path = self.out / f"moerge-shard-{len(self.files):05d}.tmp"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> list[Path]:
        self.flush()
        n = len(self.files)
        if n == 1:
            final = self.out / SINGLE
            self.files[0][0].replace(final)
            return [final]
        weight_map, paths = {}, []
        for i, (tmp, keys) in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.replace(self.out / name)
            paths.append(self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / INDEX).write_text(json.dumps(index, indent=2))
        return paths


def _read_stacked(readers: list[TensorSource], key: str, compute_dtype: torch.dtype) -> torch.Tensor:
    """``[N, *shape]`` in ``compute_dtype``: tensor ``key`` of every input, each read into its slot."""
    x = torch.empty((len(readers), *readers[0].shape(key)), dtype=compute_dtype)
    for i, r in enumerate(readers):
        r.get(key, out=x[i])
    return x


_BINS = 2**15  # a non-negative float32's top 16 bits (its sign bit is 0): exponent and 7 mantissa bits


def model_thresholds(
    readers: list[TensorSource],
    base: TensorSource,
    keys: list[str],
    density: list[float],
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per model i, the magnitude t such that the entries of τᵢ = θᵢ − θ₀ over the whole model (every floating
    tensor in ``keys``) with |τ| ≥ t are its ``density[i]`` largest: TIES' whole-model trim.

    Exact, with memory bounded by one stacked tensor: a first pass counts |τ| per model in 2¹⁵ bins ordered like
    the values (the float32 bit pattern's top 16 bits), which locates the bin holding the threshold; a second pass
    collects only that bin's entries and selects the threshold among them."""
    n = len(readers)
    float_keys = [k for k in keys if readers[0].dtype(k) in SAFETENSORS_DTYPES]

    def magnitudes(key: str) -> torch.Tensor:
        x = _read_stacked(readers, key, compute_dtype)
        return x.sub_(base.get(key).to(compute_dtype)).abs_().reshape(n, -1).float()

    counts = torch.zeros(n * _BINS, dtype=torch.int64)
    offsets = (torch.arange(n) * _BINS)[:, None]
    total = 0
    for key in float_keys:
        bins = magnitudes(key).view(torch.int32) >> 16
        counts += torch.bincount((bins + offsets).flatten(), minlength=n * _BINS)
        total += bins.shape[1]
    counts = counts.reshape(n, _BINS)
    at_or_above = counts.flip(1).cumsum(1).flip(1)  # [i, b]: entries of model i in bins ≥ b
    ks = [total if d >= 1 else max(1, int(d * total)) for d in density]
    thr = torch.zeros(n)
    want: dict[int, tuple[int, int]] = {}  # model → (bin holding its threshold, entries needed from that bin)
    for i, k in enumerate(ks):
        if k >= total:
            continue  # keeps everything: threshold 0
        b = int((at_or_above[i] >= k).nonzero().max())
        above = int(at_or_above[i, b + 1]) if b + 1 < _BINS else 0
        want[i] = (b, k - above)
    if want:
        found: dict[int, list[torch.Tensor]] = {i: [] for i in want}
        for key in float_keys:
            mags = magnitudes(key)
            bins = mags.view(torch.int32) >> 16
            for i, (b, _) in want.items():
                found[i].append(mags[i][bins[i] == b])
        for i, (_, need) in want.items():
            vals = torch.cat(found[i])
            thr[i] = torch.kthvalue(vals, vals.numel() - need + 1).values
    return thr


def iter_merged(
    spec: MethodSpec,
    readers: list[TensorSource],
    base: TensorSource | None,
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    *,
    seed: int = 0,
    stats: list[dict[str, torch.Tensor]] | None = None,
    fan_in_fan_out: AbstractSet[str] = frozenset(),
    compute_dtype: torch.dtype = torch.float32,
    params_for: Callable[[str], tuple[dict[str, Any], list[dict[str, Any]], float]] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` for every tensor, reading one tensor per input at a time. The inputs are
    read into ``compute_dtype`` and the method computes in it (mergekit's ``dtype``). ``params_for(name)`` gives
    a tensor's (global, per-model, t) parameters where they vary by more than the name (layer slices)."""
    ref = base or readers[0]
    keys = ref.names()
    layers = num_layers(ref)
    threshold = None
    if "threshold" in spec.uses and global_params.get("trim") == "model" and base is not None:
        density = [pm.get("density", 1.0) for pm in per_model]
        if not all(isinstance(d, (int, float)) for d in density):
            raise MalformedConfigError(
                f"merge method {spec.name!r}: trim: model keeps one fraction of each whole model, so density must "
                "be one number per model (no gradients or filters); use trim: tensor for densities by tensor."
            )
        threshold = model_thresholds(readers, base, keys, density, compute_dtype)
    for key in keys:
        if readers[0].dtype(key) not in SAFETENSORS_DTYPES:  # integer buffers: taken from the base
            yield key, (base or readers[0]).get(key)
            continue
        x = _read_stacked(readers, key, compute_dtype)
        b = base.get(key).to(compute_dtype) if base is not None else None
        if not all_finite(x) or (b is not None and not all_finite(b)):
            bad = [r.folder for i, r in enumerate(readers) if not all_finite(x[i])]
            bad += [base.folder] if base is not None and b is not None and not all_finite(b) else []
            raise nonfinite_input(bad[0], key)
        s = None
        if stats is not None and all(key in st for st in stats):
            s = torch.stack([st[key].to(compute_dtype) for st in stats])
        if params_for is not None:
            g0, pm0, t = params_for(key)
            g, pm = resolve_params(spec, g0, pm0, key, layers, t=t)
        else:
            g0 = global_params
            g, pm = resolve_params(spec, global_params, per_model, key, layers)
        if g is not g0:  # values that vary by tensor: check them where they apply
            check_param_ranges(spec.name, g, pm, where=f"tensor {key}")
        yield (
            key,
            merge_tensor(
                spec,
                x,
                base=b,
                global_params=g,
                per_model=pm,
                name=key,
                seed=seed,
                stats=s,
                layout="fan_in_fan_out" if key in fan_in_fan_out else "linear",
                inplace=True,
                threshold=threshold,
            ),
        )
        del x, b


def merge_checkpoints(
    spec: MethodSpec,
    models: list[str | Path],
    base_model: str | Path | None,
    out: str | Path,
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    *,
    dtype: str | None = None,
    out_dtype: str | None = None,
    seed: int = 0,
    shard_size: int | str = "2GB",
    stats: list[dict[str, torch.Tensor]] | None = None,
    fan_in_fan_out: AbstractSet[str] = frozenset(),
    recipe: dict[str, Any] | None = None,
    copy_tokenizer: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path | None] | None = None,
    open_readers: Callable[[], tuple[list[Any], Any]] | None = None,
    params_for: Callable[[str], tuple[dict[str, Any], list[dict[str, Any]], float]] | None = None,
    config_overrides: dict[str, Any] | None = None,
    tokenizer: TokenizerSpec | None = None,
) -> Path:
    """Merge transformers folders ``models`` (against ``base_model``) into the folder ``out``, streaming. A model
    or base may also be a GGUF file or a hub id (`moerge.backbones.loading.model_folder`).

    As in mergekit, ``dtype`` is the compute dtype (the inputs are read into it and merged in it; default
    float32) and ``out_dtype`` the stored one (default: ``dtype`` when given, else each tensor's dtype in the
    base).

    The output is written into a temporary sibling folder and renamed into place once complete, so a failed
    merge (bad parameters, NaN, a full disk) leaves ``out`` as it was; a non-empty ``out`` is replaced only with
    ``overwrite``, and never when it is (or holds) an input (``models``, ``base_model`` and ``inputs``).
    ``progress(name, done, total)`` is called after each tensor is written.

    Layer slices (`moerge.merging.slices`) pass ``open_readers() -> (readers, base)`` (readers that rename
    layers), ``params_for`` (parameters by output tensor) and ``config_overrides`` (the new layer count).

    ``tokenizer`` (mergekit's ``tokenizer_source`` / ``tokenizer:``) builds an output tokenizer and aligns every
    input's embeddings and LM head to it before merging (`moerge.merging.vocab`); the output holds that
    tokenizer and its ``vocab_size``."""
    out = Path(out)
    parts = [split_lora_reference(m) for m in [*models, *([base_model] if base_model is not None else [])]]
    sources = [p for pair in parts for p in pair if p is not None] + list(inputs or [])
    readers: list[TensorSource] = []
    base = None
    try:
        if open_readers is not None:
            readers, base = open_readers()
        else:
            readers = [open_model(m) for m in models]
            base = open_model(base_model) if base_model is not None else None
        out_tokenizer = None
        if tokenizer is not None:
            from moerge.merging.vocab import align_readers

            readers, base, tok_plan = align_readers(  # type: ignore[assignment]
                readers, base, tokenizer, DTYPES[dtype] if dtype else torch.float32
            )
            out_tokenizer = tok_plan.tokenizer
            config_overrides = {**(config_overrides or {}), "vocab_size": tok_plan.vocab_size}
        check_compatible(([base] if base else []) + readers, same_vocab=tokenizer is None)
        with atomic_output_dir(out, overwrite=overwrite, inputs=sources) as tmp:
            _merge_into(
                spec, readers, base, tmp, global_params, per_model, dtype, out_dtype, seed, shard_size, stats,
                fan_in_fan_out, recipe, copy_tokenizer and out_tokenizer is None, progress, params_for,
                config_overrides,
            )  # fmt: skip
            if out_tokenizer is not None:  # mergekit: tokenizer.save_pretrained(out, safe_serialization=True)
                out_tokenizer.save_pretrained(str(tmp))
    finally:
        for r in readers + ([base] if base else []):
            r.close()
    return out


def _merge_into(
    spec: MethodSpec,
    readers: list[TensorSource],
    base: TensorSource | None,
    out: Path,
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    dtype: str | None,
    out_dtype: str | None,
    seed: int,
    shard_size: int | str,
    stats: list[dict[str, torch.Tensor]] | None,
    fan_in_fan_out: AbstractSet[str],
    recipe: dict[str, Any] | None,
    copy_tokenizer: bool,
    progress: Callable[[str, int, int], None] | None,
    params_for: Callable[[str], tuple[dict[str, Any], list[dict[str, Any]], float]] | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> None:
    ref = base or readers[0]
    stored = out_dtype or dtype  # mergekit: out_dtype, else the compute dtype, else the inputs' own
    stored_dtype = DTYPES[stored] if stored else None

    def out_dtype_of(key: str) -> torch.dtype:
        src = SAFETENSORS_DTYPES.get(ref.dtype(key))
        return (stored_dtype or src) if src is not None else torch_dtype(ref.dtype(key))

    plan = plan_shards(
        [(k, st_dtype(out_dtype_of(k)), ref.shape(k)) for k in ref.names()], parse_size(shard_size)
    )
    writer = StreamingShardWriter(out, plan)
    merged_tensors = iter_merged(
        spec,
        readers,
        base,
        global_params,
        per_model,
        seed=seed,
        stats=stats,
        fan_in_fan_out=fan_in_fan_out,
        compute_dtype=DTYPES[dtype] if dtype else torch.float32,
        params_for=params_for,
    )
    total = len(ref.names())
    try:
        for done, (key, merged) in enumerate(merged_tensors, 1):
            if torch.is_floating_point(merged) and not all_finite(merged):
                raise nonfinite_merged(key)
            writer.write(key, merged.to(out_dtype_of(key)))
            if progress:
                progress(key, done, total)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    write_model_files(ref.folder, out, stored, recipe, copy_tokenizer, config_overrides)
