"""Learned routers: routers with torch parameters, trained on data (`moerge.train.router`) while the base
model and the experts stay frozen.

Every learned router keeps its parameters in one ``nn.ModuleDict`` (``net``), so training, saving and
loading are the same for all of them (`LearnedRouter.state` / `load_state`). Their selections carry weights
that are differentiable functions of the parameters, and the expert layers mix the experts' outputs with those
weights (`moerge.model.expert_layer.expert_delta`), so the language-model loss reaches the router.

- `InputGateRouter`: a linear gate on a module's input, per token (MeteoRA: top-k per module) or one gate per
  decoder layer computed from the input of the layer's first adapted module and shared by its modules
  (LoRA-Flow);
- `OutputGateRouter`: a gate over the experts' outputs themselves (MoLE): ε = softmax(W_g·LN(⊕_e E_e(x))/τ)
  with a learnable τ, inference-time masking of experts and the gating-balance loss;
- `FusionRouter`: attention over the experts' outputs with the query from the module's output (AdapterFusion);
- `PooledGateRouter`: one decision per example from the masked mean of each module's input (SMEAR), meant for
  parameter aggregation (the experts' ΔW merged per example, one forward);
- `TaskGateRouter`: one decision per module for the whole task, from a learned task vector (PEMT), with the
  task-sparsity loss;
- `MixtureGateRouter`: one decision per example and module from an MLP on the last visible token's input, over
  the experts and (optionally) the original module (MixDA).

During training the call's attention mask is what the router may see (the prompt: `moerge.train.router`), as at
inference; ``call.plan["train_mask"]`` (every real token) and ``call.plan["row_labels"]`` (each row's source
expert, for supervised gates) are set by the training loop only.

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
        """A copy of the parameters (what is stored as the router's artifact; a copy even on the CPU, so that a
        kept state does not move on with training)."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.net.state_dict().items()}

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

    def __init__(
        self, d_in: int, num_experts: int, bias: bool, bias_after_softmax: bool, init_std: float = 0.0,
        generator: torch.Generator | None = None,
    ):  # fmt: skip
        super().__init__()
        w = (
            torch.randn(num_experts, d_in, generator=generator) * init_std
            if init_std
            else torch.zeros(num_experts, d_in)
        )
        self.weight = nn.Parameter(w)  # zero: uniform weights at the start
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
    (MeteoRA). Gates start at zero (uniform weights), or normal with ``init_std`` (seeded by ``seed``).

    With ``supervised`` the call keeps every gate's logits, and `aux_loss` is MeteoRA's gate loss: the
    cross-entropy of each gate's logits at every token against the row's source expert (``call.plan["row_labels"]``,
    set by the training loop when the rows come from the experts' own data)."""

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
        init_std: float = 0.0,
        seed: int = 0,
        supervised: bool = False,
    ):
        self.groups = groups or {m: m for m in dims}
        self.leaders = leaders or {m: m for m in dims}
        g = torch.Generator().manual_seed(seed)
        net = nn.ModuleDict()
        for group, leader in self.leaders.items():
            net[key(group)] = _Gate(dims[leader], num_experts, bias, bias_after_softmax, init_std, g)
        super().__init__(net)
        self.k = k
        self.bias_after_softmax = bias_after_softmax
        self.supervised = supervised

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        group = self.groups.get(module)
        if group is None:
            raise RecipeNotApplicableError(f"no learned gate for module {module}; retrain the router")
        if len(self.groups) == len(self.leaders):  # one gate per module
            return self._gate(group, x, call)
        stored = call.plan.setdefault("group_gates", {})
        if module == self.leaders[group]:
            stored[group] = self._gate(group, x, call)
        sel = stored.get(group)
        if sel is None or sel.rows != x.reshape(-1, x.shape[-1]).shape[0]:
            raise RecipeNotApplicableError(
                f"module {module} ran before {self.leaders[group]}, whose input feeds its layer's gate"
            )
        return sel

    def aux_loss(self, call: CallState) -> torch.Tensor | None:
        """MeteoRA's gate loss (``supervised``): mean cross-entropy of every gate's logits at every real token of
        a row against the row's expert index."""
        logits, labels = call.plan.get("gate_logits"), call.plan.get("row_labels")
        if not self.supervised or not logits or labels is None:
            return None
        mask = call.plan.get("train_mask")
        losses = []
        for lg in logits:
            per_row = lg.reshape(labels.shape[0], -1, lg.shape[-1])
            target = labels.to(lg.device)[:, None].expand(-1, per_row.shape[1])
            ce = nn.functional.cross_entropy(per_row.transpose(1, 2), target, reduction="none")  # [B, T]
            m = mask.to(ce) if mask is not None and mask.shape == ce.shape else torch.ones_like(ce)
            losses.append((ce * m).sum() / m.sum().clamp(min=1))
        return torch.stack(losses).mean()

    def _gate(self, group: str, x: torch.Tensor, call: CallState) -> Selection:
        gate = cast(_Gate, self.net[key(group)])
        xs = x.reshape(-1, x.shape[-1])
        logits = gate(xs.to(gate.weight.dtype))
        if self.supervised and torch.is_grad_enabled():
            call.plan.setdefault("gate_logits", []).append(logits)
        if self.bias_after_softmax:
            assert gate.bias is not None
            return Selection(torch.softmax(logits, dim=-1) + gate.bias, None, "token")
        return _dense(logits, self.k)

    def experts_per_token(self, num_experts: int) -> float:
        return float(min(self.k or num_experts, num_experts))


