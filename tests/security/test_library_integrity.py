"""The library never loses an expert it cannot account for, notices bit rot, refuses adapters for another base,
can be read where it cannot be written, and a writer waits for the lock seconds, not minutes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from security_helpers import Q, expert_folder, lora_expert, make_canaries

from moerge.errors import (
    ChecksumMismatchError,
    LibraryError,
    LibraryLockedError,
    ShapeMismatchError,
)
from moerge.experts import library as library_module
from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
from moerge.experts.library import ExpertLibrary

HERE = Path(__file__).parent


def filled(root: Path, n: int = 3) -> ExpertLibrary:
    make_canaries(root)
    lib = ExpertLibrary.create(root / "lib")
    for i in range(n):
        lib.add(lora_expert(f"e{i}", seed=i, task=f"t{i}"))
    return lib


def weights(lib: ExpertLibrary) -> dict[str, torch.Tensor]:
    return {n: lib.get(n).lora[Q].A for n in lib.names()}


# ------------------------------------------------------------------------ the catalog can be rebuilt


@pytest.mark.parametrize("damage", ["missing", "empty", "corrupt", "truncated"])
def test_repair_rebuilds_a_lost_catalog_and_deletes_no_expert(tmp_path, damage):
    lib = filled(tmp_path)
    before = weights(lib)
    folders = sorted(p.name for p in (tmp_path / "lib" / "experts").iterdir())
    lib.close()
    catalog = tmp_path / "lib" / "catalog.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{catalog}{suffix}").unlink(missing_ok=True)
    if damage == "missing":
        catalog.unlink()
    elif damage == "empty":
        with __import__("sqlite3").connect(catalog) as c:
            c.execute("DELETE FROM experts")
    elif damage == "corrupt":
        catalog.write_bytes(b"this is not a database" * 100)
    else:
        catalog.write_bytes(catalog.read_bytes()[:1000])

    if damage == "corrupt":
        with pytest.raises(LibraryError, match="catalog .* is damaged.*verify .* --repair"):
            ExpertLibrary.open(tmp_path / "lib")
    if damage in ("missing",):  # opening rebuilds a missing catalog from the experts' JSON at once
        assert ExpertLibrary.open(tmp_path / "lib").names() == sorted(before)
    reopened = ExpertLibrary.open(tmp_path / "lib", recover=True)
    if damage == "empty":
        report = reopened.verify()
        assert all("missing from the catalog (--repair adds it back)" in left for left in report.leftovers)
        assert len(report.leftovers) == 3
    report = reopened.verify(repair=True)
    assert report.ok and not report.leftovers, report
    assert sorted(p.name for p in (tmp_path / "lib" / "experts").iterdir()) == folders, (
        "no expert folder deleted"
    )
    again = ExpertLibrary.open(tmp_path / "lib")
    assert again.names() == sorted(before) and again.tasks() == ["t0", "t1", "t2"]
    for name, a in weights(again).items():
        assert torch.equal(a, before[name])
    if damage in ("corrupt", "truncated"):
        assert any(
            p.name.startswith("catalog.sqlite.") for p in (tmp_path / "lib" / "quarantine").iterdir()
        ), "the damaged catalog is kept in quarantine/"


def test_repair_quarantines_what_it_cannot_account_for(tmp_path):
    lib = filled(tmp_path, n=2)
    experts = tmp_path / "lib" / "experts"
    (experts / "stranger").mkdir()
    (experts / "stranger" / "notes.txt").write_text("someone's files")
    broken = expert_folder(lib, "e1")
    lib._conn.execute("DELETE FROM experts WHERE name='e1'")
    data = bytearray((broken / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "adapter_model.safetensors").write_bytes(bytes(data))
    report = lib.verify(repair=True)
    moved = sorted(p.name for p in (tmp_path / "lib" / "quarantine").iterdir())
    assert moved == sorted(["stranger", broken.name])
    assert (tmp_path / "lib" / "quarantine" / "stranger" / "notes.txt").read_text() == "someone's files"
    assert sum("moved experts/" in a and "quarantine/" in a for a in report.repaired) == 2
    assert report.ok and lib.names() == ["e0"]


def test_cli_repair_says_what_it_did(tmp_path, capsys):
    from moerge.cli import app
    from moerge.cli.common import run_app

    lib = filled(tmp_path, n=2)
    lib.close()
    (tmp_path / "lib" / "catalog.sqlite").write_bytes(b"garbage" * 200)
    assert run_app(app, ["library", "verify", str(tmp_path / "lib")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--repair" in err and "Traceback" not in err
    assert run_app(app, ["library", "verify", str(tmp_path / "lib"), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "moved the damaged catalog" in out and "added 'e0' back" in out and "checked 2 experts: ok" in out


# ------------------------------------------------------------------------------------------ bit rot


def test_bit_rot_is_noticed_on_load_with_the_experts_name(tmp_path):
    lib = filled(tmp_path, n=2)
    lib.get("e0")  # loaded and checked once
    path = expert_folder(lib, "e0") / "adapter_model.safetensors"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit in the tensor data: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="expert 'e0'.*does not match its checksum.*verify"):
        lib.get("e0")  # the file's mtime changed: checked again
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # rot that keeps the mtime: a new process checks it
    library_module._VERIFIED.clear()
    with pytest.raises(ChecksumMismatchError):
        ExpertLibrary.open(tmp_path / "lib").get("e0")
    assert torch.equal(lib.get("e1").lora[Q].A, lora_expert("e1", seed=1).lora[Q].A)
    assert not lib.verify().ok


def test_verified_files_are_not_hashed_again_while_unchanged(tmp_path, monkeypatch):
    lib = filled(tmp_path, n=1)
    library_module._VERIFIED.clear()
    calls = []
    real = library_module._sha256
    monkeypatch.setattr(library_module, "_sha256", lambda data: calls.append(len(data)) or real(data))
    lib.get("e0")
    first = len(calls)
    lib.get("e0")
    assert first == 2 and len(calls) == first, "the second load of unchanged files is not hashed again"


# ----------------------------------------------------------------------------------- another base's adapter


def gpt2_like(name: str) -> Expert:
    g = torch.Generator().manual_seed(3)
    lm = LoraModule(torch.randn(2, 8, generator=g), torch.randn(24, 2, generator=g), 4.0, fan_in_fan_out=True)
    return Expert(ExpertMetadata(name=name), lora={"transformer.h.0.attn.c_attn": lm})


def test_adapter_for_another_architecture_is_refused_without_recorded_shapes(tmp_path):
    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add(lora_expert("llama-ish"))
    with pytest.raises(ShapeMismatchError, match="none of its modules .* another model"):
        lib.add(gpt2_like("gpt2-ish"))
    assert lib.names() == ["llama-ish"]


# --------------------------------------------------------------------------------- read-only libraries

READ_ONLY = textwrap.dedent(
    """
    import json, sys
    from moerge.cli import app
    from moerge.cli.common import run_app
    from moerge.experts.library import ExpertLibrary
    lib = ExpertLibrary.open(sys.argv[1])
    out = {"read_only": lib.read_only, "names": lib.names(), "rank": lib.get("e0").lora[Q_MODULE].rank,
           "verify": lib.verify().ok}
    out["list"] = run_app(app, ["library", "list", sys.argv[1]])
    out["show"] = run_app(app, ["library", "show", sys.argv[1], "e1"])
    out["export"] = run_app(app, ["library", "export", sys.argv[1], "e0", sys.argv[2]])
    out["rm"] = run_app(app, ["library", "rm", sys.argv[1], "e0"])
    print("RESULT " + json.dumps(out))
    """
).replace("Q_MODULE", repr(Q))


def test_read_only_library_can_be_read(tmp_path):
    """A library on a read-only file system (a bind mount remounted read-only in a private mount namespace; or
    file permissions, where not root) lists, shows, loads, verifies and exports; writes fail with one line."""
    lib = filled(tmp_path, n=2)
    lib.close()
    for p in (tmp_path / "lib").glob("catalog.sqlite-*"):
        p.unlink()  # as a library copied from elsewhere: no WAL files beside the catalog
    script = tmp_path / "ro.py"
    script.write_text(READ_ONLY)
    libdir, out = tmp_path / "lib", tmp_path / "exported"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, str(script), str(libdir), str(out)]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("root without unshare: cannot make a read-only library")
        shell = f'mount --bind {libdir} {libdir} && mount -o remount,ro,bind {libdir} && exec "$@"'
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", shell, "sh", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {probe.stderr.decode().strip()}")
        cmd = ["unshare", "-rm", "sh", "-c", shell, "sh", *cmd]
    else:
        for p in [libdir, *libdir.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result == {"read_only": True, "names": ["e0", "e1"], "rank": 2, "verify": True, "list": 0, "show": 0,
                      "export": 0, "rm": 1}, proc.stderr  # fmt: skip
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr and "read-only" in proc.stderr
    assert (out / "adapter_model.safetensors").is_file()


# -------------------------------------------------------------------------------------------- the lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from moerge.experts.library import ExpertLibrary
    lib = ExpertLibrary.open(sys.argv[1])
    with lib._write():
        print("HOLDING", flush=True)
        time.sleep(600)
    """
)


def test_lock_wait_times_out_naming_the_holder(tmp_path, monkeypatch):
    lib = filled(tmp_path, n=1)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "lib")], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "HOLDING"
        monkeypatch.setenv("MOERGE_LOCK_TIMEOUT", "0.5")
        with pytest.raises(LibraryLockedError, match=f"locked by process {holder.pid}.*kill {holder.pid}"):
            lib.add(lora_expert("late", seed=4))
        assert lib.names() == ["e0"] and lib.get("e0") is not None, "readers are not blocked"
    finally:
        holder.kill()
        holder.wait(timeout=60)
    lib.add(lora_expert("late", seed=4))  # the kernel dropped the dead holder's lock
    assert lib.names() == ["e0", "late"] and lib.verify().ok
