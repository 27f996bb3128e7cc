"""A library is data from strangers: nothing in its catalog or its experts' JSON may steer a read, a write or a
delete outside it. Explicit cases for each hole the issue found, then property tests that edit catalog rows and
expert JSON at random and run every library operation on the result."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from security_helpers import (
    catalog_rows,
    examples,
    expert_folder,
    hostile_strings,
    json_values,
    lora_expert,
    make_canaries,
    outside_state,
    rewrite_json,
)

from moerge.errors import ExpertNotFoundError, MoergeError, UnsafePathError
from moerge.experts.library import ExpertLibrary

SHA = "0" * 64


def make_library(root: Path) -> ExpertLibrary:
    make_canaries(root)
    lib = ExpertLibrary.create(root / "lib")
    lib.add(lora_expert("alpha", seed=1))
    lib.add(lora_expert("beta", seed=2))
    return lib


def set_row(lib: ExpertLibrary, name: str, **cols) -> None:
    with sqlite3.connect(lib._catalog_path) as c:
        for col, value in cols.items():
            c.execute(f"UPDATE experts SET {col}=? WHERE name=?", (value, name))


@pytest.fixture
def sandbox(tmp_path):
    lib = make_library(tmp_path)
    return tmp_path, lib


# ------------------------------------------------------------------------------ the holes, one by one


@pytest.mark.parametrize(
    "folder", ["../../victim-dir", "../victim-dir", "/tmp", "..", "", "alpha/../../../victim-dir"]
)
def test_rm_never_deletes_what_a_catalog_row_names_outside(sandbox, folder):
    root, lib = sandbox
    set_row(lib, "alpha", folder=folder)
    before = outside_state(root, root / "lib")
    with pytest.raises(UnsafePathError, match="not a folder inside experts/.*verify .*--repair"):
        lib.remove("alpha")
    assert outside_state(root, root / "lib") == before
    report = lib.verify(repair=True)
    assert any("dropped the catalog row of 'alpha'" in a for a in report.repaired)
    assert report.ok and lib.names() == ["alpha", "beta"], "alpha's real folder is adopted back from its JSON"
    assert outside_state(root, root / "lib") == before


def test_add_overwrite_never_deletes_what_a_catalog_row_names(sandbox):
    root, lib = sandbox
    set_row(lib, "alpha", folder="../../victim-dir")
    before = outside_state(root, root / "lib")
    with pytest.raises(UnsafePathError):
        lib.add(lora_expert("alpha", seed=9), overwrite=True)
    assert outside_state(root, root / "lib") == before
    assert not (root / "lib" / ".staging").exists() or not any((root / "lib" / ".staging").iterdir())


def test_rename_never_writes_outside(sandbox):
    root, lib = sandbox
    set_row(lib, "alpha", folder="../victim")
    before = outside_state(root, root / "lib")
    with pytest.raises(UnsafePathError):
        lib.rename("alpha", "gamma")
    assert outside_state(root, root / "lib") == before
    assert not (root / "victim" / "moerge_expert.json").exists()


def test_export_never_writes_a_file_a_checksum_key_names(sandbox):
    root, lib = sandbox
    set_row(
        lib, "alpha", checksums=json.dumps({"../../victim/precious.txt": SHA, "adapter_config.json": SHA})
    )
    before = outside_state(root, root / "lib")
    with pytest.raises(MoergeError, match="checksums"):
        lib.export_peft("alpha", root / "out")
    assert outside_state(root, root / "lib") == before and not (root / "out").exists()


def test_remote_library_export_ignores_hostile_expert_json(tmp_path):
    """On an fsspec library the catalog is rebuilt from the experts' JSON: edit only the JSON, as the issue did."""
    lib = make_library(tmp_path)
    url = f"memory://hostile-{uuid.uuid4().hex[:8]}/lib"
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "lib"), url.removeprefix("memory:/"), recursive=True)
    folder = expert_folder(lib, "alpha").name
    path = f"{url.removeprefix('memory:/')}/experts/{folder}/moerge_expert.json"
    record = json.loads(fs.cat_file(path))
    record["checksums"]["../../../pwned.txt"] = SHA
    fs.pipe_file(path, json.dumps(record).encode())
    remote = ExpertLibrary.open(url)
    assert remote.names() == ["beta"], "an expert whose JSON names other files is invisible"
    with pytest.raises(ExpertNotFoundError):
        remote.export_peft("alpha", tmp_path / "out")
    out = remote.export_peft("beta", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "moerge_expert.json",
    ]
    assert not fs.exists("/pwned.txt") and not (tmp_path / "pwned.txt").exists()
    assert any("alpha" in left for left in remote.verify().leftovers)


