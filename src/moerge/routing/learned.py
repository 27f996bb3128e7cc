"""Learned routers: routers with torch parameters, trained on data (`moerge.train.router`) while the base
model and the experts stay frozen.

Every learned router keeps its parameters in one ``nn.ModuleDict`` (``net``), so training, saving and
loading are the same for all of them (`LearnedRouter.state` / `load_state`). Their selections carry weights
that are differentiable functions of the parameters, and the expert layers mix the experts' outputs with those
weights (`moerge.model.expert_layer.expert_delta`), so the language-model loss reaches the router.

- `InputGateRouter`: a linear gate on a module's input, per token (MeteoRA: top-k per module) or one gate per
  decoder layer computed from the input of the layer's first adapted module and shared by its modules
  (LoRA-Flow);
- `OutputGateRouter`: a gate over the experts' outputs themselves (MoLE): ε = softmax(W_g·LN(⊕_e E_e(x))/τ),
  with inference-time masking of experts and the gating-balance loss;
- `FusionRouter`: attention over the experts' outputs with the query from the module's output (AdapterFusion);
- `PooledGateRouter`: one decision per example from the masked mean of each module's input (SMEAR), meant for
  parameter aggregation (the experts' ΔW merged per example, one forward).

Routers know nothing of the model layer: the builder hands them the stacked factors ``(A [E, R, d_in],
Bt [E, R, d_out])`` and, where needed, the base module as a callable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from moerge.errors import RecipeNotApplicableError
from moerge.routing.router import Router
from moerge.routing.selection import Selection

if TYPE_CHECKING:
    from moerge.routing.call import CallState

Factors = tuple[torch.Tensor, torch.Tensor]  # A [E, R, d_in] (scaling folded in), Bt [E, R, d_out]


def key(module: str) -> str:
    """A module path as an ``nn.ModuleDict`` key (dots are not allowed there)."""
    return module.replace(".", "__")


def expert_outputs(x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """Every expert's update of a module's output, ``[N, E, d_out]`` for inputs ``x [N, d_in]``: B_e A_e x."""
    E, R, d_in = A.shape
    z = (x @ A.reshape(E * R, d_in).T).view(x.shape[0], E, R)
    return torch.einsum("ner,erd->ned", z, Bt)


class LearnedRouter(Router):
    """A router whose parameters (``net``) are trained. ``aux_loss(call)`` is an auxiliary training loss the
    router accumulated during the call (None: the language-model loss alone)."""

    def __init__(self, net: nn.ModuleDict):
        self.net = net
        self.trainable_parameters = sum(p.numel() for p in net.parameters())

    def parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def state(self) -> dict[str, torch.Tensor]:
        """The parameters as tensors (what is stored as the router's artifact)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            self.net.load_state_dict(tensors)
        except RuntimeError as err:
            raise RecipeNotApplicableError(
                f"the stored router does not fit these experts and modules ({str(err).splitlines()[0][:160]}); "
                "delete the artifact or retrain"
            ) from None

    def to(self, device: torch.device | str) -> LearnedRouter:
        self.net.to(device)
        return self

    def aux_loss(self, call: CallState) -> torch.Tensor | None:
        return None

    def routing_flops_per_token(self, dims: dict[str, tuple[int, int]]) -> float:
        return float(2 * sum(p.numel() for p in self.net.parameters() if p.ndim == 2))


def _dense(logits: torch.Tensor, k: int | None, per: str = "token") -> Selection:
    """Softmax over all experts (k None or ≥ E), or over the top-k logits only (the rest weight 0)."""
    E = logits.shape[-1]
    if k is None or k >= E:
        return Selection(torch.softmax(logits, dim=-1), None, per)  # type: ignore[arg-type]
    top, idx = torch.topk(logits, k, dim=-1)
    return Selection(torch.softmax(top, dim=-1), idx, per)  # type: ignore[arg-type]


class _Gate(nn.Module):
    """logits W x (+ b); or, with ``bias_after_softmax``, weights softmax(W x) + b (LoRA-Flow's form)."""

    def __init__(self, d_in: int, num_experts: int, bias: bool, bias_after_softmax: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, d_in))  # zero: uniform weights at the start
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias or bias_after_softmax else None
        self.bias_after_softmax = bias_after_softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ self.weight.T
        return logits + self.bias if self.bias is not None and not self.bias_after_softmax else logits


