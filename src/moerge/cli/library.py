"""``moerge library …``: create, fill, inspect, check and export expert libraries, and prepare the routing
signatures recipes need (``moerge library prepare``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from moerge.cli import plugins as cli_plugins
from moerge.cli import routing_options
from moerge.cli.common import console, wide_option

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
    """Create an empty library. With --base-model FOLDER (a transformers folder, or a Hub id org/model[@revision]
    found in the Hub cache) the base's tensor shapes are recorded, and every add checks that the adapter's modules
    exist in that base with fitting shapes. --fingerprint downloads a Hub base if it is not cached."""
    from moerge.experts.hub import base_folder
    from moerge.experts.library import ExpertLibrary, base_shapes_of

    folder = base_folder(base_model, download=fingerprint_base) if base_model else None
    fingerprint = None
    if base_model and fingerprint_base:
        from moerge.experts.fingerprint import fingerprint_folder

        fingerprint = fingerprint_folder(folder or base_model)  # a missing folder: its error names the fix
    shapes = None
    local = base_model is not None and Path(base_model).expanduser().is_dir()
    if folder is not None and (local or any(folder.glob("*.safetensors"))):
        shapes = base_shapes_of(folder)
    lib = ExpertLibrary.create(path, base_model=base_model, base_fingerprint=fingerprint, base_shapes=shapes)
    checked = (
        f"; adapters are checked against the {len(shapes)} tensor shapes of {base_model}" if shapes else ""
    )
    console.print(f"created library [bold]{lib.url}[/]{checked}", highlight=False)


@library_app.command("add")
def add(
    library: str = typer.Argument(..., help="Library folder or URL."),
    source: str = typer.Argument(
        ...,
        help="A PEFT adapter folder, a folder of PEFT adapter folders, or a Hugging Face Hub repo "
        "org/adapter[@revision] (when no such path exists; HF_HUB_OFFLINE=1 reads the Hub cache only).",
    ),
    name: str | None = typer.Option(None, help="Expert name (default: the folder's name)."),
    task: str | None = typer.Option(None, help="Task the expert was trained for."),
    domain: str | None = typer.Option(None, help="Domain of the expert's data."),
    tag: list[str] = typer.Option([], "--tag", help="A tag (repeatable)."),
    contributor: str | None = typer.Option(None),
    license: str | None = typer.Option(None, "--license"),
    overwrite: bool = typer.Option(False, help="Replace an expert of the same name."),
    admit: bool = typer.Option(
        False,
        "--admit",
        help="Run the admission checks (always run when the library has an admission policy).",
    ),
    eval_file: Path | None = typer.Option(
        None,
        "--eval",
        help="The contributor's eval rows (JSONL prompt/completion or text) for the usefulness check.",
    ),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="Base model folder. With a full fine-tune as SOURCE (a transformers folder): its task vector is stored "
        "against this base (a dense expert: fine-tune − base). With --admit: the model the checks run on "
        "(default: the library's base model, if a folder).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print each admission report as one JSON line."),
    wide: bool = wide_option(),
) -> None:
    """Add a PEFT adapter folder (or every adapter folder inside a folder, or a Hub repo's adapter), or, with
    --base, a fully fine-tuned transformers folder as a dense task vector. With --admit, or when the library has
    an admission policy (`moerge library policy`), each adapter is screened first and added only if admitted;
    the checks are printed as a table."""
    from moerge.experts.library import ExpertLibrary
    from moerge.experts.peft_io import is_peft_folder

    lib = ExpertLibrary.open(library)
    if admit or lib.admission_policy is not None:
        _add_admitted(lib, source, name, task, overwrite, eval_file, base, as_json, wide, meta_of(
            domain=domain, contributor=contributor, license=license, tags=tag))  # fmt: skip
        return
    meta = {k: v for k, v in dict(domain=domain, contributor=contributor, license=license).items() if v}
    if tag:
        meta["tags"] = tag
    if base is not None:
        if is_peft_folder(Path(source)):
            from moerge.errors import UsageError

            raise UsageError(
                f"{source} is a PEFT adapter: --base goes with a full fine-tune (or with --admit)"
            )
        _add_task_vector(lib, Path(source), base, name, task, overwrite, meta)
        return
    if (Path(source) / "config.json").is_file() and not is_peft_folder(Path(source)):
        from moerge.errors import MoergeError

        raise MoergeError(
            f"{source} is a transformers model folder, not a PEFT adapter: to add a full fine-tune as a task "
            "vector, give its base model: moerge library add LIB FOLDER --base BASE_FOLDER"
        )
    from moerge.experts.hub import add_from_hub, hub_ref_or_none

    ref = hub_ref_or_none(source)
    if ref is not None:
        from moerge.errors import HubError

        try:
            md = add_from_hub(lib, ref, name=name, task=task, overwrite=overwrite, **meta)
        except HubError as e:  # it may have been meant as a local folder
            raise HubError(f"no adapter folder {source} here, and as a Hub repo: {e}") from None
        console.print(f"added [bold]{md.name}[/] ({md.kind}, task={md.task}) from {md.extra.get('source')}")
        return
    folder = Path(source)
    if not folder.exists():
        from moerge.errors import InputNotFoundError

        raise InputNotFoundError(
            f"{folder}: no such adapter folder (and not a Hub repo id org/name[@revision])"
        )
    if is_peft_folder(folder) or name:
        added = [lib.add_peft(folder, name=name, task=task, overwrite=overwrite, **meta)]
    else:
        added = lib.add_folder(folder, overwrite=overwrite, **({"task": task} if task else {}), **meta)
    for md in added:
        console.print(f"added [bold]{md.name}[/] ({md.kind}, task={md.task})")


def meta_of(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v}


def _add_admitted(lib, source: str, name, task, overwrite, eval_file, base, as_json, wide, meta) -> None:
    """Screen every adapter of ``source`` and add the admitted ones; exit 1 naming the refused ones."""
    from moerge.errors import AdmissionRefusedError, InputNotFoundError
    from moerge.experts.peft_io import is_peft_folder, read_peft_folder

    folder = Path(source)
    if not folder.is_dir():
        raise InputNotFoundError(
            f"{folder}: no such adapter folder (admission screens local adapter folders)"
        )
    if (folder / "config.json").is_file() and not is_peft_folder(folder):
        from moerge.errors import MoergeError

        raise MoergeError(
            f"{folder} is a full fine-tune; admission screens LoRA adapters only (extract one first: `moerge library "
            "extract`), or add it to a library without an admission policy"
        )
    if is_peft_folder(folder) or name:
        experts = [read_peft_folder(folder, name=name, task=task, **meta)]
    else:
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and is_peft_folder(p))
        experts = [read_peft_folder(p, task=task, **meta) for p in subs]
    if not experts:
        from moerge.errors import MalformedConfigError

        raise MalformedConfigError(
            f"{folder}: holds no PEFT adapter folders (sub-folders with adapter_config.json)"
        )
    screen, rows = _screen_for(lib, base, eval_file)
    from moerge.train.screen import admit_expert

    refused = []
    for expert in experts:
        try:
            report = admit_expert(lib, expert, screen, rows, overwrite=overwrite, merge=_merge_duplicate)
        except AdmissionRefusedError as e:
            report = e.report  # type: ignore[attr-defined]
            refused.append(report)
        _print_report(report, as_json, wide)
    if refused:
        from moerge.errors import AdmissionRefusedError

        raise AdmissionRefusedError(
            f"{lib.url}: {'; '.join(r.summary() for r in refused)}; nothing of "
            f"{'them' if len(refused) > 1 else 'it'} was added. Retrain, or change the policy (`moerge library "
            f"policy {lib.url}`)."
        )


def _screen_for(lib, base: Path | None, eval_file: Path | None):
    """The `ModelScreen` on the base model and the eval rows (the screen is None when nothing needs the model)."""
    from moerge.train.data import read_jsonl
    from moerge.train.screen import ModelScreen

    rows = read_jsonl(eval_file) if eval_file is not None else []
    model, tokenizer = _load_base(lib, base)
    return ModelScreen(model, tokenizer), rows


def _merge_duplicate(existing, new):
    """A near-duplicate merged into the expert it duplicates: the mean of the two updates, stored exactly as one
    LoRA of rank r₁ + r₂ (`moerge.merging.lora`, mode ``exact``)."""
    from moerge.merging.lora import merge_lora_experts
    from moerge.merging.registry import get_method

    merged = merge_lora_experts(
        get_method("linear"), [existing, new], {"normalize": True}, [{"weight": 1.0}, {"weight": 1.0}],
        mode="exact", name=existing.name,
    )  # fmt: skip
    keep = existing.metadata.model_dump(exclude={"training", "extra", "tags", "description", "created_at"})
    merged.metadata = merged.metadata.model_copy(update=keep)
    return merged


def _print_report(report, as_json: bool, wide: bool) -> None:
    from moerge.tables import Column, Table, render

    if as_json:
        typer.echo(report.model_dump_json())
        return
    table = Table(f"admission of {report.expert}: {report.decision}", [
        Column("check"), Column("result"), Column("numbers", drop=2), Column("reason", drop=1)])  # fmt: skip
    for c in report.checks:
        result = "skipped" if c.passed is None else "pass" if c.passed else "FAIL"
        numbers = " ".join(f"{k}={v}" for k, v in c.numbers.items())
        table.add_row(c.name, result, numbers, c.reason)
    render(table, console, wide=wide)


@library_app.command("admit")
def admit_cmd(
    library: str = typer.Argument(..., help="Library folder or URL."),
    name: str = typer.Argument(..., help="Expert in the library to screen."),
    eval_file: Path | None = typer.Option(None, "--eval", help="Eval rows (JSONL) for the usefulness check."),
    base: Path | None = typer.Option(None, "--base", help="Base model folder (default: the library's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the admission report as JSON."),
    wide: bool = wide_option(),
) -> None:
    """Screen an expert already in the library (added before the policy, say) against the others, with the
    library's policy; the report is stored with the expert and logged. Exit 1 when the policy refuses it (the
    expert stays: remove it with `moerge library rm`)."""
    from moerge.experts.library import ExpertLibrary
    from moerge.train.screen import screen_expert

    lib = ExpertLibrary.open(library)
    expert = lib.get(name)
    screen, rows = _screen_for(lib, base, eval_file)
    report = screen_expert(lib, expert, screen, rows)
    if report.decision == "merged":  # an expert already in the library is kept; the duplicate is reported
        report = report.model_copy(update={"decision": "admitted", "merged_into": None})
    lib.log_admission(report)
    extra = {**lib.get_metadata(name).extra, "admission": report.model_dump(mode="json")}
    lib.update_metadata(name, extra=extra)
    _print_report(report, as_json, wide)
    if not report.admitted:
        from moerge.errors import AdmissionRefusedError

        raise AdmissionRefusedError(
            f"{lib.url}: {report.summary()}; the expert is still in the library: remove it with "
            f"`moerge library rm {lib.url} {name}`."
        )


@library_app.command("policy")
def policy_cmd(
    library: str = typer.Argument(..., help="Library folder or URL."),
    probe: Path | None = typer.Option(
        None, "--probe", help="Neutral probe rows (JSONL text or prompt/completion), stored in the library."
    ),
    margin: float | None = typer.Option(None, "--margin", help="Usefulness margin over the base."),
    metric: str | None = typer.Option(None, "--metric", help="Usefulness metric: loss or accuracy."),
    duplicate_cosine: float | None = typer.Option(
        None, "--duplicate-cosine", help="ΔW cosine of a duplicate."
    ),
    on_duplicate: str | None = typer.Option(None, "--on-duplicate", help="refuse, merge or admit."),
    norm_max_z: float | None = typer.Option(None, "--norm-max-z", help="Largest robust z of ‖ΔW‖."),
    drift_max_kl: float | None = typer.Option(None, "--drift-max-kl", help="Largest KL on the probe set."),
    require_eval: bool | None = typer.Option(None, "--require-eval/--no-require-eval"),
    off: bool = typer.Option(False, "--off", help="Remove the policy (adds check integrity and base only)."),
) -> None:
    """Set or show the library's admission policy: every later add is screened with it."""
    from pydantic import ValidationError

    from moerge.errors import MalformedConfigError
    from moerge.experts.admission import AdmissionPolicy
    from moerge.experts.library import ExpertLibrary
    from moerge.experts.schema import explain

    lib = ExpertLibrary.open(library)
    if off:
        lib.set_admission_policy(None)
        console.print(f"{lib.url}: admission policy removed", highlight=False)
        return
    changes = {
        "usefulness_margin": margin, "usefulness_metric": metric, "duplicate_cosine": duplicate_cosine,
        "on_duplicate": on_duplicate, "norm_max_z": norm_max_z, "drift_max_kl": drift_max_kl,
        "require_eval": require_eval,
    }  # fmt: skip
    changes = {k: v for k, v in changes.items() if v is not None}
    current = lib.admission_policy
    if changes or probe is not None or current is None:
        try:
            policy = AdmissionPolicy.model_validate(
                {**(current or AdmissionPolicy()).model_dump(), **changes}
            )
        except ValidationError as e:
            raise MalformedConfigError(f"admission policy: {explain(e)}") from None
        rows = None
        if probe is not None:
            from moerge.train.data import read_jsonl

            rows = read_jsonl(probe)
        lib.set_admission_policy(policy, rows)
    console.out(lib.admission_policy.model_dump_json(indent=1), highlight=False)  # type: ignore[union-attr]