def test_symlinked_expert_folder_is_never_followed(sandbox):
    root, lib = sandbox
    os.symlink(root / "victim-dir", root / "lib" / "experts" / "evil")
    set_row(lib, "alpha", folder="evil")
    before = outside_state(root, root / "lib")
    for op in (
        lambda: lib.remove("alpha"),
        lambda: lib.get("alpha"),
        lambda: lib.export_peft("alpha", root / "o"),
    ):
        with pytest.raises(UnsafePathError, match="outside"):
            op()
    report = lib.verify(repair=True)
    assert report.ok and outside_state(root, root / "lib") == before
    assert (root / "victim-dir" / "keep" / "a.bin").exists()


def test_row_pointing_at_another_experts_folder_deletes_nothing(sandbox):
    root, lib = sandbox
    beta_folder = expert_folder(lib, "beta")
    beta_row = [r for r in catalog_rows(lib) if r[0] == "beta"][0]
    set_row(lib, "alpha", folder=beta_folder.name, checksums=beta_row[3])
    assert any("holds expert 'beta'" in p for p in lib.verify().problems)
    lib.remove("alpha")  # removes alpha's row; beta's folder is beta's (its JSON says so): kept
    assert beta_folder.is_dir() and torch.equal(lib.get("beta").lora["model.layers.0.self_attn.q_proj"].A,
                                                lora_expert("beta", seed=2).lora["model.layers.0.self_attn.q_proj"].A)  # fmt: skip
    report = lib.verify(repair=True)
    assert report.ok and "alpha" in lib.names(), "alpha's own folder was left alone and is added back"


# ------------------------------------------------------------------------------ property tests


def exercise(lib: ExpertLibrary, out: Path) -> None:
    """Every library operation once; each either works or raises a MoergeError (anything else fails the test)."""
    ops = [
        lambda: lib.list(),
        lambda: [lib.get(n) for n in list(lib.names())],
        lambda: lib.export_peft(str(lib.names()[0]) if lib.names() else "alpha", out, overwrite=True),
        lambda: lib.rename("alpha", "alpha2"),
        lambda: lib.update_metadata("beta", task="new"),
        lambda: lib.add(lora_expert("beta", seed=5), overwrite=True),
        lambda: lib.remove("alpha"),
        lambda: lib.verify(),
    ]
    for op in ops:
        with contextlib.suppress(MoergeError):
            op()


CATALOG_COLUMNS = ["folder", "metadata", "checksums", "name", "kind"]


def catalog_value() -> st.SearchStrategy:
    return (
        hostile_strings()
        | json_values().map(json.dumps)
        | st.sampled_from([None, 5, b"\xff\xfe", b"../x", 1.5])
        | st.dictionaries(
            st.sampled_from(["adapter_config.json", "../../victim/precious.txt", "/etc/x", "x"]),
            st.sampled_from([SHA, "zz", 5]),
            max_size=3,
        ).map(json.dumps)  # fmt: skip
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    lib = make_library(root)
    lib.close()
    return root


def copy_sandbox(template: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix="moerge-hostile-"))
    shutil.copytree(template, root, dirs_exist_ok=True, symlinks=True)
    return root


@settings(max_examples=examples(50))
@given(edits=st.lists(st.tuples(st.sampled_from(["alpha", "beta"]), st.sampled_from(CATALOG_COLUMNS), catalog_value()),
                      min_size=1, max_size=3))  # fmt: skip
def test_hostile_catalog_rows(template, edits):
    root = copy_sandbox(template)
    try:
        before = outside_state(root, root / "lib", root / "out")
        with sqlite3.connect(root / "lib" / "catalog.sqlite") as c:
            for name, col, value in edits:
                # a NOT NULL or duplicate name: the catalog itself refuses that edit
                with contextlib.suppress(sqlite3.IntegrityError):
                    c.execute(f"UPDATE experts SET {col}=? WHERE name=?", (value, name))
        try:
            lib = ExpertLibrary.open(root / "lib")
        except MoergeError:
            return
        exercise(lib, root / "out")
        assert outside_state(root, root / "lib", root / "out") == before
        report = lib.verify(repair=True)
        assert report.ok, report.problems
        assert lib.verify().ok and not lib.verify().leftovers
        assert outside_state(root, root / "lib", root / "out") == before
    finally:
        shutil.rmtree(root, ignore_errors=True)


