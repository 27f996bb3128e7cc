"""``moerge recipes`` (the taxonomy table, from the code) and ``moerge generate`` (a routed model's completions).

No torch/transformers import at module import time: ``moerge --help`` stays instant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from moerge.cli import plugins as cli_plugins
from moerge.cli.common import console, fail

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
LEGEND = (
    "ET expert training, ED expert data, RD routing dataset, IG input granularity, DG depth granularity, "
    "ES expert selection, EA expert aggregation, Gen generalization, UD user dataset (--json for full values)"
)


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


def encode_prompt(tokenizer, prompt: str) -> dict:
    """The prompt as the experts were trained on it: ``<bos>`` first where the tokenizer has one and does not
    add it itself (moerge's training encodes ``<bos> prompt completion <eos>``)."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt")
    bos = tokenizer.bos_token_id
    ids = enc["input_ids"]
    if bos is not None and (ids.shape[1] == 0 or int(ids[0, 0]) != bos):
        enc["input_ids"] = torch.cat([torch.tensor([[bos]]), ids], dim=1)
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    return enc


def register(app: typer.Typer) -> None:
    @app.command("recipes")
    def recipes(
        as_json: bool = typer.Option(False, "--json", help="Print the table as JSON rows."),
        plugin: list[str] = cli_plugins.plugin_option(),
    ) -> None:
        """Print every routing recipe with its taxonomy record (the survey's nine axes)."""
        from moerge.recipes import AXES, taxonomy_rows

        cli_plugins.load(plugin)

        rows = taxonomy_rows()
        if as_json:
            console.print_json(json.dumps(rows))
            return
        from rich.table import Table

        table = Table(title="moerge recipes: taxonomy records", caption=LEGEND, show_lines=False)
        table.add_column("recipe", style="bold", no_wrap=True)
        for axis in AXES:
            table.add_column(SHORT[axis], no_wrap=True)
        table.add_column("paper", overflow="fold")
        for r in rows:
            table.add_row(r["recipe"], *[ABBREV.get(r[a], r[a]) for a in AXES], r["paper"])
        console.print(table)

    @app.command("generate")
    def generate(
        base_model: Path = typer.Argument(
            ..., help="Base model folder (transformers format, with tokenizer)."
        ),
        library: str = typer.Argument(..., help="Expert library path or URL."),
        recipe: str = typer.Option("arrow", "--recipe", "-r", help="Recipe name (see `moerge recipes`)."),
        option: list[str] = typer.Option([], "--option", "-o", help="Recipe option KEY=VALUE (repeatable)."),
        prompt: str | None = typer.Option(None, "--prompt", "-p", help="One prompt."),
        prompts: Path | None = typer.Option(
            None, "--prompts", help='JSONL: "text" or {"prompt":..., "task":...}.'
        ),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
        show_routing: bool = typer.Option(
            False, "--show-routing", help="Print the experts each token went to."
        ),
        top: int = typer.Option(2, "--top", help="Experts shown per token with --show-routing."),
        plugin: list[str] = cli_plugins.plugin_option(),
    ) -> None:
        """Generate completions from a routed model (greedy)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from moerge.recipes.facade import attach
        from moerge.routing.inputs import RoutingInputs

        rows = read_prompts(prompt, prompts)
        opts = parse_options(option)
        cli_plugins.load(plugin)
        if not base_model.is_dir():
            fail(f"{base_model}: no such model folder")
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
        routed = attach(model, library, recipe=recipe, tokenizer=tokenizer, **opts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for row in rows:
            enc = encode_prompt(tokenizer, row["prompt"])
            task = row.get("task")
            routing = RoutingInputs(
                task_names=[task] if task else None, texts=[row["prompt"]], record=show_routing
            )
            out = routed.generate(
                **enc, routing=routing, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
            )
            n = enc["input_ids"].shape[1]
            text = tokenizer.decode(out[0, n:], skip_special_tokens=True)
            console.print(f"[bold]{row['prompt']}[/]{text}", highlight=False)
            if show_routing:
                print_routing(routed, tokenizer, out[0], top)

    def print_routing(routed, tokenizer, ids, top: int) -> None:
        from moerge.routing.diagnostics import per_token_experts

        for pos, token_id, experts in per_token_experts(routed.last_routing(), routed.expert_names, ids, top):
            shown = ", ".join(f"{name} {w:.2f}" for name, w in experts)
            console.print(f"  {pos:>4} {tokenizer.decode([token_id])!r:>8} → {shown}", highlight=False)
