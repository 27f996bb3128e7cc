"""Admission's model-based checks and the whole admission of an expert into a library.

`ModelScreen` runs the base model with and without an expert folded into its weights (the touched weights are
saved and put back exactly afterwards):

- **usefulness**: mean NLL (nats per completion token) and greedy token accuracy on the contributor's eval rows
  (``{"prompt", "completion"}`` or ``{"text"}``, as for training), with the expert and without it; the expert
  must beat the base by the policy's margin;
- **drift**: the mean over tokens of ``KL(p_expert ‖ p_base)`` of the next-token distributions on the library's
  neutral probe set — text the expert has no business changing.

`admit_expert` runs every check of `moerge.experts.admission` (integrity and base match, redundancy, weight-norm
outliers) and these two, decides, and adds the expert (admitted), merges it into its near-duplicate (policy
``on_duplicate="merge"``, through the ``merge`` function given) or refuses it (`AdmissionRefusedError`; nothing
is written but the decision in the catalog's admission log).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from moerge.errors import AdmissionRefusedError, MoergeError
from moerge.experts.admission import (
    AdmissionPolicy,
    AdmissionReport,
    BehaviourScreen,
    CheckResult,
    decide,
    redundancy_check,
    weight_norm_check,
)
from moerge.experts.expert import Expert
from moerge.model.routed import merge_into
from moerge.train.data import IGNORE_INDEX, encode_examples, pad_batch
from moerge.transforms.arrow import expert_prototypes


class ModelScreen:
    """Usefulness and drift of experts on one loaded base model (``model`` is changed only inside a check and
    restored bit for bit)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @contextlib.contextmanager
    def applied(self, expert: Expert | None) -> Iterator[None]:
        """The model with ``expert``'s update added to its weights (None: the base itself)."""
        if expert is None:
            yield
            return
        params = dict(self.model.named_parameters(remove_duplicate=False))
        keys = [f"{m}.weight" for m in expert.lora] + list(expert.dense)
        saved = {k: params[k].detach().clone() for k in keys if k in params}
        try:
            with torch.no_grad():
                merge_into(self.model, expert)
            yield
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    params[k].copy_(v)

    def _batches(
        self, rows: Sequence[dict[str, str]], seq_len: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        enc = encode_examples(self.tokenizer, rows, seq_len)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for i in range(0, len(enc), self.batch_size):
            out.append(pad_batch(enc.ids[i : i + self.batch_size], enc.labels[i : i + self.batch_size], pad))
        return out

    @torch.no_grad()
    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = ids.to(device)
        mask = (ids != (self.tokenizer.pad_token_id or 0)).long()
        mask[:, 0] = 1
        return self.model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1]

    def scores(
        self, expert: Expert | None, rows: Sequence[dict[str, str]], seq_len: int = 128
    ) -> dict[str, float]:
        """``{"loss": mean NLL per target token, "accuracy": greedy token accuracy, "tokens": count}``."""
        nll, hits, count = 0.0, 0, 0
        with self.applied(expert):
            for ids, labels in self._batches(rows, seq_len):
                logits = self._logits(ids)
                target = labels[:, 1:].to(logits.device)
                keep = target != IGNORE_INDEX
                lp = logits.log_softmax(-1)
                nll -= float(lp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].sum())
                hits += int((logits.argmax(-1) == target)[keep].sum())
                count += int(keep.sum())
        return {"loss": nll / max(count, 1), "accuracy": hits / max(count, 1), "tokens": count}

    def kl_drift(
        self, expert: Expert, rows: Sequence[dict[str, str]], seq_len: int = 128
    ) -> dict[str, float]:
        """``{"kl": mean over tokens of KL(p_expert ‖ p_base), "kl_max_row": the largest row mean}`` over every
        position of every probe row (prompt and completion alike)."""
        batches = [(ids, labels) for ids, labels in self._batches([_as_text(r) for r in rows], seq_len)]
        base = [self._logits(ids).log_softmax(-1) for ids, _ in batches]
        total, count, worst = 0.0, 0, 0.0
        with self.applied(expert):
            for (ids, labels), lq in zip(batches, base):
                lp = self._logits(ids).log_softmax(-1)
                kl = (lp.exp() * (lp - lq)).sum(-1)  # [B, T-1]
                keep = (labels[:, 1:] != IGNORE_INDEX).to(kl.device)
                total += float(kl[keep].sum())
                count += int(keep.sum())
                per_row = (kl * keep).sum(-1) / keep.sum(-1).clamp(min=1)
                worst = max(worst, float(per_row.max()))
        return {"kl": total / max(count, 1), "kl_max_row": worst, "tokens": count}

    # ------------------------------------------------------------------ the checks (BehaviourScreen)
    def usefulness(
        self, expert: Expert, rows: Sequence[dict[str, str]], policy: AdmissionPolicy
    ) -> CheckResult:
        if not rows:
            if policy.require_eval:
                return CheckResult(
                    name="usefulness", passed=False,
                    reason="no eval rows were given and the policy requires them (--eval FILE.jsonl)",
                )  # fmt: skip
            return CheckResult(name="usefulness", passed=None, reason="no eval rows given")
        base = self.scores(None, rows, policy.seq_len)
        mine = self.scores(expert, rows, policy.seq_len)
        metric = policy.usefulness_metric
        gain = base["loss"] - mine["loss"] if metric == "loss" else mine["accuracy"] - base["accuracy"]
        numbers = {
            "base_loss": round(base["loss"], 5), "expert_loss": round(mine["loss"], 5),
            "base_accuracy": round(base["accuracy"], 5), "expert_accuracy": round(mine["accuracy"], 5),
            "gain": round(gain, 5), "margin": policy.usefulness_margin, "rows": len(rows),
        }  # fmt: skip
        passed = gain >= policy.usefulness_margin and gain > 0
        word = "lowers the loss" if metric == "loss" else "raises the accuracy"
        reason = f"{word} by {gain:.4g} (margin {policy.usefulness_margin:g})"
        if not passed:
            reason = f"does not beat the base on its eval rows: {metric} gain {gain:.4g}, margin {policy.usefulness_margin:g}"
        return CheckResult(name="usefulness", passed=passed, numbers=numbers, reason=reason)

    def drift(self, expert: Expert, rows: Sequence[dict[str, str]], policy: AdmissionPolicy) -> CheckResult:
        if policy.drift_max_kl is None:
            return CheckResult(name="drift", passed=None, reason="the policy sets no drift limit")
        if not rows:
            return CheckResult(
                name="drift", passed=None,
                reason="the library holds no probe set (moerge library policy LIB --probe FILE.jsonl)",
            )  # fmt: skip
        d = self.kl_drift(expert, rows, policy.seq_len)
        numbers = {
            "kl": round(d["kl"], 5),
            "kl_max_row": round(d["kl_max_row"], 5),
            "limit": policy.drift_max_kl,
        }
        if d["kl"] > policy.drift_max_kl:
            return CheckResult(
                name="drift", passed=False, numbers=numbers,
                reason=f"changes the base on neutral probe text: KL {d['kl']:.3g} > {policy.drift_max_kl:g} nats/token",
            )  # fmt: skip
        return CheckResult(name="drift", passed=True, numbers=numbers, reason=f"KL {d['kl']:.3g} nats/token")


