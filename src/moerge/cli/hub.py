"""``moerge library push`` / ``moerge library pull``: experts and libraries to and from the Hugging Face Hub, or
between two libraries at any fsspec URL (a local folder, another machine's path, an object store): only the
missing experts are copied, checksums verified, and a killed copy resumes when rerun (`moerge.experts.sync`).

Kept apart from ``cli/library.py`` (it adds its commands to the same ``library`` group); ``moerge library add``
takes a Hub repo id itself."""

from __future__ import annotations

import contextlib

import typer

from moerge.cli.common import console
from moerge.cli.library import library_app


def register(app: typer.Typer) -> None:
    """The commands below join the ``library`` group when this module is imported; nothing else to add."""


@library_app.command("push")
def push(
    library: str = typer.Argument(..., help="Library folder or URL."),
    repo_id: str = typer.Argument(
        ...,
        help="Hub repo id (org/name; created if absent), or a library URL or path (scheme://…, /…, ./…): "
        "a library there receives the missing experts.",
    ),
    expert: str | None = typer.Option(
        None, "--expert", help="Push this expert alone, as a standalone PEFT adapter repo."
    ),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to commit to (default: main)."),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="URL targets: replace experts of the same name but other contents."
    ),
) -> None:
    """Upload an expert (as a PEFT adapter repo) or the whole library to the Hugging Face Hub.

    A library push uploads moerge-library.json, experts/ and artifacts/ (never the catalog) and mirrors the
    library: what is no longer in it is deleted from the repo. The token comes from `hf auth login` or HF_TOKEN.

    To a library URL or path: the experts the library there lacks are copied (it is created with this
    library's base when absent), checksums verified; rerun after an interruption to finish."""
    from moerge.experts.sync import is_url

    if is_url(repo_id):
        from moerge.errors import UsageError
        from moerge.experts.sync import push as push_to_url

        if private or revision or message:
            raise UsageError("--private, --revision and --message are for Hub repos, not URLs")
        with _ticks(f"pushing to {repo_id}") as tick:
            report = push_to_url(
                library, repo_id, [expert] if expert else None, overwrite=overwrite, on_expert=tick
            )
        _report(report)
        return
    from moerge.experts.hub import push as push_to_hub
    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.open(library)
    url = push_to_hub(lib, repo_id, expert, private=private, message=message, revision=revision)
    what = f"expert [bold]{expert}[/]" if expert else f"library {lib.url} ({len(lib)} experts)"
    console.print(f"pushed {what} to {repo_id}: {url}", highlight=False)


@library_app.command("pull")
def pull(
    repo: str = typer.Argument(
        ...,
        help="Hub repo id org/name[@revision] holding a moerge library (or an adapter), or a library URL or "
        "path (scheme://…, /…, ./…).",
    ),
    library: str = typer.Argument(
        ..., help="Local library folder (created with the remote's base when absent)."
    ),
    expert: str | None = typer.Option(None, "--expert", help="Pull only this expert."),
    overwrite: bool = typer.Option(False, help="Replace experts of the same name."),
) -> None:
    """Add the experts of a Hub library (all, or --expert NAME) to a local library.

    What comes from the Hub is checked like a local library (safe paths, strict JSON, checksums, loadable
    weights, base model) before anything is added. HF_HUB_OFFLINE=1 reads the Hub cache (HF_HUB_CACHE) only.
    From a URL or path: the experts the local library lacks are copied; rerun after an interruption to finish."""
    from moerge.errors import UsageError
    from moerge.experts.sync import is_url

    if is_url(repo):
        from moerge.experts.sync import pull as pull_from_url

        with _ticks(f"pulling from {repo}") as tick:
            report = pull_from_url(
                repo, library, [expert] if expert else None, overwrite=overwrite, on_expert=tick
            )
        _report(report)
        return
    from moerge.experts.hub import parse_hub_ref
    from moerge.experts.hub import pull as pull_from_hub

    ref = parse_hub_ref(repo)
    if ref is None:
        raise UsageError(f"{repo!r} is not a Hub repo id: give org/name or org/name@revision.")
    added = pull_from_hub(ref, library, expert, overwrite=overwrite)
    for md in added:
        console.print(f"added [bold]{md.name}[/] ({md.kind}, task={md.task}) from {md.extra.get('source')}")


@contextlib.contextmanager
def _ticks(what: str):
    """A status line naming each expert as it is done (on a terminal; nothing in a log)."""
    from moerge.progress import status

    done = 0
    with status(what) as update:

        def on_expert(name: str, state: str) -> None:
            nonlocal done
            done += 1
            update(
                f"{what}: {done} experts done ({name}: {'already there' if state == 'present' else 'copied'})"
            )

        yield on_expert


def _report(report) -> None:
    copied = len(report.copied) + len(report.repaired)
    console.print(
        f"{report.source} → {report.destination}: {copied} experts copied"
        + (f" ({len(report.repaired)} broken copies replaced)" if report.repaired else "")
        + f", {len(report.present)} already there, {report.artifacts} artifact files copied",
        highlight=False,
    )
    if report.conflicts:
        console.print(
            f"left alone (same name, other contents; --overwrite replaces them): {', '.join(report.conflicts)}",
            highlight=False,
        )
