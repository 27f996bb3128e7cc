"""`--executor ray` gives the same results as the local executor — training experts from a manifest, computing
signatures, running the benchmark's recipes — on a local Ray instance (``ray.init(num_cpus=2)``); without Ray
the error says how to install it."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from moerge.errors import MalformedConfigError
from moerge.executor import ExecutorError, LocalExecutor, get_executor


def square(x: int) -> int:
    return x * x


def add(x: int, shared: int) -> int:
    return x + shared


def test_local_executor_maps_in_order_and_reports_each():
    seen = []
    assert LocalExecutor().map(square, [3, 1, 2], on_done=lambda i, r: seen.append((i, r))) == [9, 1, 4]
    assert seen == [(0, 9), (1, 1), (2, 4)]
    assert LocalExecutor().map(add, [1, 2], shared=10) == [11, 12]


def test_ray_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ExecutorError, match="pip install 'moerge\\[ray\\]'"):
        get_executor("ray")


def test_a_bad_manifest_names_the_line(tmp_path):
    from moerge.train.manifest import read_manifest

    (tmp_path / "m.jsonl").write_text('{"name": "a", "data": "a.jsonl"}\n{"name": "b"}\n')
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(MalformedConfigError, match=r"m.jsonl:2: data: Field required"):
        read_manifest(tmp_path / "m.jsonl")


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_trains_a_manifest_like_the_local_executor(ray_instance, tiny_llama_dir, tmp_path):
    from moerge.experts.library import ExpertLibrary
    from moerge.train.manifest import train_manifest

    for task, text in (("a", "abab cdcd"), ("b", "xyzzy zyx")):
        (tmp_path / f"{task}.jsonl").write_text(
            "".join(json.dumps({"text": f"{text} {i}"}) + "\n" for i in range(8))
        )
    (tmp_path / "tasks.jsonl").write_text(
        json.dumps({"name": "ea", "data": "a.jsonl", "task": "a"}) + "\n"
        + json.dumps({"name": "eb", "data": "b.jsonl", "task": "b", "config": {"rank": 2}}) + "\n"
    )  # fmt: skip
    shared = {"steps": 3, "batch_size": 4, "seq_len": 16}
    libs = {}
    for executor in ("local", "ray"):
        libs[executor] = ExpertLibrary.create(tmp_path / executor)
        added = train_manifest(str(tiny_llama_dir), tmp_path / "tasks.jsonl", libs[executor], shared,
                               executor=executor)  # fmt: skip
        assert sorted(md.name for md in added) == ["ea", "eb"]
    for name in ("ea", "eb"):
        local, remote = libs["local"].get(name), libs["ray"].get(name)
        assert sorted(local.lora) == sorted(remote.lora)
        for module, lm in local.lora.items():
            torch.testing.assert_close(remote.lora[module].A, lm.A, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(remote.lora[module].B, lm.B, rtol=1e-5, atol=1e-6)
    assert libs["ray"].get("eb").lora[next(iter(libs["ray"].get("eb").lora))].rank == 2
    # a rerun finds every expert there and trains nothing
    assert (
        train_manifest(str(tiny_llama_dir), tmp_path / "tasks.jsonl", libs["ray"], shared, executor="ray")
        == []
    )


def test_ray_computes_signatures_like_the_local_executor(ray_instance, reduced_suite, tmp_path):
    from moerge.experts.library import ExpertLibrary
    from moerge.recipes.facade import prepare_signatures

    model, tok = reduced_suite.load_base()
    lib_src = reduced_suite.open_library()
    names = lib_src.names()[:3]
    data = {n: [{"text": f"example {i} for {n}"} for i in range(6)] for n in names}
    got = {}
    for executor in ("local", "ray"):
        folder = tmp_path / executor
        shutil.copytree(lib_src.storage.local_path(""), folder)
        lib = ExpertLibrary.open(folder)
        lines = prepare_signatures("embedding_centroids", model, tok, lib, data, experts=names, executor=executor,
                                   embedding_model="base")  # fmt: skip
        assert lines, "something was computed"
        got[executor] = {(k, h, e) for k, h, e in lib.list_artifacts() if e in names}
        got[executor + "_lib"] = lib
    assert got["local"] == got["ray"] and got["local"]
    for kind, digest, owner in got["local"]:
        a = got["local_lib"].storage.read_bytes(f"artifacts/{kind}/{digest}/{owner}.safetensors")
        b = got["ray_lib"].storage.read_bytes(f"artifacts/{kind}/{digest}/{owner}.safetensors")
        assert a == b, f"{kind} of {owner} differs"


def test_ray_runs_the_benchmarks_recipes_like_the_local_executor(ray_instance, reduced_suite, tmp_path):
    from moerge.bench.config import BenchConfig
    from moerge.bench.runner import run_bench

    model, tok = reduced_suite.load_base()
    results = {}
    for executor in ("local", "ray"):
        config = BenchConfig(recipes=["uniform", "arrow"], baselines=["base", "oracle"], limit=4, batch_size=8,
                             progress=False, premise=False, executor=executor,
                             artifacts_dir=str(tmp_path / f"art-{executor}"))  # fmt: skip
        results[executor] = run_bench(reduced_suite, config, model=model, tokenizer=tok)
    by = {e: {(r.method, r.task): r for r in res.results} for e, res in results.items()}
    assert by["local"].keys() == by["ray"].keys()
    assert {m for m, _ in by["ray"]} == {"base", "oracle", "uniform", "arrow"}
    for key, r in by["local"].items():
        other = by["ray"][key]
        assert other.status == r.status
        assert other.score == pytest.approx(r.score, abs=1e-6), key
        if r.normalized is None:
            assert other.normalized is None, key
        else:
            assert other.normalized == pytest.approx(r.normalized, abs=1e-6), key
