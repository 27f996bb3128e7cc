"""Premise diagnostics: does a suite give each zero-shot router's signature a fair chance?

Zero-shot per-token routers score a token's input to a module against one signature vector per expert:

- Arrow: |⟨x, v_e⟩| with v_e the top right-singular vector of ΔW_e (Ostapenko et al. 2024);
- PHATGOOSE: ⟨LN(x), LN(g_e)⟩/√d with g_e the trained gate (Muqeeth et al. 2024);
- average activation: the same score with g_e the mean module input over expert e's data.

Each rests on a premise about the suite. Arrow's is that an expert's update is *selective*: it acts on the
inputs its own task produces more than on other tasks' inputs, so that its top input direction marks its task.
This module measures, per expert e and adapted module m, on the base model's inputs ``x`` to ``m`` at e's own
*target* positions (positions whose next token is a training target of e):

- **selectivity** ``mean_{x ∈ X_e} ‖ΔW_e x‖² / mean_{f ≠ e} mean_{x ∈ X_f} ‖ΔW_e x‖²`` (each other expert's
  tokens weigh equally): above 1, the update fires more on its own inputs than on others';
- **open-loop top-1** of each router's signature: the share of e's tokens whose top-scoring expert is e
  (no expert is applied: the scores are those of the base model's inputs, hence "open loop").

    inputs = collect_target_inputs(model, batches_per_expert, modules)   # {expert: {module: [N, d_in]}}
    report = premise_diagnostics(experts, inputs, {"arrow": arrow_signature(experts, modules)})
    report.verdict("arrow")       # "premise holds …" or "Arrow not testable here: selectivity 1.3 < 2 …"

It needs no benchmark runner, so a suite build, a report or a user's notebook can call it on any model and
library; `recipe_signatures` takes each recipe's signature from its own builder.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.errors import MoergeError
from moerge.experts.expert import Expert
from moerge.routing.router import Score, prototype_scores

# Arrow's premise: an update that fires at least twice as strongly (in squared norm) on its own task's inputs as
# on the other tasks' inputs. The audit behind issue 9 measured selectivity 0.6–1.0 on cipher experts, where
# Arrow routed at chance (top-1 ≤ 0.18 of 8), and 2.5–4.5 on experts with input-triggered behaviours, where it
# routed at top-1 0.35–0.59; 2 separates the two regimes with a margin on each side.
SELECTIVITY_MIN = 2.0
# A signature that cannot pick its own expert's tokens at twice the rate of a uniform guess (1/E) does not
# carry the task: a router built on it is not being tested, only its fallback behaviour is.
TOP1_OVER_CHANCE_MIN = 2.0
# Tokens per expert kept for the diagnostics (a uniform subsample beyond that; the estimates are means).
MAX_TOKENS = 2048

ROUTER_LABELS = {"arrow": "Arrow", "phatgoose": "PHATGOOSE", "average_activation": "average activation"}


@dataclass
class RouterSignature:
    """One router's per-module signature vectors ``{module: [E, d_in]}`` and how it scores tokens."""

    prototypes: dict[str, torch.Tensor]
    score: Score


