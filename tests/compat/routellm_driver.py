"""Runs inside the side venv (``.venv-mergekit``, with routellm 0.2.0): RouteLLM's own implementations on the
inputs a JSON file on stdin gives, the results as JSON on stdout (tests/compat/test_routellm_compat.py)."""

import json
import os
import sys

os.environ.setdefault("OPENAI_API_KEY", "sk-dummy")  # routellm builds an OpenAI client at import

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from routellm.routers.matrix_factorization import model as mf_model  # noqa: E402
from routellm.routers.routers import SWRankingRouter  # noqa: E402,F401  (checks the module imports)
from routellm.routers.similarity_weighted.utils import compute_elo_mle_with_tie  # noqa: E402


class _Embeddings:
    """Stands in for the OpenAI embeddings endpoint: returns the embedding given for the prompt."""

    def __init__(self, table):
        self.table = table

    def create(self, input, model):  # noqa: A002
        class _D:
            embedding = self.table[input[0]]

        class _R:
            data = [_D()]

        return _R()


def main() -> None:
    job = json.load(sys.stdin)
    out = {}
    sw = job["sw"]
    df = pd.DataFrame(sw["battles"], columns=["model_a", "model_b", "winner"])
    ratings = compute_elo_mle_with_tie(df, sample_weight=sw["weights"])
    out["elo"] = {str(k): float(v) for k, v in ratings.items()}
    mf = job["mf"]
    net = mf_model.MFModel(
        dim=mf["dim"], num_models=mf["num_models"], text_dim=mf["text_dim"], num_classes=1, use_proj=True
    )
    net.load_state_dict({k: torch.tensor(v) for k, v in mf["state"].items()})

    class _Client:
        embeddings = _Embeddings(mf["embeddings"])

    mf_model.OPENAI_CLIENT = _Client()
    out["mf_win_rate"] = [net.pred_win_rate(mf["strong"], mf["weak"], p) for p in mf["embeddings"]]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
