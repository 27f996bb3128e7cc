"""``moerge merge CONFIG.yaml OUT``: merge full checkpoints or library LoRA experts from a mergekit-like YAML."""

from __future__ import annotations

from pathlib import Path

import typer

from moerge.cli import plugins as cli_plugins
from moerge.cli.common import console
from moerge.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)


def merge_command(
    config: Path | None = typer.Argument(
        None, help="Merge config (YAML): merge_method, base_model, models, parameters."
    ),
    out: Path | None = typer.Argument(
        None, help="Output folder: a transformers model, or a PEFT adapter for LoRA merges."
    ),
    lora_mode: str | None = typer.Option(
        None, "--lora-mode", help="exact | factor | svd | dense (LoRA experts)."
    ),
    rank: int | None = typer.Option(None, "--rank", help="Rank for --lora-mode svd."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (output dtype)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for random methods (DARE, DELLA)."),
    shard_size: str | None = typer.Option(
        None, "--shard-size", help="Largest output shard, e.g. 2GB, 500MB."
    ),
    name: str | None = typer.Option(None, "--name", help="Name of the merged expert (LoRA merges)."),
    add_to_library: bool = typer.Option(
        False, "--add-to-library", help="Add the merged expert to the library."
    ),
    list_methods: bool = typer.Option(
        False, "--list-methods", help="List merge methods and their parameters."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a non-empty OUT (once the merge is complete; never an input)."
    ),
    plugin: list[str] = cli_plugins.plugin_option(),
) -> None:
    """Merge models or LoRA experts as the YAML config says (same schema as moerge.merge(...))."""
    cli_plugins.load(plugin)
    if list_methods:
        from moerge.merging.registry import available_methods, get_method

        for m in available_methods():
            spec = get_method(m)
            console.print(f"[bold]{spec.describe()}[/]  [dim]{spec.paper}[/]", highlight=False)
        return
    if config is None:
        raise UsageError("give a merge config: moerge merge CONFIG.yaml OUT (or --list-methods)")
    from moerge.merging.api import merge

    overrides = dict(lora_mode=lora_mode, rank=rank, dtype=dtype, seed=seed, shard_size=shard_size, name=name)
    if add_to_library:
        overrides["add_to_library"] = True
    result = merge(config, out, overwrite=overwrite, **{k: v for k, v in overrides.items() if v is not None})
    if isinstance(result, Path):
        console.print(f"merged model written to [bold]{result}[/]")
    else:
        where = f" → {out}" if out is not None else ""
        lib = " (added to the library)" if add_to_library or result.metadata.extra.get("added") else ""
        console.print(
            f"merged expert [bold]{result.name}[/] ({result.metadata.extra['merge_note']}){where}{lib}",
            highlight=False,
        )
