"""Routers learned on data (experts and base frozen; only the router trains, through `moerge.train.router`).

On the target task's data (the builder trains on ``ctx.require_target().rows``; the trained router is cached in
the library keyed by recipe, options, expert set, modules and a hash of the data, so a second build loads it):

- **MoLE** (Wu, Huang, Wei, "Mixture of LoRA Experts", ICLR 2024, arXiv:2404.13628; checked against the paper's
  text, §3.2–3.3 and §4.2 — github:yushuiwx/MoLE holds only a README, no code): per module, a gate over the
  experts' outputs, ε = softmax(W_g · Norm(E_1(x) ⊕ … ⊕ E_n(x)) / τ) with τ *learnable* (Eq. 11), output
  W x + Σ ε_e E_e(x); trained with L_D + α·L_balance, L_balance = −log Π_e q_e where q_e is expert e's gate weight
  averaged over the gating functions (Eq. 14–15; here over every gate and token of the batch), α = 0.5 (§4);
  ``mask`` leaves experts out at inference (the softmax renormalised over the rest) without retraining (§5).
  Deviations: the paper's main gate sits per transformer block and reads each LoRA's whole *block* output; the
  expert layer mixes per adapted matrix, so this is the paper's matrix-wise variant m-MoLE (Table 9, slightly
  below the block/layer-wise ones). Norm is a LayerNorm without affine parameters over the flattened outputs,
  per token (the paper's ξ = N×L×d flattens a whole sequence, which has no fixed size in a causal LM); the gates
  start at zero (uniform). Paper settings (``preset="paper"``): 800 steps, lr 1e-5, batch 12.
- **LoRA-Flow** (Wang et al., ACL 2024, aclanthology 2024.acl-long.695; code thunlp/LoRAFlow, README "Calculating
  the fusion weights"): one fusion gate per decoder layer, w^l = softmax(W^l_gate x^l_t) + b^l with the bias
  *after* the softmax (as the official README writes it), applied to every LoRA module of the layer, per token;
  few-shot (the paper: ~200 examples). Here x^l_t is the input of the layer's first adapted module (for Llama
  the normed hidden state entering attention).
- **AdapterFusion** (Pfeiffer et al., EACL 2021, arXiv:2005.00247; code adapter-hub/adapters,
  ``StaticAdapterFusionConfig``: key and query, no value matrix, no temperature): per module and token,
  α = softmax_e((h W_Q)·(E_e(x) W_K)) with the query from the module's output h = W x and the keys from each
  expert's output; the output is W x + Σ α_e E_e(x); full target data. (The "dynamic" variant's value matrix
  mixes the output after the experts, which the expert layer does not do; not offered.)

On the experts' own data (one router for the whole expert set, a library-level artifact prepared like any data
signature: ``moerge library prepare``, or the benchmark playing the contributors):

- **MeteoRA** (Xu, Lai, Huang, arXiv:2405.13053, ICLR 2025; official code NJUDeepEngine/meteora read:
  MoELoRA/layer.py, base_model/llama/modeling_llama_meteor.py, utils.py, run_meteora_train_fsdp.sh): per adapted
  module a gate ``moe_gate`` (linear, no bias, initialised N(0, 1)), weights softmax over the top-2 logits
  (equivalently softmax, top-2, renormalised), per token, sparse at inference. Trained on the union of the
  experts' training data with the LM loss plus 50 × the cross-entropy of *every* gate's logits at every token
  against the row's source LoRA (``lora_gate_loss_func``, ``moe_aux_loss_coef = 50``) — the rows are labelled
  with their expert here. Paper settings: 15000 steps, lr 5e-4 (cosine, weight decay 0.01), batch 32.
  Deviations: the official run also trains the LoRAs (``"lora_" in module``); here the experts stay frozen (the
  issue's one training path, and the paper's description); its LM loss also covers the prompt tokens, ours the
  completions only.
- **SMEAR** (Muqeeth, Liu, Raffel, "Soft Merging of Experts with Adaptive Routing", TMLR 2024, arXiv:2306.03745;
  official code r-three/smear read: hyperformer/adapters/adapter_utils.py ``Router``, adapter_controller_fast.py,
  configs/adapter/parameter_averaging_routing.json): per example and module, p = softmax(LN(x̄) · LN_w(W) + b)
  from the mean x̄ of the module's input (a LayerNorm of it; ``normalize_router_weights``: each expert's weight
  vector layer-normalised with a gain initialised at ``router_init_scale`` = 0.01, W ~ N(0, 0.01²), b = 0), and
  one forward with the merged update Σ_e p_e ΔW_e (parameter aggregation); trained on the experts' data mixed.
  Paper settings: lr 3e-4, batch 128 (600k steps with the experts trained jointly). Deviations: the official
  code trains experts and router together from scratch on T5; here the router alone, over frozen LoRAs; it
  pools over the prompt tokens (the official mean runs over the encoder input, padding included).

On the target data again, methods whose contributor-side stage is not reproduced (only their routing and
aggregation run on top of ordinary LoRA experts):

- **PEMT** (Lin et al., Findings of ACL 2024, arXiv:2402.15082; official code JachinLin2022/PEMT read:
  pemt/adapters/lora.py ``Linear`` with ``lora_num`` > 1, pemt/third_party/models/t5/modeling_t5.py
  ``T5LayerFF``, pemt/run_pemt_stage2.sh). Reproduced: the stage-2 gate over frozen source LoRAs in each adapted
  module, g = softmax(t · W_gate / τ) with W_gate zero-initialised and τ = 1, where t is the mean of the module's
  input over the target task-prompt positions; the output W x + Σ_e g_e B_e A_e x; and the Task Sparsity Loss of
  the official code, Σ_e q_e (1 − mean_t cos(y_t, E_e(x_t))) with q the gate weights, weighted 0.1 and averaged
  over modules. Adapted: in a causal decoder the task-prompt positions see only the prompt, so t is a function
  of learned parameters alone — it is learned directly, per module (``TaskGateRouter``: task-level weights, the
  same for every example). Not reproduced: the source stage (Custom: each source adapter trained with its own
  task-description prompt, which hub LoRAs lack — the target prompt starts from them in the paper, randomly
  here) and the target adapter trained alongside the gate (only the router trains on this path). The survey
  records PEMT's user data as "multiple" (the paper runs full and few-shot); recorded as few-shot here, the
  least it needs. Paper settings: lr 3e-4, batch 32 (20 epochs).
- **MixDA** (Diao et al., ACL 2023, arXiv:2306.05406; official code Amano-Aki/Mixture-of-Domain-Adapters read:
  src/models/transformers/modeling_roberta.py ``RobertaOutput`` and ``MoeGating``, stage_two.sh). Reproduced:
  the stage-2 mixture gate, an MLP (dropout 0.2 before each of 3 linear layers of width 768 with ReLU, then a
  linear map; the official width is a literal 768 — RoBERTa-base's hidden size, while its runs use RoBERTa-large,
  hidden 1024, whose FFN output gate reads the 4096-wide intermediate — so here it defaults to the model's hidden
  size, ``preset="paper"`` sets 768: on the synthetic suite's hidden size 64, 768 made a gate of 17.5M
  parameters for a model of ~0.1M) on the FFN-output module's input at the last position, softmax over {original module, domain
  adapter 1 … E}, one decision per example, outputs mixed densely; ``include_original=False`` drops the original
  from the candidates. Adapted: each domain candidate is expert e's whole module output (W + ΔW_e) x, so the
  mixture is W x + Σ_e p_e ΔW_e x (the official adapters are parallel modules whose own output replaces the
  FFN's); the gate runs on every module the experts adapt (the paper: the FFN output of chosen layers, 7 and 11
  of RoBERTa-large); "the last position" is the last prompt token (a causal LM's summary of the prompt; the
  decision is kept while generating). Not reproduced: stage 1 (Custom: domain adapters trained on unlabelled
  corpora with a knowledge-preserving loss — any LoRA expert stands in) and the task adapter trained with the
  gate. Paper settings: lr 1e-4, batch 5 (the example run of stage_two.sh).

Each recipe's options default to the benchmark's small settings; ``preset="paper"`` fills the options not
given with the settings listed above (``PAPER`` on each options class). PEMT and MixDA are recorded with
``training="standard"``: the survey's "Custom" is their contributor-side stage, which this reproduction does not
need.

Taxonomy note: MeteoRA and SMEAR need nothing from the user (``user_data="zero-shot"`` here: the benchmark gives
them no target data); the survey's table records MeteoRA as "Full" because its target tasks are the experts' own.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from moerge.errors import RecipeNotApplicableError
from moerge.recipes.recipe import BuildContext, Recipe, RecipeOptions, Routing, Signature, Taxonomy
from moerge.routing.learned import (
    FusionRouter,
    InputGateRouter,
    LearnedRouter,
    MixtureGateRouter,
    OutputGateRouter,
    PooledGateRouter,
    TaskGateRouter,
)


class LearnedOptions(RecipeOptions):
    """Router training settings shared by the learned recipes. The defaults are the benchmark's (a few dozen
    steps at a high learning rate: the synthetic suite's tiny models); ``preset="paper"`` takes each setting
    the paper (or its official code) states — ``PAPER``, listed in each recipe's docstring — for every option
    not given explicitly."""

    PAPER: ClassVar[dict[str, Any]] = {}

    preset: Literal["benchmark", "paper"] = Field(
        default="benchmark", description="'paper': the paper's steps/lr/batch size where not given"
    )
    steps: int = Field(default=40, ge=1, description="training steps (fewer when validation stops early)")
    lr: float = Field(default=1e-2, gt=0)
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _paper_settings(self) -> LearnedOptions:
        if self.preset == "paper":
            for name, value in self.PAPER.items():
                if name not in self.model_fields_set:
                    setattr(self, name, value)
        return self


def _train_config(o: LearnedOptions, aux_weight: float = 0.0) -> Any:
    from moerge.train.router import RouterTrainConfig

    return RouterTrainConfig(
        steps=o.steps, lr=o.lr, batch_size=o.batch_size, seed=o.seed, aux_weight=aux_weight,
        gradient_checkpointing=o.gradient_checkpointing,
    )  # fmt: skip


def _layers(ctx: BuildContext) -> dict[str, Any]:
    return {m: ctx.model.get_submodule(m) for m in ctx.modules}


def _fit_on_target(
    ctx: BuildContext, o: LearnedOptions, router: LearnedRouter, aggregation: str = "output",
    aux_weight: float = 0.0, key_exclude: tuple[str, ...] = (),
) -> LearnedRouter:  # fmt: skip
    """Train ``router`` on the target task's rows (or load it from the library's cache)."""
    from moerge.train.router import data_hash, router_config, train_router, trained_router

    target = ctx.require_target()
    ctx.require_tokenizer()
    config = router_config(
        ctx.recipe or "", o.model_dump(exclude=set(key_exclude)), ctx.experts, ctx.library, ctx.modules,
        data_hash(target.rows, target.validation),
    )  # fmt: skip
    ctx.describe(
        f"training the {ctx.recipe} router on {len(target.rows)} {target.mode} rows of {target.task}"
    )

    def train() -> Any:
        return train_router(
            ctx.model, ctx.tokenizer, ctx.experts, router, target.rows, _train_config(o, aux_weight),
            validation=target.validation, aggregation=aggregation, on_step=ctx.report_steps,
        )  # fmt: skip

    trained, _ = trained_router(ctx.library, config, router, train)
    return trained.to(ctx.device)


# ---------------------------------------------------------------------------------------------------- MoLE
class MoleOptions(LearnedOptions):
    PAPER: ClassVar[dict[str, Any]] = {"steps": 800, "lr": 1e-5, "batch_size": 12}  # §4.2, NLP

    temperature: float = Field(default=1.0, gt=0, description="initial τ of the gate's softmax (learned)")
    balance_weight: float = Field(
        default=0.5, ge=0, description="weight α of the gating-balance loss (paper: 0.5)"
    )
    mask: list[str] = Field(
        default_factory=list,
        description="experts left out at inference (no retraining: not in the cache key)",
    )


def _build_mole(ctx: BuildContext, o: MoleOptions) -> Routing:
    unknown = [n for n in o.mask if n not in ctx.names]
    if unknown:
        raise RecipeNotApplicableError(f"mask names experts not routed here: {unknown} (routed: {ctx.names})")
    factors = {m: (layer.A, layer.Bt) for m, layer in _layers(ctx).items()}
    router = OutputGateRouter(factors, temperature=o.temperature, balance=o.balance_weight > 0)
    _fit_on_target(ctx, o, router, aux_weight=o.balance_weight, key_exclude=("mask",))
    router.mask = sorted(ctx.names.index(n) for n in o.mask)  # inference-time masking, after training
    return Routing(router, "output")


MOLE = Recipe(
    name="mole",
    summary="per token and module: a gate over the experts' outputs (softmax), trained on target data with a gating-balance loss; experts maskable at inference",
    paper="Wu, Huang, Wei 2024, Mixture of LoRA Experts (ICLR), arXiv:2404.13628",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="private",
        routing_data="target",
        granularity="step",
        depth="module",
        selection="dense",
        aggregation="output",
        generalization="multiple",
        user_data="few-shot",
    ),  # fmt: skip
    builder=_build_mole,
    options=MoleOptions,
)


# ---------------------------------------------------------------------------------------------------- LoRA-Flow
def layer_groups(model: Any, modules: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(groups, leaders)``: each module's decoder layer (``layer.N``; a module outside the layers is its own
    group) and each layer's first adapted module in the model's module order (the forward order of
    transformers' decoder blocks)."""
    from moerge.train.prefix import decoder_layers, layer_of

    found = decoder_layers(model)
    order = [n for n, _ in model.named_modules()]
    position = {n: i for i, n in enumerate(order)}
    groups: dict[str, str] = {}
    for m in modules:
        idx = layer_of(m, found[0]) if found is not None else None
        groups[m] = f"layer.{idx}" if idx is not None else m
    leaders: dict[str, str] = {}
    for m in sorted(modules, key=lambda n: position.get(n, len(order))):
        leaders.setdefault(groups[m], m)
    return groups, leaders


