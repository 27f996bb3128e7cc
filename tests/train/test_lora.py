"""train_expert: loss goes down, weights are reproducible, masking is right, the Expert matches PEFT."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moerge.train.data import IGNORE_INDEX, DataFormatError, encode_example, load_examples, read_jsonl
from moerge.train.loop import causal_lm_loss
from moerge.train.lora import TrainConfig, train_expert

FAST = dict(steps=40, lr=1e-2, batch_size=8, seq_len=32, rank=4, alpha=8.0, progress=False)
# A random tiny base bounds its logits through the final norm; adapting the LM head lets a LoRA move them.
LLAMA_MODULES = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def dense_merged(model, expert):
    """Independent reference: a copy of the base with W += scaling · B @ A written into every module."""
    merged = copy.deepcopy(model)
    mods = dict(merged.named_modules())
    with torch.no_grad():
        for name, lm in expert.lora.items():
            w = mods[name].weight
            delta = lm.alpha / lm.rank * (lm.B @ lm.A)
            w += delta.T if lm.fan_in_fan_out else delta
    return merged


def mean_target_loss(model, tokenizer, rows) -> float:
    """Reference loss: per-token cross-entropy over completion tokens only, token by token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = encode_example(tokenizer, row)
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            for t in range(1, len(ids)):
                if labels[t] != IGNORE_INDEX:
                    total += F.cross_entropy(logits[t - 1], torch.tensor(labels[t])).item()
                    count += 1
    return total / count


@pytest.fixture(scope="module")
def trained(tiny_llama, reverse_data):
    model, tok = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expert = train_expert(
        model,
        tok,
        reverse_data,
        TrainConfig(**FAST, seed=3, target_modules=LLAMA_MODULES),
        name="rev",
        task="reverse",
    )
    return expert, before


def test_loss_decreases_and_metadata(trained, tiny_llama, reverse_data):
    from moerge.experts.fingerprint import fingerprint_model

    model, tok = tiny_llama
    expert, _ = trained
    t = expert.metadata.training
    assert t["steps"] == 40 and t["final_loss"] < t["first_loss"] - 0.5
    assert t["tokens"] > 0 and t["seconds"] > 0 and t["lr"] == FAST["lr"]
    assert expert.metadata.task == "reverse" and expert.metadata.kind == "lora"
    mods = [
        "self_attn.q_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    assert sorted(expert.lora) == sorted(
        [f"model.layers.{i}.{p}" for i in range(2) for p in mods] + ["lm_head"]
    )
    assert expert.metadata.base_fingerprint == fingerprint_model(model)
    # The expert, applied densely to the base, lowers the completion loss on its task.
    base_loss = mean_target_loss(model, tok, reverse_data[:16])
    expert_loss = mean_target_loss(dense_merged(model, expert), tok, reverse_data[:16])
    assert expert_loss < base_loss - 0.5


def test_caller_model_untouched(trained, tiny_llama):
    model, _ = tiny_llama
    _, before = trained
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in n for n, _ in model.named_modules())


def test_same_seed_same_weights(trained, tiny_llama, reverse_data):
    model, tok = tiny_llama
    expert, _ = trained
    again = train_expert(model, tok, reverse_data, TrainConfig(**FAST, seed=3, target_modules=LLAMA_MODULES))
    other = train_expert(model, tok, reverse_data, TrainConfig(**FAST, seed=4, target_modules=LLAMA_MODULES))
    assert sorted(again.lora) == sorted(expert.lora)
    for k, m in expert.lora.items():
        assert torch.equal(m.A, again.lora[k].A) and torch.equal(m.B, again.lora[k].B)
    assert any(not torch.equal(m.A, other.lora[k].A) for k, m in expert.lora.items())


def test_expert_matches_peft(trained, tiny_llama, tmp_path):
    """The converted Expert, exported and loaded by PEFT, gives the dense reference's logits."""
    from peft import PeftModel

    from moerge.experts.peft_io import write_peft_folder

    model, _ = tiny_llama
    expert, _ = trained
    write_peft_folder(expert, tmp_path / "rev")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "rev"))
    x = torch.randint(4, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=x).logits,
            dense_merged(model, expert)(input_ids=x).logits,
            atol=1e-5,
            rtol=1e-5,
        )


def test_gpt2_conv1d(tiny_gpt2, reverse_data, tmp_path):
    """GPT-2's Conv1D layers: factors marked fan_in_fan_out; PEFT and the dense reference agree."""
    from peft import PeftModel

    from moerge.experts.peft_io import write_peft_folder

    model, tok = tiny_gpt2
    expert = train_expert(model, tok, reverse_data, TrainConfig(**{**FAST, "steps": 10}), name="g")
    assert all(m.fan_in_fan_out for m in expert.lora.values())
    assert any(k.endswith("attn.c_attn") for k in expert.lora)
    assert any(float(m.B.abs().max()) > 0 for m in expert.lora.values())
    write_peft_folder(expert, tmp_path / "g")
    ref = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "g"))
    x = torch.randint(4, 100, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            ref(input_ids=x).logits, dense_merged(model, expert)(input_ids=x).logits, atol=1e-5, rtol=1e-5
        )