class _MoleGate(nn.Linear):
    """MoLE's gating function: a linear map of the normalised, concatenated expert outputs, and its learnable
    temperature τ (Eq. 11)."""

    def __init__(self, d_in: int, num_experts: int, temperature: float):
        super().__init__(d_in, num_experts)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))


class OutputGateRouter(LearnedRouter):
    """MoLE's gate: per token and module, ε = softmax(W_g · LN(E_1(x) ⊕ … ⊕ E_n(x)) / τ) over the experts'
    outputs E_e(x) = B_e A_e x, with τ learnable (one per gate, kept ≥ 0.01). ``mask`` (expert indices) leaves
    experts out at inference: their logits are dropped and the softmax renormalises over the rest, with no
    retraining. With ``balance`` the call keeps each gate's weights for the gating-balance loss (`aux_loss`)."""

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
            net[key(module)] = _MoleGate(E * d_out, E, temperature)
        super().__init__(net)
        self.factors = factors
        self.mask = sorted(set(mask or []))
        self.balance = balance

    def logits(self, module: str, x: torch.Tensor) -> torch.Tensor:
        A, Bt = self.factors[module]
        gate = cast(_MoleGate, self.net[key(module)])
        xs = x.reshape(-1, x.shape[-1]).to(gate.weight.dtype)
        out = expert_outputs(xs, A.to(xs), Bt.to(xs))  # [N, E, d_out]
        xi = nn.functional.layer_norm(out.reshape(out.shape[0], -1), (out.shape[1] * out.shape[2],))
        return gate(xi) / gate.temperature.clamp(min=1e-2)

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
        """The gating-balance loss (the paper's Eq. 14–15): L = −log Π_e q_e, with q_e expert e's gate weight
        averaged over the M gating functions (here: over every gate and every token of the call)."""
        ws = call.plan.get("gate_weights")
        if not ws:
            return None
        q = torch.cat([w.reshape(-1, w.shape[-1]) for w in ws]).mean(0)
        return -(q.clamp(min=1e-9).log().sum())

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