class LoraFlowOptions(LearnedOptions):
    lr: float = Field(default=1e-2, gt=0)


def _build_lora_flow(ctx: BuildContext, o: LoraFlowOptions) -> Routing:
    groups, leaders = layer_groups(ctx.model, ctx.modules)
    dims = {m: layer.d_in for m, layer in _layers(ctx).items()}
    router = InputGateRouter(dims, len(ctx.experts), bias_after_softmax=True, groups=groups, leaders=leaders)
    _fit_on_target(ctx, o, router)
    return Routing(router, "output")


LORA_FLOW = Recipe(
    name="lora_flow",
    summary="per token: one fusion gate per decoder layer from its hidden state, w = softmax(W x) + b, over every LoRA of the layer; trained on a few target examples",
    paper="Wang et al. 2024, LoRA-Flow: Dynamic LoRA Fusion for Large Language Models in Generative Tasks (ACL)",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="private",
        routing_data="target",
        granularity="step",
        depth="module",
        selection="dense",
        aggregation="output",
        generalization="out-of-distribution",
        user_data="few-shot",
    ),  # fmt: skip
    builder=_build_lora_flow,
    options=LoraFlowOptions,
)


# ---------------------------------------------------------------------------------------------------- AdapterFusion
class AdapterFusionOptions(LearnedOptions):
    lr: float = Field(default=5e-3, gt=0)


