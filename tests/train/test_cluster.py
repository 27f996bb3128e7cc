"""`moerge train --cluster K` (Mo'LoRA's library building): the k-means partition against scikit-learn's Lloyd
from the same seeding, each expert against one trained on its cluster's rows alone, and the ``molora`` recipe
routing a row to its own cluster's expert by the stored centroids."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from sklearn.cluster import KMeans

from moerge.cli import app
from moerge.cli.common import run_app
from moerge.errors import DataFormatError, ExpertExistsError
from moerge.experts.library import ExpertLibrary
from moerge.recipes.facade import attach
from moerge.routing.inputs import RoutingInputs
from moerge.train.cluster import train_cluster_experts
from moerge.train.lora import TrainConfig, train_expert
from moerge.transforms.centroids import EMBED_KIND, embed_config
from moerge.transforms.kmeans import kmeans, kmeans_plus_plus

FAST = TrainConfig(steps=3, lr=1e-2, batch_size=4, seq_len=24, rank=2, alpha=4.0, progress=False)
ALPHABETS = ["abcdefgh", "01234567", "XYZUVW!?"]


class CharHistogram:
    """A cheap deterministic text embedder: the character histogram (the row groups differ in alphabet)."""

    name = "char-histogram-cluster"

    def embed_texts(self, texts):
        return torch.stack(
            [torch.bincount(torch.tensor([ord(c) for c in t]), minlength=128)[:128].float() for t in texts]
        )


def grouped_rows(sizes=(7, 5, 4), seed=0):
    """Rows of three alphabets, shuffled (the k-means sees no order), a few shared characters in each."""
    rng = random.Random(seed)
    rows = [{"prompt": "".join(rng.choice(ALPHABETS[g] + "  ab0") for _ in range(16)) + "=",
             "completion": rng.choice(ALPHABETS[g]) * 3}
            for g, n in enumerate(sizes) for _ in range(n)]  # fmt: skip
    rng.shuffle(rows)
    return rows


def reference_partition(points, k, seed):
    """scikit-learn's Lloyd k-means from moerge's k-means++ centres: each cluster's row indices."""
    init = kmeans_plus_plus(points, k, seed=seed).numpy()
    fit = KMeans(k, init=init, n_init=1, algorithm="lloyd", tol=0.0, max_iter=300).fit(
        points.double().numpy()
    )
    return [sorted(i for i, lab in enumerate(fit.labels_) if lab == c) for c in range(k)]


def test_kmeans_matches_scikit_learn_from_the_same_seeding():
    gen = torch.Generator().manual_seed(5)
    pts = torch.cat(
        [c + 1.5 * torch.randn(40, 3, generator=gen) for c in torch.randn(4, 3, generator=gen) * 3]
    )
    for seed in (0, 1, 2):
        fit = kmeans(pts, 4, seed=seed)
        got = [sorted(torch.nonzero(fit.labels == c).flatten().tolist()) for c in range(4)]
        assert got == reference_partition(pts, 4, seed)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory, tiny_llama):
    model, tok = tiny_llama
    rows = grouped_rows()
    lib = ExpertLibrary.create(tmp_path_factory.mktemp("cluster") / "lib")
    lines = []
    experts = train_cluster_experts(model, tok, rows, 3, FAST, library=lib, name="mix",
                                    embedder=CharHistogram(), progress=lines.append)  # fmt: skip
    return model, tok, rows, lib, experts, lines


def test_clusters_partition_the_rows_as_a_reference_kmeans_does(clustered):
    model, tok, rows, lib, experts, lines = clustered
    emb = CharHistogram().embed_texts([r["prompt"] for r in rows])
    ref = reference_partition(emb, 3, 0)
    assert [e.metadata.extra["cluster"]["rows"] for e in experts] == ref
    assert sorted(i for c in ref for i in c) == list(range(len(rows)))
    assert lib.names() == ["mix-c0", "mix-c1", "mix-c2"]
    assert [line for line in lines if line.startswith("cluster")] == [
        f"cluster {c + 1}/3: training mix-c{c} on {len(ref[c])} rows" for c in range(3)
    ]
    for c, name in enumerate(["mix-c0", "mix-c1", "mix-c2"]):
        stored, _ = lib.get_artifact(EMBED_KIND, embed_config(CharHistogram.name), name)
        torch.testing.assert_close(stored["centroid"], emb[ref[c]].mean(0))  # the cluster's mean embedding
        torch.testing.assert_close(stored["samples"], emb[ref[c]])


def test_each_expert_is_trained_on_exactly_its_clusters_rows(clustered):
    model, tok, rows, lib, experts, _ = clustered
    ref = reference_partition(CharHistogram().embed_texts([r["prompt"] for r in rows]), 3, 0)
    for c, members in enumerate(ref):
        alone = train_expert(model, tok, [rows[i] for i in members], FAST, name=f"alone{c}")
        stored = lib.get(f"mix-c{c}")
        assert stored.metadata.training["examples"] == len(members)
        assert sorted(stored.lora) == sorted(alone.lora)
        for m in alone.lora:
            torch.testing.assert_close(stored.lora[m].A, alone.lora[m].A)
            torch.testing.assert_close(stored.lora[m].B, alone.lora[m].B)


