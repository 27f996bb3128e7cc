"""``moerge serve``: an OpenAI-compatible HTTP server of a routed expert library (docs/serving.md).

No torch/transformers/fastapi import at module import time: ``moerge --help`` stays instant."""

from __future__ import annotations

from pathlib import Path

import typer

from moerge.cli import plugins as cli_plugins
from moerge.cli import routing_options


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        base_model: str | None = typer.Argument(
            None, help="Base model: a transformers folder, a .gguf file or a hub id (not with --demo)."
        ),
        library: str | None = typer.Argument(None, help="Expert library path or URL (not with --demo)."),
        demo: bool = typer.Option(
            False,
            "--demo",
            help="Serve the built-in synthetic suite's base model and library (built if not cached).",
        ),
        cache: Path | None = typer.Option(None, "--cache", help="--demo: the suite cache folder."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
        recipe: list[str] = typer.Option(
            [],
            "--recipe",
            "-r",
            help="Serve this recipe (repeatable; default: every recipe that applies to the library).",
        ),
        option: list[str] = typer.Option(
            [], "--option", "-o", help="Default option KEY=VALUE of the --recipe given (repeatable)."
        ),
        max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="Requests decoded together."),
        max_queue: int = typer.Option(64, "--max-queue", min=0, help="Requests waiting; beyond: 429."),
        timeout: float = typer.Option(120.0, "--timeout", min=0.001, help="Per-request timeout (seconds)."),
        max_prompt_tokens: int = typer.Option(1024, "--max-prompt-tokens", min=1),
        max_tokens_limit: int = typer.Option(512, "--max-tokens-limit", min=1, help="Largest max_tokens."),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
        experts: list[str] = routing_options.experts_option(),
        plugin: list[str] = cli_plugins.plugin_option(),
    ) -> None:
        """Serve a library with its routing recipes behind an OpenAI-compatible API (/v1/completions, ...)."""
        from moerge.cli.route import parse_options
        from moerge.errors import UsageError

        if demo and (base_model is not None or library is not None):
            raise UsageError("give BASE LIBRARY or --demo (the built-in synthetic suite), not both")
        if not demo and (base_model is None or library is None):
            raise UsageError("give BASE and LIBRARY, or --demo (the built-in synthetic suite)")
        opts = parse_options(option)
        if opts and len(recipe) != 1:
            raise UsageError("-o/--option sets the options of one recipe: give exactly one --recipe with it")
        subset = routing_options.parse_experts(experts)
        cli_plugins.load(plugin)
        import torch
        from pydantic import ValidationError
        from transformers.utils import logging as hf_logging

        from moerge.cli.common import err_console
        from moerge.errors import MalformedConfigError
        from moerge.progress import status
        from moerge.serve.app import run
        from moerge.serve.catalog import Catalog
        from moerge.serve.config import ServeConfig
        from moerge.serve.engine import Engine

        if threads:
            torch.set_num_threads(threads)
        try:
            config = ServeConfig(
                max_batch_size=max_batch_size, max_queue=max_queue, request_timeout_s=timeout,
                max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
            )  # fmt: skip
        except ValidationError as e:
            err = e.errors()[0]
            raise MalformedConfigError(
                f"serve options: {'.'.join(map(str, err['loc']))}: {err['msg']}"
            ) from e
        hf_logging.disable_progress_bar()
        if demo:
            from moerge.bench.suites.synthetic import SyntheticSuiteConfig, build_synthetic_suite

            suite = build_synthetic_suite(SyntheticSuiteConfig(), root=cache)
            base_model, library = suite.base_model, suite.library
        assert base_model is not None and library is not None
        recipes = {r: dict(opts) for r in recipe} or None
        with status("loading the base model and attaching the experts"):
            catalog = Catalog.load(base_model, library, experts=subset, recipes=recipes)
        engine = Engine(catalog, config)
        names = catalog.names()
        err_console.print(
            f"moerge serve: http://{host}:{port}/v1 — models: {', '.join(names)}"
            + (f" (not served: {', '.join(catalog.skipped)}; see /v1/models)" if catalog.skipped else ""),
            highlight=False,
        )
        run(engine, host=host, port=port)
