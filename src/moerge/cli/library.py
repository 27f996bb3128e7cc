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
    """Create an empty library. With --base-model FOLDER (a transformers folder) the base's tensor shapes are
    recorded, and every add checks that the adapter's modules exist in that base with fitting shapes."""
    from moerge.experts.library import ExpertLibrary, base_shapes_of

    fingerprint = None
    if base_model and fingerprint_base:
        from moerge.experts.fingerprint import fingerprint_folder

        fingerprint = fingerprint_folder(base_model)
    shapes = None
    if base_model and Path(base_model).is_dir():
        shapes = base_shapes_of(base_model)
    lib = ExpertLibrary.create(path, base_model=base_model, base_fingerprint=fingerprint, base_shapes=shapes)
    checked = (
        f"; adapters are checked against the {len(shapes)} tensor shapes of {base_model}" if shapes else ""
    )
    console.print(f"created library [bold]{lib.url}[/]{checked}", highlight=False)


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
        from moerge.errors import InputNotFoundError

        raise InputNotFoundError(f"{source}: no such adapter folder")
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
def show(
    library: str = typer.Argument(..., help="Library folder or URL."),
    name: str = typer.Argument(..., help="Expert name."),
) -> None:
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
    library: str = typer.Argument(..., help="Library folder or URL."),
    repair: bool = typer.Option(
        False,
        help="Rebuild the catalog from the experts' own files: drop rows naming unsafe or missing folders, add "
        "complete experts back, move unaccounted-for folders to quarantine/ (never deleted), remove staging "
        "folders of interrupted adds.",
    ),
) -> None:
    """Check every expert's files against their checksums; exit status 1 when an expert is damaged."""
    from rich.markup import escape

    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.open(library, recover=repair)
    if lib.recovered_catalog:
        console.print(
            f"[yellow]repaired:[/] moved the damaged catalog to {escape(lib.recovered_catalog)}",
            soft_wrap=True,
        )
    report = lib.verify(repair=repair)
    for action in report.repaired:
        console.print(f"[yellow]repaired:[/] {escape(action)}", soft_wrap=True)
    for p in report.problems:
        console.print(f"[red]problem:[/] {escape(p)}", soft_wrap=True)
    for left in report.leftovers:
        console.print(f"[yellow]leftover:[/] {escape(left)}", soft_wrap=True)
    console.print(
        f"checked {report.checked} experts: {'ok' if report.ok else f'{len(report.problems)} problems'}",
        highlight=False,
    )
    if not report.ok:
        from moerge.cli.common import print_error

        print_error(
            f"{library}: {len(report.problems)} damaged experts (listed above); restore their files from a "
            "backup, or remove them with `moerge library rm`."
        )
        raise typer.Exit(1)


@library_app.command("export")
def export(
    library: str = typer.Argument(..., help="Library folder or URL."),
    name: str = typer.Argument(..., help="Expert to export."),
    out_dir: Path = typer.Argument(..., help="Output folder (new or empty)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
) -> None:
    """Write an expert as a standalone PEFT adapter folder (checked against its checksums)."""
    from moerge.experts.library import ExpertLibrary

    out = ExpertLibrary.open(library).export_peft(name, out_dir, overwrite=overwrite)
    console.print(f"exported [bold]{name}[/] to {out}", highlight=False)


@library_app.command("rm")
def rm(
    library: str = typer.Argument(..., help="Library folder or URL."),
    name: list[str] = typer.Argument(..., help="Expert name(s) to remove."),
) -> None:
    """Remove experts (and their artifacts)."""
    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.open(library)
    for n in name:
        lib.remove(n)
        console.print(f"removed [bold]{n}[/]")


@library_app.command("rename")
def rename(
    library: str = typer.Argument(..., help="Library folder or URL."),
    old: str = typer.Argument(..., help="Current name."),
    new: str = typer.Argument(..., help="New name."),
) -> None:
    """Rename an expert."""
    from moerge.experts.library import ExpertLibrary

    ExpertLibrary.open(library).rename(old, new)
    console.print(f"renamed [bold]{old}[/] to [bold]{new}[/]")
