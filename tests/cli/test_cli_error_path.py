"""One CLI error path for every command: usage errors exit 2 with click's usage message, errors exit 1 with one
``error:`` line, nothing prints a traceback unless ``--debug`` (or MOERGE_DEBUG=1) asks for it. The commands are
enumerated from the app itself, so a new command is covered the day it is registered."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer.main

from moerge.cli import app
from moerge.cli.common import run_app

COMMAND = typer.main.get_command(app)
# Commands that do real work without arguments (the demo and the benchmark run; `recipes` prints its table).
RUNS_WITHOUT_ARGUMENTS = {("demo",), ("bench",), ("recipes",)}


def walk(group, path=()):
    for name, sub in sorted(group.commands.items()):
        if hasattr(sub, "commands"):
            yield (*path, name), sub, True
            yield from walk(sub, (*path, name))
        else:
            yield (*path, name), sub, False


LEAVES = [(path, cmd) for path, cmd, is_group in walk(COMMAND) if not is_group]
GROUPS = [(path, cmd) for path, cmd, is_group in walk(COMMAND) if is_group]
ids = [" ".join(p) for p, _ in LEAVES]


def numeric_options(cmd) -> list:
    return [
        p
        for p in cmd.params
        if p.param_type_name == "option" and p.type_descriptor.annotation in (int, float)
    ]


NEEDS_ARGUMENTS = [(p, c) for p, c in LEAVES if p not in RUNS_WITHOUT_ARGUMENTS]
WITH_NUMBERS = [(p, c) for p, c in LEAVES if numeric_options(c)]


def run(capsys, args, env=None, monkeypatch=None):
    if env and monkeypatch:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    code = run_app(app, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def required_args(cmd) -> list[str]:
    """Placeholder values for a command's required arguments and options (paths that do not exist)."""
    args = []
    for p in cmd.params:
        if not p.required:
            continue
        value = f"/nonexistent/moerge-{p.name}"
        args += [value] if p.param_type_name == "argument" else [p.opts[0], value]
    return args


def assert_usage_error(code, err, path):
    assert code == 2, err
    assert "Traceback" not in err
    assert f"Usage: moerge {' '.join(path)}".rstrip() in err, err
    assert "Error:" in err or "Commands" in err or "Options" in err


@pytest.mark.parametrize("path, cmd", LEAVES, ids=ids)
def test_unknown_option_is_a_usage_error(capsys, path, cmd):
    code, _, err = run(capsys, [*path, *required_args(cmd), "--no-such-option"])
    assert_usage_error(code, err, path)
    assert "No such option: --no-such-option" in err


@pytest.mark.parametrize("path, cmd", NEEDS_ARGUMENTS, ids=[" ".join(p) for p, _ in NEEDS_ARGUMENTS])
def test_no_arguments(capsys, path, cmd):
    code, _, err = run(capsys, list(path))
    if any(p.required for p in cmd.params):
        assert_usage_error(code, err, path)
        assert "Missing" in err
    else:  # no required parameter, but nothing to do: a usage error of moerge's own
        assert code == 2 and err.startswith("error:") and "Traceback" not in err


@pytest.mark.parametrize("path, cmd", WITH_NUMBERS, ids=[" ".join(p) for p, _ in WITH_NUMBERS])
def test_bad_option_values_are_usage_errors(capsys, path, cmd):
    for p in numeric_options(cmd):
        code, _, err = run(capsys, [*path, *required_args(cmd), p.opts[0], "not-a-number"])
        assert_usage_error(code, err, path)
        assert f"Invalid value for '{p.opts[0]}'" in err


@pytest.mark.parametrize(
    "path", [(), *[p for p, _ in GROUPS]], ids=["moerge", *[" ".join(p) for p, _ in GROUPS]]
)
def test_group_without_a_command_is_a_usage_error(capsys, path):
    code, out, err = run(capsys, list(path))  # click prints the help (rich formats it on stdout)
    assert (
        code == 2 and "Traceback" not in out + err and f"Usage: moerge {' '.join(path)}".rstrip() in out + err
    )


def test_every_command_is_covered():
    assert {" ".join(p) for p, _ in LEAVES} >= {
        "library add",
        "library verify",
        "merge",
        "train",
        "bench",
        "demo",
    }
    assert len(WITH_NUMBERS) >= 3 and len(NEEDS_ARGUMENTS) >= len(LEAVES) - len(RUNS_WITHOUT_ARGUMENTS)


