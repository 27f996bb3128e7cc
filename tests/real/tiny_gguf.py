"""Write a tiny Llama as a GGUF file (llama.cpp's layout) with the `gguf` package, for the loading tests.

The q/k projections are permuted the way llama.cpp's converter does (transformers undoes it on load), 2-D
weights can be stored as Q8_0 blocks, and the tokenizer is a byte-level BPE with two merges (otherwise one token
per byte), written as GGUF tokenizer metadata, so the whole file (config, weights, tokenizer) goes through
transformers' GGUF path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<pad>", "<s>", "</s>"]


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


MERGES = ["Ġ t", "e r"]  # two merges, so the BPE has some (transformers needs a non-empty merge list)


def tiny_gguf_vocab() -> list[str]:
    return SPECIALS + byte_level_alphabet() + [m.replace(" ", "") for m in MERGES]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (``convert_hf_to_gguf.py``), which transformers reverses on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """A transformers ``LlamaForCausalLM``'s weights under GGUF names, q/k permuted."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
    }
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def write_tiny_gguf(model, path: str | Path, *, quantize: bool = True) -> dict[str, torch.Tensor]:
    """Write ``model`` (a tiny ``LlamaForCausalLM`` whose vocab is `tiny_gguf_vocab`) to ``path``.

    Returns the weights as the file holds them (after the Q8_0 round trip), under the model's own
    parameter names, so a test can build the expected model independently of transformers' GGUF loader.
    """
    import gguf

    cfg = model.config
    vocab = tiny_gguf_vocab()
    assert cfg.vocab_size == len(vocab), "build the model with vocab_size=len(tiny_gguf_vocab())"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(
        float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None) else 10000.0
    )
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types(
        [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(vocab) - len(SPECIALS))
    )
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_merges(MERGES)
    w.add_pad_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    stored: dict[str, np.ndarray] = {}
    for name, arr in gguf_tensors(model).items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        qtype = gguf.GGMLQuantizationType.Q8_0
        if quantize and arr.ndim == 2 and arr.shape[-1] % 32 == 0:
            blocks = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, blocks, raw_dtype=qtype)
            stored[name] = gguf.quants.dequantize(blocks, qtype)
        else:
            w.add_tensor(name, arr)
            stored[name] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return _to_hf_names(stored, cfg)


def _to_hf_names(stored: dict[str, np.ndarray], cfg) -> dict[str, torch.Tensor]:
    """Map the stored GGUF tensors back to transformers names, undoing the q/k permutation."""

    def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    inv = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    out = {
        "model.embed_tokens.weight": stored["token_embd.weight"],
        "model.norm.weight": stored["output_norm.weight"],
    }
    if "output.weight" in stored:
        out["lm_head.weight"] = stored["output.weight"]
    for name, arr in stored.items():
        if not name.startswith("blk."):
            continue
        _, i, gg, _ = name.split(".")
        if gg == "attn_q":
            arr = unpermute(arr, cfg.num_attention_heads)
        elif gg == "attn_k":
            arr = unpermute(arr, cfg.num_key_value_heads)
        out[f"model.layers.{i}.{inv[gg]}.weight"] = arr
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in out.items()}
