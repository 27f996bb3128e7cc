"""Admission of contributed experts: the library's policy, the report of each check, and the checks that need
only the experts' factors (redundancy, weight-norm outliers). The checks that run the base model (usefulness on
the contributor's eval rows, behaviour drift on the library's probe set) are in `moerge.train.screen`, which
also runs the whole admission (`moerge.train.screen.admit_expert`).

Redundancy works on the LoRA factors and never forms ΔW: with ``ΔWᵢ = sᵢ·BᵢAᵢ``,

    ⟨ΔW₁, ΔW₂⟩_F = s₁s₂·tr(A₁ᵀB₁ᵀB₂A₂) = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ))

a trace of a product of two r₁×r₂ matrices (cost O((d_in + d_out)·r₁·r₂) per module). The cosine of two
experts is the cosine of their updates concatenated over every module (modules only one adapts count in its
norm, not in the inner product). The Arrow-prototype cosine (Ostapenko et al. 2024, arXiv:2405.11157: a
prototype is the top right-singular vector of ΔW, `moerge.transforms.arrow`) is reported beside it as the
mean over shared modules of ``|cos(v₁, v₂)|`` (a singular vector's sign is arbitrary).

Weight-norm outliers use the robust z-score of Iglewicz and Hoaglin (1993): ``z = 0.6745·(x − median)/MAD`` over
the library's experts, with ``‖ΔW‖_F`` from the factors too (``‖ΔW‖² = s²·tr((BᵀB)(AAᵀ))``).

Nothing here imports torch at module level (listing a library stays torch-free).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from moerge.experts.expert import Expert

PROBE_FILE = "admission/probe.jsonl"
Number = float | int | str | None


class ProbeSet(BaseModel):
    """The library's neutral probe set: a JSONL file inside the library and its checksum."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: Literal["admission/probe.jsonl"] = PROBE_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rows: int = Field(ge=1)


class AdmissionPolicy(BaseModel):
    """What an expert must show to enter a library. Stored in ``moerge-library.json`` (``admission``); when set,
    every add applies it."""

    model_config = ConfigDict(extra="forbid")

    usefulness_metric: Literal["loss", "accuracy"] = Field(
        "loss", description="loss: mean NLL of the completions (nats/token); accuracy: greedy token accuracy"
    )
    usefulness_margin: float = Field(
        0.0,
        ge=0,
        description="the expert must beat the base on the contributor's eval rows by this much "
        "(base loss − expert loss, or expert accuracy − base accuracy)",
    )
    require_eval: bool = Field(True, description="refuse an expert that comes without eval rows")
    duplicate_cosine: float = Field(
        0.9, gt=0, le=1, description="a cosine of ΔW at or above this makes a near-duplicate"
    )
    duplicate_prototype_cosine: float | None = Field(
        None,
        gt=0,
        le=1,
        description="also flag a near-duplicate when the Arrow-prototype cosine reaches this (None: report only)",
    )
    on_duplicate: Literal["refuse", "merge", "admit"] = Field(
        "refuse",
        description="what a near-duplicate gets: refused, merged into the closest expert, or admitted",
    )
    norm_max_z: float = Field(
        3.5, gt=0, description="refuse when the robust z-score of ‖ΔW‖_F against the library exceeds this"
    )
    norm_min_experts: int = Field(
        4, ge=2, description="the weight-norm screen runs once the library holds this many experts"
    )
    drift_max_kl: float | None = Field(
        0.5,
        gt=0,
        description="refuse when the mean KL(expert ‖ base) per token on the probe set exceeds this (nats)",
    )
    seq_len: int = Field(128, ge=2, description="eval and probe rows are truncated to this many tokens")
    probe: ProbeSet | None = None


class CheckResult(BaseModel):
    """One admission check: ``passed`` is None when the check was skipped (``reason`` says why)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    passed: bool | None
    numbers: dict[str, Number] = Field(default_factory=dict)
    reason: str = ""


class AdmissionReport(BaseModel):
    """The decision on one expert and every check behind it (stored with the expert and in the catalog's log)."""

    model_config = ConfigDict(extra="forbid")

    expert: str
    decision: Literal["admitted", "refused", "merged"]
    checks: list[CheckResult]
    merged_into: str | None = None
    policy: dict[str, Any] = Field(default_factory=dict)
    at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def admitted(self) -> bool:
        return self.decision != "refused"

    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.passed is False]

    def summary(self) -> str:
        """One line: the decision and, when refused, each failed check's reason."""
        if self.decision == "merged":
            return f"{self.expert}: merged into {self.merged_into}"
        if self.admitted:
            return f"{self.expert}: admitted"
        return f"{self.expert}: refused ({'; '.join(f'{c.name}: {c.reason}' for c in self.failed())})"