def _build_adapter_fusion(ctx: BuildContext, o: AdapterFusionOptions) -> Routing:
    layers = _layers(ctx)
    factors = {m: (layer.A, layer.Bt) for m, layer in layers.items()}
    router = FusionRouter(factors, {m: layer.base for m, layer in layers.items()}, seed=o.seed)
    _fit_on_target(ctx, o, router)
    return Routing(router, "output")


ADAPTER_FUSION = Recipe(
    name="adapter_fusion",
    summary="per token and module: attention over the experts' outputs, query from the module's output, keys from each expert's output (static fusion); trained on the full target set",
    paper="Pfeiffer et al. 2021, AdapterFusion: Non-Destructive Task Composition for Transfer Learning (EACL), arXiv:2005.00247",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="private",
        routing_data="target",
        granularity="step",
        depth="module",
        selection="dense",
        aggregation="output",
        generalization="in-distribution",
        user_data="full",
    ),  # fmt: skip
    builder=_build_adapter_fusion,
    options=AdapterFusionOptions,
)


# ---------------------------------------------------------------------------------------------------- on experts' data
def _expert_modules(experts: list[Any], model: Any = None) -> dict[str, int]:
    """Every module some expert adapts (as `inject` takes them) with its input size (dense experts' modules
    read off ``model``)."""
    dims: dict[str, int] = {}
    for e in experts:
        for m, lm in e.lora.items():
            dims.setdefault(m, lm.d_in)
    if model is not None and any(e.dense for e in experts):
        from moerge.model.expert_layer import module_dims
        from moerge.model.routed import adapted_modules

        for m in adapted_modules(model, experts):
            dims.setdefault(m, module_dims(model.get_submodule(m))[0])
    return dict(sorted(dims.items()))


