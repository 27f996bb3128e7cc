"""``moerge train``: train a LoRA expert on a JSONL file and add it to a library."""

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
    data: Path = typer.Option(
        ..., "--data", help='JSONL: {"text": ...} or {"prompt": ..., "completion": ...} rows'
    ),
    library: str = typer.Option(..., "--library", help="library folder or URL (created if absent)"),
    name: str = typer.Option(..., "--name", help="expert name"),
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
) -> None:
    """Train a LoRA expert with PEFT on a JSONL data file and add it to a library."""
    from moerge.backbones.loading import check_source
    from moerge.cli.common import console
    from moerge.errors import MalformedConfigError

    check_source(base)
    # Read the data before loading torch, so a bad file fails fast.
    from moerge.train.data import read_jsonl

    rows = read_jsonl(data)
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


def _read_yaml(path: Path) -> dict:
    from moerge.config_io import read_yaml_mapping

    return read_yaml_mapping(path, "a mapping of TrainConfig fields")