def test_unknown_command_is_a_usage_error(capsys):
    code, _, err = run(capsys, ["frobnicate"])
    assert code == 2 and "No such command 'frobnicate'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["library", "list", "/nonexistent/lib"],
        ["library", "show", "/nonexistent/lib", "x"],
        ["library", "verify", "/nonexistent/lib"],
        ["library", "add", "/nonexistent/lib", "/nonexistent/adapter"],
        ["library", "export", "/nonexistent/lib", "x", "/nonexistent/out"],
        ["library", "rm", "/nonexistent/lib", "x"],
        ["library", "rename", "/nonexistent/lib", "a", "b"],
        ["merge", "/nonexistent/merge.yaml", "/nonexistent/out"],
        ["train", "--base", "/nonexistent/base", "--data", "x.jsonl", "--library", "lib", "--name", "n"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_errors_are_one_line_with_exit_status_1(capsys, args):
    code, _, err = run(capsys, args)
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/nonexistent/" in lines[0], err


def test_library_errors_say_what_to_do(capsys, tmp_path):
    code, _, err = run(capsys, ["library", "list", str(tmp_path / "nolib")])
    assert code == 1 and "create one with `moerge library init" in err


def test_verify_of_a_damaged_library_exits_1(capsys, tmp_path):
    """`typer.Exit(1)` used to exit 0: CI would have taken a damaged library for a sound one."""
    import torch

    from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add(
        Expert(ExpertMetadata(name="a"), lora={"m.q": LoraModule(torch.ones(1, 2), torch.ones(2, 1), 1.0)})
    )
    assert run(capsys, ["library", "verify", str(tmp_path / "lib")])[0] == 0
    weights = next((tmp_path / "lib" / "experts").iterdir()) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    code, out, err = run(capsys, ["library", "verify", str(tmp_path / "lib")])
    assert code == 1 and "does not match its checksum" in out and err.startswith("error:")


def test_a_bug_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    from moerge.experts import library

    def broken(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(library.ExpertLibrary, "open", broken)
    code, _, err = run(capsys, ["library", "list", "x"])
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: internal error (ZeroDivisionError: division by zero); this is a bug")
    assert "--debug" in err and "MOERGE_DEBUG=1" in err
    for args, env in ((["--debug", "library", "list", "x"], {}), (["library", "list", "x", "--debug"], {}),
                      (["library", "list", "x"], {"MOERGE_DEBUG": "1"})):  # fmt: skip
        code, _, err = run(capsys, args, env, monkeypatch)
        assert code == 1 and "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
        monkeypatch.delenv("MOERGE_DEBUG", raising=False)


def test_moerge_errors_show_their_traceback_only_with_debug(capsys, monkeypatch):
    code, _, err = run(capsys, ["library", "list", "/nonexistent/lib"])
    assert code == 1 and "Traceback" not in err
    code, _, err = run(capsys, ["--debug", "library", "list", "/nonexistent/lib"])
    assert (
        code == 1
        and "Traceback" in err
        and "LibraryError" in err
        and err.strip().splitlines()[-1].startswith("error:")
    )


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, ["--help"])
    assert code == 0 and "--debug" in out and "library" in out


WITHOUT_TORCH = """
import sys
from moerge.cli import main
sys.argv = ["moerge", *sys.argv[1:]]
try:
    main()
except SystemExit:
    print("TORCH" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
    raise
"""


def test_real_process_exit_statuses_and_no_torch_for_help_and_list(tmp_path):
    """In real processes: the exit statuses a shell sees; `moerge --help` and `moerge library list` do not import
    torch. (Exit status 1 in a real process: tests/experts/test_bad_input.py.)"""
    import torch

    from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add(
        Expert(ExpertMetadata(name="a"), lora={"m.q": LoraModule(torch.ones(1, 2), torch.ones(2, 1), 1.0)})
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for args, shown in (
        (["--help"], "Usage: moerge"),
        (["library", "list", str(tmp_path / "lib"), "--json"], '"a"'),
    ):
        proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], capture_output=True, text=True, env=env,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0 and shown in proc.stdout, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "NO-TORCH", args
    proc = subprocess.run([sys.executable, "-m", "moerge", "library", "add"], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Missing argument" in proc.stderr and "Traceback" not in proc.stderr
