"""Mixture-of-experts models built from dense experts of one Llama-family base, in transformers' Mixtral layout.

Each expert is a full state dict of the base architecture (a dense fine-tune, or the base plus a LoRA expert's
update densified by `moerge.model.routed.weight_deltas`; `expert_state`). In every decoder layer the experts'
FFNs (``gate_proj``, ``up_proj``, ``down_proj``) become the MoE experts of a ``MixtralSparseMoeBlock``, whose
router ``mlp.gate.weight`` [E, hidden] scores the block's input (the post-attention RMSNorm output) per token:
``softmax`` over the experts, top-k, renormalised (Mixtral's router). Every other parameter (attention, norms,
embeddings, LM head) is the base's (``shared="base"``, as mergekit-moe does) or the average over the experts
(``shared="average"``, as Branch-Train-MiX does: Sukhbaatar et al. 2024, arXiv:2403.07816, §2.3).

Zero-training router initialisations follow mergekit-moe (Goddard et al. 2024, arXiv:2403.13257; code read:
arcee-ai/mergekit ``mergekit/moe/router.py``, ``get_gate_params``): per expert and layer the gate row is

- ``hidden`` / ``hidden_last``: the base model's hidden states entering each decoder layer
  (``output_hidden_states[:-1]``) at the *last* position of each prompt (prompts are ``bos + prompt``, padded
  together on the left with BOS, as ``mergekit/scripts/moe.py`` sets up the tokenizer), averaged over the positive
  prompts, minus the same for the negative prompts, then L2-normalised per layer;
- ``hidden_avg``: the same with each prompt's states averaged over all its positions (the left padding included,
  as mergekit's ``sum(dim=2) / seq_len``);
- ``cheap_embed``: the token embeddings of the prompts summed over the unpadded tokens of all prompts, negative
  subtracted, normalised, the same row in every layer;
- ``random``: standard normal; ``uniform_random``: U(-1/√hidden, 1/√hidden) (torch's ``nn.Linear`` init).

Deviation: mergekit runs the ``hidden`` modes with the base loaded in bfloat16; here they run in the base
model's own dtype (float32 for the tests' tiny models).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from moerge.errors import MalformedConfigError, ModelLoadError, ShapeMismatchError

GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"]
GATE_MODES: tuple[str, ...] = (
    "hidden",
    "hidden_last",
    "hidden_avg",
    "cheap_embed",
    "random",
    "uniform_random",
)
FFN = ("gate_proj", "up_proj", "down_proj")


def check_llama_family(config: Any) -> None:
    """Refuse a base the Mixtral layout cannot hold (not Llama/Mistral, or with biases)."""
    if getattr(config, "model_type", None) not in ("llama", "mistral"):
        raise ModelLoadError(
            f"building an MoE needs a Llama- or Mistral-family base (Mixtral layout); this base is "
            f"{getattr(config, 'model_type', None)!r}. Use a Llama/Mistral base."
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ModelLoadError(
                f"the base sets {flag}=True, which the Mixtral layout has no place for; use a base without biases"
            )


def mixtral_config(
    base_config: Any, num_experts: int, experts_per_token: int = 2, router_aux_loss_coef: float = 0.01
) -> Any:
    """The Mixtral config holding a Llama/Mistral base's shapes with ``num_experts`` FFN experts per layer."""
    from transformers import MixtralConfig

    check_llama_family(base_config)
    if not 1 <= experts_per_token <= num_experts:
        raise ShapeMismatchError(
            f"experts_per_token={experts_per_token} with {num_experts} experts; choose 1 … {num_experts}"
        )
    c = base_config
    return MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=dict(c.rope_parameters),
        attention_dropout=getattr(c, "attention_dropout", 0.0),
        sliding_window=None,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        num_local_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        router_aux_loss_coef=router_aux_loss_coef,
        output_router_logits=False,
        architectures=["MixtralForCausalLM"],
    )


def expert_state(base: nn.Module, expert: Any) -> dict[str, torch.Tensor]:
    """The full state dict of ``base`` with a library expert's update added (LoRA densified, or dense deltas)."""
    from moerge.model.routed import weight_deltas

    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for name, delta in weight_deltas(base, expert).items():
        if name in state:
            state[name] += delta.to(state[name].dtype)
    return state