def _add_task_vector(lib: Any, folder: Path, base: Path, name: str | None, task: str | None, overwrite: bool,
                     meta: dict[str, Any]) -> None:  # fmt: skip
    from moerge.errors import InputNotFoundError
    from moerge.merging.task_vectors import task_vector_expert
    from moerge.progress import status

    for path, what in ((folder, "fine-tuned model"), (base, "base model")):
        if not path.is_dir():
            raise InputNotFoundError(
                f"{path}: no such {what} folder (a transformers folder with safetensors)"
            )
    with status(f"computing the task vector of {folder.name}"):
        expert = task_vector_expert(folder, base, name or folder.name, task=task, **meta)
    md = lib.add(expert, overwrite=overwrite, source=str(folder))
    n = sum(t.numel() for t in expert.dense.values())
    console.print(
        f"added [bold]{md.name}[/] (dense, task={md.task}): {len(expert.dense)} parameters changed, {n:,} values",
        highlight=False,
    )


@library_app.command("extract")
def extract(
    library: str = typer.Argument(..., help="Library folder or URL."),
    name: str = typer.Argument(..., help="A dense expert (a full fine-tune's task vector) of the library."),
    energy: float | None = typer.Option(
        None,
        "--energy",
        min=0.0,
        max=1.0,
        help="per matrix, the smallest rank keeping this share of the squared singular values (default 0.9)",
    ),  # fmt: skip
    rank: int | None = typer.Option(
        None, "--rank", min=1, help="a fixed rank per matrix instead of --energy"
    ),
    as_name: str | None = typer.Option(None, "--as", help="name of the LoRA expert (default: NAME-lora)"),
    fan_in_fan_out: bool = typer.Option(
        False, "--fan-in-fan-out", help="weights are stored [d_in, d_out] (GPT-2's Conv1D)"
    ),
    overwrite: bool = typer.Option(False, help="Replace an expert of the same name."),
) -> None:
    """Make a LoRA expert from a dense one: a truncated SVD of each weight matrix's delta (mergekit-extract-lora),
    the rank chosen by an energy threshold or fixed; norms, biases and embeddings are left out."""
    from moerge.experts.library import ExpertLibrary
    from moerge.merging.task_vectors import extract_lora

    if energy is not None and rank is not None:
        from moerge.errors import UsageError

        raise UsageError("give --energy or --rank, not both")
    lib = ExpertLibrary.open(library)
    expert = lib.get(name)
    lora = extract_lora(expert, energy=energy, rank=rank, name=as_name, fan_in_fan_out=fan_in_fan_out)
    md = lib.add(lora, overwrite=overwrite, source=f"extracted from {name}")
    info = lora.metadata.extra["extracted"]
    ranks = [m["rank"] for m in info["modules"].values()]
    console.print(
        f"added [bold]{md.name}[/] (lora, from {name}): {len(ranks)} modules, rank {min(ranks)}–{max(ranks)}, "
        f"{lora.num_parameters():,} parameters; left out: {len(info['left_out'])} (norms, biases, embeddings)",
        highlight=False,
    )


