"""Training only the top decoder layers: which modules they hold, and their frozen prefix computed once.

When LoRA adapts only decoder layers ``K…L-1`` of a frozen model, every training step recomputes layers
``0…K-1`` on the same inputs and gets the same hidden states. `prefix_batches` computes them once per example
(the input of layer ``K``), and `truncated` runs the model from layer ``K`` on them (``inputs_embeds`` into a
model whose layers below ``K`` pass their input through): the same loss and gradients, without the prefix's
forward pass at every step. On SmolLM2-135M with LoRA on its top 4 of 30 layers a step at batch 4×48 took 0.54 s
instead of 0.98 s on one CPU thread (docs/real-models.md). The first batch is checked against the full model before training
(`check_truncation`); a model whose embeddings are not fed straight into its first layer (one that scales or
adds to ``inputs_embeds``) fails the check, and the callers then train on the full model.

    layers = decoder_layers(model)                      # ("model.layers", ModuleList) for Llama-like models
    names = layer_modules(model, [-4, -3, -2, -1])      # the Linear modules of the top 4 layers
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import nn

from moerge.errors import MoergeError
from moerge.train.data import IGNORE_INDEX


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass at the first kept layer."""


# Prefix states kept for reuse by `prefix_batches` inside a `shared_prefix()` block: {(start, token ids): [n, d]}.
_SHARED: ContextVar[dict[tuple[int, tuple[int, ...]], torch.Tensor] | None] = ContextVar(
    "moerge_shared_prefix", default=None
)


@contextlib.contextmanager
def shared_prefix() -> Iterator[dict[tuple[int, tuple[int, ...]], torch.Tensor]]:
    """Within the block, the prefix states `prefix_batches` computes are kept and reused, keyed by the first
    kept layer and the example's token ids: a suite build trains each expert, its gates and the multitask LoRA
    on the same passages of one frozen base model, and computes each passage's prefix once. Use it around work
    on one base model whose weights below the adapted layers do not change (`check_truncation` still compares
    the first batch of every training run with the full model, so states from another model are refused)."""
    store: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    token = _SHARED.set(store)
    try:
        yield store
    finally:
        _SHARED.reset(token)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(path, layers)``: the decoder's list of blocks (the longest ``ModuleList`` whose name ends in
    ``layers``/``h``/``blocks``; ``config.num_hidden_layers`` long where the config says), or None."""
    want = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not re.search(r"(^|\.)(layers|h|blocks)$", name):
            continue
        if want is not None and len(module) != want:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def resolve_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Layer indices made non-negative (``-1`` is the top layer), sorted and deduplicated."""
    out = set()
    for i in layers:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise MoergeError(f"layer {i} is out of range: the model has {num_layers} decoder layers")
        out.add(j)
    return sorted(out)


def layer_of(module: str, path: str) -> int | None:
    """The decoder layer index a module name lies in (``model.layers.26.mlp.up_proj`` → 26), or None."""
    m = re.match(re.escape(path) + r"\.(\d+)(\.|$)", module)
    return int(m.group(1)) if m else None


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's linear layers, weights stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def layer_modules(
    model: nn.Module, layers: Sequence[int], suffixes: Sequence[str] | None = None
) -> list[str]:
    """Names of the linear modules inside the decoder ``layers`` (negative indices count from the top),
    optionally only those whose name ends with one of ``suffixes`` (PEFT's matching of target module names)."""
    found = decoder_layers(model)
    if found is None:
        raise MoergeError(
            f"{type(model).__name__}: no decoder layer list found, so LoRA cannot be restricted to layers; "
            "leave `layers` unset or name the modules in `target_modules`"
        )
    path, blocks = found
    keep = set(resolve_layers(layers, len(blocks)))
    out = []
    for name, module in model.named_modules():
        if not _is_linear(module) or layer_of(name, path) not in keep:
            continue
        if suffixes and not any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        out.append(name)
    if not out:
        raise MoergeError(f"no linear modules match {list(suffixes or [])} in decoder layers {sorted(keep)}")
    return out


