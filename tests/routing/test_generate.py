"""`moerge generate` and `moerge.model.generation.complete`: greedy and seeded sampling against a token-by-token
reference on the dense merged model, stop strings, the chat template, and `--chat` with one model load."""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch
from _routing_helpers import make_experts
from rich.control import strip_control_codes

from moerge.cli import app
from moerge.cli.common import run_app
from moerge.model.generation import GenerateConfig, complete, cut_at_stop, encode_prompt
from moerge.recipes.facade import attach

PROMPT = "abc="


@pytest.fixture(scope="module")
def one_expert(tiny_llama):
    """A routed model with one expert (uniform routing over one expert = that expert at weight 1), and the dense
    reference: the base with the expert's ΔW added to its weights."""
    model, tok = tiny_llama
    (expert,) = make_experts(model, 1, ranks=(4,), scale=0.5)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, lm in expert.lora.items():
            reference.get_submodule(name).weight += lm.alpha / lm.rank * (lm.B @ lm.A)
    routed = attach(copy.deepcopy(model).eval(), [expert], recipe="uniform")
    return routed, reference, tok, expert


@pytest.fixture(scope="module")
def saved(one_expert, tiny_llama, tmp_path_factory):
    """The base model folder and a library holding the one expert, for the CLI."""
    from moerge.experts.library import ExpertLibrary

    model, tok = tiny_llama
    root = tmp_path_factory.mktemp("generate")
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    ExpertLibrary.create(root / "lib").add(one_expert[3])
    return root


def reference_tokens(model, tok, prompt, n, temperature=0.0, top_p=1.0, seed=None) -> list[int]:
    """Token by token: argmax, or one torch.multinomial draw over softmax(logits / T) restricted to the smallest
    set of likeliest tokens holding top_p of the mass (zeros elsewhere); stops at </s>."""
    ids = encode_prompt(tok, prompt)["input_ids"]
    out: list[int] = []
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids).logits[0, -1].double()
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, -1)
                p_sorted, order = probs.sort(descending=True)
                before = p_sorted.cumsum(0) - p_sorted  # mass of the likelier tokens
                keep = torch.zeros_like(probs, dtype=torch.bool)
                keep[order[before < top_p]] = True
                kept = torch.where(keep, probs, torch.zeros_like(probs))
                nxt = int(torch.multinomial((kept / kept.sum()).float(), 1))
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def cli(capsys, args, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = run_app(app, args)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("temperature, top_p, seed", [(0.0, 1.0, None), (1.0, 1.0, 5), (0.7, 0.8, 11)])
def test_completion_matches_the_token_by_token_reference(one_expert, temperature, top_p, seed):
    routed, reference, tok, _ = one_expert
    config = GenerateConfig(max_new_tokens=12, temperature=temperature, top_p=top_p, seed=seed)
    got = complete(routed, tok, PROMPT, config)
    want = reference_tokens(reference, tok, PROMPT, 12, temperature, top_p, seed)
    assert got.ids[got.prompt_tokens :].tolist() == want
    assert got.text == tok.decode(want, skip_special_tokens=True)
    again = complete(routed, tok, PROMPT, config)
    assert again.ids.tolist() == got.ids.tolist()  # reproducible with a seed (and greedy)


def test_a_seeded_completion_leaves_the_global_generator_alone(one_expert):
    routed, _, tok, _ = one_expert
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    complete(routed, tok, PROMPT, GenerateConfig(max_new_tokens=4, temperature=1.0, seed=0))
    torch.testing.assert_close(torch.rand(3), expected)


def test_stop_strings_cut_the_text_and_end_generation(one_expert):
    routed, _, tok, _ = one_expert
    config = GenerateConfig(max_new_tokens=24, temperature=1.0, seed=3)
    full = complete(routed, tok, PROMPT, config)
    gen = full.ids[full.prompt_tokens :].tolist()
    assert len(full.text) >= 10, "the seed should give a long enough completion for this test"
    first, second = full.text[6:8], full.text[3]
    for stop in ([first], [first, second]):
        stopped = complete(routed, tok, PROMPT, config.model_copy(update={"stop": stop}))
        at = min(full.text.find(s) for s in stop)
        assert stopped.text == full.text[:at] and stopped.stop == full.text[at : at + len(stopped.stop)]
        # generation ended at the first token whose text completes a stop string
        k = next(
            k
            for k in range(1, len(gen) + 1)
            if any(s in tok.decode(gen[:k], skip_special_tokens=True) for s in stop)
        )
        assert stopped.ids[stopped.prompt_tokens :].tolist() == gen[:k]
    assert cut_at_stop("a--b##c", ["##", "--"]) == ("a", "--")
    assert cut_at_stop("abc", ["x"]) == ("abc", None)


def test_chat_template_wraps_the_prompt(tiny_llama):
    _, tok = tiny_llama
    assert (
        encode_prompt(tok, "hi", chat_template=True)["input_ids"].tolist()
        == encode_prompt(tok, "hi")["input_ids"].tolist()
    )
    templated = copy.deepcopy(tok)
    templated.chat_template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    )
    got = encode_prompt(templated, "hi", chat_template=True)["input_ids"][0].tolist()
    assert got == templated("[user] hi\n[assistant] ", add_special_tokens=False)["input_ids"]


