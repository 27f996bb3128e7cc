"""The `Router` interface: scores in, `Selection` out. One interface for every family:

- ``begin_call(call)`` runs once per call before the model (example/task-level routers compute their
  per-example weights here, e.g. from an embedding of the input, and keep them in ``call.plan``);
- ``select(module, x, call)`` runs in every expert layer on that layer's input ``x`` and returns a
  `Selection` (or None: no expert for this call).

Routers know nothing of the model layer or the benchmark: they see a `moerge.routing.call.CallState`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from moerge.errors import MoergeError, RoutingError
from moerge.routing.selection import Selection

if TYPE_CHECKING:
    from moerge.routing.call import CallState

Granularity = Literal["token", "example", "task"]
Score = Literal["abs_dot", "dot", "std_dot", "cos"]


class Router:
    """Base router. ``granularity`` is ``"token"``, ``"example"`` or ``"task"``; ``experts_per_token`` is the
    nominal number of experts each token uses (for cost accounting; None: every expert)."""

    granularity: Granularity = "token"
    needs: tuple[str, ...] = ()  # RoutingInputs fields a call must carry, e.g. ("task_names",)
    # What learning this router cost (the benchmark's cost columns): seconds spent training it — recorded with
    # a cached router, so a second run that loads it still reports it — and its trainable parameters.
    train_seconds: float = 0.0
    trainable_parameters: int = 0

    @property
    def tokenwise(self) -> bool:
        """True when ``select`` decides each token from that token's input alone (no call state, no batch
        shape), so rows of several calls may be routed in one ``select`` (`moerge.routing.call.BatchCall`)."""
        return False

    def begin_call(self, call: CallState) -> None:
        for field in self.needs:
            if getattr(call.inputs, field) is None:
                raise RoutingError(
                    f"router {type(self).__name__} needs routing={{{field}: ...}} with every call: pass "
                    f"RoutingInputs({field}=[...]) (one per example)"
                )

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        return call.plan.get("selection")

    # Routers that re-decide as the input grows (Token-Level Adaptation) set this and implement `on_forward`;
    # `recompute` asks generate to run without a KV cache (earlier tokens recomputed with the new weights).
    follows_forwards: bool = False
    recompute: bool = False

    def on_forward(
        self, call: CallState, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        """Called before every forward pass of the model inside a call (each step of ``generate``) with the
        token ids that pass consumes, when ``follows_forwards`` is set; no call is bound meanwhile, so the
        router may run the base model (e.g. to embed the prefix)."""

    def experts_per_token(self, num_experts: int) -> float:
        """How many experts a token uses (the nominal k), for FLOP accounting."""
        return float(num_experts)

    def routing_flops_per_token(self, dims: dict[str, tuple[int, int]]) -> float:
        """Multiply-adds ×2 spent deciding, per token (0 for routers that decide once per example)."""
        return 0.0


def standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm without affine parameters over the last dimension."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)


def prototype_scores(x: torch.Tensor, prototypes: torch.Tensor, score: Score) -> torch.Tensor:
    """Scores ``[N, E]`` of inputs ``[N, d]`` against prototypes ``[E, d]``.

    ``abs_dot``: |⟨x, v⟩| (Arrow); ``dot``: ⟨x, v⟩; ``std_dot``: ⟨LN(x), LN(v)⟩/√d (PHATGOOSE, average
    activation); ``cos``: cosine similarity (centroid routers).
    """
    if score == "abs_dot":
        return (x @ prototypes.T).abs()
    if score == "dot":
        return x @ prototypes.T
    if score == "std_dot":
        return (standardize(x) @ standardize(prototypes).T) / (x.shape[-1] ** 0.5)
    if score == "cos":
        xn = torch.nn.functional.normalize(x, dim=-1)
        return xn @ torch.nn.functional.normalize(prototypes, dim=-1).T
    raise MoergeError(f"unknown score {score!r}; use one of abs_dot, dot, std_dot, cos")
