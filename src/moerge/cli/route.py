"""``moerge recipes`` (the taxonomy table, from the code) and ``moerge generate`` (a routed model's completions).

No torch/transformers import at module import time: ``moerge --help`` stays instant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from moerge.cli import plugins as cli_plugins
from moerge.cli import routing_options
from moerge.cli.common import console, fail, wide_option

# The survey table's abbreviations (reference/moerging-methods.md §2.1).
SHORT = {
    "training": "ET",
    "expert_data": "ED",
    "routing_data": "RD",
    "granularity": "IG",
    "depth": "DG",
    "selection": "ES",
    "aggregation": "EA",
    "generalization": "Gen",
    "user_data": "UD",
}
ABBREV = {
    "standard": "Std",
    "custom": "Cus",
    "private": "Priv",
    "shared": "Sh",
    "none": "None",
    "expert": "Exp",
    "target": "Tgt",
    "general": "Gen'l",
    "step": "Step",
    "example": "Ex",
    "task": "Task",
    "module": "Mod",
    "model": "Mdl",
    "sparse": "Sp",
    "dense": "Dn",
    "output": "Out",
    "parameter": "Par",
    "multiple": "Mult",
    "in-distribution": "ID",
    "out-of-distribution": "OOD",
    "zero-shot": "ZS",
    "few-shot": "FS",
    "full": "Full",
    "n/a": "N/A",
}
AXIS_NAMES = {
    "training": "expert training",
    "expert_data": "expert data",
    "routing_data": "routing dataset",
    "granularity": "input granularity",
    "depth": "depth granularity",
    "selection": "expert selection",
    "aggregation": "expert aggregation",
    "generalization": "generalization",
    "user_data": "user dataset",
}
VALUES_NOTE = (
    "Values: "
    + ", ".join(f"{v} {k}" for k, v in ABBREV.items() if v.lower() != k)
    + " (--json: full values)."
)
# Distinct, readable colours for experts in a routing trace (none grey or dim, which would read as "no expert").
EXPERT_STYLES = ["bold cyan", "bold magenta", "bold green", "bold yellow", "bold blue", "bold red",
                 "bright_cyan", "bright_magenta", "bright_green", "bright_yellow", "bright_blue", "bright_red"]  # fmt: skip
NO_EXPERT = "none (base model only)"


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["k=2", "temperature=0.5", "expert=foo"]`` → ``{"k": 2, "temperature": 0.5, "expert": "foo"}``."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            fail(f"option {pair!r} is not KEY=VALUE (e.g. -o k=2)")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def read_prompts(prompt: str | None, prompts: Path | None) -> list[dict[str, Any]]:
    if (prompt is None) == (prompts is None):
        fail("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    if prompt is not None:
        return [{"prompt": prompt}]
    rows = []
    for i, line in enumerate(Path(prompts).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{prompts}:{i}: not valid JSON ({e})")
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict) or "prompt" not in row:
            fail(
                f'{prompts}:{i}: each line must be a JSON string or an object with "prompt" (and optional "task")'
            )
        rows.append(row)
    return rows


def generate_config(max_new_tokens, temperature, top_p, top_k, seed, stop, chat_template):
    """`moerge generate`'s flags as a `moerge.model.generation.GenerateConfig` (one error line if invalid)."""
    from pydantic import ValidationError

    from moerge.errors import MalformedConfigError
    from moerge.model.generation import GenerateConfig

    fields = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                  stop=list(stop), chat_template=chat_template)  # fmt: skip
    try:
        return GenerateConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        raise MalformedConfigError(f"generate options: {'.'.join(map(str, err['loc']))}: {err['msg']}") from e


