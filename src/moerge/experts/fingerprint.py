"""Base-model fingerprints: enough to refuse an expert trained on another base model.

The fingerprint hashes every parameter's name, shape and dtype plus a few of its values (the first ones and
a float64 sum rounded to 6 significant digits), so two models of one architecture but different weights
differ, while the same weights loaded two ways (folder, ``from_pretrained``, state dict) agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch

from moerge.errors import InputNotFoundError

_SAMPLE = 8


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Fingerprint ``(name, tensor)`` pairs; order does not matter."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        t = t.detach()
        flat = t.reshape(-1)
        head = ",".join(f"{v:.5e}" for v in flat[:_SAMPLE].double().tolist())
        total = f"{flat.double().sum().item():.6e}" if flat.numel() else "0"
        h.update(f"{name}|{tuple(t.shape)}|{head}|{total};".encode())
    return "sha256:" + h.hexdigest()[:32]


def fingerprint_model(model: torch.nn.Module) -> str:
    """Fingerprint a loaded base model (its parameters, not buffers; tied weights counted once)."""
    return fingerprint_tensors(model.named_parameters(remove_duplicate=True))


def fingerprint_folder(path: str | Path) -> str:
    """Fingerprint a transformers folder's safetensors weights without building the model."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputNotFoundError(f"{path}: no *.safetensors weights to fingerprint")
    named = []
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            named.extend((key, sf.get_tensor(key)) for key in sf.keys())  # noqa: SIM118
    # transformers drops tied weights (lm_head tied to the embeddings) when saving, and
    # named_parameters() drops them as duplicates, so both sides see the same set.
    return fingerprint_tensors(named)
