"""`moerge build-moe` / `moerge.merging.moe.build_moe`: the written Mixtral checkpoint loads with
``from_pretrained`` and generates; a one-expert MoE computes exactly its expert's dense model; a top-2 MoE
computes the routed mixture of the experts' dense FFNs written out here; the zero-training gates equal
mergekit-moe's formulas (``mergekit/moe/router.py``) computed here through forward hooks on hand-encoded prompts;
the output is written through a temporary sibling renamed into place."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moerge.cli import app
from moerge.cli.common import run_app

IDS = torch.tensor([[1, 5, 9, 12, 3, 7, 20, 33], [1, 40, 41, 42, 8, 8, 9, 10]])
PROMPTS = [["abc def", "hello"], ["12 + 7 ="], ["the cat sat on"]]
NEGATIVE = [["zzz"], [], []]


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def config(model_dirs, names, **extra):
    experts = [
        {"source_model": str(model_dirs[n]), "positive_prompts": PROMPTS[i]} for i, n in enumerate(names)
    ]
    return {"base_model": str(model_dirs["base"]), "experts": experts, **extra}


@pytest.mark.parametrize("shared", ["average", "base"])
def test_one_expert_moe_is_its_dense_model(model_dirs, tmp_path, shared):
    from moerge.merging.moe import build_moe

    out = build_moe(
        config(model_dirs, ["ft1"], experts_per_token=1, gate_mode="random", shared=shared), tmp_path / "moe"
    )
    moe = load(out)
    assert type(moe).__name__ == "MixtralForCausalLM"
    # the reference: the fine-tune itself ("average" over one expert), or the base with the fine-tune's FFNs
    ref = load(model_dirs["ft1"])
    if shared == "base":
        base, ft = load(model_dirs["base"]), ref
        ref = copy.deepcopy(base)
        ref.load_state_dict(
            {k: (ft.state_dict()[k] if ".mlp." in k else v) for k, v in base.state_dict().items()}
        )
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=IDS).logits, ref(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
        got = moe.generate(IDS[:1], max_new_tokens=6, do_sample=False)
        want = ref.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no temporary sibling left


class DenseTopK(nn.Module):
    """The reference MoE FFN: per token, softmax over W h, the top k renormalised, Σ p_e · FFN_e(h)."""

    def __init__(self, gate: torch.Tensor, ffns: list[nn.Module], k: int):
        super().__init__()
        self.gate, self.ffns, self.k = gate, ffns, k

    def forward(self, h):
        p = torch.softmax(h @ self.gate.T, dim=-1)
        top, idx = p.topk(self.k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e, ffn in enumerate(self.ffns):
            w = (top * (idx == e)).sum(-1, keepdim=True)
            out = out + w * ffn(h)
        return out


def test_top2_moe_matches_the_dense_mixture(model_dirs, tmp_path):
    from moerge.merging.moe import build_moe

    names = ["ft0", "ft1", "ft2"]
    out = build_moe(config(model_dirs, names, gate_mode="hidden", shared="average"), tmp_path / "moe")
    moe = load(out)
    fts = [load(model_dirs[n]) for n in names]
    ref = copy.deepcopy(fts[0])
    avg = {
        k: torch.stack([f.state_dict()[k] for f in fts]).mean(0) for k in ref.state_dict() if ".mlp." not in k
    }
    ref.load_state_dict(avg, strict=False)
    for i, layer in enumerate(ref.model.layers):
        gate = moe.model.layers[i].mlp.gate.weight.detach()
        layer.mlp = DenseTopK(gate, [f.model.layers[i].mlp for f in fts], k=2)
    with torch.no_grad():
        got, want = moe(input_ids=IDS).logits, ref(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the routing is not degenerate: some token's top-2 differs from another's
    h = torch.randn(64, moe.config.hidden_size)
    assert (
        len({tuple(sorted(r)) for r in (h @ moe.model.layers[0].mlp.gate.weight.T).topk(2).indices.tolist()})
        > 1
    )


def encode(tokenizer, prompts):
    """mergekit's encoding written out: bos + characters, left-padded with bos (mergekit/scripts/moe.py)."""
    bos = tokenizer.bos_token_id
    rows = [[bos] + tokenizer.convert_tokens_to_ids(list(p)) for p in prompts]
    n = max(len(r) for r in rows)
    ids = torch.tensor([[bos] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def layer_inputs(model, ids, mask):
    """Each decoder layer's input hidden states, captured by hooks: [layers, batch, seq, hidden]."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]), with_kwargs=True)
             for layer in model.model.layers]  # fmt: skip
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for hk in hooks:
        hk.remove()
    return torch.stack(seen)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "cheap_embed"])
def test_gates_follow_mergekits_formula(model_dirs, mode):
    from moerge.backbones.loading import load_base_model
    from moerge.model.moe import gate_vectors

    base, tok = load_base_model(model_dirs["base"], fingerprint=False)
    got = gate_vectors(mode, base, tok, PROMPTS, NEGATIVE)

    def vec(prompts):
        ids, mask = encode(tok, prompts)
        if mode == "cheap_embed":
            e = (base.model.embed_tokens.weight[ids] * mask[..., None]).sum((0, 1))
            return (e / e.norm()).expand(base.config.num_hidden_layers, -1)
        h = layer_inputs(base, ids, mask)
        per_prompt = h.mean(2) if mode == "hidden_avg" else h[:, :, -1]
        return per_prompt.mean(1)

    for e, (pos, neg) in enumerate(zip(PROMPTS, NEGATIVE)):
        v = vec(pos) - (vec(neg) if neg else 0)
        want = v / v.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(got[:, e], want.detach(), rtol=1e-5, atol=1e-6)


def test_library_experts_and_cli(model_dirs, tmp_path, capsys):
    """A library LoRA expert densified onto the base becomes an MoE expert: a one-expert MoE of it computes the
    base with the LoRA folded in (W + scaling · B A)."""
    import yaml

    from moerge.experts.library import ExpertLibrary

    from .conftest import LLAMA_MODULES, make_lora_expert

    lib = ExpertLibrary.create(tmp_path / "lib", base_model="tiny")
    expert = make_lora_expert("up", LLAMA_MODULES, rank=2, alpha=4.0, seed=3)
    lib.add(expert)
    cfg = {"base_model": str(model_dirs["base"]), "library": str(tmp_path / "lib"), "gate_mode": "random",
           "experts_per_token": 1, "shared": "average", "experts": [{"expert": "up"}]}  # fmt: skip
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(cfg))
    code = run_app(app, ["build-moe", str(tmp_path / "moe.yaml"), str(tmp_path / "out")])
    assert code == 0, capsys.readouterr()
    ref = load(model_dirs["base"])
    with torch.no_grad():
        for module, lm in expert.lora.items():
            ref.get_submodule(module).weight += (lm.alpha / lm.rank) * (lm.B @ lm.A)
        torch.testing.assert_close(load(tmp_path / "out")(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    # errors: one `error:` line that says what to change; the existing output is left alone
    cfg["gate_mode"] = "hidden"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    code = run_app(app, ["build-moe", str(tmp_path / "bad.yaml"), str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert code == 1 and "error:" in err and "positive_prompts" in err and "Traceback" not in err
    code = run_app(app, ["build-moe", str(tmp_path / "moe.yaml"), str(tmp_path / "out")])
    assert code == 1 and "--overwrite" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
