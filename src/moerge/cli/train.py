"""``moerge train``: train a LoRA expert on a JSONL file and add it to a library; with ``--cluster K``, k-means
the file's rows by sentence embedding and train one expert per cluster (Mo'LoRA's library building)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def _split_modules(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [m.strip() for v in values for m in v.split(",") if m.strip()]


def _layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    from moerge.errors import MalformedConfigError

    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise MalformedConfigError(
            f"--layers {value!r}: expected comma-separated integers, e.g. -4,-3,-2,-1"
        ) from None


def train(
    base: str = typer.Option(
        ...,
        "--base",
        help="base model: a transformers folder, a .gguf file or a hub id (see docs/training.md)",
    ),
    data: Path | None = typer.Option(
        None, "--data", help='JSONL: {"text": ...} or {"prompt": ..., "completion": ...} rows'
    ),
    library: str = typer.Option(..., "--library", help="library folder or URL (created if absent)"),
    name: str | None = typer.Option(None, "--name", help="expert name"),
    manifest: Path | None = typer.Option(
        None,
        "--manifest",
        help='JSONL, one expert per line: {"name", "data", "task", "tags", "config"} (instead of --data/--name); '
        "experts already in the library are skipped",
    ),
    executor: str = typer.Option(
        "local",
        "--executor",
        help="with --manifest: local (one after another) or ray (pip install 'moerge[ray]')",
    ),
    task: str | None = typer.Option(None, "--task", help="task label stored with the expert"),
    config: Path | None = typer.Option(None, "--config", help="YAML file of TrainConfig fields; flags win"),
    steps: int | None = typer.Option(None, "--steps"),
    lr: float | None = typer.Option(None, "--lr"),
    rank: int | None = typer.Option(None, "--rank"),
    alpha: float | None = typer.Option(None, "--alpha"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    seq_len: int | None = typer.Option(None, "--seq-len"),
    seed: int | None = typer.Option(None, "--seed"),
    target_modules: list[str] | None = typer.Option(
        None, "--target-modules", help="module names to adapt (repeat or comma-separate); default: all linear"
    ),
    layers: str | None = typer.Option(
        None,
        "--layers",
        help="decoder layers to adapt, comma-separated; negative counts from the top (--layers=-4,-3,-2,-1)",
    ),
    rslora: bool | None = typer.Option(None, "--rslora/--no-rslora"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an expert of the same name"),
    tag: list[str] | None = typer.Option(None, "--tag", help="tag to store with the expert (repeatable)"),
    cluster: int | None = typer.Option(
        None,
        "--cluster",
        min=1,
        help="k-means the rows into K clusters by sentence embedding and train one expert per cluster "
        "(NAME-c0 …), storing each centroid for --recipe molora (Mo'LoRA)",
    ),
    embedding_model: str | None = typer.Option(
        None,
        "--embedding-model",
        help="with --cluster: the embedder, as the recipes' embedding_model option (default, base, minilm, "
        "or a sentence-transformers folder or hub id); route with the same -o embedding_model=…",
    ),
    cluster_seed: int | None = typer.Option(
        None, "--cluster-seed", help="with --cluster: the k-means seed (0)"
    ),
) -> None:
    """Train a LoRA expert with PEFT on a JSONL data file and add it to a library (with --cluster K: one expert
    per k-means cluster of the rows, routed by `moerge generate BASE LIB --recipe molora`)."""
    from moerge.backbones.loading import check_source
    from moerge.cli.common import console
    from moerge.errors import MalformedConfigError, UsageError

    if cluster is None and (embedding_model is not None or cluster_seed is not None):
        raise UsageError("--embedding-model and --cluster-seed go with --cluster K")
    if manifest is not None and (data is not None or name is not None or cluster is not None):
        raise UsageError("--manifest lists each expert's name and data: drop --data, --name and --cluster")
    if manifest is None and (data is None or name is None):
        raise UsageError("give --data FILE and --name NAME (one expert), or --manifest FILE (many)")
    if executor not in ("local", "ray"):
        raise UsageError(f"--executor {executor!r}: use local or ray")
    if executor != "local" and manifest is None:
        raise UsageError("--executor goes with --manifest (a single expert trains here)")
    check_source(base)
    if manifest is not None:
        _train_manifest(base, manifest, library, config, executor, overwrite, dict(
            steps=steps, lr=lr, rank=rank, alpha=alpha, batch_size=batch_size, seq_len=seq_len, seed=seed,
            target_modules=_split_modules(target_modules), layers=_layers(layers), use_rslora=rslora))  # fmt: skip
        return
    assert data is not None and name is not None
    # Read the data before loading torch, so a bad file fails fast.
    from moerge.train.data import read_jsonl

    rows = read_jsonl(data)
    if cluster is not None:
        from moerge.train.cluster import check_cluster_count

        check_cluster_count(cluster, len(rows), str(data))
    fields: dict = {}
    if config is not None:
        fields.update(_read_yaml(config))
    flags = {
        "steps": steps,
        "lr": lr,
        "rank": rank,
        "alpha": alpha,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "seed": seed,
        "target_modules": _split_modules(target_modules),
        "layers": _layers(layers),
        "use_rslora": rslora,
    }
    fields.update({k: v for k, v in flags.items() if v is not None})

    from pydantic import ValidationError

    from moerge.experts.library import open_or_create
    from moerge.train.lora import TrainConfig, train_expert

    try:
        cfg = TrainConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = str(config) if config is not None else "train options"
        raise MalformedConfigError(f"{where}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from e
    lib = open_or_create(library)
    if cluster is not None:
        _train_clusters(base, rows, cluster, cfg, lib, name, task, overwrite, list(tag or []),
                        embedding_model or "default", cluster_seed or 0, library, str(data))  # fmt: skip
        return
    if name in lib and not overwrite:
        from moerge.errors import ExpertExistsError

        raise ExpertExistsError(
            f"{library}: an expert named {name!r} exists; pass --overwrite or another --name."
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the "Loading weights" bar
    expert = train_expert(
        base,
        None,
        rows,
        cfg,
        library=lib,
        name=name,
        task=task,
        overwrite=overwrite,
        tags=list(tag or []),
    )
    t = expert.metadata.training
    console.print(
        f"trained [bold]{name}[/]: {t['steps']} steps, loss {t['first_loss']:.3f} → {t['final_loss']:.3f}, "
        f"{t['seconds']:.1f} s; added to {library}"
    )


def _train_manifest(base, manifest, library, config, executor, overwrite, flags) -> None:
    from moerge.cli.common import console
    from moerge.experts.library import open_or_create
    from moerge.progress import status
    from moerge.train.manifest import read_manifest, train_manifest

    entries = read_manifest(manifest)  # validated before torch loads
    shared = _read_yaml(config) if config is not None else {}
    shared.update({k: v for k, v in flags.items() if v is not None})
    lib = open_or_create(library)
    skipped = [e.name for e in entries if e.name in lib and not overwrite]
    done = 0
    with status(f"training {len(entries) - len(skipped)} experts ({executor})") as update:

        def tick(name: str) -> None:
            nonlocal done
            done += 1
            update(f"training on {executor}: {done}/{len(entries) - len(skipped)} added (last: {name})")

        added = train_manifest(
            base, manifest, lib, shared, executor=executor, overwrite=overwrite, on_done=tick
        )
    for md in added:
        t = md.training or {}
        console.print(f"trained [bold]{md.name}[/]: {t.get('steps')} steps, loss {t.get('first_loss', 0):.3f} → "
                      f"{t.get('final_loss', 0):.3f}, {t.get('seconds', 0):.1f} s", highlight=False)  # fmt: skip
    if skipped:
        console.print(
            f"already in {library} (skipped; --overwrite retrains): {', '.join(skipped)}", highlight=False
        )
    console.print(f"{len(added)} experts added to {library}", highlight=False)


def _train_clusters(base, rows, k, cfg, lib, name, task, overwrite, tags, embedding_model, seed, where, data):
    from transformers.utils import logging as hf_logging

    from moerge.cli.common import console
    from moerge.progress import stages
    from moerge.train.cluster import train_cluster_experts

    hf_logging.disable_progress_bar()
    with stages(f"moerge train --cluster {k}") as stage:
        experts = train_cluster_experts(
            base, None, rows, k, cfg, library=lib, name=name, embedding_model=embedding_model,
            cluster_seed=seed, task=task, overwrite=overwrite, progress=stage, tags=tags, where=data,
        )  # fmt: skip
    for e in experts:
        t = e.metadata.training
        console.print(
            f"trained [bold]{e.name}[/] on {t['examples']} rows: {t['steps']} steps, "
            f"loss {t['first_loss']:.3f} → {t['final_loss']:.3f}, {t['seconds']:.1f} s"
        )
    console.print(
        f"added {k} cluster experts and their centroids to {where}; route them with "
        f"`moerge generate BASE {where} --recipe molora"
        + (f" -o embedding_model={embedding_model}`" if embedding_model != "default" else "`")
    )


def _read_yaml(path: Path) -> dict:
    from moerge.config_io import read_yaml_mapping

    return read_yaml_mapping(path, "a mapping of TrainConfig fields")