def _joint_config(recipe: str, o: LearnedOptions, ctx: BuildContext) -> dict[str, Any]:
    from moerge.train.router import router_config

    modules = list(_expert_modules(ctx.experts, ctx.model))
    return router_config(recipe, o.model_dump(), ctx.experts, ctx.library, modules, "experts' training data")


def _joint_compute(recipe: str, make: Any, aggregation: str, aux_weight: Any, labelled: bool) -> Any:
    """A library-scope signature's compute: the router trained on every expert's training rows, mixed (each
    row labelled with its expert's index where the router learns from the labels)."""

    def compute(ctx: BuildContext, o: LearnedOptions, data: dict[str, list]) -> dict[str, dict]:
        from moerge.train.gates import training_rows
        from moerge.train.router import ROUTER_KIND, train_router

        ctx.require_tokenizer()
        pairs = [(r, i) for i, name in enumerate(ctx.names) for r in training_rows(data.get(name, []))]
        rows = [r for r, _ in pairs]
        router = make(_expert_modules(ctx.experts, ctx.model), len(ctx.experts), o)
        result = train_router(
            ctx.model, ctx.tokenizer, ctx.experts, router, rows, _train_config(o, aux_weight(o)),
            aggregation=aggregation, on_step=ctx.report_steps,
            row_labels=[i for _, i in pairs] if labelled else None,
        )  # fmt: skip
        state = router.state()
        if ctx.library is not None:
            info = {
                "train_seconds": result.seconds, "trainable_parameters": router.trainable_parameters,
                "rows": len(rows), "first_loss": result.losses[0], "final_loss": result.losses[-1],
            }  # fmt: skip
            ctx.library.put_artifact(ROUTER_KIND, _joint_config(recipe, o, ctx), None, state, info)
        return {"_library": state}

    return compute


