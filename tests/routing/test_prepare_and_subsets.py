"""Routing artifacts from the command line and routing over a named subset of a library's experts:

- ``moerge library prepare`` stores what the signature functions compute when called directly (gate training,
  centroids, Arrow prototypes), and refuses, before computing anything, experts given no data;
- ``experts=`` / ``--experts`` routes exactly as a library holding only those experts does, also when the
  library holds another expert (a merged one) without the recipe's artifacts;
- artifacts kept outside a library (`ArtifactOverlay`) never touch it and go stale with a replaced expert."""

from __future__ import annotations

import json

import pytest
import torch
from _routing_helpers import make_experts, task_texts

from moerge.cli import app
from moerge.cli.common import run_app
from moerge.errors import RecipeNotApplicableError
from moerge.experts.library import ExpertLibrary
from moerge.recipes.facade import attach, detach, prepare_signatures
from moerge.train.lora import load_base

GATE_STEPS = 2


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = run_app(app, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def folder_digest(root) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (what "the library was not modified" compares), but SQLite's
    shared-memory index, which any reader of the catalog rewrites."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith("-shm")}  # fmt: skip


def new_library(path, base_dir, experts) -> ExpertLibrary:
    lib = ExpertLibrary.create(path, base_model=str(base_dir))
    for e in experts:
        lib.add(e)
    return lib


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """The saved tiny Llama, three experts on it (tasks task0..2) and a JSONL training file per task."""
    model, tok, _, _ = load_base(tiny_llama_dir)
    model.eval()
    experts = make_experts(model, 3, ranks=(4,), seed=21, scale=0.3)
    folder = tmp_path_factory.mktemp("prepare")
    files = {}
    for i in range(3):
        rows = [{"prompt": t[:6], "completion": t[6:]} for t in task_texts(f"task{i}", 8, seed=i)]
        files[f"task{i}"] = folder / f"task{i}.jsonl"
        files[f"task{i}"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, tok, experts, files, folder


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- library prepare
def test_library_prepare_stores_what_the_signature_functions_compute(setup, tiny_llama_dir, capsys, tmp_path):
    from moerge.routing.embedding import default_embedder
    from moerge.train.gates import GATES_KIND, GateTrainConfig, gates_config, train_phatgoose_gates
    from moerge.transforms import arrow, centroids

    model, tok, experts, files, _ = setup
    lib = new_library(tmp_path / "lib", tiny_llama_dir, experts)
    # data by expert name, and by task (expert1's metadata task is task1)
    code, out, err = cli(capsys, "library", "prepare", lib.url, "--recipe", "phatgoose", "-o",
                         f"gate_steps={GATE_STEPS}", "--data", f"expert0={files['task0']}",
                         "--data", f"task1={files['task1']}", "--data", f"expert2={files['task2']}",
                         "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "phatgoose_gates for 3 experts" in out
    code, out, err = cli(capsys, "library", "prepare", lib.url, "--recipe", "average_activation",
                         "--recipe", "embedding_centroids:embedding_model=base", "--recipe", "arrow",
                         *[a for i in range(3) for a in ("--data", f"task{i}={files[f'task{i}']}")],
                         "--no-progress")  # fmt: skip
    assert code == 0, err
    embedder = default_embedder(model, tok, choice="base")
    for i, e in enumerate(experts):
        rows = read_rows(files[f"task{i}"])
        gates = train_phatgoose_gates(model, tok, e, rows, GateTrainConfig(steps=GATE_STEPS))
        stored, _ = lib.get_artifact(GATES_KIND, gates_config(GATE_STEPS), e.name)
        assert set(stored) == set(gates)
        for m in gates:
            torch.testing.assert_close(stored[m], gates[m], rtol=1e-5, atol=1e-6)
        texts = [centroids.row_text(r) for r in rows]
        cents = centroids.compute_hidden_centroids(model, tok, {e.name: texts}, experts=[e])[e.name]
        stored, _ = lib.get_artifact(centroids.HIDDEN_KIND, centroids.HIDDEN_CONFIG, e.name)
        for m in cents:
            torch.testing.assert_close(stored[m], cents[m], rtol=1e-5, atol=1e-6)
        emb = embedder.embed_texts([centroids.row_prompt(r) for r in rows]).float()
        stored, _ = lib.get_artifact(centroids.EMBED_KIND, centroids.embed_config(embedder.name), e.name)
        torch.testing.assert_close(stored["centroid"], emb.mean(0), rtol=1e-5, atol=1e-6)
        protos = arrow.expert_prototypes(e)
        stored, _ = lib.get_artifact(arrow.ARROW_KIND, arrow.ARROW_CONFIG, e.name)
        for m in protos:
            torch.testing.assert_close(stored[m], protos[m])
    # run again: everything is there, nothing is computed
    code, out, err = cli(capsys, "library", "prepare", lib.url, "--recipe", "phatgoose", "-o",
                         f"gate_steps={GATE_STEPS}", "--no-progress")  # fmt: skip
    assert code == 0 and "nothing to compute" in out, err


def test_library_prepare_refuses_experts_without_data(setup, tiny_llama_dir, capsys, tmp_path):
    _, _, experts, files, _ = setup
    lib = new_library(tmp_path / "lib", tiny_llama_dir, experts)
    before = folder_digest(tmp_path / "lib")
    code, out, err = cli(capsys, "library", "prepare", lib.url, "--recipe", "phatgoose",
                         "--data", f"expert0={files['task0']}", "--no-progress")  # fmt: skip
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert (
        "expert1, expert2" in err and "--data EXPERT_OR_TASK=FILE.jsonl" in err and "--experts expert0" in err
    )
    assert folder_digest(tmp_path / "lib") == before, "nothing was computed"
    # a key naming neither an expert nor a task is a usage error; so is a missing base
    code, _, err = cli(capsys, "library", "prepare", lib.url, "--recipe", "phatgoose",
                       "--data", f"nobody={files['task0']}")  # fmt: skip
    assert code == 2 and "no expert and no task named 'nobody'" in err
    bare = ExpertLibrary.create(tmp_path / "bare")
    bare.add(experts[0])
    code, _, err = cli(capsys, "library", "prepare", bare.url, "--recipe", "phatgoose",
                       "--data", f"expert0={files['task0']}")  # fmt: skip
    assert code == 1 and "--base FOLDER" in err


def test_preparing_reports_each_expert_and_each_gate_step(setup, tiny_llama_dir, tmp_path):
    from moerge.recipes.progress import SignatureProgress

    model, tok, experts, files, _ = setup
    lib = new_library(tmp_path / "lib", tiny_llama_dir, experts[:2])

    class Recorder(SignatureProgress):
        def __init__(self):
            self.events: list[tuple] = []

        def add(self, total):
            self.events.append(("add", total))

        def start(self, label):
            self.events.append(("start", label))

        def steps(self, done, total):
            self.events.append(("steps", done, total))

        def finish(self):
            self.events.append(("finish",))

    rec = Recorder()
    data = {e.name: read_rows(files[f"task{i}"]) for i, e in enumerate(experts[:2])}
    prepare_signatures("phatgoose", model, tok, lib, data, progress=rec, gate_steps=3)
    want = [("add", 2)]
    for e in experts[:2]:
        want += [("start", f"phatgoose_gates · {e.name}"), ("steps", 1, 3), ("steps", 2, 3), ("steps", 3, 3)]
        want += [("finish",)]
    assert rec.events == want


# ---------------------------------------------------------------------------------------------- subsets
@pytest.fixture(scope="module")
def libraries(setup, tiny_llama_dir, tmp_path_factory):
    """``full``: the three experts with their gates and centroids, plus ``merged`` (a fourth expert added later,
    without any artifact); ``sub``: a library holding only expert0 and expert2, with the same artifacts."""
    from moerge.experts.expert import Expert, ExpertMetadata

    model, tok, experts, files, _ = setup
    root = tmp_path_factory.mktemp("subsets")
    full = new_library(root / "full", tiny_llama_dir, experts)
    data = {e.name: read_rows(files[f"task{i}"]) for i, e in enumerate(experts)}
    for recipe, opts in (("phatgoose", {"gate_steps": GATE_STEPS}), ("average_activation", {})):
        prepare_signatures(recipe, model, tok, full, data, **opts)
    sub = new_library(root / "sub", tiny_llama_dir, [experts[0], experts[2]])
    for kind, h, name in full.list_artifacts():
        if name in sub:
            record = json.loads((root / "full" / "artifacts" / kind / h / f"{name}.json").read_text())
            tensors, info = full.get_artifact(kind, record["config"], name)
            sub.put_artifact(kind, record["config"], name, tensors, info)
    merged = make_experts(model, 1, ranks=(4,), seed=99, scale=0.3)[0]
    full.add(Expert(ExpertMetadata(name="merged", task="mixed"), lora=merged.lora))
    return full, sub


@pytest.mark.parametrize("recipe", ["phatgoose", "average_activation", "arrow"])
def test_a_subset_routes_as_a_library_of_only_those_experts(setup, libraries, recipe):
    """Logits routed over experts=[expert0, expert2] of the full library (which also holds a merged expert
    without artifacts) equal those of a library holding only the two."""
    import copy

    model, tok, _, _, _ = setup
    full, sub = libraries
    opts = {"gate_steps": GATE_STEPS} if recipe == "phatgoose" else {}
    ids = tok([task_texts("task0", 1, seed=7)[0], task_texts("task2", 1, seed=8)[0]], return_tensors="pt")
    want_model = attach(copy.deepcopy(model), sub, recipe, **opts)
    got_model = attach(copy.deepcopy(model), full, recipe, experts=["expert0", "expert2"], **opts)
    with torch.no_grad():
        want = want_model(**ids).logits
        got = got_model(**ids).logits
        base = model(**ids).logits
    assert not torch.allclose(want, base, atol=1e-4), "the experts change the output"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    detach(got_model)


def test_an_expert_without_artifacts_is_named_with_the_command_that_prepares_it(setup, libraries):
    import copy

    model, _, _, _, _ = setup
    full, _ = libraries
    with pytest.raises(RecipeNotApplicableError) as err:
        attach(copy.deepcopy(model), full, "phatgoose", gate_steps=GATE_STEPS)
    msg = str(err.value)
    assert "(merged)" in msg and "1 of 4" in msg
    assert f"moerge library prepare {full.url} --recipe phatgoose -o gate_steps={GATE_STEPS} " \
           "--data merged=FILE.jsonl" in msg  # fmt: skip
    assert "--experts expert0,expert1,expert2" in msg


def test_generate_experts_option_routes_over_the_subset(setup, libraries, tiny_llama_dir, capsys):
    full, sub = libraries
    prompt = task_texts("task2", 1, seed=5)[0][:8]
    args = ["generate", str(tiny_llama_dir), "--recipe", "phatgoose", "-o", f"gate_steps={GATE_STEPS}",
            "--prompt", prompt, "-n", "6", "--show-routing", "--top", "2"]  # fmt: skip
    code, want, err = cli(capsys, *args[:1], args[1], sub.url, *args[2:])
    assert code == 0, err
    code, got, err = cli(capsys, *args[:1], args[1], full.url, *args[2:], "--experts", "expert0,expert2")
    assert code == 0, err
    assert got == want and "expert2" in got and "expert1" not in got
    code, _, err = cli(capsys, *args[:1], args[1], full.url, *args[2:])
    assert code == 1 and len(err.strip().splitlines()) == 1 and "merged" in err and "library prepare" in err
    code, _, err = cli(capsys, *args[:1], args[1], full.url, *args[2:], "--experts", "expert0,nobody")
    assert code == 1 and "'nobody'" in err


# ---------------------------------------------------------------------------------------------- overlay
def test_artifacts_outside_the_library_leave_it_untouched_and_go_stale_with_the_expert(
    setup, tiny_llama_dir, tmp_path
):
    from moerge.experts.artifacts import ArtifactOverlay

    _, _, experts, _, _ = setup
    lib = new_library(tmp_path / "lib", tiny_llama_dir, experts[:2])
    lib.put_artifact("probe", {"v": 1}, "expert0", {"x": torch.ones(2)})
    before = folder_digest(tmp_path / "lib")
    overlay = ArtifactOverlay(lib, tmp_path / "cache")
    overlay.put_artifact("probe", {"v": 1}, "expert1", {"x": torch.full((2,), 3.0)})
    assert overlay.get_artifact("probe", {"v": 1}, "expert0")[0]["x"].tolist() == [1.0, 1.0]  # the library's
    assert overlay.get_artifact("probe", {"v": 1}, "expert1")[0]["x"].tolist() == [3.0, 3.0]  # the folder's
    assert not lib.has_artifact("probe", {"v": 1}, "expert1")
    assert folder_digest(tmp_path / "lib") == before
    lib.add(experts[0].__class__(experts[1].metadata, lora=experts[0].lora), overwrite=True)  # replaced
    assert not ArtifactOverlay(lib, tmp_path / "cache").has_artifact("probe", {"v": 1}, "expert1")
