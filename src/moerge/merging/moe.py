"""``moerge build-moe CONFIG.yaml OUT`` / `build_moe`: a Mixtral-layout MoE checkpoint from a base and dense
experts, configured with mergekit-moe's YAML (Goddard et al. 2024, arXiv:2403.13257; code read: arcee-ai/mergekit
``mergekit/moe/config.py``, ``mixtral.py``, ``router.py``, ``common.py``).

Accepted from mergekit-moe: ``base_model``, ``gate_mode`` (hidden, hidden_avg, hidden_last, cheap_embed, random,
uniform_random), ``dtype`` (of the output), ``experts_per_token`` (default 2), ``architecture`` (``mixtral``
only), and per expert ``source_model`` (a transformers folder of the base's architecture), ``positive_prompts``,
``negative_prompts``, ``noise_scale`` (Gaussian noise added to the expert's FFN weights, seeded by ``seed``) and
``residual_scale`` (multiplies its ``down_proj``). Refused with a message: ``shared_experts`` (the Mixtral
layout has none), ``source_model: model+lora`` references and hub ids that are not in the local cache.

moerge's additions: an expert may be ``expert: NAME`` — a LoRA (or dense-delta) expert of the ``library:`` given
at the top, densified onto the base; ``shared: base | average`` (default ``base``, as mergekit: attention, norms
and embeddings from the base; ``average``: averaged over the experts, as Branch-Train-MiX does);
``router_aux_loss_coef`` (written into the config for later router training) and ``seed``.

The model is built in memory (`moerge.model.moe.build_mixtral`), then written with ``save_pretrained`` and the
base's tokenizer into a temporary sibling of OUT renamed into place when complete (`atomic_output_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moerge.errors import MalformedConfigError

CONFIG_NAME = "moerge-moe.yaml"


class MoeExpertConfig(BaseModel):
    """One MoE expert: a transformers folder (``source_model``) or a library expert (``expert``)."""

    model_config = ConfigDict(extra="forbid")

    source_model: str | None = None
    expert: str | None = None
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = Field(default=None, ge=0)
    residual_scale: float | None = None

    @model_validator(mode="after")
    def _one_source(self) -> MoeExpertConfig:
        if (self.source_model is None) == (self.expert is None):
            raise ValueError(
                "give exactly one of source_model (a transformers folder) or expert (a library name)"
            )
        if (
            self.source_model is not None
            and "+" in self.source_model
            and not Path(self.source_model).exists()
        ):
            raise ValueError(
                f"{self.source_model!r}: model+lora references are not read here; add the LoRA to a library and "
                "name it with `expert:`"
            )
        return self


class MoeConfig(BaseModel):
    """mergekit-moe's YAML, plus moerge's ``library``, ``shared``, ``router_aux_loss_coef`` and ``seed``."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[MoeExpertConfig] = Field(min_length=1)
    gate_mode: Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"] = (
        "hidden"
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    experts_per_token: int = Field(default=2, ge=1)
    architecture: Literal["mixtral"] | None = None
    shared_experts: list[MoeExpertConfig] | None = None
    library: str | None = None
    shared: Literal["base", "average"] = "base"
    router_aux_loss_coef: float = Field(default=0.01, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> MoeConfig:
        if self.shared_experts:
            raise ValueError("shared_experts: the Mixtral layout has no shared expert; list it under experts")
        if self.experts_per_token > len(self.experts):
            raise ValueError(
                f"experts_per_token={self.experts_per_token} but only {len(self.experts)} experts are listed"
            )
        if any(e.expert is not None for e in self.experts) and self.library is None:
            raise ValueError(
                "an expert given as `expert: NAME` needs `library: PATH` at the top of the config"
            )
        if self.gate_mode not in ("random", "uniform_random"):
            missing = [i for i, e in enumerate(self.experts) if not e.positive_prompts]
            if missing:
                raise ValueError(
                    f"gate_mode {self.gate_mode} needs positive_prompts for every expert (missing for experts "
                    f"{missing}); or use gate_mode: random"
                )
        return self

    @classmethod
    def load(cls, source: str | Path | dict[str, Any] | MoeConfig) -> MoeConfig:
        """Parse a YAML file, a mapping or a config; errors name the field and say what to change."""
        if isinstance(source, MoeConfig):
            return source
        where = "config"
        if not isinstance(source, dict):
            from moerge.config_io import read_yaml_mapping

            where = str(source)
            source = read_yaml_mapping(
                source, "a mergekit-moe style mapping (base_model, experts, gate_mode …)"
            )
        try:
            return cls.model_validate(source)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            raise MalformedConfigError(f"{where}: {loc}: {err['msg']}") from None


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _expert_states(cfg: MoeConfig, base: Any) -> list[dict[str, torch.Tensor]]:
    from moerge.backbones.loading import load_base_model
    from moerge.model.moe import expert_state

    lib = None
    if cfg.library is not None:
        from moerge.experts.library import ExpertLibrary

        lib = ExpertLibrary.open(cfg.library)
    states = []
    for i, e in enumerate(cfg.experts):
        if e.expert is not None:
            st = expert_state(base, lib.get(e.expert))  # type: ignore[union-attr]
        else:
            model, _ = load_base_model(e.source_model, fingerprint=False)  # type: ignore[arg-type]
            if model.config.model_type != base.config.model_type:
                raise MalformedConfigError(
                    f"experts[{i}]: {e.source_model} is a {model.config.model_type} model, the base a "
                    f"{base.config.model_type}; every expert must be a fine-tune of the base"
                )
            st = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
            del model
        if e.noise_scale is not None:
            g = torch.Generator().manual_seed(cfg.seed * 1000 + i)
            for k in st:
                if ".mlp." in k:
                    st[k] = st[k] + torch.randn(st[k].shape, generator=g) * e.noise_scale
        states.append(st)
    return states


def build_moe_model(config: str | Path | dict[str, Any] | MoeConfig) -> tuple[Any, Any, MoeConfig]:
    """``(model, tokenizer, config)``: the MoE a config describes, in memory (a ``MixtralForCausalLM``)."""
    from moerge.backbones.loading import load_base_model
    from moerge.model.moe import build_mixtral, check_llama_family, gate_vectors

    cfg = MoeConfig.load(config)
    base, tokenizer = load_base_model(cfg.base_model, fingerprint=False)
    check_llama_family(base.config)
    states = _expert_states(cfg, base)
    gates = gate_vectors(
        cfg.gate_mode,
        base,
        tokenizer,
        [e.positive_prompts or [] for e in cfg.experts],
        [e.negative_prompts or [] for e in cfg.experts],
        num_experts=len(cfg.experts),
        seed=cfg.seed,
    )
    model = build_mixtral(
        base, states, gates, experts_per_token=cfg.experts_per_token, shared=cfg.shared,
        residual_scales=[e.residual_scale for e in cfg.experts], router_aux_loss_coef=cfg.router_aux_loss_coef,
        dtype=_dtype(cfg.dtype),
    )  # fmt: skip
    return model, tokenizer, cfg


def build_moe(
    config: str | Path | dict[str, Any] | MoeConfig, out: str | Path, *, overwrite: bool = False
) -> Path:
    """Build the MoE a mergekit-moe style config describes and write it to ``out`` as a transformers folder
    (``config.json``, safetensors, the base's tokenizer, and the config as ``moerge-moe.yaml``); ``out`` is
    written into a temporary sibling renamed into place when complete. Returns ``out``."""
    import yaml

    from moerge.experts.paths import atomic_output_dir, check_output_dir

    cfg = MoeConfig.load(config)
    inputs = [cfg.base_model, *(e.source_model for e in cfg.experts)]
    check_output_dir(out, overwrite=overwrite, inputs=inputs, libraries=[cfg.library])  # before any work
    model, tokenizer, cfg = build_moe_model(cfg)
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs, libraries=[cfg.library]) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_NAME).write_text(
            yaml.safe_dump(cfg.model_dump(exclude_none=True), sort_keys=False), encoding="utf-8"
        )
    return Path(out)