@library_app.command("list")
def list_(
    library: str = typer.Argument(..., help="Library folder or URL."),
    task: str | None = typer.Option(None, help="Only experts for this task."),
    tag: str | None = typer.Option(None, help="Only experts with this tag."),
    base_model: str | None = typer.Option(None, help="Only experts for this base model."),
    name: str | None = typer.Option(None, help="Only names matching this glob."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
    wide: bool = wide_option(),
) -> None:
    """List experts, optionally filtered."""
    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.open(library)
    experts = lib.list(task=task, tag=tag, base_model=base_model, name=name)
    if as_json:
        for md in experts:
            typer.echo(md.model_dump_json())
        return
    from moerge.tables import Column, Table, render

    columns = [Column("name"), Column("kind"), Column("task"), Column("domain", drop=3), Column("tags", drop=4),
               Column("base model", drop=2), Column("created", drop=1)]  # fmt: skip
    table = Table(f"{lib.url} — {len(experts)} of {len(lib)} experts", columns)
    for md in experts:
        table.add_row(
            md.name,
            md.kind,
            md.task or "",
            md.domain or "",
            ",".join(md.tags),
            md.base_model or "",
            md.created_at[:16].replace("T", "\u00a0"),  # date and time kept on one line
        )
    render(table, console, wide=wide)


@library_app.command("show")
def show(
    library: str = typer.Argument(..., help="Library folder or URL."),
    name: str = typer.Argument(..., help="Expert name."),
    as_json: bool = typer.Option(False, "--json", help="Print the metadata and modules as one JSON object."),
    wide: bool = wide_option(),
) -> None:
    """Show one expert's metadata and modules."""
    import json

    from moerge.experts.library import ExpertLibrary
    from moerge.tables import Column, Table, records, render

    lib = ExpertLibrary.open(library)
    expert = lib.get(name)
    columns = [
        Column("module"),
        *[Column(h, right=True) for h in ("rank", "alpha", "d_in", "d_out", "scaling")],
    ]
    table = Table(
        f"{name}: {len(expert.lora) or len(expert.dense)} modules, {expert.num_parameters():,} parameters",
        columns,
    )
    for module, lm in sorted(expert.lora.items()):
        table.add_row(module, str(lm.rank), f"{lm.alpha:g}", str(lm.d_in), str(lm.d_out), f"{lm.scaling:.3g}")
    for param, t in sorted(expert.dense.items()):
        table.add_row(param, "dense", "", "", str(tuple(t.shape)), "")
    if as_json:
        metadata = json.loads(expert.metadata.model_dump_json())
        typer.echo(json.dumps({"metadata": metadata, "modules": records(table)}, indent=1))
        return
    if console.is_terminal:
        console.print_json(expert.metadata.model_dump_json())
    else:
        console.out(expert.metadata.model_dump_json(indent=1), highlight=False)
    render(table, console, wide=wide)
    record = expert.metadata.extra.get("admission")
    if isinstance(record, dict):
        from moerge.experts.admission import AdmissionReport

        _print_report(AdmissionReport.model_validate(record), False, wide)


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


@library_app.command("prepare")
def prepare(
    library: str = typer.Argument(..., help="Library folder or URL."),
    recipe: list[str] = typer.Option(
        ...,
        "--recipe",
        "-r",
        help='Recipe whose signatures to compute: "name" or "name:key=value,…" (repeatable).',
    ),
    data: list[str] = typer.Option(
        [],
        "--data",
        metavar="EXPERT_OR_TASK=FILE.jsonl",
        help='Training data of an expert (JSONL rows {"text": …} or {"prompt": …, "completion": …}), for the '
        "expert of that name, or every expert whose task it is (repeatable).",
    ),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="Recipe option KEY=VALUE for every --recipe (repeatable)."
    ),
    base: Path | None = typer.Option(
        None, "--base", help="Base model folder (default: the library's base model, if it is a folder)."
    ),
    experts: list[str] = routing_options.experts_option(
        "Prepare these experts only (comma-separated names, repeatable; default: every LoRA expert)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    plugin: list[str] = cli_plugins.plugin_option(),
    executor: str = typer.Option(
        "local",
        "--executor",
        help="local (default), or ray: each expert's signature a Ray task (pip install 'moerge[ray]')",
    ),
) -> None:
    """Compute and store the routing signatures (PHATGOOSE gates, centroids, Arrow prototypes …) recipes need
    for the library's experts, from each expert's training data where the signature needs data."""
    from moerge.experts.library import ExpertLibrary
    from moerge.recipes.registry import get_recipe

    if executor not in ("local", "ray"):
        from moerge.errors import UsageError

        raise UsageError(f"--executor {executor!r}: use local or ray")
    cli_plugins.load(plugin)
    lib = ExpertLibrary.open(library)
    names = routing_options.parse_experts(experts) or lib.names(kind="lora")
    absent = [n for n in names if n not in lib]
    if absent:
        from moerge.errors import ExpertNotFoundError

        raise ExpertNotFoundError(
            f"library {lib.url} has no expert {', '.join(map(repr, absent))} (it holds: "
            f"{', '.join(lib.names()) or 'none'}); check --experts"
        )
    specs = [_recipe_spec(text, option) for text in recipe]
    recipes = [(spec, get_recipe(spec.recipe)) for spec in specs]
    for spec, rec in recipes:
        rec.parse_options(spec.options)  # bad options refused before anything loads
    rows = _read_data(lib, names, data)
    expert_list = [lib.get(n) for n in names]
    model = tokenizer = None
    if any(sig.needs_data for _, rec in recipes for sig in rec.signatures):
        model, tokenizer = _load_base(lib, base)
    embedders: dict = {}
    _refuse_missing_data(lib, recipes, expert_list, model, tokenizer, embedders, rows)

    from moerge.recipes.facade import prepare_signatures

    done: list[str] = []
    with _signature_progress(progress) as bar:
        for spec, rec in recipes:
            lines = prepare_signatures(
                rec, model, tokenizer, lib, rows, experts=expert_list, embedders=embedders, progress=bar,
                executor=executor, **spec.options,
            )  # fmt: skip
            done += [f"{spec.label}: {line}" for line in lines]
    for line in done:
        console.print(line, highlight=False, soft_wrap=True)
    if not done:
        console.print(
            f"nothing to compute: experts {', '.join(names)} already have what "
            f"{', '.join(s.label for s in specs)} need{'s' if len(specs) == 1 else ''} in {lib.url}",
            highlight=False,
            soft_wrap=True,
        )


def _recipe_spec(text: str, option: list[str]):
    """``--recipe name:k=v`` plus the ``-o`` options (which win) as a `RecipeSpec`."""
    from moerge.bench.config import RecipeSpec, parse_method
    from moerge.cli.route import parse_options

    spec = parse_method(text)
    return RecipeSpec(spec.label, spec.recipe, {**spec.options, **parse_options(option)})


def _read_data(lib, names: list[str], pairs: list[str]) -> dict[str, list[dict[str, str]]]:
    """``{expert: rows}`` from ``EXPERT_OR_TASK=FILE`` pairs: a key names an expert, or else a task (every chosen
    expert whose metadata task it is); rows of several files for one expert are concatenated."""
    from moerge.errors import UsageError
    from moerge.train.data import read_jsonl

    tasks = {n: lib.get_metadata(n).task for n in names}
    out: dict[str, list[dict[str, str]]] = {}
    for pair in pairs:
        key, eq, file = pair.partition("=")
        key = key.strip()
        if not eq or not key or not file.strip():
            raise UsageError(
                f"--data {pair!r} is not EXPERT_OR_TASK=FILE.jsonl (e.g. --data math=math.jsonl)"
            )
        targets = [key] if key in names else [n for n in names if tasks[n] == key]
        if not targets:
            known = sorted(set(names) | {t for t in tasks.values() if t})
            raise UsageError(
                f"--data {key}=…: no expert and no task named {key!r} among the experts prepared "
                f"(names and tasks: {', '.join(known) or 'none'})"
            )
        file_rows = read_jsonl(Path(file.strip()))
        for n in targets:
            out.setdefault(n, []).extend(file_rows)
    return out


def _load_base(lib, base: Path | None):
    """The base model and tokenizer: ``--base``, else the library's recorded base model when it is a folder."""
    from moerge.errors import ModelLoadError
    from moerge.train.lora import load_base

    if base is None:
        recorded = lib.base_model
        if not recorded or not Path(recorded).is_dir():
            where = f"records base model {recorded!r}, which is not a model folder here" if recorded else (
                "records no base model")  # fmt: skip
            raise ModelLoadError(
                f"library {lib.url} {where}; pass --base FOLDER (the transformers folder its experts were "
                "trained from)"
            )
        base = Path(recorded)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-load "Loading weights" bar
    model, tokenizer, _, _ = load_base(base)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _refuse_missing_data(lib, recipes, experts, model, tokenizer, embedders, rows) -> None:
    """Refuse, before computing anything, when a recipe needs data signatures for experts given no data."""
    from moerge.errors import RecipeNotApplicableError
    from moerge.recipes.recipe import BuildContext

    ctx = BuildContext(model=model, experts=experts, library=lib, tokenizer=tokenizer, embedders=embedders)
    for spec, rec in recipes:
        for sig, missing in rec.missing_signatures(ctx, rec.parse_options(spec.options)):
            lacking = [n for n in missing if not rows.get(n)]
            if lacking:
                shown = ", ".join(lacking[:5]) + (" …" if len(lacking) > 5 else "")
                have = [e.name for e in experts if e.name not in lacking]
                subset = f", or prepare the others only (--experts {','.join(have)})" if have else ""
                raise RecipeNotApplicableError(
                    f"recipe {rec.name!r} computes {sig.what} from each expert's training data, and none was "
                    f"given for {len(lacking)} expert{'s' if len(lacking) > 1 else ''} ({shown}); add "
                    f"--data EXPERT_OR_TASK=FILE.jsonl for each (e.g. --data {lacking[0]}=FILE.jsonl){subset}"
                )


@contextlib.contextmanager
def _signature_progress(enabled: bool) -> Iterator[Any]:
    """A `RichSignatureProgress` over a live progress display (None without ``--progress``)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moerge.recipes.progress import RichSignatureProgress

    p = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )  # fmt: skip
    bar = RichSignatureProgress(p)  # starts the display at the first computation (none: no empty display)
    try:
        yield bar
        bar.close()
    finally:
        if p.live.is_started:
            p.stop()