def _joint_signature(
    recipe: str,
    what: str,
    make: Any,
    aggregation: str,
    aux_weight: Any = lambda o: 0.0,
    labelled: bool = False,
) -> Signature:
    from moerge.train.router import ROUTER_KIND

    return Signature(
        kind=ROUTER_KIND,
        what=what,
        compute=_joint_compute(recipe, make, aggregation, aux_weight, labelled),
        config=lambda o, ctx: _joint_config(recipe, o, ctx),
        scope="library",
        how=f"moerge.recipes.prepare_signatures('{recipe}', model, tokenizer, library, {{expert: rows}})",
    )


def _joint_router(
    ctx: BuildContext, sig: Signature, o: LearnedOptions, router: LearnedRouter
) -> LearnedRouter:
    tensors, info = ctx.load_library(sig, o)
    router.load_state(tensors)
    router.train_seconds = float(info.get("train_seconds", 0.0))
    return router.to(ctx.device)


class JointOptions(LearnedOptions):
    """The routers trained on the experts' own data (MeteoRA, SMEAR): trained once per expert set, on every
    expert's training rows, so the benchmark gives them 400 steps (batch 8: 3200 rows, about 0.8 epoch of the
    synthetic suite's 8 × 512 rows) rather than the target-data recipes' 40. With Adam each weight moves by at
    most lr per step, so 40 steps at 1e-2 move a MeteoRA gate by ≤ 0.4 against its official N(0, 1)
    initialisation and the gates stay near random (held-in routing accuracy 0.32 on the synthetic suite); the
    official run moves it by up to Σ lr ≈ 5e-4 · 15000 / 2 ≈ 3.75 (cosine schedule), which 400 steps at 1e-2
    match (≤ 4). The numbers: docs/routing.md, "Routers trained on the experts' data"."""

    steps: int = Field(
        default=400, ge=1, description="training steps (the experts' data: ~0.8 epoch of the synthetic suite)"
    )


