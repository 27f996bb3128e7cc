"""ExpertLibrary operations: add, get, list/filter, rename, remove, verify, artifacts, storage by URL."""

from __future__ import annotations

import json

import pytest
import torch
from library_helpers import make_expert

from moerge.errors import ExpertNotFoundError, OutputExistsError
from moerge.experts.library import ExpertLibrary


@pytest.fixture
def lib(tmp_path):
    return ExpertLibrary.create(tmp_path / "lib", base_model="tiny")


def test_add_get_roundtrip_keeps_weights_and_metadata(lib):
    e = make_expert("alpha", task="sum", tags=["math", "toy"], contributor="ann", license="apache-2.0")
    lib.add(e)
    got = lib.get("alpha")
    torch.testing.assert_close(got.lora["layer.q"].A, e.lora["layer.q"].A, rtol=0, atol=0)
    torch.testing.assert_close(got.lora["layer.q"].B, e.lora["layer.q"].B, rtol=0, atol=0)
    assert got.lora["layer.q"].scaling == e.lora["layer.q"].scaling
    assert got.metadata == e.metadata


def test_list_filters_and_reopen(lib, tmp_path):
    lib.add(make_expert("a", task="x", tags=["t1"]))
    lib.add(make_expert("b", task="y", tags=["t1", "t2"]))
    lib.add(make_expert("c", task="x"))
    assert lib.names() == ["a", "b", "c"]
    assert lib.names(task="x") == ["a", "c"]
    assert lib.names(tag="t2") == ["b"]
    assert lib.names(name="[ab]") == ["a", "b"]
    assert lib.tasks() == ["x", "y"]
    reopened = ExpertLibrary.open(tmp_path / "lib")
    assert reopened.names() == ["a", "b", "c"] and len(reopened) == 3 and "b" in reopened
    assert reopened.base_fingerprint == "sha256:base", (
        "the library adopts its first expert's base fingerprint"
    )


def test_rename_remove_and_artifacts_follow(lib):
    lib.add(make_expert("a"))
    lib.put_artifact("arrow", {"top": 1}, "a", {"v": torch.arange(3.0)}, info={"n": 3})
    assert lib.get_artifact("arrow", {"top": 2}, "a") is None, "another config is another artifact"
    lib.rename("a", "b")
    tensors, info = lib.get_artifact("arrow", {"top": 1}, "b")
    assert info == {"n": 3} and torch.equal(tensors["v"], torch.arange(3.0))
    assert lib.get("b").name == "b" and "a" not in lib
    lib.remove("b")
    assert len(lib) == 0 and lib.list_artifacts() == []
    with pytest.raises(ExpertNotFoundError, match="no expert named 'b'"):
        lib.get("b")


def test_overwrite_replaces_and_drops_stale_artifacts(lib):
    lib.add(make_expert("a", seed=0))
    lib.put_artifact("arrow", {}, "a", {"v": torch.ones(1)})
    new = make_expert("a", seed=1)
    lib.add(new, overwrite=True)
    assert torch.equal(lib.get("a").lora["layer.q"].A, new.lora["layer.q"].A)
    assert not lib.has_artifact("arrow", {}, "a"), "artifacts of replaced weights are stale"
    assert lib.verify().ok and not lib.verify().leftovers


def test_verify_detects_corruption(lib):
    lib.add(make_expert("a"))
    folder = next((lib.storage.local_path("experts")).iterdir())
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    report = lib.verify()
    assert not report.ok and "does not match its checksum" in report.problems[0]


def test_export_refuses_non_empty_folder(lib, tmp_path):
    lib.add(make_expert("a"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not empty.*--overwrite"):
        lib.export_peft("a", tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "keep me"
    lib.export_peft("a", tmp_path / "out", overwrite=True)  # replaced once the export is complete
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "moerge_expert.json",
    ]


def test_library_level_artifact_and_metadata_update(lib):
    lib.add(make_expert("a", task="x"))
    lib.put_artifact("router", {"lr": 0.1}, None, {"w": torch.zeros(2, 2)})
    assert lib.has_artifact("router", {"lr": 0.1}, None)
    md = lib.update_metadata("a", task="z", tags=["new"], scores={"acc": 0.5})
    assert md.task == "z" and lib.names(task="z") == ["a"] and lib.names(tag="new") == ["a"]
    folder = next(lib.storage.local_path("experts").iterdir())
    assert json.loads((folder / "moerge_expert.json").read_text())["metadata"]["scores"] == {"acc": 0.5}


def test_fsspec_memory_storage():
    url = "memory://moerge-test-lib"
    lib = ExpertLibrary.create(url)
    lib.add(make_expert("m", task="x"))
    lib.put_artifact("arrow", {}, "m", {"v": torch.ones(2)})
    again = ExpertLibrary.open(url)
    assert again.names() == ["m"] and again.get("m").lora["layer.q"].rank == 4
    assert again.get_artifact("arrow", {}, "m")[0]["v"].sum() == 2
    assert again.verify().ok


def test_add_folder_of_peft_folders(peft_adapters, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    for case in ("llama-patterns", "llama-rslora"):
        shutil.copytree(peft_adapters[case][1], bundle / case)
    lib = ExpertLibrary.create(tmp_path / "lib")
    added = lib.add_folder(bundle, tags=["imported"])
    assert [m.name for m in added] == ["llama-patterns", "llama-rslora"]
    assert lib.names(tag="imported") == ["llama-patterns", "llama-rslora"]
