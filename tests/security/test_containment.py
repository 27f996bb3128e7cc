"""`contain` (the one check every path read from data goes through) and `atomic_output_dir` (how every output
folder is written), on the local disk and on an fsspec store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from security_helpers import HOSTILE_STRINGS, examples, make_canaries, outside_state

from moerge.errors import OutputExistsError, UnsafePathError
from moerge.experts.paths import atomic_output_dir, contain
from moerge.experts.storage import FsspecStorage, LocalStorage


@pytest.mark.parametrize(
    "rel",
    [
        "/etc/passwd",
        "..",
        "../x",
        "a/../../x",
        "a/./b",
        "a//b",
        "a/",
        "C:\\x",
        "a\\..\\b",
        "a\x00b",
        "~/x",
        "-",
    ],
)
def test_contain_refuses_paths_that_could_leave_the_root(tmp_path, rel):
    with pytest.raises(UnsafePathError, match="refused"):
        contain(tmp_path, rel, what="test")
    with pytest.raises(UnsafePathError, match="refused"):
        contain("/bucket/lib", rel, what="test")


def test_contain_accepts_what_moerge_writes(tmp_path):
    for rel in ["experts/a-1234abcd/adapter_model.safetensors", ".staging/12-ab/moerge_expert.json", "catalog.sqlite",
                "artifacts/arrow/0123abcd/_library.json", "quarantine/x.1"]:  # fmt: skip
        assert contain(tmp_path, rel) == tmp_path / rel
        assert contain("/bucket/lib", rel) == f"/bucket/lib/{rel}"


def test_contain_refuses_symlinks_leaving_the_root(tmp_path):
    root = tmp_path / "lib"
    (root / "experts").mkdir(parents=True)
    make_canaries(tmp_path)
    os.symlink(tmp_path / "victim-dir", root / "experts" / "evil")
    os.symlink(root / "experts", root / "inside")  # a link that stays inside is fine
    with pytest.raises(UnsafePathError, match="outside"):
        contain(root, "experts/evil/keep")
    assert contain(root, "inside/x") == root / "inside" / "x"
    storage = LocalStorage(root)
    with pytest.raises(UnsafePathError):
        storage.delete("experts/evil/keep")
    with pytest.raises(UnsafePathError):
        storage.read_bytes("experts/evil/adapter_model.safetensors")
    with pytest.raises(UnsafePathError):
        storage.write_bytes("experts/evil/x", b"x")
    storage.delete("experts/evil")  # deleting a link removes the link, never what it points to
    assert not (root / "experts" / "evil").is_symlink()
    assert (tmp_path / "victim-dir" / "keep" / "a.bin").exists() and not (
        tmp_path / "victim-dir" / "x"
    ).exists()


@settings(max_examples=examples(150))
@given(
    rel=st.sampled_from(HOSTILE_STRINGS)
    | st.text(max_size=20)
    | st.lists(st.sampled_from(["..", ".", "a", "", "/", "experts"]), max_size=5).map("/".join)
)
def test_contain_never_leaves_the_root(rel):
    """Whatever a catalog or JSON holds, a path either stays under the root or is refused (local and fsspec)."""
    root = Path("/nonexistent-root/lib")
    try:
        path = contain(root, rel)
    except UnsafePathError:
        pass
    else:
        resolved = Path(os.path.normpath(path))
        assert resolved == root or root in resolved.parents
    try:
        remote = contain("/bucket/lib", rel)
    except UnsafePathError:
        pass
    else:
        norm = os.path.normpath(remote)
        assert norm == "/bucket/lib" or norm.startswith("/bucket/lib/")


def test_fsspec_storage_refuses_traversal():
    storage = FsspecStorage("memory://contain-test/lib")
    storage.write_bytes("experts/a/x", b"1")
    for rel in ["../outside", "experts/../../outside", "/outside"]:
        with pytest.raises(UnsafePathError):
            storage.write_bytes(rel, b"x")
        with pytest.raises(UnsafePathError):
            storage.delete(rel)
    assert not storage.fs.exists("/contain-test/outside") and not storage.fs.exists("/outside")


# ------------------------------------------------------------------------------------------- atomic outputs


def test_atomic_output_dir_failure_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("a good earlier merge")
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("boom")
    assert (out / "model.safetensors").read_text() == "a good earlier merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the temporary folder is removed"


def test_atomic_output_dir_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="not empty.*--overwrite"), atomic_output_dir(out):
        pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists(), "the old output stays until the new one is complete"
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_is_or_holds_an_input_is_refused_even_with_overwrite(tmp_path):
    model = tmp_path / "models" / "ft0"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_text("input")
    os.symlink(model, tmp_path / "link")
    before = outside_state(tmp_path)
    for out in (model, tmp_path / "models", tmp_path / "models" / ".." / "models" / "ft0"):
        with (
            pytest.raises(OutputExistsError, match="is \\(or holds\\) the input"),
            atomic_output_dir(out, overwrite=True, inputs=[str(model)]),
        ):
            pass
    with (
        pytest.raises(OutputExistsError, match="input"),
        atomic_output_dir(tmp_path / "link", overwrite=True, inputs=[model]),
    ):
        pass
    assert outside_state(tmp_path) == before


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with (
        pytest.raises(OutputExistsError, match="not a folder"),
        atomic_output_dir(tmp_path / "f", overwrite=True),
    ):
        pass
    assert (tmp_path / "f").read_text() == "x"
