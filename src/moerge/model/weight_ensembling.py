"""Weight-ensembling modules: a frozen module whose parameters, per example, are θ₀ + Σ_t w_t τ_t, with the
weights w from a small router (WEMoE, Tang et al. ICML 2024, arXiv:2402.00433) or from a user's preference
vector (PWE MoE, Tang et al. 2024, arXiv:2406.09770). The model layer only computes: how the routers are
trained lives in `moerge.recipes.weight_ensembling`.

Layouts follow FusionBench (github:tanganke/fusion_bench, ``fusion_bench/models/we_moe.py``
``WeightEnsemblingMoE`` and ``Depth_2_Gate``; ``fusion_bench/method/pwe_moe/module.py``
``ParetoWeightEnsemblingModule``): the router is fc1 (d→d, ReLU) then fc2 (d→T), weights ~ N(0, 0.01²), fc1's
bias 0, fc2's bias λ₀; the token-level router outputs are averaged over the sequence (here over the tokens of
``routing_mask``, the prompt), no softmax; each example then runs the module with its own merged parameters
(``torch.func.functional_call``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

# The tokens a per-example router may pool over during one forward ([B, S], 1 = visible); None: all of them.
_ROUTING_MASK: ContextVar[torch.Tensor | None] = ContextVar("moerge_we_routing_mask", default=None)


@contextlib.contextmanager
def routing_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block (this thread/task only), weight-ensembling routers pool over ``mask``'s tokens."""
    token = _ROUTING_MASK.set(mask)
    try:
        yield
    finally:
        _ROUTING_MASK.reset(token)


class WeightEnsemblingGate(nn.Module):
    """FusionBench's ``Depth_2_Gate``: ``fc2(relu(fc1(x)))``, initialised N(0, 0.01²), fc1 bias 0, fc2 bias λ₀."""

    def __init__(self, in_features: int, hidden: int, num_experts: int, init_lambda: float):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)
        nn.init.normal_(self.fc1.weight, std=0.01)
        nn.init.zeros_(self.fc1.bias)
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.constant_(self.fc2.bias, init_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def _stacked(base: nn.Module, task_vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = dict(base.named_parameters())
    unknown = sorted(set(task_vectors) - set(names))
    if unknown:
        raise KeyError(f"task vectors for parameters the module does not have: {unknown}")
    return {n: t.detach() for n, t in task_vectors.items()}


class _Ensembled(nn.Module):
    """A frozen copy of ``base`` plus stacked task vectors ``{param: [T, *shape]}`` (buffers, never trained)."""

    def __init__(self, base: nn.Module, task_vectors: dict[str, torch.Tensor]):
        super().__init__()
        self.base = copy.deepcopy(base).requires_grad_(False)
        self._names = list(_stacked(self.base, task_vectors))
        for i, n in enumerate(self._names):
            self.register_buffer(f"tv{i}", task_vectors[n].detach().clone(), persistent=False)

    @property
    def num_experts(self) -> int:
        return int(self._tv(0).shape[0]) if self._names else 0

    def _tv(self, i: int) -> torch.Tensor:
        tv = getattr(self, f"tv{i}")
        assert isinstance(tv, torch.Tensor)
        return tv

    def merged(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ₀ + Σ_t w_t τ_t for the parameters with task vectors (``w`` [T])."""
        params = dict(self.base.named_parameters())
        out = {}
        for i, n in enumerate(self._names):
            tv = self._tv(i)
            out[n] = params[n] + torch.einsum("t,t...->...", w.to(tv.dtype), tv)
        return out


class WeightEnsemblingMoE(_Ensembled):
    """WEMoE's module: per example, w = mean over the routed tokens of gate(x_token) ∈ ℝ^T; output
    f(x; θ₀ + Σ_t w_t τ_t). ``last_weights`` keeps the last forward's ``[B, T]`` weights (detached)."""

    def __init__(self, base: nn.Module, task_vectors: dict[str, torch.Tensor], gate: nn.Module):
        super().__init__(base, task_vectors)
        self.gate = gate
        self.last_weights: torch.Tensor | None = None

    def routing_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = self.gate(hidden)  # [B, S, T]
        mask = _ROUTING_MASK.get()
        if mask is None or tuple(mask.shape) != tuple(scores.shape[:2]):
            return scores.mean(dim=1)
        m = mask.to(scores.dtype).unsqueeze(-1)
        return (scores * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.routing_weights(hidden)
        self.last_weights = w.detach()
        rows = [
            functional_call(self.base, self.merged(w[b]), (hidden[b : b + 1],))
            for b in range(hidden.shape[0])
        ]
        return torch.cat(rows, dim=0)


class PreferenceEnsembling(_Ensembled):
    """PWE MoE's module: w = gate(r) for the preference vector r over the tasks (set with `set_preference`);
    the whole batch runs with θ₀ + Σ_t w_t τ_t, so a fixed preference folds into one dense module (`fold`)."""

    def __init__(self, base: nn.Module, task_vectors: dict[str, torch.Tensor], gate: nn.Module):
        super().__init__(base, task_vectors)
        self.gate = gate
        self.register_buffer("preference", torch.full((self.num_experts,), 1.0 / max(1, self.num_experts)))

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        w = self.gate(self.preference.to(next(self.gate.parameters()).dtype))
        return functional_call(self.base, self.merged(w), args, kwargs)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A plain copy of the base module with the current preference's parameters."""
        out = copy.deepcopy(self.base)
        merged = self.merged(self.gate(self.preference))
        for n, p in out.named_parameters():
            if n in merged:
                p.copy_(merged[n])
        return out


def set_preference(model: nn.Module, preference: torch.Tensor) -> None:
    """Set every `PreferenceEnsembling` module of ``model`` to ``preference`` (a vector over the tasks)."""
    for m in model.modules():
        if isinstance(m, PreferenceEnsembling):
            pref = m.preference
            assert isinstance(pref, torch.Tensor)
            pref.copy_(preference.to(pref))


def fold_preferences(model: nn.Module) -> nn.Module:
    """Replace each `PreferenceEnsembling` module of ``model`` (in place) by its folded dense module."""
    for name, m in list(model.named_modules()):
        if isinstance(m, PreferenceEnsembling):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, m.fold())
    return model
