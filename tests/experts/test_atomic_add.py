"""Adding is atomic and safe across processes: a kill mid-add leaves the library as it was, and two
processes adding at once both land."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from moerge.experts.library import ExpertLibrary

HERE = Path(__file__).parent

CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {here!r})
    from library_helpers import make_expert
    from moerge.experts.library import ExpertLibrary
    from moerge.experts.storage import LocalStorage

    phase = {phase!r}
    lib = ExpertLibrary.open({url!r})

    def pause():
        print("READY", flush=True)
        time.sleep(600)

    if phase == "staging":  # killed after the first file of the expert is written
        original = LocalStorage.write_bytes
        def write_bytes(self, rel, data):
            original(self, rel, data)
            if rel.startswith(".staging/"):
                pause()
        LocalStorage.write_bytes = write_bytes
    else:  # killed after the folder is moved into experts/, holding the catalog lock, before the commit
        original = ExpertLibrary._move_into_place
        def move(self, staging, final):
            original(self, staging, final)
            pause()
        ExpertLibrary._move_into_place = move
    lib.add(make_expert("victim", seed=1){overwrite})
    """
)


@pytest.mark.parametrize("phase", ["staging", "after_move"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_kill_mid_add_leaves_library_as_it_was(tmp_path, phase, overwrite):
    from library_helpers import make_expert

    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add(make_expert("keep", seed=0))
    if overwrite:
        lib.add(make_expert("victim", seed=0))
    before = {n: lib.get(n).lora["layer.q"].A.clone() for n in lib.names()}

    script = CHILD.format(
        here=str(HERE),
        phase=phase,
        url=str(tmp_path / "lib"),
        overwrite=", overwrite=True" if overwrite else "",
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL

    after = ExpertLibrary.open(tmp_path / "lib")
    assert after.names() == sorted(before)
    for name, a in before.items():
        assert (a == after.get(name).lora["layer.q"].A).all(), "an existing expert changed"
    report = after.verify()
    assert report.ok
    assert report.leftovers, "the killed add leaves a leftover, which verify reports"
    repaired = after.verify(repair=True)
    assert repaired.repaired and not repaired.leftovers and repaired.ok
    assert not after.verify().leftovers
    if phase == "after_move" and not overwrite:
        # the killed add had moved a complete, checksummed expert into experts/: repair adds it back
        assert after.names() == sorted([*before, "victim"])
        assert torch.equal(
            after.get("victim").lora["layer.q"].A, make_expert("victim", seed=1).lora["layer.q"].A
        )
        assert any("added 'victim' back" in a for a in repaired.repaired)
    else:
        # a staging leftover is removed; an uncommitted copy of an existing expert goes to quarantine/
        assert after.names() == sorted(before)
        if phase == "after_move":
            assert any("quarantine" in a for a in repaired.repaired)
            assert len(list((tmp_path / "lib" / "quarantine").iterdir())) == 1
        for name, a in before.items():
            assert torch.equal(after.get(name).lora["layer.q"].A, a), "repair changed a committed expert"
    after.add(make_expert("victim", seed=2), overwrite=True)  # the name is usable again
    assert after.verify().ok


CONCURRENT = textwrap.dedent(
    """
    import sys, time, os
    sys.path.insert(0, {here!r})
    from library_helpers import make_expert
    from moerge.experts.library import ExpertLibrary
    lib = ExpertLibrary.open({url!r})
    while not os.path.exists({go!r}):
        time.sleep(0.01)
    for i in range(20):
        lib.add(make_expert(f"p{worker}-{{i:02d}}", task="w{worker}", seed=i))
    """
)


def test_two_processes_adding_at_once(tmp_path):
    ExpertLibrary.create(tmp_path / "lib")
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONCURRENT.format(here=str(HERE), url=str(tmp_path / "lib"), go=str(go), worker=w),
            ]
        )
        for w in (0, 1)
    ]
    time.sleep(0.5)
    go.touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    lib = ExpertLibrary.open(tmp_path / "lib")
    assert len(lib) == 40
    assert lib.names(task="w0") == [f"p0-{i:02d}" for i in range(20)]
    assert lib.names(task="w1") == [f"p1-{i:02d}" for i in range(20)]
    report = lib.verify()
    assert report.ok and report.checked == 40 and not report.leftovers
    assert all(lib.get(n).lora["layer.q"].rank == 4 for n in lib.names())
