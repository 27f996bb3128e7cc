"""Tiny models built from a config, deterministically from a seed: for tests, demos and the synthetic suite.

Nothing is downloaded. The tokenizer is a character-level ``PreTrainedTokenizerFast`` over printable ASCII,
so any text round-trips and ``save_pretrained`` writes a normal transformers folder.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARSET = string.printable[:-2]  # printable ASCII without \x0b \x0c


class TinyModelConfig(BaseModel):
    """Shape of a tiny causal LM. Defaults give a ~0.2M-parameter Llama that trains in seconds on a CPU."""

    model_config = ConfigDict(extra="forbid")

    architecture: Literal["llama", "gpt2"] = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 172
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    seed: int = 0


def build_tokenizer():
    """A character-level fast tokenizer (``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, then ASCII)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARSET:
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(CHARSET)


def build_tiny_model(config: TinyModelConfig | None = None, **overrides):
    """Build ``(model, tokenizer)``: a randomly initialised tiny causal LM, the same for the same seed."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    config = (config or TinyModelConfig()).model_copy(update=overrides)
    tokenizer = build_tokenizer()
    common = dict(vocab_size=vocab_size(), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if config.architecture == "llama":
        hf_config = LlamaConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads or config.num_heads,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=config.tie_word_embeddings,
            **common,
        )
        cls = LlamaForCausalLM
    else:
        hf_config = GPT2Config(
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size,
            n_positions=config.max_position_embeddings,
            tie_word_embeddings=config.tie_word_embeddings,
            **common,
        )
        cls = GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = cls(hf_config)
    model.eval()
    return model, tokenizer


def save_tiny_model(out_dir: str | Path, config: TinyModelConfig | None = None, **overrides) -> Path:
    """Build a tiny model and save it (safetensors + config + tokenizer) as a transformers folder."""
    model, tokenizer = build_tiny_model(config, **overrides)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
