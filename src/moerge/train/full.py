"""Full fine-tuning: train every weight of the decoder's linear layers (or every parameter) on one task and
keep the result as a dense expert, the task vector ``τ = θ_ft − θ_base`` (Ilharco et al. 2023,
arXiv:2212.04089), by parameter name.

    expert = train_full_expert(model, tokenizer, rows, FullTrainConfig(steps=150), name="math")

The data, batching and loop are `moerge.train.lora.train_expert`'s (`moerge.train.data`, `moerge.train.loop`);
only what trains differs. The caller's model is never modified (a deep copy trains).

``params="linear"`` (the default) trains the weights and biases of the decoder's linear modules (attention and
MLP projections; not the LM head, the embeddings or the norms): every update is then routable per module by an
`moerge.model.expert_layer.ExpertLayer`. ``params="all"`` trains everything; the routed model then handles the
norms and embeddings by its ``unrouted`` policy (`moerge.model.routed.inject`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # torch is imported inside the functions: the config is read by `moerge bench --help`
    import torch

    from moerge.experts.expert import Expert
    from moerge.train.data import DataSource


class FullTrainConfig(BaseModel):
    """How to fully fine-tune one expert (the same loop settings as `moerge.train.lora.TrainConfig`)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(64, ge=2, description="examples are truncated to this many tokens")
    params: Literal["linear", "all"] = Field(
        "linear",
        description="what trains: the decoder's linear layers (weights and biases; every update routable) or "
        "every parameter (norms and embeddings too)",
    )
    weight_decay: float = 0.0
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    seed: int = 0
    stats_rows: int = Field(
        64,
        ge=0,
        description="a suite's full-fine-tune library: training rows per expert its Fisher and Gram statistics "
        "are computed on (Fisher merging, RegMean; 0: none)",
    )
    progress: bool = Field(True, description="show a progress bar")


def trainable_names(model: torch.nn.Module, params: Literal["linear", "all"]) -> list[str]:
    """The parameter names a full fine-tune with ``params`` trains (``"linear"``: weights and biases of the
    ``nn.Linear`` / ``Conv1D`` modules other than the LM head)."""
    import torch

    if params == "all":
        return [n for n, _ in model.named_parameters()]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for mname, mod in model.named_modules():
        linear = isinstance(mod, torch.nn.Linear) or (type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"))
        if not linear or mod is head:
            continue
        names += [f"{mname}.{leaf}" for leaf, _ in mod.named_parameters(recurse=False)]
    return names


def train_full_expert(
    model: torch.nn.Module,
    tokenizer: Any,
    data: DataSource,
    config: FullTrainConfig | None = None,
    library: Any = None,
    name: str = "expert",
    task: str | None = None,
    overwrite: bool = False,
    base_model_id: str | None = None,
    **metadata: Any,
) -> Expert:
    """Fully fine-tune a copy of ``model`` on ``data`` and return the task vector as a dense `Expert`
    (``kind="dense"``; added to ``library`` when given). Extra keyword arguments are `ExpertMetadata` fields."""
    import torch

    from moerge.experts.expert import Expert, ExpertMetadata
    from moerge.experts.fingerprint import fingerprint_model
    from moerge.train.data import build_batches, encode_examples, load_examples
    from moerge.train.loop import loop_settings, run_loop

    config = config or FullTrainConfig()
    examples = load_examples(data)
    encoded = encode_examples(tokenizer, examples, config.seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = build_batches(encoded, config.batch_size, config.steps, config.seed, pad_id)
    fingerprint = fingerprint_model(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        work = copy.deepcopy(model)
    names = trainable_names(work, config.params)
    wanted = set(names)
    for n, p in work.named_parameters():
        p.requires_grad_(n in wanted)
    params = [p for n, p in work.named_parameters() if n in wanted]
    base = {n: p.detach().clone() for n, p in work.named_parameters() if n in wanted}
    result = run_loop(work, params, batches, **loop_settings(config), description=f"training {name}")
    trained = dict(work.named_parameters())
    dense = {n: (trained[n].detach() - base[n]).to("cpu", torch.float32).contiguous() for n in names}
    summary = {
        "method": "full", "params": config.params, "steps": result.steps, "lr": config.lr,
        "batch_size": config.batch_size, "seq_len": config.seq_len, "seed": config.seed,
        "trained_parameters": sum(t.numel() for t in dense.values()), "examples": len(encoded),
        "tokens": result.tokens, "first_loss": round(result.first_loss, 6),
        "final_loss": round(result.final_loss, 6), "seconds": round(result.seconds, 3),
    }  # fmt: skip
    fields: dict[str, Any] = {"base_model": base_model_id, "base_fingerprint": fingerprint, "task": task}
    fields.update(metadata)
    fields.update(name=name, kind="dense")
    fields["training"] = {**summary, **dict(fields.get("training") or {})}
    expert = Expert(metadata=ExpertMetadata(**fields), dense=dense)
    expert.check()
    if library is not None:
        library.add(expert, overwrite=overwrite)
    return expert
