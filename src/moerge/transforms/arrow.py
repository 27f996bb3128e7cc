"""Arrow prototypes: per expert and module, the top right-singular vector of ΔW = B·A, from the factors.

ΔW = B·A = Q_B R_B (Q_A R_A)ᵀ with thin QRs of B [d_out, r] and Aᵀ [d_in, r], so its singular vectors come from
the r×r core R_B R_Aᵀ = U S Vᵀ: the right-singular vectors are Q_A V. Cost O(r²·d); never a d×d matrix.
Batched over experts. The sign is fixed so the largest-magnitude entry is positive (Arrow scores |⟨x, v⟩|).
"""

from __future__ import annotations

from typing import Any

import torch

from moerge.experts.expert import Expert

ARROW_KIND = "arrow_prototypes"
ARROW_CONFIG: dict[str, Any] = {"method": "qr_core_svd", "version": 1}


def top_right_singular(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top right-singular vector and value of ``B @ A`` for batched factors ``A [..., r, d_in]``,
    ``B [..., d_out, r]``: returns ``(v [..., d_in], sigma [...])``, computed in float64."""
    A64, B64 = A.double(), B.double()
    QB, RB = torch.linalg.qr(B64)  # [.., d_out, r'], [.., r', r]
    QA, RA = torch.linalg.qr(A64.transpose(-1, -2))  # [.., d_in, r'], [.., r', r]
    core = RB @ RA.transpose(-1, -2)  # [.., r', r']
    _, S, Vh = torch.linalg.svd(core)
    v = (QA @ Vh[..., 0, :].unsqueeze(-1)).squeeze(-1)
    idx = v.abs().argmax(-1, keepdim=True)
    v = v * torch.sign(v.gather(-1, idx))  # flip so the largest-magnitude entry is positive
    return v.float(), S[..., 0].float()


def expert_prototypes(expert: Expert) -> dict[str, torch.Tensor]:
    """``{module: v [d_in], module + ".sigma": σ}`` for one LoRA expert."""
    out: dict[str, torch.Tensor] = {}
    for module, m in expert.lora.items():
        v, s = top_right_singular(m.A, m.B)
        out[module] = v.contiguous()
        out[module + ".sigma"] = (s * m.scaling).reshape(1)
    return out


def stack_prototypes(
    per_expert: list[dict[str, torch.Tensor]], modules: list[str], scale: bool = False
) -> dict[str, torch.Tensor]:
    """Prototypes per module ``[E, d_in]`` from each expert's `expert_prototypes` (rows follow the list; zeros
    where an expert lacks the module). ``scale`` multiplies each prototype by its singular value (mttl's
    ``scale=True``)."""
    out = {}
    for module in modules:
        d_in = next(t[module].shape[0] for t in per_expert if module in t)
        rows = []
        for t in per_expert:
            if module not in t:
                rows.append(torch.zeros(d_in))
                continue
            v = t[module].float()
            rows.append(v * t[module + ".sigma"].float() if scale else v)
        out[module] = torch.stack(rows)
    return out