EXPERT_JSON_KEYS = ["format", "metadata", "checksums", "metadata.name", "metadata.kind", "metadata.tags",
                    "metadata.created_at", "metadata.extra", "checksums.adapter_config.json",
                    "checksums.../../victim/precious.txt", "checksums./etc/passwd"]  # fmt: skip


def edit_record(record: dict, key: str, value) -> dict:
    if key in ("format", "metadata", "checksums"):
        record[key] = value
    elif key.startswith("metadata.") and isinstance(record.get("metadata"), dict):
        record["metadata"][key.split(".", 1)[1]] = value
    elif key.startswith("checksums.") and isinstance(record.get("checksums"), dict):
        record["checksums"][key.split(".", 1)[1]] = value
    return record


@settings(max_examples=examples(40))
@given(edits=st.lists(st.tuples(st.sampled_from(EXPERT_JSON_KEYS), json_values()), min_size=1, max_size=3),
       remote=st.booleans())  # fmt: skip
def test_hostile_expert_json(template, edits, remote):
    """Edit alpha's moerge_expert.json; open the library (locally, or as an fsspec library whose catalog is
    rebuilt from that JSON) and run every operation."""
    root = copy_sandbox(template)
    try:
        before = outside_state(root, root / "lib", root / "out")
        folder = next(p for p in (root / "lib" / "experts").iterdir() if p.name.startswith("alpha-"))
        rewrite_json(folder / "moerge_expert.json", lambda r: _apply(r, edits))
        url = root / "lib"
        if remote:
            url = f"memory://json-{uuid.uuid4().hex[:8]}/lib"
            fsspec.filesystem("memory").put(str(root / "lib"), url.removeprefix("memory:/"), recursive=True)
        try:
            lib = ExpertLibrary.open(url)
        except MoergeError:
            return
        exercise(lib, root / "out")
        assert outside_state(root, root / "lib", root / "out") == before
        lib.verify(repair=True)
        assert lib.verify().ok
        assert outside_state(root, root / "lib", root / "out") == before
        if (root / "out").exists():
            assert {p.name for p in (root / "out").iterdir()} <= {
                "adapter_config.json", "adapter_model.safetensors", "delta_model.safetensors", "moerge_expert.json",
            }  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _apply(record, edits):
    for key, value in edits:
        record = edit_record(record, key, value)
    return record


@pytest.mark.parametrize(
    "name", ["catalog.sqlite-wal", "catalog.sqlite-shm", "catalog.sqlite.lock", "quarantine"]
)
def test_library_files_linked_outside_are_refused(tmp_path, name):
    """SQLite and the lock follow links: a library whose own files lead outside is refused before they are opened."""
    lib = make_library(tmp_path)
    lib.close()
    for suffix in ("-wal", "-shm"):
        (tmp_path / "lib" / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    target = tmp_path / "victim" / "precious.txt"
    (tmp_path / "lib" / name).unlink(missing_ok=True)
    os.symlink(target if name != "quarantine" else tmp_path / "victim-dir", tmp_path / "lib" / name)
    before = outside_state(tmp_path, tmp_path / "lib")
    if name == "quarantine":  # only used while repairing a damaged catalog
        (tmp_path / "lib" / "catalog.sqlite").write_bytes(b"not a database" * 100)
        with pytest.raises(UnsafePathError):
            ExpertLibrary.open(tmp_path / "lib", recover=True)
    else:
        with pytest.raises(UnsafePathError, match="outside"):
            ExpertLibrary.open(tmp_path / "lib")
    assert outside_state(tmp_path, tmp_path / "lib") == before
    assert target.read_text() == "do not touch"


def test_a_planted_temporary_file_is_never_written_through(tmp_path):
    lib = make_library(tmp_path)
    for pid in (os.getpid(), os.getpid() + 1):  # the old temporary names were predictable
        os.symlink(tmp_path / "victim" / "precious.txt", tmp_path / "lib" / f".moerge-library.json.{pid}.tmp")
    lib.record_base_shapes({"model.layers.0.self_attn.q_proj.weight": [8, 8]})
    assert (tmp_path / "victim" / "precious.txt").read_text() == "do not touch"
    assert ExpertLibrary.open(tmp_path / "lib").base_shapes == {
        "model.layers.0.self_attn.q_proj.weight": [8, 8]
    }