def register(app: typer.Typer) -> None:
    @app.command("recipes")
    def recipes(
        as_json: bool = typer.Option(False, "--json", help="Print the table as JSON rows."),
        plugin: list[str] = cli_plugins.plugin_option(),
        wide: bool = wide_option(),
    ) -> None:
        """Print every routing recipe with its taxonomy record (the survey's nine axes)."""
        from moerge.recipes import AXES, taxonomy_rows

        cli_plugins.load(plugin)

        rows = taxonomy_rows()
        if as_json:
            console.print_json(json.dumps(rows))
            return
        from moerge.tables import Column, Table, render

        columns = [
            Column("recipe"),
            *[Column(AXIS_NAMES[a], short=SHORT[a]) for a in AXES],
            Column("paper", drop=1),
        ]
        table = Table("moerge recipes: taxonomy records", columns, notes=[VALUES_NOTE])
        for r in rows:
            table.add_row(r["recipe"], *[ABBREV.get(r[a], r[a]) for a in AXES], r["paper"])
        render(table, console, wide=wide)

    @app.command("generate")
    def generate(
        base_model: str = typer.Argument(
            ...,
            help="Base model: a transformers folder, a .gguf file or a hub id (as `moerge train --base`).",
        ),
        library: str = typer.Argument(..., help="Expert library path or URL."),
        recipe: str = typer.Option("arrow", "--recipe", "-r", help="Recipe name (see `moerge recipes`)."),
        option: list[str] = typer.Option([], "--option", "-o", help="Recipe option KEY=VALUE (repeatable)."),
        prompt: str | None = typer.Option(None, "--prompt", "-p", help="One prompt."),
        prompts: Path | None = typer.Option(
            None, "--prompts", help='JSONL: "text" or {"prompt":..., "task":...}.'
        ),
        chat: bool = typer.Option(
            False,
            "--chat",
            help="Interactive: load the model once, then complete each line of stdin (until EOF or /exit).",
        ),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1),
        temperature: float = typer.Option(
            0.0, "--temperature", "-t", min=0.0, help="0 = greedy (the default); > 0 samples."
        ),
        top_p: float = typer.Option(
            1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with -t > 0)."
        ),
        top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k likeliest tokens; 0 = all."),
        seed: int | None = typer.Option(None, "--seed", help="Seed for sampling: each prompt reproducible."),
        stop: list[str] = typer.Option(
            [], "--stop", help="Stop at this string and cut it from the output (repeatable)."
        ),
        chat_template: bool = typer.Option(
            False,
            "--chat-template/--no-chat-template",
            help="Send prompts through the tokenizer's chat template.",
        ),
        target_modules: list[str] = typer.Option(
            [],
            "--target-modules",
            help="Route only these modules (names or suffixes; repeat or comma-separate).",
        ),
        show_routing: bool | None = typer.Option(
            None,
            "--show-routing/--no-show-routing",
            help="Print the experts each token went to (on with --chat).",
        ),
        top: int = typer.Option(2, "--top", help="Experts shown per token with --show-routing."),
        experts: list[str] = routing_options.experts_option(),
        plugin: list[str] = cli_plugins.plugin_option(),
        wide: bool = wide_option(),
        as_json: bool = typer.Option(
            False,
            "--json",
            help="One JSON object per prompt (completion, and the routing with --show-routing).",
        ),
    ) -> None:
        """Generate completions from a routed model (greedy by default; sampling with --temperature)."""
        from moerge.backbones.loading import check_source
        from moerge.errors import UsageError

        if chat and (prompt is not None or prompts is not None):
            raise UsageError("give --chat or --prompt/--prompts, not both")
        rows = [] if chat else read_prompts(prompt, prompts)
        opts = parse_options(option)
        config = generate_config(max_new_tokens, temperature, top_p, top_k, seed, stop, chat_template)
        check_source(base_model)
        cli_plugins.load(plugin)
        from transformers.utils import logging as hf_logging

        from moerge.backbones.loading import load_base_model
        from moerge.cli.common import err_console
        from moerge.model.generation import has_chat_template
        from moerge.progress import status
        from moerge.recipes.facade import attach

        subset = routing_options.parse_experts(experts)
        hf_logging.disable_progress_bar()  # the "Loading weights" bar
        model, tokenizer = load_base_model(base_model, fingerprint=False)  # with its own status line
        if chat_template and not has_chat_template(tokenizer):
            err_console.print(
                "note: the tokenizer has no chat template; prompts are sent as they are", highlight=False
            )
        modules = [m.strip() for v in target_modules for m in v.split(",") if m.strip()] or None
        with status(f"attaching {recipe}"):
            routed = attach(
                model,
                library,
                recipe=recipe,
                experts=subset,
                tokenizer=tokenizer,
                target_modules=modules,
                **opts,
            )
        show = chat if show_routing is None else show_routing
        if not chat:
            for row in rows:
                complete_and_print(
                    routed, tokenizer, row["prompt"], row.get("task"), config, show, top, wide, as_json
                )
            return
        import sys

        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                console.print("[bold]>[/] ", end="")
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                break
            if line.strip():
                complete_and_print(
                    routed, tokenizer, line.rstrip("\r\n"), None, config, show, top, wide, as_json
                )

    def complete_and_print(
        routed,
        tokenizer,
        text: str,
        task: str | None,
        config,
        show: bool,
        top: int,
        wide: bool,
        as_json: bool,
    ) -> None:
        from rich.text import Text

        from moerge.model.generation import complete
        from moerge.routing.inputs import RoutingInputs

        routing = RoutingInputs(task_names=[task] if task else None, texts=[text], record=show)
        done = complete(routed, tokenizer, text, config, routing=routing)
        trace = routing_trace(routed, tokenizer, done.ids, top) if show else None
        if as_json:
            record = {"prompt": text, "completion": done.text, **({"task": task} if task else {})}
            if trace is not None:
                record["routing"] = [{"position": p, "token": t, "experts": [{"expert": e, "weight": w}
                                                                               for e, w in ex]}
                                     for p, t, ex in trace]  # fmt: skip
            typer.echo(json.dumps(record, ensure_ascii=False))
            return
        console.print(Text.assemble((text, "bold"), done.text), highlight=False)
        if trace is not None:
            print_routing(trace, routed.expert_names, wide)

    def routing_trace(routed, tokenizer, ids, top: int) -> list[tuple[int, str, list[tuple[str, float]]]]:
        from moerge.routing.diagnostics import per_token_experts

        return [
            (pos, tokenizer.decode([token_id]), experts)
            for pos, token_id, experts in per_token_experts(
                routed.last_routing(), routed.expert_names, ids, top
            )
        ]

    def print_routing(trace, expert_names: list[str], wide: bool) -> None:
        from moerge.tables import NBSP, Column, Table, render

        table = Table(
            "routing: experts with the largest mean weight over layers, per position",
            [Column("position", short="pos", right=True), Column("token"), Column("experts (weight)")],
            styles={name: EXPERT_STYLES[i % len(EXPERT_STYLES)] for i, name in enumerate(expert_names)},
        )
        table.styles[NO_EXPERT] = "italic"
        for pos, token, experts in trace:
            shown = ", ".join(f"{name}{NBSP}{w:.2f}" for name, w in experts) or NO_EXPERT
            table.add_row(pos, repr(token), shown)
        render(table, console, wide=wide)
