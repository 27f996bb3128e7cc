"""``moerge library push`` / ``moerge library pull``: experts and libraries to and from the Hugging Face Hub.

Kept apart from ``cli/library.py`` (it adds its commands to the same ``library`` group); ``moerge library add``
takes a Hub repo id itself."""

from __future__ import annotations

import typer

from moerge.cli.common import console
from moerge.cli.library import library_app


def register(app: typer.Typer) -> None:
    """The commands below join the ``library`` group when this module is imported; nothing else to add."""


@library_app.command("push")
def push(
    library: str = typer.Argument(..., help="Library folder or URL."),
    repo_id: str = typer.Argument(..., help="Hub repo id (org/name); created if absent."),
    expert: str | None = typer.Option(
        None, "--expert", help="Push this expert alone, as a standalone PEFT adapter repo."
    ),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to commit to (default: main)."),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
) -> None:
    """Upload an expert (as a PEFT adapter repo) or the whole library to the Hugging Face Hub.

    A library push uploads moerge-library.json, experts/ and artifacts/ (never the catalog) and mirrors the
    library: what is no longer in it is deleted from the repo. The token comes from `hf auth login` or HF_TOKEN."""
    from moerge.experts.hub import push as push_to_hub
    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.open(library)
    url = push_to_hub(lib, repo_id, expert, private=private, message=message, revision=revision)
    what = f"expert [bold]{expert}[/]" if expert else f"library {lib.url} ({len(lib)} experts)"
    console.print(f"pushed {what} to {repo_id}: {url}", highlight=False)


@library_app.command("pull")
def pull(
    repo: str = typer.Argument(
        ..., help="Hub repo id org/name[@revision] holding a moerge library (or an adapter)."
    ),
    library: str = typer.Argument(
        ..., help="Local library folder (created with the remote's base when absent)."
    ),
    expert: str | None = typer.Option(None, "--expert", help="Pull only this expert."),
    overwrite: bool = typer.Option(False, help="Replace experts of the same name."),
) -> None:
    """Add the experts of a Hub library (all, or --expert NAME) to a local library.

    What comes from the Hub is checked like a local library (safe paths, strict JSON, checksums, loadable
    weights, base model) before anything is added. HF_HUB_OFFLINE=1 reads the Hub cache (HF_HUB_CACHE) only."""
    from moerge.errors import UsageError
    from moerge.experts.hub import parse_hub_ref
    from moerge.experts.hub import pull as pull_from_hub

    ref = parse_hub_ref(repo)
    if ref is None:
        raise UsageError(f"{repo!r} is not a Hub repo id: give org/name or org/name@revision.")
    added = pull_from_hub(ref, library, expert, overwrite=overwrite)
    for md in added:
        console.print(f"added [bold]{md.name}[/] ({md.kind}, task={md.task}) from {md.extra.get('source')}")