class InputGateRouter(LearnedRouter):
    """Per token, from a gate's input x: weights softmax(W x + b), dense or over the top-k logits only; with
    ``bias_after_softmax``, softmax(W x) + b (LoRA-Flow).

    ``groups`` maps each module to a group sharing one gate (LoRA-Flow: the decoder layer); a group's gate reads
    the input of its ``leaders[group]`` module (the group's first module in the forward pass) and its weights
    are reused by the group's other modules in the same forward. Without groups each module has its own gate
    (MeteoRA). Gates start at zero (uniform weights)."""

    def __init__(
        self,
        dims: dict[str, int],
        num_experts: int,
        *,
        k: int | None = None,
        bias: bool = True,
        bias_after_softmax: bool = False,
        groups: dict[str, str] | None = None,
        leaders: dict[str, str] | None = None,
    ):
        self.groups = groups or {m: m for m in dims}
        self.leaders = leaders or {m: m for m in dims}
        net = nn.ModuleDict()
        for group, leader in self.leaders.items():
            net[key(group)] = _Gate(dims[leader], num_experts, bias, bias_after_softmax)
        super().__init__(net)
        self.k = k
        self.bias_after_softmax = bias_after_softmax

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        group = self.groups.get(module)
        if group is None:
            raise RecipeNotApplicableError(f"no learned gate for module {module}; retrain the router")
        if len(self.groups) == len(self.leaders):  # one gate per module
            return self._gate(group, x)
        stored = call.plan.setdefault("group_gates", {})
        if module == self.leaders[group]:
            stored[group] = self._gate(group, x)
        sel = stored.get(group)
        if sel is None or sel.rows != x.reshape(-1, x.shape[-1]).shape[0]:
            raise RecipeNotApplicableError(
                f"module {module} ran before {self.leaders[group]}, whose input feeds its layer's gate"
            )
        return sel

    def _gate(self, group: str, x: torch.Tensor) -> Selection:
        gate = cast(_Gate, self.net[key(group)])
        xs = x.reshape(-1, x.shape[-1])
        logits = gate(xs.to(gate.weight.dtype))
        if self.bias_after_softmax:
            assert gate.bias is not None
            return Selection(torch.softmax(logits, dim=-1) + gate.bias, None, "token")
        return _dense(logits, self.k)

    def experts_per_token(self, num_experts: int) -> float:
        return float(min(self.k or num_experts, num_experts))


class OutputGateRouter(LearnedRouter):
    """MoLE's gate: per token and module, ε = softmax(W_g · LN(E_1(x) ⊕ … ⊕ E_n(x)) / τ) over the experts'
    outputs E_e(x) = B_e A_e x. ``mask`` (expert indices) leaves experts out at inference: their logits are
    dropped and the softmax renormalises over the rest, with no retraining. With ``balance`` the call keeps
    each module's weights for the gating-balance loss (`aux_loss`)."""

    def __init__(
        self,
        factors: dict[str, Factors],
        *,
        temperature: float = 1.0,
        mask: list[int] | None = None,
        balance: bool = True,
    ):
        net = nn.ModuleDict()
        for module, (_, Bt) in factors.items():
            E, _, d_out = Bt.shape
            gate = nn.Linear(E * d_out, E)
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
            net[key(module)] = gate
        super().__init__(net)
        self.factors = factors
        self.temperature = temperature
        self.mask = sorted(set(mask or []))
        self.balance = balance

    def logits(self, module: str, x: torch.Tensor) -> torch.Tensor:
        A, Bt = self.factors[module]
        gate = cast(nn.Linear, self.net[key(module)])
        xs = x.reshape(-1, x.shape[-1]).to(gate.weight.dtype)
        out = expert_outputs(xs, A.to(xs), Bt.to(xs))  # [N, E, d_out]
        xi = nn.functional.layer_norm(out.reshape(out.shape[0], -1), (out.shape[1] * out.shape[2],))
        return gate(xi) / self.temperature

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        logits = self.logits(module, x)
        E = logits.shape[-1]
        if self.mask:
            keep = [e for e in range(E) if e not in self.mask]
            if not keep:
                raise RecipeNotApplicableError("every expert is masked; leave at least one")
            idx = torch.tensor(keep, device=logits.device).expand(logits.shape[0], -1)
            sel = Selection(torch.softmax(logits[:, keep], dim=-1), idx, "token")
        else:
            sel = Selection(torch.softmax(logits, dim=-1), None, "token")
        if self.balance and torch.is_grad_enabled():
            call.plan.setdefault("gate_weights", []).append(sel.dense(E))
        return sel

    def aux_loss(self, call: CallState) -> torch.Tensor | None:
        """The gating-balance loss: per module, −log Π_e q_e with q_e the mean weight of expert e over the
        call's tokens, averaged over modules (minimal when the experts are used equally)."""
        ws = call.plan.get("gate_weights")
        if not ws:
            return None
        return torch.stack([-(w.mean(0).clamp(min=1e-9).log().sum()) for w in ws]).mean()

    def experts_per_token(self, num_experts: int) -> float:
        return float(num_experts - len(self.mask))

    def routing_flops_per_token(self, dims: dict[str, tuple[int, int]]) -> float:
        # the gate reads every expert's output: computing them (2·E·R·(d_in + d_out)) plus the gate itself
        total = 0.0
        for A, Bt in self.factors.values():
            E, R, d_in = A.shape
            total += 2 * E * R * (d_in + Bt.shape[-1]) + 2 * E * E * Bt.shape[-1]
        return total


