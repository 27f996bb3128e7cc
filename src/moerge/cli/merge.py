"""``moerge merge CONFIG.yaml OUT``: merge full checkpoints or library LoRA experts from a mergekit-like YAML."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import typer

from moerge.cli import plugins as cli_plugins
from moerge.cli.common import console
from moerge.errors import UsageError


@contextlib.contextmanager
def _config_warnings_as_lines() -> Iterator[None]:
    """Show each `ConfigWarning` (something of the YAML that is ignored) as one ``warning:`` line on stderr."""
    from moerge.errors import ConfigWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if issubclass(category, ConfigWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ConfigWarning)
        warnings.showwarning = show
        yield


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)
    app.command("build-moe")(build_moe_command)


def build_moe_command(
    config: Path = typer.Argument(
        ...,
        help="mergekit-moe style YAML: base_model, gate_mode, experts (source_model or expert + prompts).",
    ),
    out: Path = typer.Argument(..., help="Output folder: a transformers Mixtral model."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a non-empty OUT (once the new model is complete; never an input)."
    ),
) -> None:
    """Build a mixture-of-experts checkpoint (Mixtral layout) from a base and dense or library experts."""
    from moerge.merging.moe import build_moe

    with _config_warnings_as_lines():
        written = build_moe(config, out, overwrite=overwrite)
    console.print(f"MoE model written to [bold]{written}[/]")


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
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="float32 | float16 | bfloat16: the dtype the merge computes in (mergekit's dtype).",
    ),
    out_dtype: str | None = typer.Option(
        None, "--out-dtype", help="float32 | float16 | bfloat16: the dtype stored (default: --dtype)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed for random methods (DARE, DELLA)."),
    engine: str | None = typer.Option(
        None,
        "--engine",
        help="auto | numpy | torch: numpy runs linear and task_arithmetic without torch (auto: where it can).",
    ),
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
    intermediate_dir: Path | None = typer.Option(
        None,
        "--intermediate-dir",
        help="Multi-stage configs (several YAML documents): where named stages go (default: OUT.stages).",
    ),
    plugin: list[str] = cli_plugins.plugin_option(),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="A progress bar on stderr (only shown on a terminal)."
    ),
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

    overrides = dict(
        lora_mode=lora_mode,
        rank=rank,
        dtype=dtype,
        out_dtype=out_dtype,
        seed=seed,
        engine=engine,
        shard_size=shard_size,
        name=name,
    )
    if add_to_library:
        overrides["add_to_library"] = True
    from moerge.progress import bar

    with bar(f"merging {config.name}", None, enabled=progress) as advance, _config_warnings_as_lines():
        result = merge(
            config,
            out,
            overwrite=overwrite,
            progress=lambda key, done, total: advance(1, total=total),
            intermediate_dir=intermediate_dir,
            **{k: v for k, v in overrides.items() if v is not None},
        )
    if isinstance(result, Path):
        console.print(f"merged model written to [bold]{result}[/]")
    else:
        where = f" → {out}" if out is not None else ""
        lib = " (added to the library)" if add_to_library or result.metadata.extra.get("added") else ""
        console.print(
            f"merged expert [bold]{result.name}[/] ({result.metadata.extra['merge_note']}){where}{lib}",
            highlight=False,
        )