def _as_text(row: dict[str, str]) -> dict[str, str]:
    return (
        {"text": row["text"]}
        if "text" in row
        else {"text": row.get("prompt", "") + row.get("completion", "")}
    )


def screen_expert(
    library: Any,
    expert: Expert,
    screen: BehaviourScreen | None,
    eval_rows: Sequence[dict[str, str]] = (),
    policy: AdmissionPolicy | None = None,
) -> AdmissionReport:
    """Run every admission check on ``expert`` against ``library`` (its other experts; an expert of the same name
    already there is left out of the comparisons) and decide. ``policy`` defaults to the library's (or the
    defaults). ``screen`` runs the model-based checks; without it they are skipped."""
    policy = policy or library.admission_policy or AdmissionPolicy()
    checks: list[CheckResult] = []
    try:
        library.check_compatible(expert)
    except MoergeError as e:
        checks.append(CheckResult(name="integrity", passed=False, reason=str(e)))
        return decide(expert.name, checks, policy)
    base = library.base_fingerprint or library.base_model or "not recorded"
    checks.append(
        CheckResult(name="integrity", passed=True, reason=f"factors finite; base {base}; shapes fit")
    )
    others = [library.get(n) for n in library.names() if n != expert.name]
    lora = [o for o in others if o.kind == "lora"]
    protos = None
    if expert.kind == "lora" and lora:
        protos = {e.name: expert_prototypes(e) for e in [expert, *lora]}
    checks.append(redundancy_check(expert, lora, policy, protos))
    checks.append(weight_norm_check(expert, others, policy))
    if screen is None:
        checks.append(CheckResult(name="usefulness", passed=None, reason="no base model given"))
        checks.append(CheckResult(name="drift", passed=None, reason="no base model given"))
    else:
        checks.append(screen.usefulness(expert, list(eval_rows), policy))
        checks.append(screen.drift(expert, library.probe_rows(), policy))
    return decide(expert.name, checks, policy)


def admit_expert(
    library: Any,
    expert: Expert,
    screen: BehaviourScreen | None,
    eval_rows: Sequence[dict[str, str]] = (),
    *,
    policy: AdmissionPolicy | None = None,
    overwrite: bool = False,
    merge: Callable[[Expert, Expert], Expert] | None = None,
) -> AdmissionReport:
    """Screen ``expert`` and act on the decision: add it with its report, merge it into the closest expert
    (``merge(existing, new)`` gives the expert stored under the existing name), or log the refusal and raise
    `AdmissionRefusedError` with the report attached (``e.report``). A refused expert leaves the library's
    experts, artifacts and folders as they were."""
    report = screen_expert(library, expert, screen, eval_rows, policy)
    if report.decision == "merged":
        if merge is None:
            raise MoergeError("the policy merges near-duplicates; pass merge= (moerge library add does)")
        target = library.get(str(report.merged_into))
        merged = merge(target, expert)
        merged.metadata = merged.metadata.model_copy(update={"name": target.name})
        record = report.model_copy(update={"expert": target.name})
        library.add(merged, overwrite=True, admission=record)
        library.log_admission(report)
        return report
    if not report.admitted:
        library.log_admission(report)
        error = AdmissionRefusedError(f"{library.url}: {report.summary()}")
        error.report = report  # type: ignore[attr-defined]
        raise error
    library.add(expert, overwrite=overwrite, admission=report)
    return report
