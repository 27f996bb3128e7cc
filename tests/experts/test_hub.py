"""The Hugging Face Hub: `library add` from a hub id, `library push` / `library pull`, a base by hub id.

The network is not reachable here, so nothing talks to huggingface.co: every test runs with
``HF_HUB_OFFLINE=1`` against a local folder laid out as the Hub cache (``models--org--name/blobs/``,
``snapshots/<commit>/`` of links into the blobs, ``refs/<branch>``), which is what ``huggingface_hub``'s
``snapshot_download`` reads offline. Uploads go through ``HfApi.create_repo`` / ``HfApi.upload_folder``,
replaced by a stand-in that commits the uploaded folder into that cache (deleting what ``delete_patterns``
names, as the Hub does), so a push can be pulled back through the real download path.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from library_helpers import make_expert

from moerge.cli import app
from moerge.cli.common import run_app
from moerge.errors import ChecksumMismatchError, LibraryError, UnsafePathError
from moerge.experts.hub import HubRef, parse_hub_ref, pull
from moerge.experts.library import ExpertLibrary
from moerge.experts.peft_io import read_peft_folder


class FakeHubCache:
    """A Hub cache folder that repos are committed into (as ``huggingface_hub`` lays it out)."""

    def __init__(self, root: Path):
        self.root = root
        self.commits = 0

    def repo(self, repo_id: str) -> Path:
        return self.root / f"models--{repo_id.replace('/', '--')}"

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        ref = self.repo(repo_id) / "refs" / revision
        if not ref.exists():
            return {}
        snap = self.repo(repo_id) / "snapshots" / ref.read_text()
        return {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()}

    def commit(self, repo_id: str, files: dict[str, bytes], revision: str = "main", tags=()) -> str:
        self.commits += 1
        commit = hashlib.sha1(f"{repo_id}{self.commits}".encode()).hexdigest()
        repo = self.repo(repo_id)
        for rel, data in files.items():
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        for ref in (revision, *tags):
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / ref).write_text(commit)
        return commit

    def commit_folder(self, repo_id: str, folder: Path, **kw) -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return self.commit(repo_id, files, **kw)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hub: HF_HUB_OFFLINE=1, HF_HUB_CACHE a fake cache; uploads commit into that cache."""
    from huggingface_hub import HfApi

    cache = FakeHubCache(tmp_path / "hub-cache")
    cache.root.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache.root))
    cache.uploads = []

    def create_repo(self, repo_id, *, exist_ok=False, private=False, **kw):
        cache.uploads.append(("create", repo_id, private))

    def upload_folder(
        self, *, folder_path, repo_id, commit_message=None, revision=None, delete_patterns=None, **kw
    ):
        branch = revision or "main"
        kept = {
            rel: data
            for rel, data in cache.files(repo_id, branch).items()
            if not any(fnmatch.fnmatch(rel, pat) for pat in delete_patterns or [])
        }
        new = {
            p.relative_to(folder_path).as_posix(): p.read_bytes()
            for p in Path(folder_path).rglob("*")
            if p.is_file()
        }
        commit = cache.commit(repo_id, {**kept, **new}, revision=branch)
        cache.uploads.append(("upload", repo_id, commit_message, sorted(new)))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return cache