def test_cli_sampling_and_stop_match_the_api(one_expert, saved, capsys):
    routed, _, tok, _ = one_expert
    base, lib = str(saved / "base"), str(saved / "lib")
    config = GenerateConfig(max_new_tokens=16, temperature=0.7, top_p=0.9, seed=4)
    want = strip_control_codes(complete(routed, tok, PROMPT, config).text)  # the console drops \r and such
    args = ["generate", base, lib, "-r", "uniform", "-p", PROMPT, "-n", "16", "-t", "0.7", "--top-p", "0.9"]
    assert cli(capsys, [*args, "--seed", "4"]) == PROMPT + want + "\n"
    stop = want[5:7]
    assert cli(capsys, [*args, "--seed", "4", "--stop", stop]) == PROMPT + want[: want.find(stop)] + "\n"
    code = run_app(app, [*args, "--chat-template"])
    out = capsys.readouterr()
    assert code == 0 and "no chat template" in out.err


def test_cli_chat_loads_once_and_completes_each_line(one_expert, saved, capsys, monkeypatch):
    import moerge.backbones.loading as loading

    routed, _, tok, expert = one_expert
    loads = []
    real = loading.load_base_model
    monkeypatch.setattr(loading, "load_base_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    config = GenerateConfig(max_new_tokens=6, temperature=1.0, seed=2)
    want = [strip_control_codes(complete(routed, tok, p, config).text) for p in ("abc=", "xyz=")]
    args = [
        "generate",
        str(saved / "base"),
        str(saved / "lib"),
        "-r",
        "uniform",
        "--chat",
        "-n",
        "6",
        "-t",
        "1",
        "--seed",
        "2",
    ]
    out = cli(capsys, args, stdin="abc=\n\nxyz=\n/exit\nnever=\n", monkeypatch=monkeypatch)
    assert len(loads) == 1
    lines = out.splitlines()
    assert f"abc={want[0]}" in lines and f"xyz={want[1]}" in lines and "never" not in out
    # routing per token, shown by default: piped, a Markdown table whose rows name the expert
    routing_rows = [ln for ln in lines if ln.startswith("|") and expert.name in ln]
    assert len(routing_rows) >= 2 * 6
    out = cli(capsys, [*args, "--no-show-routing"], stdin="abc=\n", monkeypatch=monkeypatch)
    assert out.splitlines() == [f"abc={want[0]}"]


def test_cli_generate_errors(saved, capsys, monkeypatch):
    base, lib = str(saved / "base"), str(saved / "lib")
    code = run_app(app, ["generate", base, lib, "-r", "uniform", "-p", "x", "--target-modules", "q_prj"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "did you mean 'q_proj'" in err[0], err
    code = run_app(app, ["generate", base, lib, "--chat", "-p", "x"])
    assert code == 2 and "not both" in capsys.readouterr().err
    code = run_app(app, ["generate", str(saved / "nope"), lib, "-p", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "no such file or folder" in err[0], err
    code = run_app(app, ["generate", base, lib, "-p", "x", "--stop", ""])
    assert code == 1 and "stop strings must not be empty" in capsys.readouterr().err
