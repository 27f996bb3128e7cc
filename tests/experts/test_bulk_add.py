"""`ExpertLibrary.add_many`: every expert lands or none does — on a refused expert, an error inside the
transaction, or a kill — with the checks of `add` (also between the experts of one batch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from library_helpers import make_expert

from moerge.errors import BaseModelMismatchError, ExpertExistsError, NonFiniteWeightsError, ShapeMismatchError
from moerge.experts.library import ExpertLibrary

HERE = Path(__file__).parent


def snapshot(lib):
    return {n: lib.get(n).lora["layer.q"].A.clone() for n in lib.names()}


def assert_unchanged(lib, before, root):
    again = ExpertLibrary.open(root)
    assert again.names() == sorted(before)
    for name, a in before.items():
        assert torch.equal(again.get(name).lora["layer.q"].A, a)
    assert not list((root / ".staging").glob("*")), "nothing staged is left behind"
    held = {p.name.rsplit("-", 1)[0] for p in (root / "experts").iterdir()}
    assert held == set(before), "no expert folder of the refused batch is left in experts/"


@pytest.fixture
def lib(tmp_path):
    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add(make_expert("keep", seed=0))
    lib.add(make_expert("old", seed=1))
    return lib


def test_add_many_lands_every_expert(lib):
    batch = [make_expert(f"b{i}", task=f"t{i % 2}", seed=10 + i) for i in range(5)]
    lib.add_many(batch)
    assert lib.names() == sorted(["keep", "old", *(e.name for e in batch)])
    for e in batch:
        got = lib.get(e.name)
        assert torch.equal(got.lora["layer.q"].A, e.lora["layer.q"].A)
        assert torch.equal(got.lora["layer.q"].B, e.lora["layer.q"].B)
    assert [m.name for m in lib.list(task="t1")] == ["b1", "b3"]
    assert lib.verify().ok and not lib.verify().leftovers


def nan_expert():
    e = make_expert("b3", seed=3, rank=2)
    e.lora["layer.q"].A[0, 0] = float("nan")
    return e


@pytest.mark.parametrize(
    "bad, error",
    [
        (nan_expert, NonFiniteWeightsError),
        (lambda: make_expert("b1", seed=9), ExpertExistsError),  # a name twice in one batch
        (lambda: make_expert("keep", seed=9), ExpertExistsError),  # a taken name without overwrite
        (lambda: make_expert("b3", seed=3, d_in=5), ShapeMismatchError),  # disagrees with b0's module
    ],
)
def test_a_refused_expert_refuses_the_batch(lib, tmp_path, bad, error):
    before = snapshot(lib)
    batch = [make_expert(f"b{i}", seed=10 + i) for i in range(3)]
    with pytest.raises(error):
        lib.add_many([*batch, bad()])
    assert_unchanged(lib, before, tmp_path / "lib")


def test_a_batch_of_two_bases_is_refused_by_a_library_without_one(tmp_path):
    lib = ExpertLibrary.create(tmp_path / "fresh")
    with pytest.raises(BaseModelMismatchError, match="same add"):
        lib.add_many([make_expert("a", fingerprint="sha256:one"), make_expert("b", fingerprint="sha256:two")])
    assert len(lib) == 0 and lib.base_fingerprint is None
    lib.add_many([make_expert("a", fingerprint="sha256:one"), make_expert("b", fingerprint="sha256:one")])
    assert ExpertLibrary.open(tmp_path / "fresh").base_fingerprint == "sha256:one"


def test_an_error_inside_the_transaction_rolls_everything_back(lib, tmp_path, monkeypatch):
    before = snapshot(lib)
    moved = []
    original = ExpertLibrary._move_into_place

    def move(self, staging, final):
        if len(moved) == 2:
            raise OSError("disk full (simulated)")
        original(self, staging, final)
        moved.append(final)

    monkeypatch.setattr(ExpertLibrary, "_move_into_place", move)
    replacement = make_expert("old", seed=99)
    with pytest.raises(OSError, match="disk full"):
        lib.add_many([replacement, make_expert("n1", seed=5), make_expert("n2", seed=6)], overwrite=True)
    assert len(moved) == 2
    assert_unchanged(lib, before, tmp_path / "lib")  # "old" keeps its weights: the overwrite never landed


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {here!r})
    from library_helpers import make_expert
    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.open({url!r})
    original = ExpertLibrary._move_into_place
    moved = []
    def move(self, staging, final):  # killed holding the lock, two of four folders moved, nothing committed
        original(self, staging, final)
        moved.append(final)
        if len(moved) == 2:
            print("READY", flush=True)
            time.sleep(600)
    ExpertLibrary._move_into_place = move
    lib.add_many([make_expert(f"k{{i}}", seed=20 + i) for i in range(4)])
    """
)


def test_a_kill_mid_batch_leaves_the_library_as_it_was(lib, tmp_path):
    before = snapshot(lib)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(here=str(HERE), url=str(tmp_path / "lib"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "READY"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    after = ExpertLibrary.open(tmp_path / "lib")
    assert after.names() == sorted(before)
    for name, a in before.items():
        assert torch.equal(after.get(name).lora["layer.q"].A, a)
    report = after.verify()
    assert report.ok and report.leftovers  # the moved folders and the staging are reported, not used
    after.add_many([make_expert("k0", seed=1)])  # the library takes writes again (the lock died with it)
    assert "k0" in after
