"""Every code block of README.md and docs/*.md runs as written, so a page cannot drift from the code.

Each page runs in its own copy of a small workspace (below: tiny models, adapters, libraries and a suite folder
under the names the pages use as placeholders), in one fresh Python process, block by block in page order:

- ```python blocks are executed in one namespace per page;
- ```bash / ```sh / ```shell blocks run line by line (```console blocks: their ``$ `` lines): ``moerge …`` in
  the page's process through the CLI's own `run_app` (one torch import per page, not per command), anything else
  in bash; ``moerge`` and ``python`` are this environment's; a non-zero exit status fails the page. A command line must start with ``moerge``, ``python`` or
  ``./dev`` (after ``VAR=value`` assignments); anything else (``pip``, ``sudo``, ``.venv/bin/…``) needs a marker;
- other blocks (YAML, JSON, TOML, output) are not run; YAML blocks must parse.

A block that would be too slow or needs the network carries a marker on the line just above it, visible in
the page's source:

    <!-- doc-test: skip reason="why it cannot run here" -->
    <!-- doc-test: sub "OLD" "NEW" reason="why the cheaper form" -->   (text substitution before running; repeatable)
    <!-- doc-test: file PATH -->                                       (write the block to PATH; not run)

A marker without a reason, an unknown marker, or a ``sub`` whose OLD text is not in the block fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
COMMANDS = ("moerge", "python", "./dev")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*doc-test:(.*?)-->\s*$")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str  # python | shell | file | text
    path: str | None = None
    skip: str | None = None
    subs: list[tuple[str, str]] = field(default_factory=list)
    reason: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


class MarkerError(ValueError):
    pass


def parse_marker(text: str, where: str) -> dict:
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise MarkerError(f"{where}: unreadable doc-test marker ({e})") from None
    out: dict = {"subs": [], "skip": False, "file": None, "reason": None}
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t == "skip":
            out["skip"] = True
        elif t == "sub" and i + 2 < len(tokens):
            out["subs"].append((tokens[i + 1], tokens[i + 2]))
            i += 2
        elif t == "file" and i + 1 < len(tokens):
            out["file"] = tokens[i + 1]
            i += 1
        elif t.startswith("reason="):
            out["reason"] = t[len("reason=") :].strip()
        else:
            raise MarkerError(
                f"{where}: unknown doc-test marker token {t!r} (skip, sub OLD NEW, file PATH, reason=)"
            )
        i += 1
    if (out["skip"] or out["subs"]) and not out["reason"]:
        raise MarkerError(f'{where}: a doc-test skip or sub needs reason="…"')
    if out["skip"] and (out["subs"] or out["file"]):
        raise MarkerError(f"{where}: skip cannot be combined with sub or file")
    return out


def parse_page(path: Path) -> list[Block]:
    """The fenced code blocks of one Markdown page, with the marker (if any) on the line above each."""
    rel = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    pending: tuple[int, str] | None = None
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if m:
            if pending is not None:
                raise MarkerError(f"{rel}:{pending[0]}: doc-test marker not followed by a code block")
            pending = (i + 1, m.group(1))
            i += 1
            continue
        f = FENCE.match(lines[i])
        if not f:
            if lines[i].strip() and pending is not None:
                raise MarkerError(f"{rel}:{pending[0]}: doc-test marker not directly above a code block")
            i += 1
            continue
        fence, lang = f.group(1), f.group(2).lower()
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence[:3]):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        code = "\n".join(body) + "\n"
        block = Block(rel, start + 1, lang, code, "text")
        if lang == "console":
            block.code = "\n".join(ln[2:] for ln in body if ln.startswith("$ ")) + "\n"
            block.mode = "shell"
        elif lang in RUN_LANGS:
            block.mode = RUN_LANGS[lang]
        if pending is not None:
            mk = parse_marker(pending[1], f"{rel}:{pending[0]}")
            pending = None
            block.reason = mk["reason"]
            if mk["skip"]:
                block.skip = mk["reason"]
            block.subs = mk["subs"]
            if mk["file"]:
                block.mode, block.path = "file", mk["file"]
        blocks.append(block)
    if pending is not None:
        raise MarkerError(f"{rel}:{pending[0]}: doc-test marker not followed by a code block")
    return blocks


def command_words(code: str) -> list[str]:
    """The program each command line of a shell block starts (after ``VAR=value`` assignments)."""
    words = []
    for raw in code.replace("\\\n", " ").splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        toks = shlex.split(line, comments=True)
        while toks and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", toks[0]):
            toks = toks[1:]
        if toks:
            words.append(toks[0])
    return words


def prepared(block: Block) -> Block:
    """The block as it will run: substitutions applied, checked."""
    code = block.code
    for old, new in block.subs:
        if old not in code:
            raise MarkerError(f"{block.where}: doc-test sub {old!r} does not occur in the block")
        code = code.replace(old, new)
    out = Block(**{**asdict(block), "code": code})
    if out.mode == "shell" and not out.skip:
        bad = [w for w in command_words(code) if w not in COMMANDS]
        if bad:
            raise MarkerError(
                f"{block.where}: the block runs {bad[0]!r}; a doc command starts with moerge, python or ./dev, "
                "or the block needs a doc-test marker (skip or sub, with a reason)"
            )
    return out


# ------------------------------------------------------------------------------------------------ the runner
SHELL_SYNTAX = re.compile(r"[|<>;&`]|\$\(")


def shell_lines(code: str) -> list[str]:
    """The command lines of a shell block (continuations joined, comment-only lines dropped)."""
    lines = []
    for raw in code.replace("\\\n", " ").splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append(raw.strip())
    return lines


def run_shell_line(line: str, env: dict[str, str]) -> int:
    """One command: ``moerge …`` runs in this process (as the console script would: `run_app`), which saves
    an interpreter start and the torch import per command; anything else, or shell syntax, runs in bash."""
    toks = shlex.split(line, comments=True)
    assign = {}
    while toks and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", toks[0]):
        k, v = toks.pop(0).split("=", 1)
        assign[k] = v
    if toks and toks[0] == "moerge" and not SHELL_SYNTAX.search(line.split("#", 1)[0]):
        from moerge.cli import app
        from moerge.cli.common import run_app

        saved = {k: os.environ.get(k) for k in assign}
        os.environ.update(assign)
        try:
            return run_app(app, toks[1:])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", line], env=env).returncode


def run_blocks(spec_path: str) -> int:
    """In a fresh process (cwd: the page's workspace): run the blocks of one page in order; 1 on the first
    failure, naming the block."""
    spec = json.loads(Path(spec_path).read_text())
    ns: dict = {"__name__": "__doc__"}
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for b in spec["blocks"]:
        where = f"{b['page']}:{b['line']}"
        t0 = time.perf_counter()
        print(f"--- {where} ({b['mode']})", flush=True)
        try:
            if b["mode"] == "file":
                Path(b["path"]).parent.mkdir(parents=True, exist_ok=True)
                Path(b["path"]).write_text(b["code"])
            elif b["mode"] == "python":
                exec(compile(b["code"], where, "exec"), ns)
            elif b["mode"] == "shell":
                for line in shell_lines(b["code"]):
                    t1 = time.perf_counter()
                    rc = run_shell_line(line, env)
                    print(f"--- {time.perf_counter() - t1:.1f} s: {line}", flush=True)
                    if rc:
                        raise RuntimeError(f"exit status {rc}: {line}")
        except BaseException:
            traceback.print_exc()
            print(f"DOC BLOCK FAILED: {where}", flush=True)
            return 1
        print(f"--- {where} ok in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


# ------------------------------------------------------------------------------------------- the workspace
def random_lora_expert(model, name: str, task: str | None = None, seed: int = 0, rank: int = 4):
    """A LoRA expert on q/v/gate of ``model`` with random (non-zero) factors."""
    import torch

    from moerge.experts.expert import Expert, ExpertMetadata, LoraModule

    g = torch.Generator().manual_seed(seed)
    lora = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod_name.endswith(("q_proj", "v_proj", "gate_proj")):
            lora[mod_name] = LoraModule(
                A=torch.randn(rank, mod.in_features, generator=g) * 0.1,
                B=torch.randn(mod.out_features, rank, generator=g) * 0.1,
                alpha=2.0 * rank,
            )
    meta = ExpertMetadata(name=name, task=task, base_model="base-model", kind="lora")
    return Expert(metadata=meta, lora=lora)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_workspace(root: Path) -> Path:
    """The placeholders the pages name, small: models, adapters, libraries, configs, a suite folder."""
    import random

    import torch
    from safetensors.torch import load_file, save_file

    from moerge.backbones.tiny import build_tiny_model, save_tiny_model
    from moerge.experts.library import ExpertLibrary
    from moerge.experts.peft_io import write_peft_folder
    from moerge.transforms.centroids import compute_hidden_centroids

    ws = root / "workspace"
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(5)) for _ in range(40)]
    tiny = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0)  # trains in a blink
    base = save_tiny_model(ws / "base-model", **tiny)
    model, tokenizer = build_tiny_model(**tiny)
    shutil.copytree(base, ws / "base")
    sd = load_file(str(base / "model.safetensors"))
    for i in range(2):  # full fine-tunes for the merging examples
        shutil.copytree(base, ws / f"ft{i}")
        g = torch.Generator().manual_seed(100 + i)
        noisy = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
        save_file(noisy, str(ws / f"ft{i}" / "model.safetensors"), metadata={"format": "pt"})
    for cfg in ("merge", "ties"):
        (ws / f"{cfg}.yaml").write_text(
            "merge_method: ties\nbase_model: base\nmodels:\n  - {model: ft0, parameters: {weight: 1.0}}\n"
            "  - {model: ft1, parameters: {weight: 0.5}}\nparameters: {density: 0.5}\n"
        )
    (ws / "bench.yaml").write_text("recipes: [arrow]\nbaselines: [base, oracle]\nlimit: 2\n")
    (ws / "median.yaml").write_text("merge_method: median\nbase_model: base\nmodels: [ft0, ft1]\n")

    write_jsonl(ws / "task.jsonl", [{"prompt": w + ">", "completion": w[::-1]} for w in words])
    write_peft_folder(random_lora_expert(model, "peft-adapter", seed=1), ws / "path/to/peft-adapter")
    for j, n in enumerate(("alpha", "beta")):
        write_peft_folder(random_lora_expert(model, n, seed=2 + j), ws / "folder-of-adapters" / n)
    lib = ExpertLibrary.create(ws / "lib")
    for j, n in enumerate(("a", "b")):
        lib.add(random_lora_expert(model, n, task=n, seed=4 + j))
    lib = ExpertLibrary.create(
        ws / "my-lib"
    )  # docs/routing.md's, with the centroids average activation needs
    for j, (n, task) in enumerate((("qa_expert", "qa"), ("code_expert", "code"))):
        lib.add(random_lora_expert(model, n, task=task, seed=6 + j))
    compute_hidden_centroids(
        model, tokenizer, {"qa_expert": words[:8], "code_expert": words[8:16]}, library=lib
    )

    suite = ws / "my-suite"  # the folder docs/suites.md describes
    save_tiny_model(suite / "base", **tiny)
    lib = ExpertLibrary.create(suite / "library")
    lib.add(random_lora_expert(model, "reverse-lora", task="reverse", seed=8))
    lib.add(random_lora_expert(model, "upper-lora", task="upper", seed=9))
    write_jsonl(
        suite / "reverse.train.jsonl", [{"prompt": w + "=", "completion": w[::-1]} for w in words[:16]]
    )
    write_jsonl(
        suite / "reverse.eval.jsonl", [{"prompt": w + "=", "completion": w[::-1]} for w in words[16:20]]
    )
    write_jsonl(
        suite / "upper.eval.jsonl", [{"prompt": w + ":", "completion": w.upper()} for w in words[20:24]]
    )
    mixed = []
    for w, v in zip(words[24:28], words[28:32]):
        text = f"{w}={w[::-1]} {v}:{v.upper()}"
        a, b = len(w) + 1, len(w) * 2 + 1
        c = b + 1 + len(v) + 1
        mixed.append(
            {
                "text": text,
                "targets": [[a, b], [c, len(text)]],
                "routing": [
                    {"start": 0, "end": b, "experts": ["reverse-lora"]},
                    {"start": b + 1, "end": len(text), "experts": ["upper-lora"]},
                ],
            }
        )
    write_jsonl(suite / "mixed.eval.jsonl", mixed)
    write_jsonl(
        suite / "prose.eval.jsonl", [{"text": " ".join(words[32:36])}, {"text": " ".join(words[36:40])}]
    )
    (suite / "suite.yaml").write_text(
        "name: my-suite\nbase_model: base\nlibrary: library\ntasks:\n"
        "  - {name: reverse, split: held_in, expert: reverse-lora, train: reverse.train.jsonl, eval: reverse.eval.jsonl}\n"
        "  - {name: upper, split: held_in, expert: upper-lora, eval: upper.eval.jsonl}\n"
        "  - {name: mixed, split: held_out, condition: switching, experts: [reverse-lora, upper-lora], eval: mixed.eval.jsonl}\n"
        "  - {name: prose, split: held_out, condition: unrelated, metric: nll, eval: prose.eval.jsonl}\n"
    )
    return ws


@pytest.fixture(scope="session")
def doc_workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("docs"))


# ------------------------------------------------------------------------------------------------- the tests
def test_markers_are_read_and_checked():
    """The marker grammar itself: a skip needs a reason; a sub must match; unmarked foreign commands fail."""
    assert parse_marker('skip reason="slow"', "x")["skip"]
    assert parse_marker('sub "a b" "c" reason="r"', "x")["subs"] == [("a b", "c")]
    for bad in ("skip", 'sub "a" "b"', "frobnicate", 'skip file x reason="r"'):
        with pytest.raises(MarkerError):
            parse_marker(bad, "x")
    with pytest.raises(MarkerError, match="does not occur"):
        prepared(Block("p", 1, "bash", "moerge demo\n", "shell", subs=[("moerge bench", "x")], reason="r"))
    with pytest.raises(MarkerError, match="runs 'pip'"):
        prepared(Block("p", 1, "bash", "moerge --help\npip install x   # y\n", "shell"))
    assert command_words("A=1 B=2 moerge demo   # c\n# only a comment\n./dev test \\\n  -x\n") == [
        "moerge",
        "./dev",
    ]


def test_every_page_parses_and_marks_are_valid():
    blocks = [prepared(b) for page in PAGES for b in parse_page(page)]
    assert sum(b.mode == "python" for b in blocks) >= 8 and sum(b.mode == "shell" for b in blocks) >= 8
    import yaml

    for b in blocks:
        if b.lang == "yaml":
            list(
                yaml.safe_load_all(b.code)
            )  # every YAML example parses (multi-stage merges: several documents)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_code_blocks_run(page, doc_workspace, tmp_path):
    blocks = [prepared(b) for b in parse_page(page)]
    runnable = [asdict(b) for b in blocks if b.mode in ("python", "shell", "file") and not b.skip]
    if not runnable:
        pytest.skip(f"{page.name} has no code block to run")
    work = tmp_path / "work"
    shutil.copytree(doc_workspace, work)
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps({"blocks": runnable}))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MOERGE_DEBUG="1")
    proc = subprocess.run(
        [sys.executable, __file__, spec],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


if __name__ == "__main__":
    sys.exit(run_blocks(sys.argv[1]))