def test_molora_routes_a_row_to_its_clusters_expert(clustered):
    model, tok, rows, lib, experts, _ = clustered
    routed = attach(copy.deepcopy(model), lib, recipe="molora", embedder=CharHistogram())
    for c, e in enumerate(experts):
        texts = [rows[i]["prompt"] for i in e.metadata.extra["cluster"]["rows"]]
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            routed(**enc, routing=RoutingInputs(texts=texts))
        weights = routed.last_call().plan["selection"].weights
        assert weights.argmax(-1).tolist() == [routed.expert_names.index(f"mix-c{c}")] * len(texts)


def test_refusals_leave_the_library_as_it_was(clustered, tiny_llama):
    model, tok, rows, lib, _, _ = clustered
    before = {n: lib.get(n).lora for n in lib.names()}
    centroid_before = lib.get_artifact(EMBED_KIND, embed_config(CharHistogram.name), "mix-c0")[0]
    with pytest.raises(ExpertExistsError, match="--overwrite or another --name"):
        train_cluster_experts(model, tok, rows, 2, FAST, library=lib, name="mix", embedder=CharHistogram())
    with pytest.raises(DataFormatError, match=r"16 rows, too few for 17 clusters; choose K ≤ 16"):
        train_cluster_experts(model, tok, rows, 17, FAST, library=lib, name="new", embedder=CharHistogram())
    same = [{"prompt": "abc", "completion": "x"}] * 3 + [{"prompt": "012", "completion": "y"}] * 3
    with pytest.raises(DataFormatError, match="only 2 distinct row embeddings.*choose K ≤ 2"):
        train_cluster_experts(model, tok, same, 3, FAST, library=lib, name="new", embedder=CharHistogram())

    class Failing(ExpertLibrary):  # the third add fails: the first two are taken back
        def add(self, expert, overwrite=False, source=None):
            if expert.name.endswith("-c2"):
                raise OSError("disk full")
            return super().add(expert, overwrite=overwrite, source=source)

    failing = Failing.open(lib.url)
    other_seed = FAST.model_copy(update={"seed": 7})  # other weights, so a replacement left in place shows
    with pytest.raises(OSError, match="disk full"):
        train_cluster_experts(model, tok, rows, 3, other_seed, library=failing, name="mix", overwrite=True,
                              embedder=CharHistogram(), cluster_seed=1)  # fmt: skip
    with pytest.raises(OSError, match="disk full"):
        train_cluster_experts(
            model, tok, rows, 3, FAST, library=failing, name="other", embedder=CharHistogram()
        )
    after = ExpertLibrary.open(lib.url)
    assert after.names() == sorted(before)
    for n, lora in before.items():
        for m in lora:
            assert torch.equal(after.get(n).lora[m].A, lora[m].A)
            assert torch.equal(after.get(n).lora[m].B, lora[m].B)
    got = after.get_artifact(EMBED_KIND, embed_config(CharHistogram.name), "mix-c0")
    assert got is not None and torch.equal(got[0]["centroid"], centroid_before["centroid"])


# ---------------------------------------------------------------------------------------------- the command
def test_cli_trains_clusters_that_molora_routes_with_no_further_step(tmp_path, capsys, tiny_llama_dir):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in grouped_rows((3, 3, 2))))
    lib = tmp_path / "lib"
    args = ["train", "--base", str(tiny_llama_dir), "--data", str(data), "--library", str(lib), "--name", "cl",
            "--steps", "2", "--batch-size", "2", "--no-rslora", "--embedding-model", "base"]  # fmt: skip
    code = run_app(app, [*args, "--cluster", "0"])  # usage error: K < 1
    _, err = capsys.readouterr()
    assert code == 2 and "Usage: moerge train" in err and "Traceback" not in err
    code = run_app(app, args)  # --embedding-model without --cluster
    _, err = capsys.readouterr()
    assert code == 2 and "--embedding-model and --cluster-seed go with --cluster K" in err
    code = run_app(app, [*args, "--cluster", "9"])  # more clusters than rows: an error, nothing written
    _, err = capsys.readouterr()
    assert (
        code == 1 and "error:" in err and "8 rows, too few for 9 clusters" in err and "Traceback" not in err
    )
    assert not lib.exists()
    code = run_app(app, [*args, "--cluster", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "--recipe molora -o embedding_model=base" in out
    code = run_app(app, ["generate", str(tiny_llama_dir), str(lib), "--recipe", "molora",
                         "-o", "embedding_model=base", "-p", "abc", "-n", "2", "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["prompt"] == "abc"
