"""Models under test: each turns an eval batch into logits (and, where routed, the routing weights each layer
gave each token). A plain model (the base, or a merge folded into its weights), a routed model, the oracle."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from moerge.bench.metrics import label_weights, routing_view
from moerge.errors import RoutingError
from moerge.routing.inputs import RoutingInputs
from moerge.routing.router import Router
from moerge.routing.selection import Selection


class Subject:
    """A model under test: ``forward(batch, task) -> (logits, weights [L, B, T, E] or None)``."""

    routed: bool = False
    flops: float = 0.0

    def forward(self, batch: Any, task: Any) -> tuple[Any, Any]:
        raise NotImplementedError


class PlainSubject(Subject):
    """A plain model (the base, or a merge folded into its weights): no routing, no extra FLOPs."""

    def __init__(self, model: Any):
        self.model = model

    def forward(self, batch: Any, task: Any) -> tuple[Any, Any]:
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, None


class BuiltSubject(Subject):
    """A whole model a model-building recipe made (`moerge.recipes.BuiltModel`): its per-example routers see the
    prompt only (``routing_mask``), never the answer being scored."""

    def __init__(self, built: Any):
        self.model = built
        self.flops = float(built.flops_per_token)

    def forward(self, batch: Any, task: Any) -> tuple[Any, Any]:
        mask, _ = routing_view(batch)
        return self.model.logits(batch.input_ids, batch.attention_mask, mask), None


class RoutedSubject(Subject):
    """A `MoErgedModel`: each call carries task names, the example texts the router may see, and (for the
    oracle) the ground-truth weights; routing weights are recorded."""

    routed = True

    def __init__(self, routed: Any, inputs: Callable[[Any, Any], dict[str, Any]] | None = None):
        self.model = routed
        self.inputs = inputs
        self.layers: list[str] | None = None  # the routed modules, in the order of the recorded weights
        self.flops = float(routed.expert_flops_per_token())

    def forward(self, batch: Any, task: Any) -> tuple[Any, Any]:
        routed = self.model
        if routed.router is None:
            return routed.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, None
        mask, texts = routing_view(batch)
        extra = self.inputs(batch, task) if self.inputs else {}
        ri = RoutingInputs(task_names=[task.name] * len(batch.examples), texts=texts, record=True, **extra)
        # The routing call sees only the unscored tokens (its attention mask); the model sees the whole batch.
        with routed.call(ri, input_ids=batch.input_ids, attention_mask=mask) as call:
            logits = routed.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        rec = call.routing()
        if not rec:
            return logits, None
        self.layers = list(rec)
        return logits, torch.stack([w[:, : batch.input_ids.shape[1]] for w in rec.values()])


class LabelRouter(Router):
    """Per-token routing fed the ground truth: each token's labelled experts
    (``RoutingInputs.extra["label_weights"]`` ``[B, T, E]``)."""

    granularity = "token"

    def begin_call(self, call: Any) -> None:
        w = call.inputs.extra.get("label_weights")
        if w is None:
            raise RoutingError("the label router needs RoutingInputs(extra={'label_weights': [B, T, E]})")
        call.plan["w"] = w

    def select(self, module: str, x: Any, call: Any) -> Any:
        w = call.plan["w"]
        return Selection(w.reshape(-1, w.shape[-1]).to(x.dtype), None, "token")

    def experts_per_token(self, num_experts: int) -> float:
        return 1.0


class OracleSubject(Subject):
    """The oracle: each target token predicted by the model of its ground-truth expert — every labelled
    expert runs alone on the whole sequence, and position t takes the logits of token t+1's expert (the mean
    of its experts' logits where it has several; the base model's where it has none). Model-level, so an
    upper reference for routing rather than a method; for a held-in task it is simply the task's expert."""

    routed = True

    def __init__(self, routed: Any):
        self.model = routed

    def forward(self, batch: Any, task: Any) -> tuple[Any, Any]:
        routed = self.model
        ids, mask = batch.input_ids, batch.attention_mask
        want = label_weights(batch).to(ids.device)  # [B, T, E]
        logits = routed.model(input_ids=ids, attention_mask=mask).logits  # the base model (experts off)
        used = (want.sum((0, 1)) > 0).nonzero().flatten().tolist()
        if used:
            mixed = torch.zeros_like(logits)
            for e in used:  # one pass per labelled expert (a reference, not a method's hot path)
                w = torch.zeros(len(ids), routed.num_experts, device=ids.device)
                w[:, e] = 1.0
                with routed.call(RoutingInputs(weights=w), input_ids=ids, attention_mask=mask):
                    out = routed.model(input_ids=ids, attention_mask=mask).logits
                mixed += want[..., e : e + 1].to(out.dtype) * out
            logits = torch.where(want.sum(-1, keepdim=True) > 0, mixed, logits)
        return logits, want[None]


@contextlib.contextmanager
def folded(model: Any, expert: Any, scale: float = 1.0) -> Iterator[Any]:
    """``model`` with ``scale`` × ``expert``'s deltas (LoRA or dense) added into its weights; restored on exit."""
    saved: dict[str, Any] = {}
    params = dict(model.named_parameters())
    try:
        with torch.no_grad():
            for name, lm in expert.lora.items():
                p = params[name + ".weight"]
                saved[name + ".weight"] = p.detach().clone()
                p += scale * lm.delta_for_weight().to(device=p.device, dtype=p.dtype)
            for name, d in expert.dense.items():
                p = params[name]
                saved[name] = p.detach().clone()
                p += scale * d.to(device=p.device, dtype=p.dtype)
        yield model
    finally:
        with torch.no_grad():
            for name, v in saved.items():
                params[name].copy_(v)