class _SmearGate(nn.Module):
    """SMEAR's router as in the official code (r-three/smear, hyperformer/adapters/adapter_utils.py `Router`, with
    configs/adapter/parameter_averaging_routing.json: ``normalize_router_weights``, ``router_init_scale`` 1e-2):
    logits = LN(x̄) · LN_w(W) + b, where LN is a LayerNorm of the pooled input, LN_w normalises each expert's
    weight vector over the input features with a gain initialised at ``init_scale``, W ~ N(0, init_scale²)
    and b = 0."""

    def __init__(self, d_in: int, num_experts: int, init_scale: float, generator: torch.Generator):
        super().__init__()
        self.input_norm = nn.LayerNorm(d_in)
        self.weight = nn.Parameter(torch.randn(num_experts, d_in, generator=generator) * init_scale)
        self.weight_norm = nn.LayerNorm(d_in)
        with torch.no_grad():
            self.weight_norm.weight.fill_(init_scale)
        self.bias = nn.Parameter(torch.zeros(num_experts))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.input_norm(pooled) @ self.weight_norm(self.weight).T + self.bias


class PooledGateRouter(LearnedRouter):
    """One decision per example and module: p = softmax(LN(x̄) · LN_w(W) + b) from the masked mean x̄ of the
    example's inputs to the module that the router may see (SMEAR's router, `_SmearGate`), kept for the tokens
    generated after the prompt."""

    granularity = "example"

    def __init__(self, dims: dict[str, int], num_experts: int, *, init_scale: float = 1e-2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        net = nn.ModuleDict()
        for module, d_in in dims.items():
            net[key(module)] = _SmearGate(d_in, num_experts, init_scale, g)
        super().__init__(net)

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        stored = call.plan.setdefault("per_module", {})
        if module in stored:  # decode steps after the prompt keep the prompt's decision
            return stored[module]
        gate = cast(_SmearGate, self.net[key(module)])
        x3 = x.reshape(call.batch_size, -1, x.shape[-1]).to(gate.weight.dtype)
        mask = call.token_mask(x3.shape[1], x3.dtype, x3.device)
        pooled = (x3 * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        stored[module] = Selection(torch.softmax(gate(pooled), dim=-1), None, "example")
        return stored[module]


class TaskGateRouter(LearnedRouter):
    """PEMT's correlation gate, one decision per module for the whole target task: g_m = softmax(t_m · W_m / τ)
    over the frozen experts, where t_m is the target task's description vector as module m sees it (learned;
    in the paper the mean of the module's input over the target task-prompt positions, which in a causal
    decoder depends on the prompt alone) and W_m the gate (zero at the start: uniform weights; τ = 1 as in the
    official code). The module's output is W x + Σ_e g_{m,e} B_e A_e x.

    With ``sparsity`` the call keeps, per module, the Task Sparsity Loss of the official code:
    Σ_e q_e · (1 − mean_t cos(y_t, E_e(x_t))), q the gate weights and y the module's mixed output."""

    granularity = "task"

    def __init__(
        self,
        factors: dict[str, Factors],
        bases: dict[str, Callable[[torch.Tensor], Any]],
        *,
        temperature: float = 1.0,
        sparsity: bool = True,
        seed: int = 0,
    ):
        g = torch.Generator().manual_seed(seed)
        net = nn.ModuleDict()
        for module, (A, _) in factors.items():
            E, _, d_in = A.shape
            net[key(module)] = nn.ParameterDict(
                {
                    "task": nn.Parameter(torch.randn(d_in, generator=g)),
                    "gate": nn.Parameter(torch.zeros(d_in, E)),
                }
            )
        super().__init__(net)
        self.factors = factors
        self.bases = bases
        self.temperature = temperature
        self.sparsity = sparsity

    def weights(self, module: str) -> torch.Tensor:
        """The module's task-level weights over the experts, ``[E]``."""
        p = cast(nn.ParameterDict, self.net[key(module)])
        return torch.softmax(p["task"] @ p["gate"] / self.temperature, dim=-1)

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        w = self.weights(module)
        if self.sparsity and torch.is_grad_enabled():
            A, Bt = self.factors[module]
            xs = x.reshape(-1, x.shape[-1]).to(w.dtype)
            out = expert_outputs(xs, A.to(xs), Bt.to(xs))  # [N, E, d_out]
            with torch.no_grad():
                base = self.bases[module](xs).to(w.dtype)
            y = base + (w[None, :, None] * out).sum(1)
            cos = nn.functional.cosine_similarity(y[:, None, :], out, dim=-1).mean(0)  # [E]
            call.plan.setdefault("task_sparsity", []).append((w * (1 - cos)).sum())
        return Selection(w.expand(call.batch_size, -1), None, "example")

    def aux_loss(self, call: CallState) -> torch.Tensor | None:
        """The Task Sparsity Loss, averaged over modules (the official code averages it over layers)."""
        losses = call.plan.get("task_sparsity")
        return torch.stack(losses).mean() if losses else None

    def routing_flops_per_token(self, dims: dict[str, tuple[int, int]]) -> float:
        return 0.0  # task-level weights: nothing per token


class _MoeGating(nn.Module):
    """MixDA's gate (official code: `MoeGating` in src/models/transformers/modeling_roberta.py): ``layers``
    linear layers of width ``hidden`` with ReLU, each preceded by dropout, then a linear map to the candidates;
    softmax outside."""

    def __init__(self, d_in: int, hidden: int, outputs: int, layers: int, dropout: float):
        super().__init__()
        sizes = [d_in] + [hidden] * layers + [outputs]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        for i, lin in enumerate(self.linears):
            if i:
                x = torch.relu(x)
            x = lin(nn.functional.dropout(x, self.dropout, training))
        return x


class MixtureGateRouter(LearnedRouter):
    """MixDA's mixture-of-adapters gate, one decision per example and module: p = softmax(MLP(x_last)) over the
    candidates {the original module, expert 1 … E} from the module's input at the example's last token the
    router may see (the official gate reads the last position). Each candidate is a whole module output — the
    original W x, or expert e's (W + ΔW_e) x — so the mixture is W x + Σ_e p_e ΔW_e x (the original's share
    p_0 adds no update). Without ``include_original`` the softmax runs over the experts alone. Dropout acts only
    while gradients are on (training). The decision is kept for the tokens generated after the prompt."""

    granularity = "example"

    def __init__(
        self,
        dims: dict[str, int],
        num_experts: int,
        *,
        hidden: int = 768,
        layers: int = 3,
        dropout: float = 0.2,
        include_original: bool = True,
        seed: int = 0,
    ):
        self.include_original = include_original
        net = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # nn.Linear's default initialisation, seeded
            for module, d_in in dims.items():
                net[key(module)] = _MoeGating(d_in, hidden, num_experts + include_original, layers, dropout)
        super().__init__(net)

    def probabilities(self, module: str, x_last: torch.Tensor) -> torch.Tensor:
        """``[B, E (+1)]``: the softmax over the candidates (the original module first, if included)."""
        gate = cast(_MoeGating, self.net[key(module)])
        return torch.softmax(gate(x_last, torch.is_grad_enabled()), dim=-1)

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        stored = call.plan.setdefault("per_module", {})
        if module in stored:
            return stored[module]
        gate = cast(_MoeGating, self.net[key(module)])
        first = cast(nn.Linear, gate.linears[0])
        x3 = x.reshape(call.batch_size, -1, x.shape[-1]).to(first.weight.dtype)
        mask = call.token_mask(x3.shape[1], x3.dtype, x3.device)
        positions = torch.arange(x3.shape[1], device=x3.device, dtype=x3.dtype)
        last = (mask * (positions + 1)).argmax(1)  # the last visible token (the last one if none is)
        last = torch.where(mask.sum(1) > 0, last, torch.full_like(last, x3.shape[1] - 1))
        p = self.probabilities(module, x3[torch.arange(x3.shape[0], device=x3.device), last])
        w = p[:, 1:] if self.include_original else p
        stored[module] = Selection(w, None, "example")
        return stored[module]