class BehaviourScreen(Protocol):
    """The checks that run a model (implemented by `moerge.train.screen.ModelScreen`)."""

    def usefulness(
        self, expert: Expert, rows: Sequence[dict[str, str]], policy: AdmissionPolicy
    ) -> CheckResult: ...
    def drift(
        self, expert: Expert, rows: Sequence[dict[str, str]], policy: AdmissionPolicy
    ) -> CheckResult: ...


def decide(expert: str, checks: list[CheckResult], policy: AdmissionPolicy) -> AdmissionReport:
    """The decision from the checks: refused when any failed; a near-duplicate under ``on_duplicate="merge"``
    (and nothing else failed) is merged into the closest expert."""
    failed = [c for c in checks if c.passed is False]
    record = policy.model_dump(mode="json")
    dup = next((c for c in checks if c.name == "redundancy" and c.numbers.get("duplicate") == 1), None)
    if not failed and dup is not None and policy.on_duplicate == "merge":
        closest = dup.numbers.get("closest")
        return AdmissionReport(
            expert=expert, decision="merged", checks=checks, merged_into=str(closest), policy=record
        )
    return AdmissionReport(
        expert=expert, decision="refused" if failed else "admitted", checks=checks, policy=record
    )


def digest_rows(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe_bytes(rows: Sequence[dict[str, str]]) -> bytes:
    """The probe set as stored: one JSON object per line."""
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


# ---------------------------------------------------------------------------------------------- factor math
def lora_gram(expert_a: Expert, expert_b: Expert) -> float:
    """``Σ_modules ⟨ΔW_a, ΔW_b⟩_F`` over the modules both adapt, from r×r products (no d×d matrix)."""
    total = 0.0
    for module, a in expert_a.lora.items():
        b = expert_b.lora.get(module)
        if b is None or (a.d_in, a.d_out) != (b.d_in, b.d_out):
            continue
        left = a.B.double().T @ b.B.double()  # [r_a, r_b]
        right = b.A.double() @ a.A.double().T  # [r_b, r_a]
        total += float(a.scaling * b.scaling * (left * right.T).sum())  # tr(L·R) = Σ L ⊙ Rᵀ
    return total


def delta_norm(expert: Expert) -> float:
    """``‖ΔW‖_F`` of the expert's update over all its modules (LoRA from its factors; dense deltas directly)."""
    if expert.dense:
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in expert.dense.values()))
    return math.sqrt(max(lora_gram(expert, expert), 0.0))


def delta_cosine(
    expert_a: Expert, expert_b: Expert, norm_a: float | None = None, norm_b: float | None = None
) -> float:
    """Cosine of the two experts' updates (every module concatenated); 0 when either is zero."""
    na = delta_norm(expert_a) if norm_a is None else norm_a
    nb = delta_norm(expert_b) if norm_b is None else norm_b
    if na == 0 or nb == 0:
        return 0.0
    return lora_gram(expert_a, expert_b) / (na * nb)


def prototype_cosine(protos_a: dict[str, torch.Tensor], protos_b: dict[str, torch.Tensor]) -> float | None:
    """Mean over shared modules of ``|cos|`` of two experts' Arrow prototypes (`expert_prototypes` dicts)."""
    import torch

    values = []
    for module, va in protos_a.items():
        vb = protos_b.get(module)
        if module.endswith(".sigma") or vb is None or vb.shape != va.shape:
            continue
        values.append(float(torch.nn.functional.cosine_similarity(va.double(), vb.double(), dim=0).abs()))
    return sum(values) / len(values) if values else None