class MeteoraOptions(JointOptions):
    PAPER: ClassVar[dict[str, Any]] = {
        "steps": 15000,
        "lr": 5e-4,
        "batch_size": 32,
    }  # run_meteora_train_fsdp.sh

    k: int = Field(default=2, ge=1, description="experts per token (the paper: top-2)")
    gate_loss_weight: float = Field(
        default=50.0,
        ge=0,
        description="weight of the gates' cross-entropy against each row's expert (official: 50)",
    )
    init_std: float = Field(
        default=1.0, ge=0, description="std of the gates' normal initialisation (official: 1)"
    )


def _meteora_router(dims: dict[str, int], num_experts: int, o: MeteoraOptions) -> InputGateRouter:
    return InputGateRouter(
        dims,
        num_experts,
        k=o.k,
        bias=False,
        init_std=o.init_std,
        seed=o.seed,
        supervised=o.gate_loss_weight > 0,
    )


METEORA_ROUTER = _joint_signature(
    "meteora", "a MeteoRA gate set trained on the experts' data", _meteora_router, "output",
    aux_weight=lambda o: o.gate_loss_weight, labelled=True,
)  # fmt: skip


def _build_meteora(ctx: BuildContext, o: MeteoraOptions) -> Routing:
    router = _meteora_router(_expert_modules(ctx.experts, ctx.model), len(ctx.experts), o)
    return Routing(_joint_router(ctx, METEORA_ROUTER, o, router), "output")


METEORA = Recipe(
    name="meteora",
    summary="per token and module: a top-2 gate softmax(TopK(W x)) trained on the union of the experts' own data; sparse at inference",
    paper="Xu, Lai, Huang 2025, MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models (ICLR), arXiv:2405.13053",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="shared",
        routing_data="expert",
        granularity="step",
        depth="module",
        selection="sparse",
        aggregation="output",
        generalization="in-distribution",
        user_data="zero-shot",
    ),  # fmt: skip
    builder=_build_meteora,
    options=MeteoraOptions,
    signatures=(METEORA_ROUTER,),
)


class SmearOptions(JointOptions):
    PAPER: ClassVar[dict[str, Any]] = {
        "steps": 600000,
        "lr": 3e-4,
        "batch_size": 128,
    }  # parameter_averaging_routing.json

    init_scale: float = Field(
        default=1e-2, gt=0, description="router_init_scale: std of W and initial gain of its normalisation"
    )


def _smear_router(dims: dict[str, int], num_experts: int, o: SmearOptions) -> PooledGateRouter:
    return PooledGateRouter(dims, num_experts, init_scale=o.init_scale, seed=o.seed)


SMEAR_ROUTER = _joint_signature(
    "smear", "a SMEAR router trained on the experts' data", _smear_router, "parameter"
)


def _build_smear(ctx: BuildContext, o: SmearOptions) -> Routing:
    router = _smear_router(_expert_modules(ctx.experts, ctx.model), len(ctx.experts), o)
    return Routing(_joint_router(ctx, SMEAR_ROUTER, o, router), "parameter")


SMEAR = Recipe(
    name="smear",
    summary="per example and module: p = softmax(W mean(x) + b), one forward with the merged update sum_e p_e dW_e; router trained on the experts' data",
    paper="Muqeeth, Liu, Raffel 2024, Soft Merging of Experts with Adaptive Routing (TMLR), arXiv:2306.03745",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="shared",
        routing_data="expert",
        granularity="example",
        depth="module",
        selection="dense",
        aggregation="parameter",
        generalization="in-distribution",
        user_data="zero-shot",
    ),  # fmt: skip
    builder=_build_smear,
    options=SmearOptions,
    signatures=(SMEAR_ROUTER,),
)


