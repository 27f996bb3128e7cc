"""Co-LLM and CALM on tiny models built here, each compared with its two models alone (docs/collaboration.md).

Co-LLM: one tiny Llama is pretrained on the format ``w>X^Y`` (X, Y random strings of the right length and
case), then two full fine-tunes of it: the *base* learns ``X = cipher(w)`` (a fixed letter permutation; Y stays
random), the *assistant* ``Y = upper(w)`` (X stays random). The target task ``w>cipher(w)^upper(w)`` needs both,
token by token. The deferral head is trained on the target's training words; scores are greedy exact match on
held-out words, with the deferral rate, across thresholds. The weight average of the two fine-tunes (they
share an init) is the merged model; the *oracle switch* defers exactly on the tokens after ``^`` (the best a
per-token deferral can do with these two models).

CALM: the *augmenting* model (narrower) learns key→value facts: 20 letters each with a seeded digit, as
``a3 k7 …`` lines. The *anchor* learns digit arithmetic ``3+7=0`` (sum mod 10) and has never seen a key. The
composition task ``a+k=`` → ``(v(a) + v(k)) mod 10`` is trained on 60% of the key pairs and scored on the
other 40%. Both models are frozen; only the cross-attention bridges train.

Run: ``OMP_NUM_THREADS=1 python benchmarks/collaboration.py [--seed 0] [--quick] [--json PATH]``
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import time
from pathlib import Path

import torch

from moerge.backbones.tiny import build_tiny_model
from moerge.bench.report import markdown_table
from moerge.bench.results_doc import write_tables
from moerge.compose import (
    CALM,
    CALMConfig,
    CALMTrainConfig,
    CoLLM,
    CoLLMTrainConfig,
    co_decode,
    train_calm,
    train_deferral,
)
from moerge.train.pretrain import PretrainConfig, pretrain_model

LOWER = "abcdefghij"


def _words(rng: random.Random, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(LOWER) for _ in range(rng.randint(2, 4))))
    return sorted(out)


def _rand(rng: random.Random, alphabet: str, k: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(k))


def _train(model, tok, rows, steps, seed, lr=3e-3):
    pretrain_model(model, tok, rows, PretrainConfig(steps=steps, lr=lr, batch_size=16, seq_len=48, seed=seed,
                                                    progress=False))  # fmt: skip
    return model


@torch.no_grad()
def _greedy_exact(model_fn, tok, rows, max_new=12) -> float:
    """Greedy exact match of each completion: ``model_fn(ids [1, T]) -> logits``, whole prefix re-run."""
    hits = 0
    for r in rows:
        ids = [tok.bos_token_id, *tok(r["prompt"], add_special_tokens=False)["input_ids"]]
        new: list[int] = []
        for _ in range(max_new):
            nxt = int(model_fn(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
        hits += tok.decode(new) == r["completion"]
    return hits / len(rows)


def co_llm_experiment(seed: int, quick: bool) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    words = _words(rng, 600)
    rng.shuffle(words)
    train_w, test_w = words[:400], words[400:]
    up = str.upper
    table = dict(zip(LOWER, rng.sample(LOWER, len(LOWER))))

    def cipher(w):
        return "".join(table[c] for c in w)

    def fmt(w, x, y):
        return {"text": f"{w}>{x}^{y}"}

    pre = [
        fmt(w, _rand(rng, LOWER, len(w)), _rand(rng, LOWER.upper(), len(w)))
        for w in train_w
        for _ in range(2)
    ]
    skill_base = [fmt(w, cipher(w), _rand(rng, LOWER.upper(), len(w))) for w in train_w]
    skill_asst = [fmt(w, _rand(rng, LOWER, len(w)), up(w)) for w in train_w]
    target_train = [{"prompt": f"{w}>", "completion": f"{cipher(w)}^{up(w)}"} for w in train_w]
    target_test = [{"prompt": f"{w}>", "completion": f"{cipher(w)}^{up(w)}"} for w in test_w]
    steps = 200 if quick else 600

    init, tok = build_tiny_model(seed=seed, hidden_size=64, num_layers=2)
    _train(init, tok, pre, steps, seed)
    base, _ = build_tiny_model(seed=seed, hidden_size=64, num_layers=2)
    base.load_state_dict(init.state_dict())
    _train(base, tok, skill_base, steps, seed + 1)
    asst, _ = build_tiny_model(seed=seed, hidden_size=64, num_layers=2)
    asst.load_state_dict(init.state_dict())
    _train(asst, tok, skill_asst, steps, seed + 2)
    merged, _ = build_tiny_model(seed=seed, hidden_size=64, num_layers=2)
    merged.load_state_dict({k: (v + asst.state_dict()[k]) / 2 for k, v in base.state_dict().items()})

    colm = CoLLM(base, asst)
    res = train_deferral(colm, tok, target_train, CoLLMTrainConfig(steps=100 if quick else 300, batch_size=16,
                                                                   init_steps=20, seq_len=48, seed=seed))  # fmt: skip
    caret = tok("^", add_special_tokens=False)["input_ids"][0]

    def switch(x):  # the oracle per-token deferral: the assistant writes everything after "^"
        return (asst if caret in x[0].tolist() else base)(x).logits

    rows = [("base alone (knows cipher)", f"{_greedy_exact(lambda x: base(x).logits, tok, target_test):.3f}", "0.000"),
            ("assistant alone (knows upper)", f"{_greedy_exact(lambda x: asst(x).logits, tok, target_test):.3f}", "1.000"),
            ("merged (weight average)", f"{_greedy_exact(lambda x: merged(x).logits, tok, target_test):.3f}", "n/a"),
            ("oracle switch at ^", f"{_greedy_exact(switch, tok, target_test):.3f}", "≈0.5")]  # fmt: skip
    for eta in (0.1, 0.3, 0.5, 0.7, 0.9):
        outs = co_decode(colm, tok, [r["prompt"] for r in target_test], threshold=eta, max_new_tokens=12)
        em = sum(o.text == r["completion"] for o, r in zip(outs, target_test)) / len(target_test)
        rate = sum(sum(o.deferred) for o in outs) / max(1, sum(len(o.deferred) for o in outs))
        rows.append((f"Co-LLM, threshold {eta}", f"{em:.3f}", f"{rate:.3f}"))
    print(f"  (deferral head: marginal NLL {res.losses[0]:.3f} → {res.losses[-1]:.3f})", file=sys.stderr)
    return rows


def calm_experiment(seed: int, quick: bool) -> list[tuple[str, str]]:
    rng = random.Random(seed + 100)
    keys = string.ascii_lowercase[:20]
    value = {k: rng.randrange(10) for k in keys}
    facts = [{"text": " ".join(f"{k}{value[k]}" for k in rng.sample(keys, 6))} for _ in range(2000)]
    arith = [{"prompt": f"{a}+{b}=", "completion": str((a + b) % 10)} for a in range(10) for b in range(10)]
    pairs = [(a, b) for a in keys for b in keys]
    rng.shuffle(pairs)
    cut = int(0.6 * len(pairs))

    def comp(a, b):
        return {"prompt": f"{a}+{b}=", "completion": str((value[a] + value[b]) % 10)}

    comp_train = [comp(a, b) for a, b in pairs[:cut]]
    comp_test = [comp(a, b) for a, b in pairs[cut:]][: 80 if quick else 160]
    steps = 200 if quick else 500

    aug, tok = build_tiny_model(
        seed=seed + 1, hidden_size=48, num_heads=4, num_layers=2, intermediate_size=128
    )
    _train(aug, tok, facts, steps, seed)
    anchor, _ = build_tiny_model(seed=seed + 2, hidden_size=64, num_layers=3)
    _train(anchor, tok, arith * 4, 2 * steps, seed)

    calm = CALM(anchor, aug, CALMConfig(anchor_layers=[0, 1], augmenting_layers=[0, 1], num_heads=4))
    losses = train_calm(calm, tok, comp_train, CALMTrainConfig(steps=200 if quick else 600, lr=3e-3,
                                                               batch_size=32, seq_len=16, seed=seed))  # fmt: skip
    print(f"  (bridges: loss {losses[0]:.3f} → {sum(losses[-20:]) / 20:.3f})", file=sys.stderr)
    arith_test = arith[:50]
    return [
        ("anchor alone (knows arithmetic)", f"{_greedy_exact(lambda x: anchor(x).logits, tok, comp_test):.3f}",
         f"{_greedy_exact(lambda x: anchor(x).logits, tok, arith_test):.3f}"),
        ("augmenting alone (knows the key values)", f"{_greedy_exact(lambda x: aug(x).logits, tok, comp_test):.3f}",
         f"{_greedy_exact(lambda x: aug(x).logits, tok, arith_test):.3f}"),
        ("CALM (anchor + augmenting)", f"{_greedy_exact(calm, tok, comp_test):.3f}",
         f"{_greedy_exact(calm, tok, arith_test):.3f}"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer training steps (a smoke run)")
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write both tables, the command and the environment as JSON (docs/results/NAME/tables.json "
        "feeds the page's <!-- results: NAME/co-llm --> and NAME/calm blocks; python -m moerge.bench.results_doc)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tables = {
        "co-llm": (["model", "exact match", "deferral rate"], co_llm_experiment(args.seed, args.quick)),
        "calm": (
            ["model", "composition exact match (held-out pairs)", "digit arithmetic exact match"],
            calm_experiment(args.seed, args.quick),
        ),
    }
    titles = {
        "co-llm": f"Co-LLM (seed {args.seed}): target w>cipher(w)^upper(w), held-out words",
        "calm": f"CALM (seed {args.seed}): a+k= → (v(a)+v(k)) mod 10 on held-out key pairs",
    }
    for key, (header, rows) in tables.items():
        print(f"{titles[key]}\n\n{markdown_table(header, [list(r) for r in rows])}\n")
    if args.json:
        print(f"wrote {write_tables(args.json, tables, time.perf_counter() - t0)}", file=sys.stderr)
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
