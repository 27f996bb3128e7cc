"""`Expert`: a named set of weight deltas against a base model, plus its metadata.

Conventions (shared by every part of moerge):

- A LoRA module is stored in PEFT's layout: ``A`` is ``[r, d_in]``, ``B`` is ``[d_out, r]`` and the update in
  ``nn.Linear`` convention is ``ΔW = scaling · B @ A`` (``[d_out, d_in]``). For fan-in-fan-out layers (GPT-2's
  ``Conv1D``, whose weight is ``[d_in, d_out]``) the factors keep the same layout; only the base weight is
  transposed, which `LoraModule.delta_for_weight` accounts for.
- Module names are the base model's own module paths (``model.layers.0.self_attn.q_proj``), without PEFT's
  ``base_model.model.`` prefix.
- Dense deltas (task vectors of full fine-tunes) are keyed by the base model's parameter names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.errors import MalformedConfigError, NonFiniteWeightsError, ShapeMismatchError
from moerge.experts.metadata import ExpertMetadata

__all__ = ["Expert", "ExpertMetadata", "LoraModule"]


@dataclass
class LoraModule:
    """One LoRA-adapted linear module: ``ΔW = scaling · B @ A``."""

    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def delta(self) -> torch.Tensor:
        """The dense update ``scaling · B @ A`` in ``nn.Linear`` layout ``[d_out, d_in]``."""
        return (self.B.float() @ self.A.float()) * self.scaling

    def delta_for_weight(self) -> torch.Tensor:
        """The dense update in the base weight's own layout (transposed for fan-in-fan-out layers)."""
        d = self.delta()
        return d.T.contiguous() if self.fan_in_fan_out else d

    def check(self, where: str) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ShapeMismatchError(
                f"{where}: LoRA factors do not fit: A is {tuple(self.A.shape)} and B is {tuple(self.B.shape)}; "
                "expected A [r, d_in] and B [d_out, r] with the same r."
            )
        if min(self.rank, self.d_in, self.d_out) < 1:
            raise ShapeMismatchError(
                f"{where}: LoRA factors A {tuple(self.A.shape)} and B {tuple(self.B.shape)} are empty; "
                "rank, d_in and d_out must be at least 1."
            )
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise MalformedConfigError(
                f"{where}: lora_alpha is {self.alpha!r}; it must be a finite number > 0 (fix adapter_config.json)."
            )
        for label, t in (("lora_A", self.A), ("lora_B", self.B)):
            if not t.is_floating_point():
                raise MalformedConfigError(
                    f"{where}.{label} has dtype {t.dtype}; LoRA factors are floating point. Re-save the adapter."
                )
            if not torch.isfinite(t.float() if t.element_size() == 1 else t).all():
                raise NonFiniteWeightsError(
                    f"{where}.{label} holds NaN or Inf values; retrain or repair the adapter before adding it."
                )


@dataclass
class Expert:
    """A named set of weight deltas (LoRA modules or dense deltas) with metadata."""

    metadata: ExpertMetadata
    lora: dict[str, LoraModule] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    # PEFT config keys to carry through an import/export round trip (task_type, base_model_name_or_path ...).
    peft_config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def kind(self) -> str:
        return self.metadata.kind

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.lora)

    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.lora.values()) + sum(
            t.numel() for t in self.dense.values()
        )

    def check(self, source: str | None = None) -> None:
        """Raise a clear error for malformed factors, a wrong kind, or NaN/Inf weights."""
        where = source or f"expert {self.name!r}"
        if self.kind == "lora" and (self.dense or not self.lora):
            raise ShapeMismatchError(f"{where}: a LoRA expert must hold LoRA modules and no dense deltas.")
        if self.kind == "dense" and (self.lora or not self.dense):
            raise ShapeMismatchError(f"{where}: a dense expert must hold dense deltas and no LoRA modules.")
        for module, lm in self.lora.items():
            lm.check(f"{where}: module {module}")
        for param, t in self.dense.items():
            if not t.is_floating_point():
                raise MalformedConfigError(
                    f"{where}: dense delta {param} has dtype {t.dtype}; weight deltas are floating point."
                )
            if not torch.isfinite(t.float() if t.element_size() == 1 else t).all():
                raise NonFiniteWeightsError(f"{where}: dense delta {param} holds NaN or Inf values.")

    def check_against_shapes(self, shapes: dict[str, tuple[int, ...]], source: str | None = None) -> None:
        """Check every module against the base model's weight shapes (``{module: weight shape}``)."""
        where = source or f"expert {self.name!r}"
        for module, lm in self.lora.items():
            if module not in shapes:
                raise ShapeMismatchError(f"{where}: module {module} does not exist in the base model.")
            expected = shapes[module]
            got = (lm.d_in, lm.d_out) if lm.fan_in_fan_out else (lm.d_out, lm.d_in)
            if tuple(expected) != got:
                raise ShapeMismatchError(
                    f"{where}: module {module} expects a weight of shape {tuple(expected)}, the LoRA gives {got}."
                )

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Expert:
        """A copy with every tensor moved/cast."""
        return Expert(
            metadata=self.metadata.model_copy(deep=True),
            lora={
                k: LoraModule(
                    m.A.to(device=device, dtype=dtype),
                    m.B.to(device=device, dtype=dtype),
                    m.alpha,
                    m.use_rslora,
                    m.fan_in_fan_out,
                )
                for k, m in self.lora.items()
            },
            dense={k: t.to(device=device, dtype=dtype) for k, t in self.dense.items()},
            peft_config=dict(self.peft_config),
        )