class FusionRouter(LearnedRouter):
    """AdapterFusion's attention, per token and module: α = softmax_e((h W_Q + b_Q)·(E_e(x) W_K + b_K)) with
    the query from the module's output h = W x and keys from each expert's output E_e(x) = B_e A_e x; the
    output is W x + Σ_e α_e E_e(x) (the values are the experts' outputs: the official code's static fusion,
    ``value=False``). W_Q and W_K start as in the official code (normal, std 0.02; bias 0)."""

    def __init__(
        self, factors: dict[str, Factors], bases: dict[str, Callable[[torch.Tensor], Any]], seed: int = 0
    ):
        net = nn.ModuleDict()
        g = torch.Generator().manual_seed(seed)
        for module, (_, Bt) in factors.items():
            d_out = Bt.shape[-1]
            pair = nn.ModuleDict({"query": nn.Linear(d_out, d_out), "key": nn.Linear(d_out, d_out)})
            for lin in pair.values():
                assert isinstance(lin, nn.Linear)
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
                    lin.bias.zero_()
            net[key(module)] = pair
        super().__init__(net)
        self.factors = factors
        self.bases = bases

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        A, Bt = self.factors[module]
        pair = cast(nn.ModuleDict, self.net[key(module)])
        query, key_ = cast(nn.Linear, pair["query"]), cast(nn.Linear, pair["key"])
        dtype = query.weight.dtype
        xs = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            h = self.bases[module](xs).to(dtype)  # the frozen module's own output
        out = expert_outputs(
            xs.to(dtype), A.to(device=xs.device, dtype=dtype), Bt.to(device=xs.device, dtype=dtype)
        )
        q = query(h)  # [N, d]
        k = key_(out)  # [N, E, d]
        return Selection(torch.softmax(torch.einsum("nd,ned->ne", q, k), dim=-1), None, "token")

    def routing_flops_per_token(self, dims: dict[str, tuple[int, int]]) -> float:
        total = 0.0
        for A, Bt in self.factors.values():
            E, R, d_in = A.shape
            d_out = Bt.shape[-1]
            total += 2 * d_in * d_out + 2 * E * R * (d_in + d_out) + 2 * (E + 1) * d_out * d_out
        return total


class PooledGateRouter(LearnedRouter):
    """One decision per example and module: p = softmax(W x̄ + b) from the masked mean x̄ of the example's
    inputs to the module (SMEAR's router), kept for the tokens generated after the prompt. Gates start at
    zero (the uniform merge)."""

    granularity = "example"

    def __init__(self, dims: dict[str, int], num_experts: int):
        net = nn.ModuleDict()
        for module, d_in in dims.items():
            gate = nn.Linear(d_in, num_experts)
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
            net[key(module)] = gate
        super().__init__(net)

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        stored = call.plan.setdefault("per_module", {})
        if module in stored:  # decode steps after the prompt keep the prompt's decision
            return stored[module]
        gate = cast(nn.Linear, self.net[key(module)])
        x3 = x.reshape(call.batch_size, -1, x.shape[-1]).to(gate.weight.dtype)
        mask = call.token_mask(x3.shape[1], x3.dtype, x3.device)
        pooled = (x3 * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        stored[module] = Selection(torch.softmax(gate(pooled), dim=-1), None, "example")
        return stored[module]
