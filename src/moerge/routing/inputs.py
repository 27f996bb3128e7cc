"""`RoutingInputs`: what a caller may tell the router about one call, passed explicitly with the call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutingInputs:
    """Per-call routing information (all optional; each router says what it needs).

    - ``task_names``: one task name per example (task-name oracle, task-level routers group by it).
    - ``texts``: the raw text of each example (embedding routers with a text embedder).
    - ``weights``: explicit per-example expert weights ``[B, E]`` (overrides the router; columns follow
      ``routed.expert_names``).
    - ``expert_labels``: ground-truth expert name per example, used only by diagnostics.
    - ``record``: keep each layer's weights of this call (read with ``routed.last_routing()``).
    """

    task_names: list[str] | None = None
    texts: list[str] | None = None
    weights: torch.Tensor | None = None
    expert_labels: list[str] | None = None
    record: bool = False
    extra: dict = field(default_factory=dict)
