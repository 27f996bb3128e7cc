"""``moerge library …``: create, fill, inspect, check and export expert libraries."""

from __future__ import annotations

from pathlib import Path

import typer

from moerge.cli.common import console

library_app = typer.Typer(help="Create and manage expert libraries.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(library_app, name="library")


@library_app.command("init")
def init(
    path: str = typer.Argument(..., help="Folder (or fsspec URL) for the new library."),
    base_model: str | None = typer.Option(
        None, "--base-model", help="Base model id or path the experts share."
    ),
    fingerprint_base: bool = typer.Option(
        False, "--fingerprint/--no-fingerprint", help="Load --base-model to record its fingerprint."
    ),
) -> None:
    """Create an empty library."""
    from moerge.experts.library import ExpertLibrary

    fingerprint = None
    if base_model and fingerprint_base:
        from moerge.experts.fingerprint import fingerprint_folder

        fingerprint = fingerprint_folder(base_model)
    lib = ExpertLibrary.create(path, base_model=base_model, base_fingerprint=fingerprint)
    console.print(f"created library [bold]{lib.url}[/]")


@library_app.command("add")
def add(
    library: str = typer.Argument(..., help="Library folder or URL."),
    source: Path = typer.Argument(..., help="A PEFT adapter folder, or a folder of PEFT adapter folders."),
    name: str | None = typer.Option(None, help="Expert name (default: the folder's name)."),
    task: str | None = typer.Option(None, help="Task the expert was trained for."),
    domain: str | None = typer.Option(None, help="Domain of the expert's data."),
    tag: list[str] = typer.Option([], "--tag", help="A tag (repeatable)."),
    contributor: str | None = typer.Option(None),
    license: str | None = typer.Option(None, "--license"),
    overwrite: bool = typer.Option(False, help="Replace an expert of the same name."),
) -> None:
    """Add a PEFT adapter folder (or every adapter folder inside a folder)."""
    from moerge.experts.library import ExpertLibrary
    from moerge.experts.peft_io import is_peft_folder

    lib = ExpertLibrary.open(library)
    meta = {k: v for k, v in dict(domain=domain, contributor=contributor, license=license).items() if v}
    if tag:
        meta["tags"] = tag
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such adapter folder")
    if is_peft_folder(source) or name:
        added = [lib.add_peft(source, name=name, task=task, overwrite=overwrite, **meta)]
    else:
        added = lib.add_folder(source, overwrite=overwrite, **({"task": task} if task else {}), **meta)
    for md in added:
        console.print(f"added [bold]{md.name}[/] ({md.kind}, task={md.task})")


@library_app.command("list")
def list_(
    library: str = typer.Argument(..., help="Library folder or URL."),
    task: str | None = typer.Option(None, help="Only experts for this task."),
    tag: str | None = typer.Option(None, help="Only experts with this tag."),
    base_model: str | None = typer.Option(None, help="Only experts for this base model."),
    name: str | None = typer.Option(None, help="Only names matching this glob."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
) -> None:
    """List experts, optionally filtered."""
    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.open(library)
    experts = lib.list(task=task, tag=tag, base_model=base_model, name=name)
    if as_json:
        for md in experts:
            typer.echo(md.model_dump_json())
        return
    from rich.table import Table

    table = Table(title=f"{lib.url} — {len(experts)} of {len(lib)} experts")
    for col in ("name", "kind", "task", "domain", "tags", "base model", "created"):
        table.add_column(col)
    for md in experts:
        table.add_row(
            md.name,
            md.kind,
            md.task or "",
            md.domain or "",
            ",".join(md.tags),
            md.base_model or "",
            md.created_at[:16].replace("T", " "),
        )
    console.print(table)


@library_app.command("show")
def show(library: str, name: str) -> None:
    """Show one expert's metadata and modules."""
    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.open(library)
    expert = lib.get(name)
    console.print_json(expert.metadata.model_dump_json())
    from rich.table import Table

    table = Table(
        title=f"{name}: {len(expert.lora) or len(expert.dense)} modules, {expert.num_parameters():,} parameters"
    )
    for col in ("module", "rank", "alpha", "d_in", "d_out", "scaling"):
        table.add_column(col)
    for module, lm in sorted(expert.lora.items()):
        table.add_row(module, str(lm.rank), f"{lm.alpha:g}", str(lm.d_in), str(lm.d_out), f"{lm.scaling:.3g}")
    for param, t in sorted(expert.dense.items()):
        table.add_row(param, "dense", "", "", str(tuple(t.shape)), "")
    console.print(table)


@library_app.command("verify")
def verify(
    library: str,
    repair: bool = typer.Option(False, help="Delete leftovers of interrupted adds."),
) -> None:
    """Check every expert's files against their checksums."""
    from moerge.experts.library import ExpertLibrary

    report = ExpertLibrary.open(library).verify(repair=repair)
    for p in report.problems:
        console.print(f"[red]problem:[/] {p}")
    for left in report.leftovers:
        console.print(f"[yellow]leftover:[/] {left}{' (removed)' if repair else ''}")
    console.print(
        f"checked {report.checked} experts: {'ok' if report.ok else f'{len(report.problems)} problems'}"
    )
    if not report.ok:
        raise typer.Exit(1)


@library_app.command("export")
def export(library: str, name: str, out_dir: Path) -> None:
    """Write an expert as a standalone PEFT adapter folder."""
    from moerge.experts.library import ExpertLibrary

    out = ExpertLibrary.open(library).export_peft(name, out_dir)
    console.print(f"exported [bold]{name}[/] to {out}")


@library_app.command("rm")
def rm(library: str, name: list[str] = typer.Argument(..., help="Expert name(s) to remove.")) -> None:
    """Remove experts (and their artifacts)."""
    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.open(library)
    for n in name:
        lib.remove(n)
        console.print(f"removed [bold]{n}[/]")


@library_app.command("rename")
def rename(library: str, old: str, new: str) -> None:
    """Rename an expert."""
    from moerge.experts.library import ExpertLibrary

    ExpertLibrary.open(library).rename(old, new)
    console.print(f"renamed [bold]{old}[/] to [bold]{new}[/]")
