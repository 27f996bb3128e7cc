"""Hostile contributions: generated adapter_config.json files, expert JSON and safetensors headers. Each either
adds a sound expert (whose values are exactly what the file says, with types checked, not coerced) or raises a
`MoergeError`; nothing outside the library changes, and the library still passes `verify`."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from security_helpers import (
    Q,
    V,
    examples,
    hostile_strings,
    json_scalars,
    json_values,
    lora_expert,
    make_canaries,
    outside_state,
)

from moerge.errors import MalformedConfigError, MoergeError
from moerge.experts.library import ExpertLibrary
from moerge.experts.peft_io import load_safetensors, write_peft_folder
from moerge.merging.folders import CheckpointReader
from moerge.merging.st_io import read_header

ADAPTER_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "peft_type",
                "bias", "use_dora", "modules_to_save", "target_modules", "base_model_name_or_path", "task_type"]  # fmt: skip
METADATA_KEYS = ["name", "kind", "task", "tags", "created_at", "extra", "scores", "base_fingerprint", "training",
                 "base_model", "unknown_key", "checksums", "format"]  # fmt: skip


class Sandbox:
    """A library next to canaries, and an adapter folder to edit; built once per test (not per example)."""

    def __init__(self, root: Path):
        self.root = root
        make_canaries(root)
        self.lib = ExpertLibrary.create(root / "lib")
        self.lib.add(lora_expert("keep", seed=1))
        self.adapter = root / "adapter"
        write_peft_folder(
            lora_expert("contrib", seed=2, rank=2, alpha=4.0), self.adapter, with_metadata=False
        )
        self.config = json.loads((self.adapter / "adapter_config.json").read_text())
        self.weights = (self.adapter / "adapter_model.safetensors").read_bytes()
        self.before = outside_state(root, root / "lib", self.adapter)

    def reset(self) -> None:
        shutil.rmtree(self.adapter)
        self.adapter.mkdir()
        (self.adapter / "adapter_config.json").write_text(json.dumps(self.config))
        (self.adapter / "adapter_model.safetensors").write_bytes(self.weights)

    def add(self):
        try:
            return self.lib.add_peft(self.adapter, name="contrib", overwrite=True)
        except MoergeError:
            return None

    def assert_sound(self) -> None:
        assert outside_state(self.root, self.root / "lib", self.adapter) == self.before
        report = self.lib.verify()
        assert report.ok and not report.leftovers, report
        assert "keep" in self.lib.names()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return Sandbox(tmp_path_factory.mktemp("hostile-inputs"))


def pattern_dicts() -> st.SearchStrategy:
    keys = hostile_strings() | st.sampled_from(
        ["q_proj", "v_proj", "self_attn.q_proj", "layers.0", ".*_proj", "q_proj|v_proj"]
    )
    return st.dictionaries(keys, json_scalars(), max_size=3)


def config_edits() -> st.SearchStrategy:
    value = json_values() | pattern_dicts()
    return st.dictionaries(st.sampled_from(ADAPTER_KEYS), value, min_size=1, max_size=4)


@settings(max_examples=examples(100))
@given(edits=config_edits())
def test_hostile_adapter_config(sandbox, edits):
    sandbox.reset()
    config = {**sandbox.config, **edits}
    try:
        text = json.dumps(config)
    except ValueError:
        return
    (sandbox.adapter / "adapter_config.json").write_text(text)
    added = sandbox.add()
    if added is not None:
        expert = sandbox.lib.get("contrib")
        for lm in expert.lora.values():
            assert lm.rank >= 1 and math.isfinite(lm.alpha) and lm.alpha > 0
            assert lm.fan_in_fan_out is (config.get("fan_in_fan_out", False) is True), (
                "a string is not a bool"
            )
            assert lm.use_rslora is (config.get("use_rslora", False) is True)
            patterns = config.get("alpha_pattern") or {}
            if not patterns and "lora_alpha" in config and config["lora_alpha"] is not None:
                assert lm.alpha == float(config["lora_alpha"])
        assert config.get("peft_type", "LORA").upper() == "LORA" and not config.get("use_dora")
        assert isinstance(config.get("r", 8), int) and not isinstance(config.get("r", 8), bool)
    sandbox.assert_sound()


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"fan_in_fan_out": "false"}, "fan_in_fan_out: Input should be a valid boolean"),
        ({"use_rslora": "true"}, "use_rslora: Input should be a valid boolean"),
        ({"lora_alpha": float("nan")}, "lora_alpha: Input should be a finite number"),
        ({"lora_alpha": float("inf")}, "lora_alpha: Input should be a finite number"),
        ({"lora_alpha": 0}, "lora_alpha: Input should be greater than 0"),
        ({"lora_alpha": -4}, "lora_alpha: Input should be greater than 0"),
        ({"r": 0}, "r: Input should be greater than or equal to 1"),
        ({"r": "2"}, "r: Input should be a valid integer"),
        ({"r": True}, "r: Input should be a valid integer"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern.q_proj: Input should be greater than or equal to 1"),
        ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
        ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern.q_proj: Input should be a valid number"),
    ],
)
def test_silently_wrong_configs_are_refused(sandbox, edit, message):
    sandbox.reset()
    (sandbox.adapter / "adapter_config.json").write_text(json.dumps({**sandbox.config, **edit}))
    with pytest.raises(MalformedConfigError, match=message) as err:
        sandbox.lib.add_peft(sandbox.adapter, name="contrib", overwrite=True)
    assert "adapter_config.json" in str(err.value)
    sandbox.assert_sound()


def test_rank_zero_factors_are_refused(sandbox):
    sandbox.reset()
    sd = {f"base_model.model.{m}.lora_{ab}.weight": torch.zeros((0, 8) if ab == "A" else (8, 0))
          for m in (Q, V) for ab in "AB"}  # fmt: skip
    (sandbox.adapter / "adapter_model.safetensors").write_bytes(save(sd))
    (sandbox.adapter / "adapter_config.json").write_text(json.dumps({**sandbox.config, "r": 1}))
    with pytest.raises(MoergeError, match="rank"):
        sandbox.lib.add_peft(sandbox.adapter, name="contrib", overwrite=True)
    sandbox.assert_sound()


@settings(max_examples=examples(50))
@given(
    edits=st.dictionaries(st.sampled_from(METADATA_KEYS), json_values(), min_size=1, max_size=4),
    nested=st.booleans(),
)
def test_hostile_expert_json_of_a_contribution(sandbox, edits, nested):
    """The moerge_expert.json a contributor ships next to the adapter (flat metadata, or a record)."""
    sandbox.reset()
    md = {"name": "contrib", "task": "t", **edits}
    blob = {"format": 1, "metadata": md, "checksums": {"adapter_config.json": "0" * 64}} if nested else md
    try:
        (sandbox.adapter / "moerge_expert.json").write_text(json.dumps(blob))
    except ValueError:
        return
    added = sandbox.add()
    if added is not None:
        assert added.name == "contrib" and all(isinstance(t, str) for t in added.tags)
    sandbox.assert_sound()


# ------------------------------------------------------------------------------------- safetensors headers

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X", "", "f32"]


def entry() -> st.SearchStrategy:
    shape = st.lists(st.integers(-2, 6) | st.sampled_from([2**40, 2**62, 0]), max_size=3) | json_values()
    offsets = (
        st.lists(st.integers(-8, 600) | st.sampled_from([2**63, 2**64 + 1]), min_size=0, max_size=3)
        | json_values()
    )
    return st.fixed_dictionaries({}, optional={"dtype": st.sampled_from(DTYPES) | json_values(), "shape": shape,
                                               "data_offsets": offsets})  # fmt: skip


def header_bytes() -> st.SearchStrategy:
    names = st.sampled_from([f"base_model.model.{Q}.lora_A.weight", f"base_model.model.{Q}.lora_B.weight",
                             "__metadata__", "x", ""]) | hostile_strings()  # fmt: skip
    header = st.dictionaries(names, entry() | json_values(), max_size=4)
    return header.map(lambda h: json.dumps(h).encode()) | st.binary(max_size=64)


@settings(max_examples=examples(200))
@given(header=header_bytes(), data=st.binary(max_size=128), length=st.none() | st.integers(0, 2**64 - 1))
def test_hostile_safetensors_headers(tmp_path_factory, header, data, length):
    n = len(header) if length is None else length
    blob = struct.pack("<Q", n) + header + data
    folder = tmp_path_factory.mktemp("st", numbered=True)
    path = folder / "model.safetensors"
    path.write_bytes(blob)
    try:  # the streaming reader behind full-checkpoint merges
        entries, _ = read_header(path)
    except MoergeError:
        entries = None
    if entries is not None:
        with CheckpointReader(folder) as r:
            for k in r.names():
                t = r.get(k)
                assert tuple(t.shape) == r.shape(k)
    with contextlib.suppress(MoergeError):  # the reader behind adapters and library experts
        load_safetensors(blob, str(path))
    shutil.rmtree(folder)


def test_hostile_safetensors_as_an_adapter(sandbox):
    for blob in [b"", b"\x00" * 8, struct.pack("<Q", 2**40) + b"{}", struct.pack("<Q", 2) + b"{}",
                 struct.pack("<Q", 60) + json.dumps({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4]}}).encode()[:60]]:  # fmt: skip
        sandbox.reset()
        (sandbox.adapter / "adapter_model.safetensors").write_bytes(blob)
        with pytest.raises(MoergeError, match="adapter/adapter_(model.safetensors|config.json)"):
            sandbox.lib.add_peft(sandbox.adapter, name="contrib", overwrite=True)
    sandbox.assert_sound()


def test_a_catastrophically_backtracking_pattern_is_cut_off(tmp_path, monkeypatch):
    """PEFT matches rank/alpha pattern keys as regexes; one that backtracks for ever is refused, not waited on."""
    from moerge.experts import peft_io

    monkeypatch.setattr(peft_io, "_PATTERN_TIMEOUT_S", 0.2)
    module = "a" * 40
    sd = {f"base_model.model.{module}.lora_A.weight": torch.ones(2, 4), f"base_model.model.{module}.lora_B.weight": torch.ones(4, 2)}  # fmt: skip
    (tmp_path / "adapter_model.safetensors").write_bytes(save(sd))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "rank_pattern": {"(a|aa)+b": 2}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MalformedConfigError, match="takes too long to match"):
        peft_io.read_peft_folder(tmp_path)