def first_layer(model: nn.Module, modules: Iterable[str]) -> int | None:
    """The lowest decoder layer any of ``modules`` lies in; None when one lies outside the layers (then
    nothing below it is frozen) or no layer list is found."""
    found = decoder_layers(model)
    if found is None:
        return None
    path = found[0]
    idx = [layer_of(m, path) for m in modules]
    if not idx or any(i is None for i in idx):
        return None
    return min(i for i in idx if i is not None)


class _PassThrough(nn.Module):
    """Stands in for a decoder layer below the kept ones: returns the hidden states it is given."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def truncated(model: nn.Module, start: int) -> Iterator[None]:
    """Within the block, ``model``'s decoder layers below ``start`` pass their input through: feed the model the
    input of layer ``start`` as ``inputs_embeds``. The layer list keeps its length, so module names (hooks,
    expert weights) stay valid; the layers are put back afterwards."""
    found = decoder_layers(model)
    if found is None:
        raise MoergeError(f"{type(model).__name__}: no decoder layer list to truncate")
    _, blocks = found
    saved = [blocks[i] for i in range(start)]
    for i in range(start):
        blocks[i] = _PassThrough()
    try:
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


@torch.no_grad()
def layer_inputs(model: nn.Module, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    """The hidden states entering decoder layer ``start`` for ``input_ids [B, T]`` (right padding, causal, as in
    training); the forward pass stops there."""
    path, blocks = decoder_layers(model) or ("", None)
    if blocks is None:
        raise MoergeError(f"{type(model).__name__}: no decoder layer list")
    got: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        got["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop

    handle = blocks[start].register_forward_pre_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
        model.train(was_training)
    if "h" not in got:
        raise MoergeError(f"decoder layer {start} of {type(model).__name__} was never called")
    return got["h"]


def prefix_batches(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    start: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` of ``(input_ids, labels)`` as ``(hidden [B, T, d], labels)``: each distinct example's input to
    layer ``start`` computed once and reused by every batch it appears in (and, inside `shared_prefix`, by later
    calls). Padding positions get zeros: with right padding and a causal model they influence no real position.

    Each example is computed alone, unpadded: its states are then the same bits whichever examples were computed
    before or beside it (in a padded chunk they change in the last bits with the chunk's length), so a suite
    build that resumes after an interruption, with another set of examples already kept, trains the same
    weights as one that ran through (about 20% slower than chunks of 32 for this part on a CPU)."""
    shared = _SHARED.get()
    states: dict[tuple[int, ...], torch.Tensor] = {}
    for ids, labels in batches:
        for x, y in zip(ids, labels):
            key = tuple(x[: _length(y, x)].tolist())
            if key not in states and shared is not None and (start, key) in shared:
                states[key] = shared[(start, key)]
            states.setdefault(key, torch.empty(0))
    for k in [k for k, v in states.items() if not v.numel()]:
        states[k] = layer_inputs(model, torch.tensor([k]), start)[0].clone()
        if shared is not None:
            shared[(start, k)] = states[k]
    out = []
    for ids, labels in batches:
        d = next(iter(states.values()))
        hidden = torch.zeros(ids.shape[0], ids.shape[1], d.shape[-1], dtype=d.dtype)
        for b, (x, y) in enumerate(zip(ids, labels)):
            n = _length(y, x)
            hidden[b, :n] = states[tuple(x[:n].tolist())]
        out.append((hidden, labels))
    return out


def _length(labels: torch.Tensor, ids: torch.Tensor) -> int:
    """Real tokens of a right-padded row: up to its last target (labels past it are all ``IGNORE_INDEX``)."""
    real = (labels != IGNORE_INDEX).nonzero()
    return int(real[-1]) + 1 if len(real) else int(ids.shape[0])


@torch.no_grad()
def check_truncation(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor, start: int
) -> bool:
    """Whether the truncated model on ``hidden`` gives the full model's logits at every target position of
    ``batch`` (to float tolerance)."""
    ids, labels = batch
    was_training = model.training
    model.eval()
    try:
        full = model(input_ids=ids, use_cache=False).logits
        with truncated(model, start):
            part = model(inputs_embeds=hidden, use_cache=False).logits
    except Exception:  # noqa: BLE001 (an architecture that does not take inputs_embeds this way)
        return False
    finally:
        model.train(was_training)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return part.shape == full.shape and torch.allclose(part[mask], full[mask], atol=1e-4, rtol=1e-4)