def build_mixtral(
    base: nn.Module,
    experts: Sequence[Mapping[str, torch.Tensor]],
    gates: torch.Tensor | None = None,
    *,
    experts_per_token: int = 2,
    shared: Literal["base", "average"] = "base",
    residual_scales: Sequence[float | None] | None = None,
    router_aux_loss_coef: float = 0.01,
    dtype: torch.dtype | None = None,
) -> Any:
    """A ``MixtralForCausalLM`` whose layer-l experts are the FFNs of ``experts`` (state dicts of ``base``'s
    architecture) and whose routers are ``gates`` [layers, experts, hidden] (zeros when None). ``shared``: the
    non-FFN parameters from ``base`` or averaged over ``experts``. ``residual_scales`` (one per expert or None)
    multiply each expert's ``down_proj`` (mergekit's ``residual_scale``). ``base`` is left unchanged."""
    from transformers import MixtralForCausalLM

    if not experts:
        raise ShapeMismatchError("building an MoE needs at least one expert")
    config = mixtral_config(base.config, len(experts), experts_per_token, router_aux_loss_coef)
    n_layers, n_exp, hidden = config.num_hidden_layers, len(experts), config.hidden_size
    if gates is None:
        gates = torch.zeros(n_layers, n_exp, hidden)
    if tuple(gates.shape) != (n_layers, n_exp, hidden):
        raise ShapeMismatchError(
            f"router weights have shape {tuple(gates.shape)}; expected {(n_layers, n_exp, hidden)}"
        )
    base_state = base.state_dict()
    for i, st in enumerate(experts):
        for k, v in base_state.items():
            if k not in st or tuple(st[k].shape) != tuple(v.shape):
                raise ShapeMismatchError(
                    f"expert {i}: {k} is missing or has another shape than the base's {tuple(v.shape)}; "
                    "every expert must be a fine-tune of the base"
                )
    scales = list(residual_scales) if residual_scales is not None else [None] * n_exp
    out: dict[str, torch.Tensor] = {}
    for k, v in base_state.items():
        if ".mlp." in k:
            continue
        if shared == "average":
            out[k] = torch.stack([st[k].float() for st in experts]).mean(0).to(v.dtype)
        else:
            out[k] = v.detach().clone()
    for layer in range(n_layers):
        p = f"model.layers.{layer}.mlp"
        gate_up, down = [], []
        for st, scale in zip(experts, scales, strict=True):
            gate_up.append(torch.cat([st[f"{p}.gate_proj.weight"], st[f"{p}.up_proj.weight"]], dim=0))
            d = st[f"{p}.down_proj.weight"]
            down.append(d * scale if scale is not None else d)
        out[f"{p}.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"{p}.experts.down_proj"] = torch.stack(down)
        out[f"{p}.gate.weight"] = gates[layer].to(out[f"{p}.experts.down_proj"].dtype)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    model.load_state_dict(out, strict=True, assign=True)
    model.tie_weights()
    # non-persistent buffers (the rotary frequencies) are not in the state dict: made again off the meta device
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    if dtype is not None:
        model.to(dtype)  # type: ignore[arg-type]
    return model.eval()


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> Any:
    """mergekit's prompt encoding: ``bos + prompt``, no other special tokens, padded together on the *left*
    with the BOS token (EOS when there is none) as padding, as ``mergekit-moe`` sets up its tokenizer
    (``mergekit/scripts/moe.py``); ``tokenizer`` itself is left as it was."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.bos_token_id is not None:
        tokenizer.pad_token_id = tokenizer.bos_token_id
    else:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


@torch.no_grad()
def _hidden(model: nn.Module, tokenized: Any, average: bool) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(
        input_ids=tokenized["input_ids"].to(device),
        attention_mask=tokenized["attention_mask"].to(device),
        output_hidden_states=True,
        return_dict=True,
    )
    h = torch.stack(out.hidden_states[:-1]).float()  # [layers, batch, seq, hidden]: each layer's input
    h = h.sum(dim=2) / h.shape[2] if average else h[:, :, -1, :]
    return (h.sum(dim=1) / h.shape[1]).cpu()  # [layers, hidden]


def _cheap_embed(embed: torch.Tensor, tokenized: Any, num_layers: int) -> torch.Tensor:
    ids, mask = tokenized["input_ids"], tokenized["attention_mask"]
    h = embed.float()[ids] * mask.unsqueeze(-1)
    e = h.sum(dim=1).sum(dim=0, keepdim=True)
    return (e / e.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(num_layers, 1)


def gate_vectors(
    mode: str,
    base: nn.Module,
    tokenizer: Any = None,
    positive: Sequence[Sequence[str]] = (),
    negative: Sequence[Sequence[str]] = (),
    *,
    num_experts: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Router weights [layers, experts, hidden] by mergekit-moe's ``gate_mode`` (module docstring): one
    positive (and optionally negative) prompt list per expert; ``num_experts`` for the random modes."""
    cfg: Any = base.config
    n_layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    if mode in ("random", "uniform_random"):
        n = num_experts if num_experts is not None else len(positive)
        g = torch.Generator().manual_seed(seed)
        if mode == "random":
            return torch.randn(n_layers, n, hidden, generator=g)
        scale = (1.0 / hidden) ** 0.5
        return torch.rand(n_layers, n, hidden, generator=g) * 2 * scale - scale
    if mode not in GATE_MODES:
        raise MalformedConfigError(f"gate_mode {mode!r} is not one of {', '.join(GATE_MODES)}")
    if tokenizer is None:
        raise MalformedConfigError(f"gate_mode {mode!r} encodes prompts: give the base model's tokenizer")
    if mode == "cheap_embed":
        embed = base.get_input_embeddings().weight.detach()  # type: ignore[operator]

        def vec(tok: Any) -> torch.Tensor:
            return _cheap_embed(embed, tok, n_layers)
    else:
        was = base.training
        base.eval()

        def vec(tok: Any) -> torch.Tensor:
            return _hidden(base, tok, average=mode == "hidden_avg")

    rows = []
    negs = list(negative) + [()] * (len(positive) - len(negative))
    for pos, neg in zip(positive, negs, strict=True):
        if not pos:
            raise MalformedConfigError(f"gate_mode {mode!r} needs positive_prompts for every expert")
        v = vec(tokenize_prompts(tokenizer, pos))
        if neg:
            v = v - vec(tokenize_prompts(tokenizer, neg))
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    if mode != "cheap_embed":
        base.train(was)
    return torch.stack(rows, dim=1)  # [layers, experts, hidden]


def moe_flops_per_token(config: Any) -> float:
    """Multiply-adds per token beyond a dense model of the same shape: the routers, plus k-1 extra FFNs."""
    ffn = 3 * config.hidden_size * config.intermediate_size
    router = config.hidden_size * config.num_local_experts
    return float(config.num_hidden_layers * (router + (config.num_experts_per_tok - 1) * ffn))