@dataclass
class PremiseReport:
    """Selectivity ``[E, M]`` and open-loop top-1 ``{router: [E, M]}`` per expert and module."""

    experts: list[str]
    modules: list[str]
    selectivity: torch.Tensor
    top1: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)

    @property
    def chance(self) -> float:
        return 1.0 / max(1, len(self.experts))

    def expert_selectivity(self) -> dict[str, float]:
        """Per expert, the geometric mean selectivity over its modules."""
        return {e: float(v) for e, v in zip(self.experts, geometric_mean(self.selectivity, 1))}

    def expert_top1(self, router: str) -> dict[str, float]:
        """Per expert, the mean open-loop top-1 of ``router`` over modules."""
        return {e: float(v) for e, v in zip(self.experts, self.top1[router].nanmean(1))}

    def mean_selectivity(self) -> float:
        """Geometric mean over experts and modules (a ratio's average: 4 and 1/4 average to 1)."""
        return float(geometric_mean(self.selectivity.flatten(), 0))

    def mean_top1(self, router: str) -> float:
        return float(self.top1[router].nanmean())

    def module_selectivity(self) -> dict[str, float]:
        return {m: float(v) for m, v in zip(self.modules, geometric_mean(self.selectivity, 0))}

    def module_top1(self, router: str) -> dict[str, float]:
        return {m: float(v) for m, v in zip(self.modules, self.top1[router].nanmean(0))}

    def failing_experts(self, router: str) -> dict[str, str]:
        """``{expert: why}`` for the experts on which ``router``'s premise fails."""
        out: dict[str, str] = {}
        sel = self.expert_selectivity()
        top = self.expert_top1(router) if router in self.top1 else {}
        floor = TOP1_OVER_CHANCE_MIN * self.chance
        for e in self.experts:
            why = []
            if router == "arrow" and sel[e] < SELECTIVITY_MIN:
                why.append(f"selectivity {sel[e]:.2f} < {SELECTIVITY_MIN:g}")
            if e in top and top[e] < floor:
                why.append(f"open-loop top-1 {top[e]:.2f} < {floor:.2f}")
            if why:
                out[e] = ", ".join(why)
        return out

    def verdict(self, router: str) -> str:
        """One line: whether ``router``'s premise holds on this suite, and for which experts it fails. It is
        "not testable here" when it fails for more than half of the experts."""
        label = ROUTER_LABELS.get(router, router)
        if router not in self.top1:
            return f"{label}: no signature measured"
        E = len(self.experts)
        facts = f"open-loop top-1 {self.mean_top1(router):.2f}, chance {self.chance:.2f}"
        if router == "arrow":
            facts = f"selectivity {self.mean_selectivity():.2f}, " + facts
        failing = self.failing_experts(router)
        if not failing:
            return f"premise holds ({facts})"
        which = "; ".join(f"{e}: {why}" for e, why in failing.items())
        if 2 * len(failing) > E:
            return f"{label} not testable here: premise fails for {len(failing)} of {E} experts ({facts}): {which}"
        return f"premise holds for {E - len(failing)} of {E} experts ({facts}); fails for {which}"

    def untestable(self, router: str) -> str | None:
        """Why ``router`` cannot be tested on this suite (its premise fails for more than half of the
        experts), or None."""
        failing = self.failing_experts(router) if router in self.top1 else {}
        if 2 * len(failing) > len(self.experts):
            return self.verdict(router)
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per expert and module values, means, and a verdict per router."""

        def rows(t: torch.Tensor) -> list[list[float | None]]:
            return [[None if torch.isnan(v) else round(float(v), 4) for v in row] for row in t]

        return {
            "experts": list(self.experts),
            "modules": list(self.modules),
            "tokens": list(self.tokens),
            "selectivity": rows(self.selectivity),
            "top1": {r: rows(t) for r, t in self.top1.items()},
            "mean": {
                "selectivity": round(self.mean_selectivity(), 4),
                **{f"top1/{r}": round(self.mean_top1(r), 4) for r in self.top1},
            },
            "per_expert": {
                e: {
                    "selectivity": round(self.expert_selectivity()[e], 4),
                    **{f"top1/{r}": round(self.expert_top1(r)[e], 4) for r in self.top1},
                }
                for e in self.experts
            },
            "verdicts": {r: self.verdict(r) for r in self.top1},
            "thresholds": {"selectivity": SELECTIVITY_MIN, "top1_over_chance": TOP1_OVER_CHANCE_MIN},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PremiseReport:
        def tensor(rows: list[list[float | None]]) -> torch.Tensor:
            return torch.tensor([[float("nan") if v is None else v for v in row] for row in rows])

        return cls(
            experts=list(data["experts"]),
            modules=list(data["modules"]),
            selectivity=tensor(data["selectivity"]),
            top1={r: tensor(v) for r, v in data["top1"].items()},
            tokens=list(data.get("tokens", [])),
        )


def geometric_mean(t: torch.Tensor, dim: int) -> torch.Tensor:
    """exp(mean(log t)) along ``dim``, ignoring NaN (ratios are averaged geometrically)."""
    return t.clamp(min=1e-12).log().nanmean(dim).exp()


# ---------------------------------------------------------------------------------------------- inputs
@torch.no_grad()
def collect_target_inputs(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    modules: Sequence[str],
    max_tokens: int = MAX_TOKENS,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The inputs ``{module: [N, d_in]}`` of ``model``'s ``modules`` at target positions.

    ``batches`` are ``(input_ids [B, T], labels [B, T])`` as an expert is trained on (-100 where no loss, right
    padding), or ``(inputs_embeds [B, T, d], labels)`` for a model run from a later layer
    (`moerge.train.prefix.truncated`). Position ``t`` counts when ``labels[t + 1]`` is a target: its module
    inputs produce that target's prediction. At most ``max_tokens`` positions are kept (a seeded uniform
    subsample)."""
    captured: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    where: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module, args):
            x = args[0]
            captured[name].append(x[where["mask"]].detach().float().cpu())

        return fn

    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    try:
        for input_ids, labels in batches:
            mask = torch.zeros_like(labels, dtype=torch.bool)
            mask[:, :-1] = labels[:, 1:] != -100
            where["mask"] = mask
            key = "inputs_embeds" if input_ids.is_floating_point() else "input_ids"
            model(**{key: input_ids})  # as in training: right padding, causal, no mask needed
    finally:
        for h in handles:
            h.remove()
    out = {m: torch.cat(v) if v else torch.zeros(0) for m, v in captured.items()}
    n = min((len(v) for v in out.values()), default=0)
    if n > max_tokens:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_tokens].sort().values
        out = {m: v[keep] for m, v in out.items()}
    return out