def frozen_prefix_plan(
    model: nn.Module, start: int | None, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """``batches`` as the hidden states entering decoder layer ``start`` (`prefix_batches`), when ``start`` > 0
    (every trained parameter lies in layers ``start…``) and the truncated model reproduces the full one on the
    first batch (`check_truncation`); None otherwise: train on the full model."""
    if not start or not batches:
        return None
    cached = prefix_batches(model, batches, start)
    if not check_truncation(model, batches[0], cached[0][0], start):
        return None
    return cached


# ---------------------------------------------------------------------------------------------- forward passes
class CachedPrefix(nn.Module):
    """Stands in for decoder layers ``0…K-1`` in forward passes: returns the hidden states they gave the same
    input row before (keyed by the bytes of the row's embeddings, its attention-mask row and its position ids),
    and runs the real layers on a batch with any row not seen yet. For a frozen base evaluated many times on
    the same passages with only layers ``K…`` changing (experts, merges, routers): the prefix runs once per
    passage. Rows are stored detached: no gradient flows into these layers."""

    def __init__(self, layers: Sequence[nn.Module], store: dict[bytes, torch.Tensor]):
        super().__init__()
        # a plain list, not submodules: the model's module and parameter names stay as they were
        self._layers = list(layers)
        self.store = store
        self.enabled = True
        self.hits = 0
        self.misses = 0

    def _run(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> object:
        out: object = hidden_states
        for layer in self._layers:
            out = layer(out, *args, **kwargs)
        return out

    @staticmethod
    def _row(t: object, b: int, batch: int) -> bytes:
        if not isinstance(t, torch.Tensor):
            return b"-"
        row = t[b] if t.ndim and t.shape[0] == batch else t
        return row.detach().cpu().contiguous().numpy().tobytes()

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> object:
        if args or not self.enabled or any(kwargs.get(k) is not None for k in ("cache", "past_key_values")):
            return self._run(hidden_states, *args, **kwargs)
        import hashlib

        batch = hidden_states.shape[0]
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        keys = [
            hashlib.sha1(
                self._row(hidden_states, b, batch) + b"|" + self._row(mask, b, batch) + b"|"
                + self._row(positions, b, batch) + str(tuple(hidden_states.shape[1:])).encode()
            ).digest()
            for b in range(batch)
        ]  # fmt: skip
        if all(k in self.store for k in keys):
            self.hits += batch
            return torch.stack([self.store[k] for k in keys])
        out = self._run(hidden_states, **kwargs)
        if not isinstance(out, torch.Tensor) or out.shape != hidden_states.shape:
            self.enabled = False  # layers that return more than hidden states: always run them
            return out
        self.misses += batch
        for b, k in enumerate(keys):
            self.store[k] = out[b].detach().clone()
        return out


@contextlib.contextmanager
def cached_prefix(model: nn.Module, start: int | None) -> Iterator[CachedPrefix | None]:
    """Within the block, decoder layers ``0…start-1`` of ``model`` run once per distinct input row
    (`CachedPrefix`); every forward pass (any caller: ``model(input_ids=…, attention_mask=…)``, hooks on later
    modules, a routed model around it) gets the same outputs. Use it only while nothing below layer ``start``
    changes (experts, merges and routers adapting layers ``start…`` of a frozen base). Intermediate hidden
    states below ``start`` (``output_hidden_states``) are not reproduced. ``start`` 0 or None: does nothing."""
    found = decoder_layers(model) if start else None
    if not start or found is None:
        yield None
        return
    _, blocks = found
    if isinstance(blocks[0], CachedPrefix):  # already inside one
        yield blocks[0]
        return
    saved = [blocks[i] for i in range(start)]
    cache = CachedPrefix(saved, {})
    blocks[0] = cache
    for i in range(1, start):
        blocks[i] = _PassThrough()
    # A call that builds a key/value cache (generation) runs the real layers, since later steps need theirs;
    # plain calls default to none inside the block (``config.use_cache``), so they can reuse the prefix.
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None and use_cache is not None:
        config.use_cache = False
    try:
        yield cache
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
