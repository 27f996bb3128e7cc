"""The model pool (`moerge.pool.members`): FLOPs counted by hand from the config, a truncated member against the
full model's hidden state at the cut, a merged member against ``W + scaling·B@A`` written out, and the YAML
config's refusals."""

from __future__ import annotations

import pytest
import torch

from moerge.errors import MalformedConfigError
from moerge.pool.members import (
    PoolConfig,
    PoolMemberConfig,
    build_member,
    build_pool,
    linear_flops_per_token,
    truncate_layers,
)


def test_flops_per_token_counts_every_linear_weight(tiny_llama_dir):
    from moerge.train.lora import load_base

    model, _, _, _ = load_base(str(tiny_llama_dir))
    c = model.config
    d, f, v, n = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * f  # q, k, v, o; gate, up, down
    assert linear_flops_per_token(model) == 2 * (n * per_layer + d * v)


def test_truncated_member_is_the_full_model_cut_at_that_layer(tiny_llama_dir):
    from moerge.train.lora import load_base

    model, _, _, _ = load_base(str(tiny_llama_dir))
    model.eval()
    keep = 1
    cut = truncate_layers(model, keep)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[keep]  # after layer `keep`
        want = model.lm_head(model.model.norm(hidden))
        torch.testing.assert_close(cut(input_ids=ids).logits, want)
    assert len(model.model.layers) == model.config.num_hidden_layers > keep  # the original is untouched
    with pytest.raises(MalformedConfigError, match="out of range"):
        truncate_layers(model, 99)


def test_merged_member_adds_each_experts_update(reduced_suite):
    lib = reduced_suite.open_library()
    names = lib.names(kind="lora")[:2]
    cfg = PoolConfig(
        members=[
            PoolMemberConfig(name="base", model=reduced_suite.base_model),
            PoolMemberConfig(name="two", base=reduced_suite.base_model, experts=names, weights=[1.0, 0.5]),
        ],
        library=reduced_suite.library,
    )
    base, two = build_pool(cfg)
    w_base = dict(base.model.named_parameters())
    w_two = dict(two.model.named_parameters())
    for mod in lib.get(names[0]).lora:
        want = w_base[mod + ".weight"].clone()
        for n, wt in zip(names, [1.0, 0.5]):
            lm = lib.get(n).lora.get(mod)
            if lm is not None:
                want += wt * lm.scaling * (lm.B @ lm.A)
        torch.testing.assert_close(w_two[mod + ".weight"], want)
    assert two.flops_per_token == base.flops_per_token  # a merge costs nothing at inference


def test_pool_config_refusals(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        PoolMemberConfig(name="x")
    with pytest.raises(ValueError, match="recipe"):
        PoolMemberConfig(name="x", base="b", experts=["e"], combine="route")
    with pytest.raises(ValueError, match="repeated: a"):
        PoolConfig(members=[PoolMemberConfig(name="a", model="m"), PoolMemberConfig(name="a", model="n")])
    bad = tmp_path / "pool.yaml"
    bad.write_text("members:\n  - {name: a, base: b, experts: [e]}\n")
    with pytest.raises(MalformedConfigError, match="library"):
        PoolConfig.from_yaml(bad)


def test_routed_member_needs_a_route_function(reduced_suite):
    lib = reduced_suite.open_library()
    cfg = PoolMemberConfig(name="r", base=reduced_suite.base_model, experts=lib.names(kind="lora")[:2],
                           combine="route", recipe="arrow")  # fmt: skip
    with pytest.raises(MalformedConfigError, match="route=moerge.recipes.attach"):
        build_member(cfg, lib)
    from moerge.recipes import attach

    member = build_member(cfg, lib, route=attach)
    assert member.info["recipe"] == "arrow"
    ids = torch.randint(0, 10, (1, 5))
    assert member.logits(ids).shape[:2] == (1, 5)
