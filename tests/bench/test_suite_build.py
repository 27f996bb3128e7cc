"""Building a suite: the build's lock, its partial folder kept and resumed after an interruption, its stages on
stderr, and the synthetic suite built again after being killed partway: the same files and weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from moerge.bench.suites import build as suite_build
from moerge.bench.suites.build import BuildSteps, build_cached, lock_file, partial_folder
from moerge.bench.suites.format import Example, Suite, Task, write_jsonl_suite


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_small_suite(out: Path, note: str = "") -> None:
    task = Task(name="t", split="held_out", metric="nll", eval=[Example(text="ab", targets=[(0, 2)])])
    write_jsonl_suite(Suite(name="small", tasks=[task]), out)
    (out / "build.json").write_text(json.dumps({"note": note}))


class Stop(BaseException):
    """An interruption (as Ctrl-C is) raised inside a build."""


def test_interrupted_build_is_kept_reported_and_resumed(tmp_path, capfd):
    folder = tmp_path / "small-1"
    calls: list[list[str]] = []

    def build(out: Path, steps: BuildSteps) -> None:
        done = []
        for name in ("one", "two", "three"):
            value = steps.run(
                name, "work", f"unit {name}", lambda name=name: done.append(name) or name.upper()
            )
            assert value == name.upper()  # a recorded unit gives back its recorded value
            if name == "two" and not calls:
                calls.append(done)
                raise Stop
        calls.append(done)
        write_small_suite(out, note=",".join(steps.earlier))

    with pytest.raises(Stop):
        build_cached(folder, build)
    err = capfd.readouterr().err
    assert f"kept in {partial_folder(folder)}" in err and "--rebuild starts over" in err
    assert "unit one" in err and "unit two" in err  # a line per unit on a piped stderr
    assert not folder.exists() and not lock_file(folder).exists()
    assert sorted(p.name for p in (partial_folder(folder) / ".steps").iterdir()) == ["one.json", "two.json"]

    suite = build_cached(folder, build)  # resumes: only the unit not recorded runs
    err = capfd.readouterr().err
    assert calls == [["one", "two"], ["three"]] and "resuming the interrupted build" in err
    assert json.loads((folder / "build.json").read_text())["note"] == "one,two"
    assert suite.root == str(folder) and not partial_folder(folder).exists()
    assert not (folder / ".steps").exists() and not lock_file(folder).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small-1"]  # nothing else left behind

    build_cached(folder, build, force=True)  # --rebuild: from scratch, the old build replaced when done
    assert (
        calls[-1] == ["one", "two", "three"] and json.loads((folder / "build.json").read_text())["note"] == ""
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small-1"]


def test_a_second_builder_waits_for_the_first_and_loads_its_suite(tmp_path, capfd):
    import fcntl

    folder = tmp_path / "small-2"
    fd = os.open(lock_file(folder), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # this process is "building"
    os.write(fd, b"4242\n")
    built = []
    got = []
    waiter = threading.Thread(
        target=lambda: got.append(build_cached(folder, lambda out, steps: built.append(out)))
    )
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and not got
    write_small_suite(folder)  # the first builder finishes
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    waiter.join(10)
    assert got and got[0].root == str(folder) and built == []  # loaded, not built again
    assert "waiting for process 4242, which is building this suite" in capfd.readouterr().err


def test_dead_processes_staging_folders_are_removed(tmp_path):
    dead, alive = (
        tmp_path / f".synthetic-abc.{dead_pid()}.tmp",
        tmp_path / f".synthetic-abc.{os.getpid()}.tmp",
    )
    other = tmp_path / ".notes.tmp"
    for p in (dead, alive, other):
        p.mkdir()
    assert suite_build.remove_dead_staging(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and other.exists()


def test_synthetic_build_killed_partway_resumes_to_the_same_suite(
    reduced_config, reduced_suite, tmp_path, monkeypatch, capfd
):
    """Killed (no clean-up runs) after its third expert, the build resumes: the stale lock is taken over, only
    the missing experts and the multitask LoRA are trained, and the suite is what the uninterrupted build
    (`reduced_suite`) made: the same files, base, expert and gate weights, and build.json but for timings."""
    from safetensors.torch import load_file

    from moerge.train import lora
    from moerge.train.gates import GATES_KIND, gates_config

    script = (
        "import os, sys\n"
        "from moerge.bench.suites import synthetic\n"
        "from moerge.train import lora\n"
        "real, n = lora.train_expert, []\n"
        "def dying(*a, **k):\n"
        "    if len(n) == 3: os._exit(9)\n"
        "    n.append(1)\n"
        "    return real(*a, **k)\n"
        "lora.train_expert = dying\n"
        "config = synthetic.SyntheticSuiteConfig.model_validate_json(sys.argv[1])\n"
        "synthetic.build_synthetic_suite(config, root=sys.argv[2])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen(
        [sys.executable, "-c", script, reduced_config.model_dump_json(), str(tmp_path)], env=env
    )
    killed.wait(600)
    assert killed.returncode == 9
    folder = Path(reduced_suite.root).name
    lock = lock_file(tmp_path / folder)
    assert lock.read_text().strip() == str(killed.pid)  # left by the dead process
    assert not (tmp_path / folder).exists() and partial_folder(tmp_path / folder).is_dir()

    trained = []
    real = lora.train_expert
    monkeypatch.setattr(lora, "train_expert", lambda *a, **k: trained.append(k["name"]) or real(*a, **k))
    capfd.readouterr()
    again = synthetic_build(reduced_config.model_copy(update={"progress": True}), tmp_path)
    err = capfd.readouterr().err
    held_in = reduced_suite.experts
    assert trained == held_in[3:] + ["multitask"]  # the three experts done before are not trained again
    assert "resuming the interrupted build" in err
    for i, name in enumerate(held_in[3:], start=4):  # one line per expert, not per step
        assert f"expert {i}/{len(held_in)} {name}" in err
    assert f"phatgoose_gates 8/{len(held_in)}" in err and "premise diagnostics" in err
    assert len(err.splitlines()) < 40

    a, b = Path(reduced_suite.root), Path(again.root)
    assert a.name == b.name and a != b and not lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]  # no partial or staging folder left
    for rel in ["suite.yaml", "pretrain.jsonl"] + sorted(
        str(p.relative_to(a)) for p in (a / "tasks").glob("*")
    ):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    wa, wb = (
        load_file(str(a / "base" / "model.safetensors")),
        load_file(str(b / "base" / "model.safetensors")),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for kind in ("library", "baselines"):
        la, lb = (
            type(reduced_suite.open_library()).open(a / kind),
            type(reduced_suite.open_library()).open(b / kind),
        )
        assert la.names() == lb.names()
        for name in la.names():
            ea, eb = la.get(name), lb.get(name)
            for m in ea.lora:
                assert torch.equal(ea.lora[m].A, eb.lora[m].A) and torch.equal(ea.lora[m].B, eb.lora[m].B)
            if kind == "library":
                ga = la.get_artifact(GATES_KIND, gates_config(reduced_config.gate_steps), name)[0]
                gb = lb.get_artifact(GATES_KIND, gates_config(reduced_config.gate_steps), name)[0]
                assert all(torch.equal(ga[k], gb[k]) for k in ga)
    ja, jb = (json.loads((f / "build.json").read_text()) for f in (a, b))
    assert (
        jb["resumed"] == sorted(["expert-" + n for n in held_in[:3]] + ["pretrain"]) and ja["resumed"] == []
    )
    assert set(jb["timings_s"]) == set(ja["timings_s"]) and jb["timings_s"]["experts"] > 0
    for j in (ja, jb):
        for key in ("timings_s", "cpu_s", "resumed", "config"):
            j.pop(key)
        for training in [*j["experts"].values(), j["multitask"]]:
            for key in ("seconds", "tokens_per_second"):  # the training's own timing
                training.pop(key, None)
    assert ja == jb


def synthetic_build(config, root):
    from moerge.bench.suites.synthetic import build_synthetic_suite

    return build_synthetic_suite(config, root=root)
