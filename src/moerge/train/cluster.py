"""Mo'LoRA's library building ("Llama-2, Mo' LoRA", maxine/crumb, blog post, July 2023): embed the rows of one
dataset, cluster them with k-means (the post: K = 4 over Evol-Instruct), train one LoRA expert per cluster, and
store each cluster's centroid as that expert's embedding centroid, so the ``molora`` recipe routes by cosine to
the centroids with no further step (``moerge train --cluster K``).

    experts = train_cluster_experts("base/", None, "data.jsonl", 4, TrainConfig(steps=200), library=lib,
                                    name="evol")          # evol-c0 … evol-c3

What is embedded is what the router sees at inference: a row's prompt (its whole text when it has none), as the
``embedding_centroids`` signature embeds an expert's data. The stored artifact is the one that signature stores
(``embedding_centroids`` under the embedder's name): the k-means centroid (the mean embedding of the cluster's
rows) and up to 100 of its rows' embeddings.

All experts are trained before the library is touched; the adds then happen one by one and are undone if one
fails, so a failed run leaves the library as it was (with ``overwrite``, a replaced expert is put back with its
artifacts).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moerge.errors import DataFormatError, ExpertExistsError, MalformedConfigError
from moerge.experts.expert import Expert
from moerge.train.data import DataSource, load_examples
from moerge.train.lora import TrainConfig, load_base, train_expert
from moerge.transforms import centroids
from moerge.transforms.kmeans import KMeansResult, kmeans

MAX_SAMPLES = 100  # embeddings kept per cluster expert (as `compute_embedding_centroids`)


def cluster_names(name: str, k: int) -> list[str]:
    """The experts ``moerge train --cluster K --name NAME`` makes: ``NAME-c0`` … ``NAME-c{K-1}``."""
    return [f"{name}-c{c}" for c in range(k)]


def existing_cluster_experts(library: Any, name: str) -> list[str]:
    """Experts of ``library`` named ``NAME-c<number>`` (an earlier cluster run under ``name``)."""
    pattern = re.compile(rf"{re.escape(name)}-c\d+")
    return sorted(n for n in library.names() if pattern.fullmatch(n))


def check_cluster_count(k: int, rows: int, where: str = "the data") -> None:
    if k < 1:
        raise MalformedConfigError(f"--cluster {k}: the number of clusters must be at least 1")
    if k > rows:
        raise DataFormatError(
            f"--cluster {k}: {where} has {rows} rows, too few for {k} clusters; choose K ≤ {rows} or add rows"
        )


def cluster_rows(embeddings: torch.Tensor, k: int, *, seed: int = 0, where: str = "the data") -> KMeansResult:
    """k-means of the rows' embeddings into ``k`` non-empty clusters (refused with the fix when the rows have
    fewer than ``k`` distinct embeddings)."""
    check_cluster_count(k, len(embeddings), where)
    fit = kmeans(embeddings.float(), k, seed=seed)
    sizes = torch.bincount(fit.labels, minlength=k)
    if bool((sizes == 0).any()):
        distinct = len(torch.unique(embeddings, dim=0))
        raise DataFormatError(
            f"--cluster {k}: {where} has only {distinct} distinct row embeddings, so k-means left "
            f"{int((sizes == 0).sum())} cluster(s) empty; choose K ≤ {distinct}"
        )
    return fit


def train_cluster_experts(
    base_model: Any,
    tokenizer: Any,
    data: DataSource,
    k: int,
    config: TrainConfig | None = None,
    library: Any = None,
    name: str = "cluster",
    *,
    embedding_model: str = "default",
    embedder: Any = None,
    cluster_seed: int = 0,
    task: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    tags: Sequence[str] = (),
    where: str | None = None,
) -> list[Expert]:
    """Cluster ``data`` into ``k`` groups by sentence embedding and train one LoRA expert per group.

    ``embedding_model`` is a recipe's ``embedding_model`` choice (``default``, ``base``, ``minilm`` or a
    sentence-transformers folder / hub id; ``embedder`` overrides it with any `SentenceEmbedder`), and must be
    the one the ``molora`` recipe is later given. With a ``library``, the experts (``NAME-c0`` …) and their
    centroids are added only once all are trained; an earlier run's ``NAME-c*`` experts are refused unless
    ``overwrite`` (which also removes those beyond ``k``). ``progress`` gets a line per stage; ``where`` names
    the data in errors."""
    from moerge.backbones.loading import base_model_id
    from moerge.routing.embedding import default_embedder

    config = config or TrainConfig()
    say = progress or (lambda _text: None)
    rows = load_examples(data)
    if where is None:
        where = str(data) if isinstance(data, str) or hasattr(data, "__fspath__") else "the data"
    check_cluster_count(k, len(rows), where)
    names = cluster_names(name, k)
    earlier = existing_cluster_experts(library, name) if library is not None else []
    if earlier and not overwrite:
        raise ExpertExistsError(
            f"{getattr(library, 'url', library)}: experts of an earlier cluster run named {name!r} exist "
            f"({', '.join(earlier[:4])}{' …' if len(earlier) > 4 else ''}); pass --overwrite or another --name."
        )

    say("loading the base model")
    model, tokenizer, base_id, _owned = load_base(base_model, tokenizer)
    if isinstance(base_model, str) or hasattr(base_model, "__fspath__"):
        base_id = base_model_id(base_model)
    emb_model = default_embedder(model, tokenizer, embedder, choice=embedding_model)
    say(f"embedding {len(rows)} rows with {emb_model.name}")
    embeddings = emb_model.embed_texts([centroids.row_prompt(r) for r in rows]).float().cpu()
    fit = cluster_rows(embeddings, k, seed=cluster_seed, where=where)
    members = [torch.nonzero(fit.labels == c).flatten().tolist() for c in range(k)]

    experts = []
    for c, (expert_name, idx) in enumerate(zip(names, members)):
        say(f"cluster {c + 1}/{k}: training {expert_name} on {len(idx)} rows")
        extra = {"cluster": {"index": c, "of": k, "rows": idx, "embedder": emb_model.name,
                             "seed": cluster_seed}}  # fmt: skip
        experts.append(
            train_expert(
                model,
                tokenizer,
                [rows[i] for i in idx],
                config,
                name=expert_name,
                task=task,
                base_model_id=base_id,
                tags=sorted({*tags, "cluster"}),
                extra=extra,
            )  # fmt: skip
        )
    if library is not None:
        say(f"adding {k} experts and their centroids to {getattr(library, 'url', library)}")
        _commit(library, experts, fit, members, embeddings, emb_model.name, earlier, overwrite)
    return experts


def _commit(
    library: Any,
    experts: list[Expert],
    fit: KMeansResult,
    members: list[list[int]],
    embeddings: torch.Tensor,
    embedder_name: str,
    earlier: list[str],
    overwrite: bool,
) -> None:
    """Add the experts and their centroid artifacts; on any failure, undo what this run changed."""
    config = centroids.embed_config(embedder_name)
    replaced = {e.name: library.get(e.name) for e in experts if e.name in library} if overwrite else {}
    kept = _artifact_files(library, set(replaced))
    added: list[str] = []
    try:
        for e, idx, centre in zip(experts, members, fit.centroids):
            library.add(e, overwrite=overwrite)
            added.append(e.name)
            tensors = {
                "centroid": centre.float().contiguous(),
                "samples": embeddings[idx][:MAX_SAMPLES].contiguous(),
            }
            record = {"num_texts": len(idx), "source": "moerge train --cluster"}
            library.put_artifact(centroids.EMBED_KIND, config, e.name, tensors, record)
    except BaseException:
        for n in added:  # undo; the first error is the one to report
            with contextlib.suppress(Exception):
                if n in replaced:
                    library.add(replaced[n], overwrite=True)
                else:
                    library.remove(n)
        for rel, data in kept.items():  # the replaced experts' artifacts, as they were
            with contextlib.suppress(Exception):
                library.storage.write_bytes(rel, data)
        raise
    for stale in sorted(set(earlier) - {e.name for e in experts}):
        library.remove(stale)


def _artifact_files(library: Any, names: set[str]) -> dict[str, bytes]:
    """The artifact files of the experts ``names`` (path → bytes), to put back if a replacement is undone."""
    out = {}
    for kind, digest, expert in library.list_artifacts():
        if expert in names:
            for ext in (".safetensors", ".json"):
                rel = f"artifacts/{kind}/{digest}/{expert}{ext}"
                out[rel] = library.storage.read_bytes(rel)
    return out