# ---------------------------------------------------------------------------------------------------- PEMT
class PemtOptions(LearnedOptions):
    PAPER: ClassVar[dict[str, Any]] = {"lr": 3e-4, "batch_size": 32}  # pemt/run_pemt_stage2.sh (20 epochs)

    sparsity_weight: float = Field(
        default=0.1, ge=0, description="weight of the Task Sparsity Loss (official code: 0.1)"
    )
    temperature: float = Field(default=1.0, gt=0, description="τ of the gate's softmax (official code: 1)")


def _build_pemt(ctx: BuildContext, o: PemtOptions) -> Routing:
    layers = _layers(ctx)
    factors = {m: (layer.A, layer.Bt) for m, layer in layers.items()}
    router = TaskGateRouter(
        factors, {m: layer.base for m, layer in layers.items()}, temperature=o.temperature,
        sparsity=o.sparsity_weight > 0, seed=o.seed,
    )  # fmt: skip
    _fit_on_target(ctx, o, router, aux_weight=o.sparsity_weight)
    return Routing(router, "output")


PEMT = Recipe(
    name="pemt",
    summary="per module, for the whole task: g = softmax(t . W) over the frozen experts from a learned target-task vector, trained on target data with the Task Sparsity Loss",
    paper="Lin et al. 2024, PEMT: Multi-Task Correlation Guided Mixture-of-Experts Enables Parameter-Efficient Transfer Learning (Findings of ACL), arXiv:2402.15082",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="private",
        routing_data="target",
        granularity="task",
        depth="module",
        selection="dense",
        aggregation="output",
        generalization="out-of-distribution",
        user_data="few-shot",
    ),  # fmt: skip
    builder=_build_pemt,
    options=PemtOptions,
)


# ---------------------------------------------------------------------------------------------------- MixDA
class MixdaOptions(LearnedOptions):
    PAPER: ClassVar[dict[str, Any]] = {
        "lr": 1e-4,
        "batch_size": 5,
        "gate_hidden": 768,
    }  # stage_two.sh's example run (20 epochs); modeling_roberta.py's MoeGating(..., 768, ...)

    include_original: bool = Field(
        default=True, description="the original module is a candidate of the mixture (as in the paper)"
    )
    gate_hidden: int | None = Field(
        default=None,
        ge=1,
        description="width of the gate's MLP (None: the model's hidden size; official: 768, preset=paper)",
    )
    gate_layers: int = Field(default=3, ge=1, description="hidden layers of the gate's MLP (official: 3)")
    dropout: float = Field(default=0.2, ge=0, lt=1, description="the gate's dropout (official: 0.2)")


def _hidden_size(model: Any, dims: dict[str, int]) -> int:
    """The model's hidden size (transformers' ``config.hidden_size``; else the widest adapted module input)."""
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    return int(size) if isinstance(size, int) and size > 0 else max(dims.values())


def _build_mixda(ctx: BuildContext, o: MixdaOptions) -> Routing:
    dims = {m: layer.d_in for m, layer in _layers(ctx).items()}
    router = MixtureGateRouter(
        dims, len(ctx.experts), hidden=o.gate_hidden or _hidden_size(ctx.model, dims), layers=o.gate_layers, dropout=o.dropout,
        include_original=o.include_original, seed=o.seed,
    )  # fmt: skip
    _fit_on_target(ctx, o, router)
    return Routing(router, "output")


MIXDA = Recipe(
    name="mixda",
    summary="per example and module: an MLP gate on the last prompt token's input mixes the original module and the experts, W x + sum_e p_e dW_e x; trained on the full target set",
    paper="Diao et al. 2023, Mixture-of-Domain-Adapters: Decoupling and Injecting Domain Knowledge to Pre-trained Language Models' Memories (ACL), arXiv:2306.05406",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="private",
        routing_data="target",
        granularity="example",
        depth="module",
        selection="dense",
        aggregation="output",
        generalization="in-distribution",
        user_data="full",
    ),  # fmt: skip
    builder=_build_mixda,
    options=MixdaOptions,
)


RECIPES = [MOLE, LORA_FLOW, ADAPTER_FUSION, METEORA, SMEAR, PEMT, MIXDA]
