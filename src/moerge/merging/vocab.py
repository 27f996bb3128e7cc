"""mergekit's ``tokenizer_source`` / ``tokenizer:``: an output tokenizer (the base's, one model's, or the union
of all inputs' vocabularies) and every input's token-indexed tensors aligned to it before the merge.

A port of mergekit 0.1.5, read in its own source: ``mergekit/tokenizer/build.py`` (``get_stripped_tokenizer``,
``build_union_tokenizer``, ``build_tokenizer``: the output vocabulary and one permutation per model),
``mergekit/tokenizer/embed.py`` (``PermutedVocabulary``: the aligned rows and the defaults for tokens a model
lacks), ``mergekit/tokenizer/config.py`` (the ``tokenizer:`` schema), ``mergekit/plan.py`` (alignment applies to
the tensors an architecture marks with a ``vocabulary_axis``: input embeddings and LM heads) and
``mergekit/merge.py`` (the output's ``vocab_size`` and the saved tokenizer). The same transformers calls build the
tokenizer, so the vocabulary is mergekit's.

The union is the base tokenizer plus, model by model, every token it lacks (``add_tokens``), then every model's
added tokens (first settings win). A token a model lacks gets, in that model's aligned tensor, a default shared
by all models (``PermutedVocabulary.assign_embedding_sources``): the one model's row when only one model has it;
the base's row when the base has it; else the mean of the rows of the models that have it; zero when no model
has it (a token only named under ``tokenizer.tokens``). ``tokenizer.tokens`` overrides the default per token:
``source`` a model (its row of that token), ``{kind: model_token, model, token | token_id}`` (a row of that
model's own vocabulary) or ``{kind: zero}``; ``force: true`` uses the source in every model, even those that
have the token. ``pad_to_multiple_of`` pads the vocabulary with rows equal to the mean of the real ones.

Where mergekit's order is not defined, moerge's is: mergekit walks the inputs as a Python set (its
``referenced_models``), so the ids of tokens that several non-base models add depend on the process's hash seed;
moerge walks the base, then the models in the config's order. With no base model mergekit takes the base
tokenizer from that set too; moerge takes the first model's. An input whose tokenizer does not load is refused
(mergekit assumes it is the base's).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.errors import MalformedConfigError, ShapeMismatchError
from moerge.merging.config import ModelTokenEmbedding, TokenEmbedding, TokenizerSpec, ZeroEmbedding

# Tensors mergekit's architecture files (mergekit/_data/architectures/*.json) mark with vocabulary_axis 0.
VOCAB_TENSORS = frozenset(
    {
        "model.embed_tokens.weight", "embed_tokens.weight", "decoder.embed_tokens.weight",
        "encoder.embed_tokens.weight", "model.language_model.embed_tokens.weight", "shared.weight",
        "lm_head.weight", "lm_head.bias", "model.tok_embeddings.weight", "output.weight", "embed_out.weight",
        "gpt_neox.embed_in.weight", "transformer.wte.weight", "transformer.word_embeddings.weight",
        "transformer.embd.wte.weight", "transformer.embedding.word_embeddings.weight",
        "transformer.output_layer.weight", "backbone.embeddings.weight", "embeddings.word_embeddings.weight",
    }
)  # fmt: skip


def _config_vocab_size(folder: Path) -> int | None:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return None
    cfg = json.loads(cfg_file.read_text())
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    v = cfg.get("vocab_size")
    return v if isinstance(v, int) else None


def _load_tokenizer(folder: Path) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as e:  # transformers' errors for a folder without (or with a broken) tokenizer vary
        raise MalformedConfigError(
            f"{folder}: its tokenizer does not load ({str(e)[:120]}); an output tokenizer needs every input's "
            "tokenizer saved in its folder (mergekit would assume the base's)."
        ) from None


def _stripped_tokenizer(folder: Path) -> Any:
    """The tokenizer without tokens whose id is ≥ the model's ``vocab_size`` (``get_stripped_tokenizer``)."""
    import tokenizers

    tok = _load_tokenizer(folder)
    vocab_size = _config_vocab_size(folder) or len(tok.get_vocab())
    unused = [t for t, i in tok.get_vocab().items() if i >= vocab_size]
    if not unused:
        return tok
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise MalformedConfigError(
            f"{folder}: the tokenizer has tokens past vocab_size and is {data['model']['type']}, not BPE; "
            "mergekit (and moerge) strip only BPE tokenizers. Use tokenizer_source: base."
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m: Any) -> bool:
        toks = m.split(" ") if isinstance(m, str) else m
        return not any(t in unused for t in toks)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union_tokenizer(base_tok: Any, toks: list[tuple[Path, Any]]) -> Any:
    """``build_union_tokenizer``: the base tokenizer plus each model's missing tokens, then the added tokens."""
    import transformers

    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for folder, tok in toks:
        vocab_size = _config_vocab_size(folder) or tok.vocab_size
        added = tok.added_tokens_decoder
        # mergekit's out_vocab takes added tokens too (its `tok in added_tokens` tests a str against ids); they
        # are skipped below, where out_added decides. Its order is get_vocab()'s (a hash map); here: by id.
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < vocab_size:
                out_vocab.setdefault(t, len(out_vocab))
        for i, info in sorted(added.items()):
            if i < vocab_size and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as p:  # a copy: base_tok itself stays as it is
        base_tok.save_pretrained(p, legacy_format=False, safe_serialization=True)
        res = transformers.AutoTokenizer.from_pretrained(p, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


@dataclass
class TokenizerPlan:
    """The output tokenizer, and per input (in `VocabAligner` order) the input id of each output id (−1: the
    input lacks that token)."""

    tokenizer: Any
    vocab: dict[str, int]
    permutations: list[torch.Tensor]
    original_vocabs: list[dict[str, int]]
    vocab_size: int  # the output's rows: len(vocab), padded to pad_to_multiple_of
    tokens: dict[str, TokenEmbedding] = field(default_factory=dict)


def build_tokenizer_plan(
    folders: list[Path],
    base_index: int | None,
    source: str,
    tokens: dict[str, TokenEmbedding] | None = None,
    pad_to_multiple_of: int | None = None,
) -> TokenizerPlan:
    """``build_tokenizer``: the output tokenizer of ``source`` (``union``, ``base`` or one of ``folders``) over
    the inputs ``folders`` (the base at ``base_index``), with ``tokens``' names added, and each input's
    permutation."""
    first = base_index if base_index is not None else 0
    base_tok = _stripped_tokenizer(folders[first])
    toks: list[Any] = []
    for i, f in enumerate(folders):
        if i == first:
            toks.append(base_tok)
            continue
        toks.append(_load_tokenizer(f))  # mergekit assumes the base's when one does not load; moerge refuses
    order = [first] + [i for i in range(len(folders)) if i != first]
    if source == "union":
        out = _union_tokenizer(base_tok, [(folders[i], toks[i]) for i in order])
    elif source == "base":
        out = base_tok
    else:
        out = _load_tokenizer(Path(source))
    existing = set(out.get_vocab())
    for t in tokens or {}:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    perms = []
    for f, tok in zip(folders, toks):
        model_vocab = tok.get_vocab()
        size = _config_vocab_size(f) or len(model_vocab)
        p = torch.full((len(vocab),), -1, dtype=torch.int64)
        for t, new in vocab.items():
            old = model_vocab.get(t)
            if old is not None and old < size:  # mergekit: ids past vocab_size are padding, not rows
                p[new] = old
        perms.append(p)
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size = (size // pad_to_multiple_of + 1) * pad_to_multiple_of
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise MalformedConfigError(
            "the output tokenizer's ids are not 0…n−1 without gaps; its rows cannot be laid out. Use another "
            "tokenizer_source."
        )
    return TokenizerPlan(out, vocab, perms, [t.get_vocab() for t in toks], size, dict(tokens or {}))


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def align_rows(
    tensors: list[torch.Tensor],
    plan: TokenizerPlan,
    folders: list[Path],
    base_index: int | None,
    name: str = "tensor",
) -> list[torch.Tensor]:
    """``PermutedVocabulary.execute`` for one tensor (vocabulary on axis 0): each input's rows laid out in the
    output vocabulary, with the shared defaults for the tokens it lacks (module docstring)."""
    rest = tensors[0].shape[1:]
    if any(t.shape[1:] != rest for t in tensors):
        raise ShapeMismatchError(
            f"{name}: the inputs differ beyond the vocabulary axis {[tuple(t.shape) for t in tensors]}; only "
            "models of one size can be merged."
        )
    dtype = tensors[0].dtype
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    perms = plan.permutations
    n = len(tensors)

    def index_of(ref: str) -> int:
        for i, f in enumerate(folders):
            if _same(f, ref):
                return i
        raise MalformedConfigError(
            f"tokenizer.tokens: model {ref!r} is not an input of this merge; name one of the merged models."
        )

    # the default source of each token some input lacks (assign_embedding_sources), as an input index,
    # "zero", ("model_token", i, id) or "mean"
    sources: dict[str, Any] = {}
    forced: set[str] = set()
    for token, cfg in plan.tokens.items():
        src = cfg.source
        if cfg.force:
            forced.add(token)
        if isinstance(src, ZeroEmbedding):
            sources[token] = "zero"
        elif isinstance(src, ModelTokenEmbedding):
            i = index_of(src.model)
            tid = src.token_id
            if tid is None:
                if src.token not in plan.original_vocabs[i]:
                    raise MalformedConfigError(
                        f"tokenizer.tokens.{token}: token {src.token!r} is not in {folders[i]}'s vocabulary."
                    )
                tid = plan.original_vocabs[i][src.token]
            if tid >= tensors[i].shape[0]:
                raise MalformedConfigError(
                    f"tokenizer.tokens.{token}: token id {tid} is past {folders[i]}'s {tensors[i].shape[0]} rows."
                )
            sources[token] = ("model_token", i, tid)
        elif isinstance(src, str):
            sources[token] = index_of(src)
    for token, tid in plan.vocab.items():
        if token in plan.tokens:
            continue
        has = [int(p[tid]) >= 0 for p in perms]
        count = sum(has)
        if count == 1:
            sources[token] = has.index(True)
        elif count == 0:
            sources[token] = "zero"
        elif base_index is not None and has[base_index]:
            sources[token] = base_index
        else:
            sources[token] = "mean"
    defaults: dict[str, torch.Tensor] = {}
    for token, tid in plan.vocab.items():
        if token not in forced and all(int(p[tid]) >= 0 for p in perms):
            continue
        src = sources.get(token)
        if src == "mean":
            acc = torch.zeros(rest, dtype=dtype)
            k = 0
            for i in range(n):
                if int(perms[i][tid]) >= 0:
                    acc = acc + tensors[i][int(perms[i][tid])]
                    k += 1
            defaults[token] = acc / k
        elif src == "zero":
            defaults[token] = torch.zeros(rest, dtype=dtype)
        elif isinstance(src, tuple):
            defaults[token] = tensors[src[1]][src[2]].to(dtype)
        elif isinstance(src, int):
            row = int(perms[src][tid])
            if row < 0:
                raise MalformedConfigError(
                    f"tokenizer.tokens.{token}: {folders[src]} does not have that token; give a model that does, "
                    "or {kind: model_token, model: …, token: …}."
                )
            defaults[token] = tensors[src][row].to(dtype)
        else:  # mergekit raises NotImplementedError on a token entry without a source that it needs
            raise MalformedConfigError(
                f"tokenizer.tokens.{token}: some input lacks this token (or force is set) and no source is given; "
                "set source: a model, {kind: model_token, …} or {kind: zero}."
            )
    out = []
    v = len(plan.vocab)
    for i in range(n):
        new = torch.zeros((plan.vocab_size, *rest), dtype=dtype)
        p = perms[i]
        keep = p >= 0
        for token in forced:
            keep[plan.vocab[token]] = False
        ids = keep.nonzero().flatten()
        new[ids] = tensors[i][p[ids]].to(dtype)
        for token, default in defaults.items():
            j = plan.vocab[token]
            if not keep[j]:
                new[j] = default
        if plan.vocab_size > v:  # mergekit: the mean of the real rows (Hewitt's vocabulary expansion)
            new[v:] = new[:v].mean(dim=0)
        out.append(new)
    return out


class VocabAligner:
    """Reads a vocabulary tensor from every input at once and aligns it (`align_rows`), keeping the last one, so
    each input's `AlignedReader` takes its slot."""

    def __init__(
        self, readers: list[Any], base_index: int | None, plan: TokenizerPlan, compute_dtype: torch.dtype
    ):
        self.readers, self.base_index, self.plan, self.dtype = readers, base_index, plan, compute_dtype
        self.folders = [Path(r.folder) for r in readers]
        self._key: str | None = None
        self._rows: list[torch.Tensor] = []

    def rows(self, key: str) -> list[torch.Tensor]:
        if key != self._key:
            self._rows = []  # the previous tensor's rows are freed before this one's are read
            tensors = [r.get(key).to(self.dtype) for r in self.readers]
            self._rows = align_rows(tensors, self.plan, self.folders, self.base_index, name=key)
            self._key = key
        return self._rows


class AlignedReader:
    """An input seen through the output vocabulary: its vocabulary tensors have the output's rows."""

    def __init__(self, inner: Any, aligner: VocabAligner, index: int):
        self.inner, self.aligner, self.index = inner, aligner, index
        self.folder = inner.folder
        self.config = {**inner.config, "vocab_size": aligner.plan.vocab_size}
        self.vocab_keys = {k for k in inner.names() if k in VOCAB_TENSORS}

    def names(self) -> list[str]:
        return self.inner.names()

    def shape(self, key: str) -> tuple[int, ...]:
        s = tuple(self.inner.shape(key))
        return (self.aligner.plan.vocab_size, *s[1:]) if key in self.vocab_keys else s

    def dtype(self, key: str) -> str:
        return self.inner.dtype(key)

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if key not in self.vocab_keys:
            return self.inner.get(key, out)
        row = self.aligner.rows(key)[self.index]
        return row if out is None else out.copy_(row)

    def close(self) -> None:
        self.inner.close()


def align_readers(
    readers: list[Any], base: Any | None, spec: TokenizerSpec, compute_dtype: torch.dtype
) -> tuple[list[AlignedReader], AlignedReader | None, TokenizerPlan]:
    """Wrap the merge's inputs (models, then the base, mergekit's order) so that their vocabulary tensors follow
    the output tokenizer of ``spec``; also return that tokenizer's plan."""
    inputs = readers + ([base] if base is not None else [])
    base_index = len(readers) if base is not None else None
    folders = [Path(r.folder) for r in inputs]
    source = spec.source
    if source not in ("union", "base"):
        matches = [f for f in folders if _same(f, source)]
        if not matches and not (Path(source) / "tokenizer_config.json").is_file():
            raise MalformedConfigError(
                f"tokenizer_source: {source!r} is neither union, base, nor a model folder with a tokenizer."
            )
    plan = build_tokenizer_plan(folders, base_index, source, spec.tokens, spec.pad_to_multiple_of)
    aligner = VocabAligner(inputs, base_index, plan, compute_dtype)
    wrapped = [AlignedReader(r, aligner, i) for i, r in enumerate(inputs)]
    return wrapped[: len(readers)], (wrapped[-1] if base is not None else None), plan
