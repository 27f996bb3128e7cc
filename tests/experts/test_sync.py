"""`moerge library push LIB URL` / `pull URL LIB` (`moerge.experts.sync`): only missing experts are copied,
byte-identical (checksums), with their artifacts; a push killed mid-way and rerun loses and duplicates nothing;
a broken copy at the destination is replaced; same-name conflicts are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moerge.experts.library import ExpertLibrary
from moerge.experts.sync import pull, push, sync

HERE = Path(__file__).parent
N = 5


def make_source(path: Path) -> ExpertLibrary:
    from library_helpers import make_expert

    lib = ExpertLibrary.create(path)
    for i in range(N):
        lib.add(make_expert(f"e{i}", task=f"t{i}", seed=i))
    lib.put_artifact("arrow_prototypes", {"k": 1}, "e0", {"p": torch.arange(4.0)}, {"note": "x"})
    lib.put_artifact("learned_router", {"set": "all"}, None, {"w": torch.ones(2)})
    return lib


def checksums(lib: ExpertLibrary) -> dict[str, dict[str, str]]:
    return {n: dict(lib._entry(n).checksums) for n in lib.names()}


@pytest.mark.parametrize("where", ["folder", "memory"])
def test_push_copies_what_is_missing_and_pull_brings_it_back(tmp_path, where):
    src = make_source(tmp_path / "src")
    url = str(tmp_path / "dest") if where == "folder" else f"memory://moerge-sync-{os.getpid()}/dest"
    first = push(str(tmp_path / "src"), url)
    assert sorted(first.copied) == src.names() and first.artifacts == 4
    dest = ExpertLibrary.open(url)
    assert checksums(dest) == checksums(src)
    assert torch.equal(dest.get_artifact("arrow_prototypes", {"k": 1}, "e0")[0]["p"], torch.arange(4.0))
    assert dest.get_artifact("learned_router", {"set": "all"}, None) is not None
    again = push(str(tmp_path / "src"), url)  # nothing new: nothing copied
    assert not again.copied and sorted(again.present) == src.names() and again.artifacts == 0

    back = pull(url, str(tmp_path / "back"))
    assert sorted(back.copied) == src.names()
    assert checksums(ExpertLibrary.open(tmp_path / "back")) == checksums(src)


def test_a_broken_copy_is_replaced_and_a_conflict_left_alone(tmp_path):
    from library_helpers import make_expert

    src = make_source(tmp_path / "src")
    url = f"memory://moerge-sync-broken-{os.getpid()}/dest"
    push(str(tmp_path / "src"), url)
    dest = ExpertLibrary.open(url)
    folder = dest._entry("e1").folder
    dest.storage.write_bytes(
        f"experts/{folder}/adapter_model.safetensors", b"truncated"
    )  # a half-copied file
    dest.add(make_expert("e2", task="other", seed=99), overwrite=True)  # same name, other contents
    report = sync(src, dest)
    assert report.repaired == ["e1"] and report.conflicts == ["e2"]
    assert checksums(dest)["e1"] == checksums(src)["e1"]
    assert checksums(dest)["e2"] != checksums(src)["e2"]  # left alone
    assert sync(src, dest, overwrite=True).repaired == ["e2"]
    assert checksums(dest) == checksums(src)


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {here!r})
    from moerge.experts.library import ExpertLibrary
    from moerge.experts.storage import LocalStorage
    from moerge.experts.sync import push

    adds = 0
    def pause():
        print("READY", flush=True)
        time.sleep(600)
    if {phase!r} == "staging":  # killed while the third expert's files are being staged
        original = LocalStorage.write_bytes
        def write_bytes(self, rel, data):
            global adds
            original(self, rel, data)
            if rel.startswith(".staging/") and rel.endswith(".safetensors"):
                adds += 1
                if adds == 3:
                    pause()
        LocalStorage.write_bytes = write_bytes
    else:  # killed with the third expert moved into experts/, before its catalog row is committed
        original = ExpertLibrary._move_into_place
        def move(self, staging, final):
            global adds
            original(self, staging, final)
            adds += 1
            if adds == 3:
                pause()
        ExpertLibrary._move_into_place = move
    push({src!r}, {dest!r})
    """
)


@pytest.mark.parametrize("phase", ["staging", "after_move"])
def test_a_killed_push_rerun_loses_and_duplicates_nothing(tmp_path, phase):
    src = make_source(tmp_path / "src")
    dest_path = tmp_path / "dest"
    script = CHILD.format(here=str(HERE), phase=phase, src=str(tmp_path / "src"), dest=str(dest_path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert len(ExpertLibrary.open(dest_path)) == 2  # two experts landed before the kill

    report = push(str(tmp_path / "src"), str(dest_path))
    dest = ExpertLibrary.open(dest_path)
    assert checksums(dest) == checksums(src)
    assert sorted(report.present) == ["e0", "e1"] + (["e2"] if phase == "after_move" else [])
    verified = dest.verify()
    assert verified.ok and not verified.leftovers
    folders = [p for p in (dest_path / "experts").iterdir() if p.is_dir()]
    assert len(folders) == N  # one folder per expert: nothing duplicated on disk
    assert not (dest_path / "quarantine").exists() or not any((dest_path / "quarantine").iterdir())
