"""moerge's Arrow (output mix, PEFT's settings) gives the same logits as PEFT's `create_arrow_model`, on
adapters saved by PEFT itself and read through moerge's PEFT import and library."""

from __future__ import annotations

import copy

import pytest
import torch
from _routing_helpers import save_peft_adapters

from moerge.experts.library import ExpertLibrary
from moerge.experts.peft_io import read_peft_folder
from moerge.recipes.facade import attach, detach
from moerge.transforms.arrow import ARROW_CONFIG, ARROW_KIND

peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    "arch,targets,fan",
    [
        ("llama", ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], False),
        ("gpt2", ["c_attn", "c_proj", "c_fc"], True),
    ],
)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_arrow_matches_peft(tmp_path_factory, tiny_llama, tiny_gpt2, arch, targets, fan, top_k):
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch][0]
    tmp = tmp_path_factory.mktemp(f"peft_{arch}_{top_k}")
    paths = save_peft_adapters(base, tmp, num=5, r=4, target_modules=targets, seed=top_k, fan_in_fan_out=fan)
    ids = torch.randint(4, 95, (2, 9), generator=torch.Generator().manual_seed(0))

    cfg = peft.ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0)
    peft_model = peft.create_arrow_model(copy.deepcopy(base), paths, cfg)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits

    lib = ExpertLibrary.create(tmp / "lib")
    for i, p in enumerate(paths):
        lib.add(read_peft_folder(p, name=f"task_{i}", task=f"t{i}"))
    model = copy.deepcopy(base)
    routed = attach(model, lib, recipe="arrow", k=top_k, temperature=1.0, aggregation="output")
    with torch.no_grad():
        got = routed(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, base(input_ids=ids).logits, atol=1e-3)  # the experts do act
    assert all(lib.has_artifact(ARROW_KIND, ARROW_CONFIG, n) for n in lib.names())  # prototypes cached
    detach(routed)