# ---------------------------------------------------------------------------------------------- signatures
def arrow_signature(experts: Sequence[Expert], modules: Sequence[str]) -> RouterSignature:
    """Arrow prototypes (top right-singular vectors of each ΔW), scored by |⟨x, v⟩|."""
    from moerge.transforms.arrow import expert_prototypes, stack_prototypes

    return RouterSignature(
        stack_prototypes([expert_prototypes(e) for e in experts], list(modules)), "abs_dot"
    )


def recipe_signatures(
    model: Any,
    library: Any,
    experts: Sequence[Expert],
    modules: Sequence[str],
    recipes: Sequence[str] = ("arrow", "phatgoose", "average_activation"),
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, RouterSignature]:
    """Each recipe's per-token signature as its own builder makes it (any recipe whose router scores prototypes,
    plugins included), where ``library`` holds what it needs for every expert; ``options`` per recipe."""
    from moerge.errors import RecipeNotApplicableError
    from moerge.recipes.recipe import BuildContext
    from moerge.recipes.registry import get_recipe
    from moerge.routing.prototype import PrototypeRouter

    ctx = BuildContext(model=model, experts=list(experts), library=library, modules=list(modules))
    out = {}
    for name in recipes:
        rec = get_recipe(name)
        opts = rec.parse_options(dict((options or {}).get(name, {})))
        try:
            rec.check_applicable(ctx, options=opts)
            router = rec.build(ctx, opts).router
        except RecipeNotApplicableError:
            continue
        if isinstance(router, PrototypeRouter):
            out[name] = RouterSignature(router.prototypes, router.score)
    return out


# ---------------------------------------------------------------------------------------------- measurements
def update_energy(expert: Expert, module: str, x: torch.Tensor) -> torch.Tensor:
    """``‖ΔW x‖²`` per row of ``x [N, d_in]`` for ``expert``'s LoRA on ``module`` (scaling included)."""
    lm = expert.lora[module]
    z = (x.float() @ lm.A.float().T) @ lm.B.float().T * lm.scaling
    return (z * z).sum(-1)


