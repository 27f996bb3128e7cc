"""Data statistics as library artifacts, computed by the contributor (or an aggregator holding the data):

- hidden-state centroids (average activation): per module, the mean input to that module over the expert's
  data, L2-normalised (``hidden_centroids``);
- embedding centroids and samples: the mean embedding of the expert's data (DAM-style centroid routers) and a
  sample of embeddings (Retrieval of Experts) under the embedder's name (``embedding_centroids``).
"""

from __future__ import annotations

from typing import Any

import torch

from moerge.backbones.embedder import SentenceEmbedder as Embedder
from moerge.errors import MoergeError
from moerge.experts.expert import Expert

HIDDEN_KIND = "hidden_centroids"
HIDDEN_CONFIG: dict[str, Any] = {"pool": "token_mean", "normalize": "l2", "version": 1}
EMBED_KIND = "embedding_centroids"


def row_text(row: Any) -> str:
    """The whole text of a training row (``{"prompt", "completion"}``, ``{"text"}`` or a string)."""
    if isinstance(row, str):
        return row
    return row["text"] if "text" in row else row.get("prompt", "") + row.get("completion", "")


def row_prompt(row: Any) -> str:
    """What an example-level router sees of a training row: its prompt (the whole text when it has none)."""
    if isinstance(row, dict) and row.get("prompt"):
        return row["prompt"]
    return row_text(row)


def embed_config(embedder_name: str) -> dict[str, Any]:
    return {"embedder": embedder_name, "version": 1}


@torch.no_grad()
def module_input_means(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    modules: list[str],
    batch_size: int = 8,
    max_length: int = 128,
) -> dict[str, torch.Tensor]:
    """Mean (over non-pad tokens of ``texts``) of each module's input, from forward hooks on the base model."""
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros(())
    mask_ref: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_mod, args):
            x = args[0].float()
            m = mask_ref["m"].to(x.dtype)[..., None]
            sums[name] = sums.get(name, 0) + (x * m).sum((0, 1))

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in modules]
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            mask_ref["m"] = enc["attention_mask"]
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            count = count + enc["attention_mask"].sum()
    finally:
        for h in handles:
            h.remove()
    return {n: s / count.clamp(min=1) for n, s in sums.items()}


def compute_hidden_centroids(
    model: torch.nn.Module,
    tokenizer: Any,
    data: dict[str, list[str]],
    library: Any = None,
    experts: list[Expert] | None = None,
    modules: list[str] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per expert ``{module: unit-norm mean input}`` from that expert's texts; stored in ``library`` if given.

    ``modules`` defaults to the modules each expert adapts (from the library or ``experts``)."""
    out = {}
    for name, texts in data.items():
        mods = modules
        if mods is None:
            e = next((x for x in experts or [] if x.name == name), None) or (
                library.get(name) if library else None
            )
            if e is None:
                raise MoergeError(f"no expert {name!r} to compute centroids for; pass experts= or a library")
            mods = sorted(e.lora) or _dense_linear_modules(model, e)
        means = module_input_means(model, tokenizer, texts, mods)
        tensors = {m: torch.nn.functional.normalize(v, dim=-1).contiguous() for m, v in means.items()}
        if library is not None:
            library.put_artifact(HIDDEN_KIND, HIDDEN_CONFIG, name, tensors, {"num_texts": len(texts)})
        out[name] = tensors
    return out


def compute_embedding_centroids(
    embedder: Embedder, data: dict[str, list[str]], library: Any = None, max_samples: int = 100
) -> dict[str, dict[str, torch.Tensor]]:
    """Per expert ``{"centroid": [d], "samples": [S, d]}`` (S ≤ max_samples); stored in ``library`` if given."""
    out = {}
    for name, texts in data.items():
        emb = embedder.embed_texts(list(texts)).float()
        tensors = {"centroid": emb.mean(0).contiguous(), "samples": emb[:max_samples].contiguous()}
        if library is not None:
            library.put_artifact(
                EMBED_KIND, embed_config(embedder.name), name, tensors, {"num_texts": len(texts)}
            )
        out[name] = tensors
    return out


def load_per_expert(
    library: Any, kind: str, config: dict[str, Any], names: list[str]
) -> list[dict[str, torch.Tensor]]:
    rows = []
    for n in names:
        got = library.get_artifact(kind, config, n)
        if got is None:
            raise MoergeError(f"expert {n!r} has no {kind} artifact in {getattr(library, 'url', library)}")
        rows.append(got[0])
    return rows


def stack_modules(per_expert: list[dict[str, torch.Tensor]], modules: list[str]) -> dict[str, torch.Tensor]:
    """``{module: [E, d]}`` from per-expert ``{module: [d]}`` (zeros where an expert lacks the module)."""
    out = {}
    for m in modules:
        d = next(t[m].shape[-1] for t in per_expert if m in t)
        out[m] = torch.stack([t[m].float() if m in t else torch.zeros(d) for t in per_expert])
    return out


def _dense_linear_modules(model: Any, expert: Any) -> list[str]:
    """The linear modules whose weight a dense expert updates (where its centroids are taken)."""
    out = []
    for key in expert.dense:
        mod, _, leaf = key.rpartition(".")
        if leaf != "weight" or not mod:
            continue
        try:
            m = model.get_submodule(mod)
        except AttributeError:
            continue
        if isinstance(m, torch.nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf")):
            out.append(mod)
    return sorted(out)
