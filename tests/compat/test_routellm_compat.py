"""Peer agreement: moerge's RouteLLM routers vs routellm 0.2.0's own code on the same inputs.

Runs when routellm is installed in the side venv ``.venv-mergekit`` (``./dev compat`` installs it beside mergekit,
without dependencies; ``MOERGE_MERGEKIT_VENV`` may name another side venv) and is skipped otherwise. One driver
process (`routellm_driver.py`) computes:

- SW-ranking's ratings with ``compute_elo_mle_with_tie`` on similarity-weighted battles derived from a pool's
  answers, against `moerge.pool.routellm.SWRankingRouter.ratings` for the same query (ratings compared up to their
  common offset, which routellm fixes by its 1000 start and moerge by centring);
- MF's ``MFModel.pred_win_rate`` with the weights of a `MatrixFactorizationRouter` trained here (the OpenAI
  embedding call replaced by the query's embedding), against its ``win_rate``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from moerge.pool.query import PoolData
from moerge.pool.routellm import MatrixFactorizationRouter, SWRankingRouter, pairwise_preferences

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def routellm_python() -> Path | None:
    venv = REPO / os.environ.get("MOERGE_MERGEKIT_VENV", ".venv-mergekit")
    py = venv / "bin" / "python"
    if py.exists() and any(venv.glob("lib/python3*/site-packages/routellm/__init__.py")):
        return py
    return None


PY = routellm_python()
pytestmark = pytest.mark.skipif(
    PY is None, reason="routellm is not installed in .venv-mergekit; `./dev compat --setup` installs it"
)


def pool(n: int = 24) -> PoolData:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(n, 8, generator=g)
    q = torch.stack([(f[:, 0] > 0).float(), (torch.rand(n, generator=g) < 0.4).float(),
                     (torch.rand(n, generator=g) < 0.9).float()], dim=1)  # fmt: skip
    return PoolData(
        [f"q{i}" for i in range(n)], f, q, ["weak", "mid", "strong"], torch.tensor([1.0, 2.0, 8.0])
    )


def test_sw_ranking_and_mf_match_routellm():
    data = pool()
    sw = SWRankingRouter(strong="strong", weak="weak").fit(data)
    query = torch.randn(1, 8, generator=torch.Generator().manual_seed(9))
    sims = torch.nn.functional.cosine_similarity(query, data.features, dim=1).double()
    weights = (10 * 10 ** (sims / sims.max())).tolist()
    pairs, outcome = pairwise_preferences(data.quality)
    battles, bw = [], []
    for j in range(len(data.texts)):
        for p, (a, b) in enumerate(pairs.tolist()):
            o = float(outcome[j, p])
            battles.append(
                [data.members[a], data.members[b], "model_a" if o == 1 else "model_b" if o == 0 else "tie"]
            )
            bw.append(weights[j])
    mf = MatrixFactorizationRouter(dim=16, epochs=5, strong="strong", weak="weak").fit(data)
    state = {"P.weight": mf.net.P.weight, "text_proj.0.weight": mf.net.text_proj.weight,
             "classifier.0.weight": mf.net.classifier.weight}  # fmt: skip
    prompts = {f"p{i}": data.features[i].tolist() for i in range(6)}
    job = {
        "sw": {"battles": battles, "weights": bw},
        "mf": {"dim": 16, "num_models": 3, "text_dim": 8, "strong": 2, "weak": 0, "embeddings": prompts,
               "state": {k: v.detach().tolist() for k, v in state.items()}},
    }  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": "sk-dummy", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([str(PY), str(HERE / "routellm_driver.py")], input=json.dumps(job), capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    ref = np.array([got["elo"][m] for m in data.members])
    ours = sw.ratings(query)[0].numpy()
    np.testing.assert_allclose(ours - ours.mean(), ref - ref.mean(), atol=0.05)
    want = 1 - 1 / (1 + 10 ** ((ref[2] - ref[0]) / 400))
    assert float(sw.win_rate(query)[0]) == pytest.approx(want, abs=1e-4)
    ours_mf = mf.win_rate(data.features[:6]).tolist()
    np.testing.assert_allclose(ours_mf, got["mf_win_rate"], atol=1e-6)