def test_prompt_completion_masking(tiny_llama):
    _, tok = tiny_llama
    ids, labels = encode_example(tok, {"prompt": "ab=", "completion": "ba"})
    chars = [tok.convert_ids_to_tokens(i) for i in ids]
    assert chars == ["<s>", "a", "b", "=", "b", "a", "</s>"]
    assert labels == [IGNORE_INDEX] * 4 + ids[4:]
    ids_t, labels_t = encode_example(tok, "ab")
    assert labels_t == [IGNORE_INDEX] + ids_t[1:] and tok.convert_ids_to_tokens(ids_t[-1]) == "</s>"


def test_loss_only_on_completion(tiny_llama, reverse_data):
    """The loop's loss equals a token-by-token reference over completion tokens (prompt tokens excluded)."""
    from moerge.train.data import pad_batch

    model, tok = tiny_llama
    rows = reverse_data[:3] + [{"prompt": "abcdefab=", "completion": "x"}]
    enc = [encode_example(tok, r) for r in rows]
    x, y = pad_batch([e[0] for e in enc], [e[1] for e in enc], tok.pad_token_id)
    with torch.no_grad():
        got = causal_lm_loss(model(input_ids=x).logits, y).item()
    assert got == pytest.approx(mean_target_loss(model, tok, rows), rel=1e-5)


def test_jsonl_path_and_errors(tmp_path, tiny_llama):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "abc"}\n\n{"prompt": "a", "completion": "b"}\n')
    assert read_jsonl(good) == [{"text": "abc"}, {"prompt": "a", "completion": "b"}]
    assert load_examples(["xy", {"text": "z"}]) == [{"text": "xy"}, {"text": "z"}]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "abc"}\n{"text": "ok"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: not valid JSON"):
        read_jsonl(bad)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataFormatError, match=r"wrong\.jsonl:1: .*\"completion\".*found keys: prompt"):
        read_jsonl(wrong)
    with pytest.raises(DataFormatError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")
    model, tok = tiny_llama
    with pytest.raises(DataFormatError, match="example 1"):
        train_expert(model, tok, ["ok", 5], TrainConfig(**FAST))


def test_into_library(tmp_path, tiny_llama, reverse_data):
    library = pytest.importorskip("moerge.experts.library")
    model, tok = tiny_llama
    lib = library.ExpertLibrary.create(tmp_path / "lib")
    train_expert(
        model, tok, reverse_data, TrainConfig(**{**FAST, "steps": 5}), library=lib, name="r1", task="rev"
    )
    assert lib.names() == ["r1"] and lib.get_metadata("r1").task == "rev"
    got = lib.get("r1")
    assert got.lora and got.metadata.training["steps"] == 5


def test_cli_bad_jsonl_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "abc"}\nnot json\n')
    base = tmp_path / "base"
    base.mkdir()
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "moerge"),
            "train",
            "--base",
            str(base),
            "--data",
            str(bad),
            "--library",
            str(tmp_path / "lib"),
            "--name",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad.jsonl:2: not valid JSON" in lines[0] and "Traceback" not in proc.stderr


def test_cli_train_into_library(tmp_path, tiny_llama_dir):
    """`moerge train` in-process: trains from a JSONL file and adds the expert with its task and tags."""
    from typer.testing import CliRunner

    from moerge.cli import app
    from moerge.experts.library import ExpertLibrary

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{w}=", "completion": w[::-1]}) + "\n" for w in ["abc", "xyz"])
    )
    cfg = tmp_path / "train.yaml"
    cfg.write_text("steps: 50\nrank: 2\nprogress: false\n")
    args = ["train", "--base", str(tiny_llama_dir), "--data", str(data), "--library", str(tmp_path / "lib"),
            "--name", "rev", "--task", "reverse", "--steps", "3", "--config", str(cfg), "--tag", "cli"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lib = ExpertLibrary.open(tmp_path / "lib")
    md = lib.get_metadata("rev")
    assert (
        md.task == "reverse" and md.tags == ["cli"] and md.training["steps"] == 3 and md.training["rank"] == 2
    )
    assert md.base_model == str(tiny_llama_dir)
    args = ["train", "--base", str(tiny_llama_dir), "--data", str(data), "--library", str(tmp_path / "lib"),
            "--name", "top", "--steps", "2", "--config", str(cfg), "--layers=-1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {m.split(".")[2] for m in lib.get("top").lora} == {"1"} and lib.get_metadata("top").training[
        "layers"
    ] == [-1]