def premise_diagnostics(
    experts: Sequence[Expert],
    inputs: Mapping[str, Mapping[str, torch.Tensor]],
    signatures: Mapping[str, RouterSignature] | None = None,
    modules: Sequence[str] | None = None,
) -> PremiseReport:
    """Selectivity and open-loop top-1 per expert and module.

    ``inputs[e][m]``: the base model's inputs ``[N, d_in]`` to module ``m`` at expert ``e``'s target positions
    (`collect_target_inputs`). ``signatures``: per router name, its signature vectors (rows follow ``experts``).
    ``modules`` defaults to the modules every expert adapts. NaN where an expert lacks a module or has no
    tokens."""
    names = [e.name for e in experts]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise MoergeError(f"premise diagnostics: no inputs for experts {missing}")
    mods = list(modules) if modules is not None else sorted(set.intersection(*(set(e.lora) for e in experts)))
    E, M = len(experts), len(mods)
    selectivity = torch.full((E, M), float("nan"))
    top1 = {r: torch.full((E, M), float("nan")) for r in signatures or {}}
    for j, m in enumerate(mods):
        xs = [inputs[n].get(m, torch.zeros(0)) for n in names]
        for i, e in enumerate(experts):
            if m not in e.lora or len(xs[i]) == 0:
                continue
            own = float(update_energy(e, m, xs[i]).mean())
            others = [float(update_energy(e, m, xs[f]).mean()) for f in range(E) if f != i and len(xs[f])]
            if others:
                selectivity[i, j] = own / max(sum(others) / len(others), 1e-30)
        for r, sig in (signatures or {}).items():
            protos = sig.prototypes.get(m)
            if protos is None:
                continue
            for i in range(E):
                if len(xs[i]) == 0:
                    continue
                scores = prototype_scores(xs[i].float(), protos.float(), sig.score)
                top1[r][i, j] = float((scores.argmax(-1) == i).float().mean())
    tokens = [min((len(inputs[n][m]) for m in mods if m in inputs[n]), default=0) for n in names]
    return PremiseReport(names, mods, selectivity, top1, tokens)


def measure_premise(
    model: Any,
    tokenizer: Any,
    data: Mapping[str, Sequence[Any]],
    experts: Sequence[Expert],
    library: Any,
    *,
    seq_len: int | None = None,
    max_rows: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> PremiseReport:
    """Premise diagnostics of ``experts`` from their training rows ``data`` (``{expert: rows}``, encoded as each
    expert was trained: ``seq_len``, default the expert's recorded one), against the signatures of the zero-shot
    prototype recipes found in ``library`` (`recipe_signatures`, ``options`` per recipe)."""
    from moerge.train.data import encode_examples, pad_batch

    experts = [e for e in experts if data.get(e.name)]
    if len(experts) < 2:
        raise MoergeError("premise diagnostics need training data for at least two experts")
    if any(e.kind != "lora" for e in experts):
        raise MoergeError(
            "premise diagnostics read the experts' LoRA factors; these experts are dense (full fine-tunes)"
        )
    modules = sorted(set.intersection(*(set(e.lora) for e in experts)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = {}
    for e in experts:
        length = seq_len or int((e.metadata.training or {}).get("seq_len", 128))
        enc = encode_examples(tokenizer, list(data[e.name])[:max_rows], length)
        batches = [
            pad_batch(enc.ids[i : i + 64], enc.labels[i : i + 64], pad) for i in range(0, len(enc), 64)
        ]
        inputs[e.name] = collect_target_inputs(model, batches, modules)
    return premise_diagnostics(experts, inputs, recipe_signatures(model, library, experts, modules, options=options),
                               modules)  # fmt: skip


def format_premise(report: PremiseReport) -> str:
    """A Markdown table: per expert, selectivity and each router's open-loop top-1 (means over modules); then
    one verdict line per router."""
    routers = list(report.top1)
    head = ["expert", "tokens", "selectivity"] + [f"top-1 {ROUTER_LABELS.get(r, r)}" for r in routers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sel = report.expert_selectivity()
    tops = {r: report.expert_top1(r) for r in routers}
    for i, e in enumerate(report.experts):
        n = report.tokens[i] if i < len(report.tokens) else 0
        cells = [e, str(n), f"{sel[e]:.2f}"] + [f"{tops[r][e]:.2f}" for r in routers]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["mean", "", f"{report.mean_selectivity():.2f}"] + [f"{report.mean_top1(r):.2f}" for r in routers]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {ROUTER_LABELS.get(r, r)}: {report.verdict(r)}" for r in routers]
    return "\n".join(lines)


__all__ = [
    "MAX_TOKENS",
    "SELECTIVITY_MIN",
    "TOP1_OVER_CHANCE_MIN",
    "PremiseReport",
    "RouterSignature",
    "arrow_signature",
    "collect_target_inputs",
    "format_premise",
    "measure_premise",
    "recipe_signatures",
    "premise_diagnostics",
    "update_energy",
]
