"""Training data: JSONL or in-memory examples → token ids and loss labels, and pre-built batches.

An example is ``{"text": ...}`` (loss on every token) or ``{"prompt": ..., "completion": ...}`` (loss on the
completion tokens only); a plain string counts as ``{"text": ...}``. Every sequence is encoded as
``<bos> prompt completion <eos>`` (``<bos>``/``<eos>`` where the tokenizer has them), the same way the
benchmark encodes its eval examples (`encode_example`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.errors import DataFormatError

IGNORE_INDEX = -100

Example = str | Mapping[str, Any]
DataSource = str | Path | Iterable[Example]


def normalize_example(example: Example, where: str) -> dict[str, str]:
    """Return ``{"text": …}`` or ``{"prompt": …, "completion": …}``; raise `DataFormatError` otherwise."""
    if isinstance(example, str):
        return {"text": example}
    if not isinstance(example, Mapping):
        raise DataFormatError(
            f"{where}: expected a JSON object or a string, found {type(example).__name__}; "
            'write rows as {"text": ...} or {"prompt": ..., "completion": ...}.'
        )
    if "text" in example and isinstance(example["text"], str):
        return {"text": example["text"]}
    if isinstance(example.get("prompt"), str) and isinstance(example.get("completion"), str):
        return {"prompt": example["prompt"], "completion": example["completion"]}
    keys = ", ".join(sorted(map(str, example))) or "none"
    raise DataFormatError(
        f'{where}: a row needs a string "text", or string "prompt" and "completion" fields (found keys: {keys}).'
    )


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Read a JSONL file of examples. Errors name the file and the 1-based line number."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such data file (expected a JSONL file of examples)")
    from moerge.config_io import iter_jsonl

    rows = [normalize_example(obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path, DataFormatError)]
    if not rows:
        raise DataFormatError(f"{path}: the file holds no examples.")
    return rows


def load_examples(data: DataSource) -> list[dict[str, str]]:
    """Examples from a JSONL path or an iterable of dicts/strings, normalised."""
    if isinstance(data, (str, Path)):
        return read_jsonl(data)
    rows = [normalize_example(ex, f"example {i}") for i, ex in enumerate(data)]
    if not rows:
        raise DataFormatError("the training data holds no examples.")
    return rows


def _encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_example(tokenizer, example: Example, add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and loss labels (``-100`` where no loss) for one example.

    ``<bos>`` is never a target; for prompt/completion rows the prompt tokens are not targets either.
    """
    ex = normalize_example(example, "example")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    if "text" in ex:
        body = _encode_text(tokenizer, ex["text"]) + eos
        return bos + body, [IGNORE_INDEX] * len(bos) + body
    prompt = _encode_text(tokenizer, ex["prompt"])
    completion = _encode_text(tokenizer, ex["completion"]) + eos
    ids = bos + prompt + completion
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt)) + completion
    return ids, labels


@dataclass
class EncodedData:
    """All examples tokenised once: ragged lists of ids and labels."""

    ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)


def encode_examples(tokenizer, examples: Iterable[Example], seq_len: int) -> EncodedData:
    """Tokenise every example once, truncated to ``seq_len`` tokens; drop rows with no target left."""
    ids_all, labels_all = [], []
    for ex in examples:
        ids, labels = encode_example(tokenizer, ex)
        ids, labels = ids[:seq_len], labels[:seq_len]
        if any(t != IGNORE_INDEX for t in labels[1:]):
            ids_all.append(ids)
            labels_all.append(labels)
    if not ids_all:
        raise DataFormatError(
            f"no example has a target token within seq_len={seq_len}; raise seq_len or shorten the prompts."
        )
    return EncodedData(ids_all, labels_all)


def pad_batch(
    ids: list[list[int]], labels: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: ``(input_ids [B, T], labels [B, T])`` with ``-100`` on padding."""
    width = max(len(r) for r in ids)
    x = torch.full((len(ids), width), pad_id, dtype=torch.long)
    y = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(ids, labels)):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        y[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return x, y


def build_batches(
    data: EncodedData, batch_size: int, steps: int, seed: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches drawn epoch by epoch from seeded permutations (no example repeats within an epoch)."""
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    order: list[int] = []
    need = steps * batch_size
    while len(order) < need:
        order.extend(torch.randperm(n, generator=g).tolist())
    batches = []
    for s in range(steps):
        idx = order[s * batch_size : (s + 1) * batch_size]
        batches.append(pad_batch([data.ids[i] for i in idx], [data.labels[i] for i in idx], pad_id))
    return batches


def training_batches(
    tokenizer: Any, examples: Iterable[Example], seq_len: int, batch_size: int, steps: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` seeded batches of ``examples`` encoded to ``seq_len`` tokens, padded with the tokenizer's pad
    token (0 without one): what every training loop here iterates over."""
    encoded = encode_examples(tokenizer, examples, seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return build_batches(encoded, batch_size, steps, seed, pad_id)