def cli(capsys, *args):
    code = run_app(app, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def same_weights(a, b):
    assert sorted(a.lora) == sorted(b.lora) and sorted(a.dense) == sorted(b.dense)
    for m in a.lora:
        torch.testing.assert_close(a.lora[m].delta(), b.lora[m].delta(), atol=0, rtol=0)
    for p in a.dense:
        torch.testing.assert_close(a.dense[p], b.dense[p], atol=0, rtol=0)


@pytest.mark.parametrize(
    "text, ref",
    [
        ("org/adapter", HubRef("org/adapter")),
        ("org/adapter@v1.0", HubRef("org/adapter", "v1.0")),
        ("org/a_b-c.d@refs/pr/1", HubRef("org/a_b-c.d", "refs/pr/1")),
        ("adapter", None),
        ("org/../x", None),
        ("/abs/path", None),
        ("org/a/b", None),
        ("org/a@../main", None),
    ],
)
def test_hub_ids_are_parsed_strictly(text, ref):
    assert parse_hub_ref(text) == ref


def test_add_from_hub_id_with_revision(hub, peft_adapters, tmp_path, capsys):
    folder = peft_adapters["llama-rslora"][1]
    first = hub.commit_folder("org/rs-adapter", folder, tags=("v1",))
    hub.commit("org/rs-adapter", {"adapter_config.json": b"{}", "README.md": b"a later, broken revision"})
    lib = tmp_path / "lib"
    assert cli(capsys, "library", "init", lib)[0] == 0
    code, out, err = cli(capsys, "library", "add", lib, "org/rs-adapter@v1", "--task", "rs")
    assert code == 0, err
    got = ExpertLibrary.open(lib).get("rs-adapter")
    same_weights(got, read_peft_folder(folder))  # the reference: the adapter folder read directly
    assert got.metadata.extra["source"] == f"hub:org/rs-adapter@{first}" and got.metadata.task == "rs"
    # main points at the broken revision: refused in one line, nothing added
    code, _, err = cli(capsys, "library", "add", lib, "org/rs-adapter", "--name", "other")
    assert code == 1 and err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err
    assert "other" not in ExpertLibrary.open(lib)


def test_hub_id_not_in_the_offline_cache_is_one_error_line(hub, tmp_path, capsys):
    lib = tmp_path / "lib"
    ExpertLibrary.create(lib)
    code, _, err = cli(capsys, "library", "add", lib, "org/missing@v2")
    assert code == 1 and err.startswith("error: no adapter folder org/missing@v2 here, and as a Hub repo:")
    assert "org/missing@v2: not in the Hub cache" in err and "HF_HUB_OFFLINE" in err
    assert err.count("\n") == 1


def _library(path: Path, n: int = 3) -> ExpertLibrary:
    lib = ExpertLibrary.create(path, base_model="org/base")
    for i in range(n):
        lib.add(make_expert(name=f"e{i}", task=f"t{i}", seed=i))
    lib.put_artifact("proto", {"k": 1}, "e0", {"v": torch.ones(3)}, {"note": "x"})
    lib.put_artifact("proto", {"k": 1}, None, {"v": torch.zeros(2)})
    return lib


def test_push_library_then_pull_it_back(hub, tmp_path, capsys):
    lib = _library(tmp_path / "lib")
    code, out, err = cli(capsys, "library", "push", tmp_path / "lib", "org/my-library", "--private")
    assert code == 0, err
    uploaded = hub.files("org/my-library")
    assert "moerge-library.json" in uploaded and not any("catalog" in f for f in uploaded)
    assert sum(f.endswith("/moerge_expert.json") for f in uploaded) == 3
    assert ("create", "org/my-library", True) in hub.uploads
    # pull into a new library: the same experts, metadata, artifacts and base
    code, out, err = cli(capsys, "library", "pull", "org/my-library", tmp_path / "pulled")
    assert code == 0, err
    pulled = ExpertLibrary.open(tmp_path / "pulled")
    assert pulled.names() == ["e0", "e1", "e2"] and pulled.base_model == "org/base"
    for n in pulled.names():
        same_weights(pulled.get(n), lib.get(n))
        assert pulled.get_metadata(n).task == lib.get_metadata(n).task
        assert pulled.get_metadata(n).extra["source"].startswith("hub:org/my-library@")
    tensors, info = pulled.get_artifact("proto", {"k": 1}, "e0")
    assert torch.equal(tensors["v"], torch.ones(3)) and info == {"note": "x"}
    assert pulled.get_artifact("proto", {"k": 1}, None) is not None
    assert pulled.verify().ok
    # a library push mirrors: an expert removed locally disappears from the repo
    lib.remove("e2")
    assert cli(capsys, "library", "push", tmp_path / "lib", "org/my-library")[0] == 0
    assert not any("/e2-" in f for f in hub.files("org/my-library"))


def test_pull_one_expert_into_an_existing_library(hub, tmp_path, capsys):
    _library(tmp_path / "lib")
    pull_lib = ExpertLibrary.create(tmp_path / "mine")
    pull_lib.add(make_expert(name="local", seed=7))
    assert cli(capsys, "library", "push", tmp_path / "lib", "org/lib")[0] == 0
    code, _, err = cli(capsys, "library", "pull", "org/lib", tmp_path / "mine", "--expert", "e1")
    assert code == 0, err
    assert ExpertLibrary.open(tmp_path / "mine").names() == ["e1", "local"]
    code, _, err = cli(capsys, "library", "pull", "org/lib", tmp_path / "mine", "--expert", "nope")
    assert code == 1 and "no expert named 'nope'" in err


def test_push_one_expert_is_a_peft_adapter_repo(hub, peft_adapters, tmp_path, capsys):
    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add_peft(peft_adapters["llama-patterns"][1], name="pat")
    code, _, err = cli(capsys, "library", "push", tmp_path / "lib", "org/pat-repo", "--expert", "pat")
    assert code == 0, err
    assert set(hub.files("org/pat-repo")) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "moerge_expert.json",
    }
    other = ExpertLibrary.create(tmp_path / "other")
    assert cli(capsys, "library", "add", tmp_path / "other", "org/pat-repo")[0] == 0
    same_weights(other.get("pat"), read_peft_folder(peft_adapters["llama-patterns"][1]))


def test_a_tampered_pulled_library_is_refused_and_nothing_is_added(hub, tmp_path):
    _library(tmp_path / "lib")
    from moerge.experts.hub import push

    push(ExpertLibrary.open(tmp_path / "lib"), "org/lib")
    files = hub.files("org/lib")
    weights = next(f for f in files if f.endswith("adapter_model.safetensors"))
    hub.commit("org/lib", {**files, weights: files[weights][:-4] + b"\x00\x00\x80\x7f"})  # one value: NaN
    with pytest.raises((LibraryError, ChecksumMismatchError), match="refused, nothing was added|checksum"):
        pull(HubRef("org/lib"), tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


def test_a_link_out_of_the_repo_cache_is_refused(hub, tmp_path):
    _library(tmp_path / "lib", n=1)
    from moerge.experts.hub import push

    push(ExpertLibrary.open(tmp_path / "lib"), "org/lib")
    snap = hub.repo("org/lib") / "snapshots" / (hub.repo("org/lib") / "refs" / "main").read_text()
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"format": 1}))
    (snap / "moerge-library.json").unlink()
    (snap / "moerge-library.json").symlink_to(secret)
    with pytest.raises(UnsafePathError, match="outside the repo's cache folder"):
        pull(HubRef("org/lib"), tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


def test_init_with_a_hub_base_records_its_shapes(hub, tiny_llama_dir, tmp_path, capsys):
    hub.commit_folder("org/tiny-llama", Path(tiny_llama_dir))
    code, out, err = cli(capsys, "library", "init", tmp_path / "lib", "--base-model", "org/tiny-llama")
    assert code == 0, err
    lib = ExpertLibrary.open(tmp_path / "lib")
    assert lib.base_model == "org/tiny-llama"
    assert lib.base_shapes["model.layers.0.self_attn.q_proj.weight"] == [64, 64]