def robust_z(value: float, population: Sequence[float]) -> float:
    """``0.6745·(value − median)/MAD`` of ``value`` against ``population`` (Iglewicz–Hoaglin). With MAD = 0 the
    mean absolute deviation ×1.2533 stands in; when that is 0 too, any difference is an infinite z."""
    xs = sorted(population)
    med = _median(xs)
    mad = _median(sorted(abs(x - med) for x in xs))
    if mad > 0:
        return 0.6745 * (value - med) / mad
    mean_ad = sum(abs(x - med) for x in xs) / len(xs)
    if mean_ad > 0:
        return (value - med) / (1.2533 * mean_ad)
    return 0.0 if value == med else math.copysign(math.inf, value - med)


def _median(xs: Sequence[float]) -> float:
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ---------------------------------------------------------------------------------------------- checks
def redundancy_check(
    expert: Expert,
    others: Sequence[Expert],
    policy: AdmissionPolicy,
    prototypes: dict[str, dict[str, torch.Tensor]] | None = None,
) -> CheckResult:
    """Similarity to every other expert: the closest by ΔW cosine is named; a near-duplicate fails unless the
    policy admits or merges duplicates (``numbers["duplicate"]`` is 1 then). ``prototypes`` (by expert name,
    `moerge.transforms.arrow.expert_prototypes`) adds the Arrow-prototype cosine to the closest."""
    others = [o for o in others if o.kind == "lora" and o.name != expert.name]
    if expert.kind != "lora":
        return CheckResult(
            name="redundancy", passed=None, reason="a dense expert (checked for LoRA experts only)"
        )
    if not others:
        return CheckResult(name="redundancy", passed=True, reason="no other LoRA expert to compare with")
    norm = delta_norm(expert)
    cosines = {o.name: delta_cosine(expert, o, norm_a=norm) for o in others}
    closest = max(cosines, key=lambda n: cosines[n])
    numbers: dict[str, Number] = {"closest": closest, "cosine": round(cosines[closest], 6)}
    proto = None
    if prototypes is not None and expert.name in prototypes and closest in prototypes:
        proto = prototype_cosine(prototypes[expert.name], prototypes[closest])
        numbers["prototype_cosine"] = None if proto is None else round(proto, 6)
    dup = cosines[closest] >= policy.duplicate_cosine or (
        policy.duplicate_prototype_cosine is not None
        and proto is not None
        and proto >= policy.duplicate_prototype_cosine
    )
    numbers["duplicate"] = int(dup)
    if not dup:
        return CheckResult(
            name="redundancy", passed=True, numbers=numbers,
            reason=f"closest is {closest} (cosine {cosines[closest]:.3f} < {policy.duplicate_cosine:g})",
        )  # fmt: skip
    what = f"near-duplicate of {closest} (cosine of ΔW {cosines[closest]:.3f}"
    what += f", prototypes {proto:.3f})" if proto is not None else ")"
    if policy.on_duplicate == "refuse":
        return CheckResult(
            name="redundancy", passed=False, numbers=numbers, reason=what + "; the policy refuses duplicates"
        )
    action = "merged into it" if policy.on_duplicate == "merge" else "admitted by the policy"
    return CheckResult(name="redundancy", passed=True, numbers=numbers, reason=f"{what}; {action}")


def weight_norm_check(expert: Expert, others: Sequence[Expert], policy: AdmissionPolicy) -> CheckResult:
    """Robust z-score of the expert's ``‖ΔW‖_F`` against the other experts' (high side only: an update far
    larger than the library's is what overwriting the base takes)."""
    norm = delta_norm(expert)
    population = [delta_norm(o) for o in others if o.name != expert.name]
    numbers: dict[str, Number] = {"norm": round(norm, 6)}
    if len(population) < policy.norm_min_experts:
        return CheckResult(
            name="weight_norm", passed=None, numbers=numbers,
            reason=f"the library holds {len(population)} other experts; the screen needs {policy.norm_min_experts}",
        )  # fmt: skip
    z = robust_z(norm, population)
    numbers.update(
        median=round(_median(sorted(population)), 6), z=round(z, 3) if math.isfinite(z) else str(z)
    )
    if z > policy.norm_max_z:
        return CheckResult(
            name="weight_norm", passed=False, numbers=numbers,
            reason=f"‖ΔW‖ {norm:.3g} is an outlier (robust z {z:.1f} > {policy.norm_max_z:g})",
        )  # fmt: skip
    return CheckResult(name="weight_norm", passed=True, numbers=numbers, reason=f"robust z {z:.2f}")
