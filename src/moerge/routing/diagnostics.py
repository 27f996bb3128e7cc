"""Routing diagnostics as data: per layer, the expert weight distribution, its entropy, and — given the
ground-truth expert of each example — routing accuracy (mean weight mass on the right expert); plus a
layer × expert heatmap."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel

from moerge.errors import RoutingError
from moerge.routing.selection import entropy


class LayerRouting(BaseModel):
    """One layer's routing over the recorded tokens."""

    module: str
    mean_weights: list[float]  # [E]: the average weight each expert got
    usage: list[float]  # [E]: the fraction of tokens that selected each expert (weight > 0)
    entropy: float  # mean per-token entropy (nats)
    accuracy: float | None = None  # mean weight on the ground-truth expert


class RoutingReport(BaseModel):
    expert_names: list[str]
    layers: list[LayerRouting]
    accuracy: float | None = None  # mean over layers

    def matrix(self) -> torch.Tensor:
        """``[layers, E]`` mean weights (the heatmap)."""
        return torch.tensor([la.mean_weights for la in self.layers])


def routing_report(
    weights: dict[str, torch.Tensor],
    expert_names: list[str],
    labels: list[str] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> RoutingReport:
    """Summarise ``{module: [B, T, E]}`` (``routed.last_routing()``); ``labels`` are ground-truth expert names
    per example; ``attention_mask [B, T]`` drops padding tokens."""
    target = None
    if labels is not None:
        missing = sorted({lab for lab in labels if lab not in expert_names})
        if missing:
            raise RoutingError(f"ground-truth labels {missing} are not expert names ({expert_names})")
        target = torch.tensor([expert_names.index(lab) for lab in labels])
    layers = []
    for module, w in weights.items():
        B, T, E = w.shape
        fits = attention_mask is not None and attention_mask.shape[0] == B and attention_mask.shape[1] >= T
        # (after generate, the prompt's mask no longer fits the recorded steps)
        mask = attention_mask[:, :T].float() if attention_mask is not None and fits else torch.ones(B, T)
        m = mask[..., None]
        n = mask.sum().clamp(min=1)
        mean_w = (w * m).sum((0, 1)) / n
        usage = ((w > 0).float() * m).sum((0, 1)) / n
        ent = float((entropy(w) * mask).sum() / n)
        acc = None
        if target is not None:
            if (
                len(target) != B and B % len(target) == 0
            ):  # generate with beams / several sequences per prompt
                target = target.repeat_interleave(B // len(target))
            on_right = w.gather(2, target[:, None, None].expand(B, T, 1)).squeeze(-1)
            acc = float((on_right * mask).sum() / n)
        layers.append(
            LayerRouting(
                module=module, mean_weights=mean_w.tolist(), usage=usage.tolist(), entropy=ent, accuracy=acc
            )
        )
    accs = [la.accuracy for la in layers if la.accuracy is not None]
    return RoutingReport(
        expert_names=list(expert_names), layers=layers, accuracy=sum(accs) / len(accs) if accs else None
    )


def plot_heatmap(report: RoutingReport, path: str | Path, title: str | None = None) -> Path:
    """Save a layer × expert heatmap of mean routing weights (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mat = report.matrix().numpy()
    label_w = 0.055 * max((len(la.module) for la in report.layers), default=10)  # inches for layer names
    fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + label_w + 0.35 * mat.shape[1]), 1.6 + 0.22 * mat.shape[0]))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(report.expert_names)), report.expert_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(report.layers)), [la.module for la in report.layers], fontsize=6)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title or "mean routing weight per layer and expert", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def per_token_experts(
    weights: dict[str, torch.Tensor],
    expert_names: list[str],
    ids: torch.Tensor,
    top: int = 2,
    example: int = 0,
) -> list[tuple[int, int, list[tuple[str, float]]]]:
    """For each recorded position of one example: ``(position, token id, [(expert, mean weight over layers)])``."""
    if not weights:
        return []
    mean = torch.stack([w[example] for w in weights.values()]).mean(0)  # [T, E]
    out = []
    for pos in range(mean.shape[0]):
        vals, idx = torch.topk(mean[pos], min(top, mean.shape[1]))
        out.append(
            (pos, int(ids[pos]), [(expert_names[i], float(v)) for v, i in zip(vals, idx.tolist()) if v > 0])
        )
    return out
