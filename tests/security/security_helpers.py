"""Helpers for the security tests (a uniquely named module: test folders share one import path).

A *sandbox* is a temporary folder holding a library and, around it, files that nothing may touch (canaries).
`outside_state` records every entry outside the library and the output folder, so a test asserts that a hostile
input changed nothing there, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from hypothesis import strategies as st

from moerge.experts.expert import Expert, ExpertMetadata, LoraModule

FUZZ = float(os.environ.get("MOERGE_FUZZ", "0") or 0)
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"

HOSTILE_STRINGS = [
    "", " ", "false", "true", "False", "0", "1", "nan", "-1", ".", "..", "../..", "/", "/etc/passwd",
    "../victim/precious.txt", "../../victim/precious.txt", "../victim-dir", "experts/../../victim",
    "a/../../victim", "/tmp", "~", "~/x", "\x00", "a\x00b", "C:\\Windows", "..\\..\\victim", "experts",
    "catalog.sqlite", "moerge-library.json", "adapter_model.safetensors", "adapter_config.json",
    "delta_model.safetensors", "moerge_expert.json", "(a+)+$", "(a|a)*b", "[", "*", ".*", "q_proj", Q,
    "^model\\.layers\\.0\\.self_attn\\.q_proj$", "LORA", "IA3", "none", "all", "x" * 300, "é", "\n", "%s",
    "{}", "[]", "null",
]  # fmt: skip


def examples(n: int) -> int:
    """``n`` examples per run (``MOERGE_FUZZ=k`` multiplies them, see conftest.py)."""
    return max(1, int(n * FUZZ)) if FUZZ else n


def hostile_strings() -> st.SearchStrategy[str]:
    return st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=12)


def json_scalars() -> st.SearchStrategy:
    return (
        st.none()
        | st.booleans()
        | st.sampled_from([0, 1, -1, 2, 4, 8, 2**31, 2**63, -(2**63), 10**30])
        | st.integers(-5, 70)
        | st.sampled_from(
            [0.0, -0.0, 0.5, -0.5, 1.5, 1e308, -1e308, 1e-320, float("nan"), float("inf"), -float("inf")]
        )
        | st.floats(allow_nan=True, allow_infinity=True)
        | hostile_strings()
    )


def json_values() -> st.SearchStrategy:
    return st.recursive(
        json_scalars(),
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(hostile_strings(), children, max_size=3)
        ),
        max_leaves=6,
    )


def lora_expert(
    name: str = "e", seed: int = 0, rank: int = 2, d: int = 8, alpha: float = 4.0, **meta
) -> Expert:
    g = torch.Generator().manual_seed(seed)
    lora = {
        m: LoraModule(torch.randn(rank, d, generator=g), torch.randn(d, rank, generator=g), alpha)
        for m in (Q, V)
    }
    return Expert(ExpertMetadata(name=name, base_model="tiny", **meta), lora=lora)


def file_state(path: Path) -> tuple:
    st_ = path.lstat()
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_dir():
        return ("dir", st_.st_mode)
    return ("file", st_.st_size, st_.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())


def outside_state(root: Path, *inside: Path) -> dict[str, tuple]:
    """Every entry under ``root`` except those under ``inside`` (the library, OUT): relative path -> state."""
    skip = [p.resolve() for p in inside]
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        if any(d.resolve() == s or s in d.resolve().parents for s in skip):
            dirnames.clear()
            continue
        for n in dirnames + filenames:
            p = d / n
            if any(p.resolve() == s for s in skip) and not p.is_symlink():
                continue
            out[str(p.relative_to(root))] = file_state(p)
    return out


def make_canaries(root: Path) -> None:
    """Files a hostile library would love to reach: next to the library, and a folder it may try to delete."""
    (root / "victim").mkdir(parents=True, exist_ok=True)
    (root / "victim" / "precious.txt").write_text("do not touch")
    (root / "victim-dir" / "keep").mkdir(parents=True, exist_ok=True)
    (root / "victim-dir" / "keep" / "a.bin").write_bytes(b"\x00" * 16)
    (root / "victim-dir" / "adapter_model.safetensors").write_bytes(b"not yours")


def catalog_rows(lib) -> list[tuple]:
    return lib._conn.execute("SELECT name, folder, metadata, checksums FROM experts ORDER BY name").fetchall()


def expert_folder(lib, name: str) -> Path:
    folder = lib._conn.execute("SELECT folder FROM experts WHERE name=?", (name,)).fetchone()[0]
    return lib.storage.local_path("experts") / folder


def rewrite_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def write_model(folder: Path, seed: int, *, vocab: int = 32, hidden: int = 16, nan: bool = False) -> Path:
    """A minimal transformers-style folder (config, safetensors weights, tokenizer) without transformers."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(hidden, hidden, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(2 * hidden, hidden, generator=g),
        "model.norm.weight": torch.ones(hidden),
    }
    if nan:
        tensors["model.norm.weight"][0] = float("nan")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "num_hidden_layers": 2, "hidden_size": hidden}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}, "added_tokens": []}))
    return folder
