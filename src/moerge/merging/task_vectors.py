"""Full fine-tunes as experts: a transformers folder against its base as a dense task vector
(``τ = θ_ft − θ_base``, Ilharco et al. 2023, arXiv:2212.04089), and a LoRA extracted from a dense expert by a
truncated SVD of each weight matrix's delta, the rank chosen per matrix by an energy threshold or fixed — what
mergekit's ``mergekit-extract-lora`` does (mergekit/scripts/extract_lora.py, read at arcee-ai/mergekit 00243ac:
``low_rank_decomposition`` takes the SVD of the fine-tune − base difference per linear module and splits √S
between the factors, ``A = √S·Vᴴ``, ``B = U·√S``, "to improve numerical precision"; its rank is a fixed
``--rank``). The energy threshold (the smallest rank keeping a share of the squared singular values) is the
issue's; a fixed rank is mergekit's. Unlike mergekit, embeddings and the LM head are not decomposed and other
modules are not kept as ``modules_to_save``: they are left out and listed.

    expert = task_vector_expert("finetuned/", "base/", name="math")
    lora = extract_lora(expert, energy=0.9)                  # or rank=16
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moerge.errors import MalformedConfigError, ShapeMismatchError
from moerge.experts.expert import Expert, ExpertMetadata, LoraModule

EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "embed_positions", "word_embeddings", "lm_head")


def task_vector_expert(
    finetuned: str | Path, base: str | Path, name: str, *, task: str | None = None, **metadata: Any
) -> Expert:
    """The dense expert ``θ_ft − θ_base`` of two transformers folders (safetensors, sharded or not), by
    parameter name, in float32. Parameters the fine-tune left unchanged are not stored. A parameter missing
    from the base, or of another shape (a resized vocabulary), is refused."""
    from moerge.backbones.loading import base_model_id
    from moerge.experts.fingerprint import fingerprint_folder
    from moerge.merging.folders import CheckpointReader

    dense: dict[str, torch.Tensor] = {}
    unchanged = 0
    with CheckpointReader(finetuned) as ft, CheckpointReader(base) as b:
        base_names = set(b.names())
        for key in ft.names():
            if key not in base_names:
                raise ShapeMismatchError(
                    f"{finetuned}: parameter {key} is not in the base model {base}; give the model it was "
                    "fine-tuned from as --base"
                )
            if tuple(ft.shape(key)) != tuple(b.shape(key)):
                raise ShapeMismatchError(
                    f"{finetuned}: {key} has shape {tuple(ft.shape(key))}, the base's {tuple(b.shape(key))} (a "
                    "resized vocabulary?); a task vector needs the base's shapes"
                )
            delta = ft.get(key).float() - b.get(key).float()
            if not delta.any():
                unchanged += 1
                continue
            dense[key] = delta.contiguous()
    if not dense:
        raise MalformedConfigError(f"{finetuned}: every parameter equals the base's; there is no task vector")
    fields: dict[str, Any] = {
        "base_model": base_model_id(base),
        "base_fingerprint": fingerprint_folder(base),
        "task": task,
        **metadata,
    }
    extra = dict(fields.pop("extra", None) or {})
    extra.update(source=str(Path(finetuned).resolve()), unchanged_parameters=unchanged)
    expert = Expert(metadata=ExpertMetadata(name=name, kind="dense", extra=extra, **fields), dense=dense)
    expert.check()
    return expert


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r whose top-r singular values hold ``energy`` of the sum of their squares (≥ 1)."""
    sq = singular_values.double() ** 2
    total = float(sq.sum())
    if total == 0:
        return 0
    kept = torch.cumsum(sq, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1


def extract_lora(
    expert: Expert,
    *,
    energy: float | None = None,
    rank: int | None = None,
    name: str | None = None,
    fan_in_fan_out: bool = False,
) -> Expert:
    """A LoRA expert from a dense one: each 2-D weight delta (``nn.Linear`` layout ``[d_out, d_in]``) becomes
    ``B @ A`` with ``A = √S_r·Vᴴ_r``, ``B = U_r·√S_r`` (mergekit's split; ``alpha = r``, scaling 1) — the best rank-r approximation
    (Eckart–Young) — with r the smallest keeping ``energy`` of the squared singular values (default 0.9), or
    ``rank`` (capped by the matrix). Embeddings, the LM head, norms and biases are left out (a LoRA holds
    linear modules only); what was left out and the energy each module kept are recorded in
    ``metadata.extra["extracted"]``. ``fan_in_fan_out``: the weights are stored ``[d_in, d_out]`` (GPT-2's
    ``Conv1D``); the factors are then of the transposed delta, flagged as PEFT does."""
    if energy is not None and rank is not None:
        raise MalformedConfigError("give an energy threshold or a rank, not both")
    if rank is None and energy is None:
        energy = 0.9
    if energy is not None and not 0 < energy <= 1:
        raise MalformedConfigError(
            f"energy {energy} must be in (0, 1]: the share of the squared singular values kept"
        )
    if rank is not None and rank < 1:
        raise MalformedConfigError(f"rank {rank} must be at least 1")
    if expert.kind != "dense":
        raise MalformedConfigError(f"expert {expert.name!r} is already a LoRA; extract from a dense expert")
    lora: dict[str, LoraModule] = {}
    kept: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    for key, delta in sorted(expert.dense.items()):
        module, _, leaf = key.rpartition(".")
        if delta.ndim != 2 or leaf != "weight" or module.rsplit(".", 1)[-1] in EMBEDDING_NAMES:
            skipped.append(key)
            continue
        U, S, Vh = torch.linalg.svd((delta.T if fan_in_fan_out else delta).double(), full_matrices=False)
        r = min(rank, S.shape[0]) if rank is not None else energy_rank(S, float(energy))  # type: ignore[arg-type]
        if r == 0:
            skipped.append(key)
            continue
        root = S[:r].sqrt()
        A = (root[:, None] * Vh[:r]).float().contiguous()
        B = (U[:, :r] * root).float().contiguous()
        lora[module] = LoraModule(A=A, B=B, alpha=float(r), fan_in_fan_out=fan_in_fan_out)
        total = float((S.double() ** 2).sum())
        kept[module] = {"rank": r, "energy": round(float((S[:r].double() ** 2).sum()) / total, 6)}
    if not lora:
        raise MalformedConfigError(
            f"expert {expert.name!r} has no 2-D linear weight deltas to extract a LoRA from (only {len(skipped)} "
            "norms, biases or embeddings)"
        )
    md = expert.metadata.model_copy(deep=True)
    md.name = name or f"{expert.name}-lora"
    md.kind = "lora"
    md.tags = sorted(set(md.tags) | {"extracted"})
    md.extra = {
        **md.extra,
        "extracted": {
            "from": expert.name,
            "energy": energy,
            "rank": rank,
            "modules": kept,
            "left_out": skipped,
        },
    }
    out = Expert(metadata=md, lora=lora)
    out.check()
    return out
