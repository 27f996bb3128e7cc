"""Transformers model folders as both merge engines read and write them, without torch.

A folder holds ``config.json``, the tokenizer files and safetensors weights (one ``model.safetensors`` or shards
with an index). `CheckpointReader` reads one tensor at a time with ``pread`` (``get`` into a torch tensor,
``read_into`` into any buffer); `check_compatible` refuses inputs that cannot be merged tensor by tensor;
`write_model_files` writes everything of an output folder except the weights (config, tokenizer, model card).
The torch engine is `moerge.merging.checkpoint`, the numpy one `moerge.merging.numpy_engine`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from moerge.errors import (
    InputNotFoundError,
    MalformedConfigError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    UnsafeFormatError,
)
from moerge.experts.paths import contain
from moerge.merging.registry import count_layers
from moerge.merging.st_io import TensorEntry, read_header, read_into, read_tensor

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _read_json_file(path: Path, what: str) -> Any:
    """A JSON file of a model folder; unreadable or malformed ones are one `MalformedConfigError`."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MalformedConfigError(
            f"{path}: not valid JSON ({str(e)[:100]}); fix or re-save the {what}."
        ) from None


class CheckpointReader:
    """Access to one transformers folder's safetensors tensors (single file or sharded with an index), one tensor
    at a time via ``pread``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputNotFoundError(f"{self.folder}: no such model folder")
        if (self.folder / INDEX).is_file():
            index = _read_json_file(self.folder / INDEX, "model")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise MalformedConfigError(
                    f"{self.folder / INDEX}: no weight_map of tensor names to shard files; re-save the model."
                )
            where = str(self.folder / INDEX)
            # shard names are data: they must name files in this folder (a shard may be a link, as in the
            # Hugging Face cache, where snapshots link to blobs; the name itself may not leave the folder)
            files = sorted(
                {Path(contain(self.folder, v, what=where, follow=False)) for v in weight_map.values()}
            )
        elif (self.folder / SINGLE).is_file():
            files = [self.folder / SINGLE]
        else:
            pickles = sorted(self.folder.glob("*.bin")) + sorted(self.folder.glob("*.pt"))
            if pickles:
                raise UnsafeFormatError(
                    f"{pickles[0]}: pickle weights are refused; re-save the model with "
                    "`model.save_pretrained(dir, safe_serialization=True)`."
                )
            raise MalformedConfigError(
                f"{self.folder}: no {SINGLE} or {INDEX}; not a transformers model folder."
            )
        self.entries: dict[str, TensorEntry] = {}
        for f in files:
            if not f.is_file():
                raise MalformedConfigError(
                    f"{f}: listed in {INDEX} but missing; re-download or re-save the model."
                )
            self.entries.update(read_header(f)[0])
        cfg = self.folder / "config.json"
        config = _read_json_file(cfg, "model config") if cfg.is_file() else {}
        if not isinstance(config, dict):
            raise MalformedConfigError(f"{cfg}: expected a JSON object; re-save the model.")
        self.config: dict[str, Any] = config
        self._fds: dict[Path, int] = {}

    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard, by offset)."""
        return sorted(self.entries, key=lambda k: (str(self.entries[k].file), self.entries[k].start))

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def dtype(self, key: str) -> str:
        return self.entries[key].dtype

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        e = self.entries[key]
        return read_tensor(e, self._fd(e.file), out)

    def read_into(self, key: str, buffer: memoryview) -> None:
        """Tensor ``key``'s raw bytes (its stored dtype, little-endian) into ``buffer``, of exactly that size."""
        e = self.entries[key]
        read_into(e, self._fd(e.file), buffer)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorSource(Protocol):
    """What the engine reads a model through: a `CheckpointReader`, a `LoraAppliedReader`, or the renaming
    reader of layer slices (`moerge.merging.slices.SlicedReader`)."""

    folder: Path
    config: dict[str, Any]

    def names(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> str: ...
    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor: ...
    def close(self) -> None: ...


def num_layers(reader: TensorSource) -> int:
    """The model's layer count (``num_hidden_layers``, or GPT-2's ``n_layer``, of the text config for multimodal
    configs), else the highest ``layers.<i>`` in its tensor names plus one: what gradients interpolate over."""
    cfg = reader.config
    if isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    return cfg.get("num_hidden_layers") or cfg.get("n_layer") or count_layers(reader.names())


def split_lora_reference(ref: str | Path) -> tuple[str | Path, str | None]:
    """mergekit's ``model+lora`` reference: ``(model, PEFT adapter folder)``, or ``(ref, None)`` for a plain
    model (a path that exists is always plain, even with a ``+`` in it)."""
    text = str(ref)
    if "+" not in text or Path(text).exists():
        return ref, None
    model, _, lora = text.partition("+")
    if not model or not lora or "+" in lora:
        raise MalformedConfigError(
            f"{text}: a model reference is a folder, or MODEL+LORA (one '+': a model and a PEFT adapter folder)."
        )
    return model, lora


def _tokenizer_vocab_hash(folder: Path) -> str | None:
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        return None
    data = _read_json_file(tj, "tokenizer")
    model = data.get("model") if isinstance(data, dict) else None
    added = data.get("added_tokens") if isinstance(data, dict) else None
    vocab = {
        "model": model.get("vocab") if isinstance(model, dict) else None,
        "added": [t.get("content") if isinstance(t, dict) else t for t in added]
        if isinstance(added, list)
        else None,
    }
    return hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()


def nonfinite_input(folder: Path, key: str) -> NonFiniteWeightsError:
    """The error for an input tensor holding NaN/Inf (both engines raise it before anything is written)."""
    return NonFiniteWeightsError(
        f"{folder}: tensor {key} holds NaN or Inf; nothing was written. Repair or re-save that model before "
        "merging it."
    )


def nonfinite_merged(key: str) -> NonFiniteWeightsError:
    """The error for a merged tensor holding NaN/Inf from finite inputs."""
    return NonFiniteWeightsError(
        f"merged tensor {key} holds NaN/Inf; nothing was written. Check the inputs (NaN weights) and the "
        "parameters (weights summing to 0 with normalize, extreme scale)."
    )


def _same_vocabulary(a: Path, b: Path) -> bool:
    """False only when both folders hold a ``tokenizer.json`` and their vocabularies differ. Identical files are
    not parsed (a 49k-token tokenizer takes 0.2 s to parse and hash)."""
    ta, tb = a / "tokenizer.json", b / "tokenizer.json"
    if not (ta.is_file() and tb.is_file()) or ta.read_bytes() == tb.read_bytes():
        return True
    ha, hb = _tokenizer_vocab_hash(a), _tokenizer_vocab_hash(b)
    return not (ha and hb and ha != hb)


def check_compatible(readers: Sequence[TensorSource], same_vocab: bool = True) -> None:
    """Refuse, naming the folder and the difference, models whose architecture, vocabulary or tensors differ
    (vocabularies may differ when ``same_vocab`` is false: inputs aligned to an output tokenizer)."""
    ref = readers[0]
    for other in readers[1:]:
        where = f"{other.folder} vs {ref.folder}"
        for key in ("architectures", "model_type"):
            if ref.config.get(key) != other.config.get(key):
                raise ShapeMismatchError(
                    f"{where}: {key} differs ({other.config.get(key)!r} vs {ref.config.get(key)!r}); only models "
                    "of one architecture can be merged."
                )
        if ref.config.get("vocab_size") != other.config.get("vocab_size"):
            raise ShapeMismatchError(
                f"{where}: vocab_size differs ({other.config.get('vocab_size')} vs {ref.config.get('vocab_size')}); "
                "merge models that share a tokenizer, or resize/transplant the vocabulary first."
            )
        if same_vocab and not _same_vocabulary(ref.folder, other.folder):
            raise ShapeMismatchError(
                f"{where}: the tokenizers' vocabularies differ (same size, different tokens); token embeddings "
                "would be averaged across different tokens. Merge models that share a tokenizer."
            )
        missing, extra = set(ref.names()) - set(other.names()), set(other.names()) - set(ref.names())
        if missing or extra:
            what = f"lacks {sorted(missing)[:3]}" if missing else f"has extra {sorted(extra)[:3]}"
            raise ShapeMismatchError(f"{where}: the tensor names differ ({other.folder} {what}).")
        for key in ref.names():
            if ref.shape(key) != other.shape(key):
                raise ShapeMismatchError(
                    f"{where}: tensor {key} has shape {other.shape(key)} vs {ref.shape(key)}; the models differ in "
                    "size and cannot be merged tensor by tensor."
                )


def write_model_files(
    ref: Path,
    out: Path,
    dtype: str | None,
    recipe: dict[str, Any] | None,
    copy_tokenizer: bool,
    config_overrides: dict[str, Any] | None = None,
) -> None:
    """config.json (dtype and ``config_overrides`` applied), generation config, the tokenizer (from the base)
    and a model card."""
    cfg = _read_json_file(ref / "config.json", "model config") if (ref / "config.json").is_file() else {}
    cfg.update(config_overrides or {})
    if dtype:
        cfg["torch_dtype"] = dtype
        cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    names = ("generation_config.json",) + (TOKENIZER_FILES if copy_tokenizer else ())
    for name in names:
        if (ref / name).is_file():
            shutil.copyfile(ref / name, out / name)
    if recipe is not None:
        (out / "moerge_merge.json").write_text(json.dumps(recipe, indent=2, default=str))
        (out / "README.md").write_text(model_card(recipe))


def model_card(recipe: dict[str, Any]) -> str:
    """The merged folder's README: Hugging Face front matter (``base_model`` lists the inputs, as mergekit's
    card does) and the method, its paper, the inputs and the recipe that reproduces the merge."""
    import yaml

    from moerge.merging.config import METHOD_ALIASES
    from moerge.merging.registry import get_method

    method = str(recipe.get("merge_method", ""))
    models = [str(m.get("model")) for m in recipe.get("models") or [] if isinstance(m, dict)]
    models += [str(src.get("model")) for sl in recipe.get("slices") or [] for src in sl.get("sources") or []]
    base = recipe.get("base_model")
    inputs = list(dict.fromkeys(([str(base)] if base else []) + models))
    try:
        paper = get_method(METHOD_ALIASES.get(method, (method, {}))[0]).paper
    except Exception:  # a plugin method no longer importable: the card still records the recipe
        paper = ""
    front = {"base_model": inputs, "library_name": "transformers", "tags": ["moerge", "merge"]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "# Merged model",
        "",
        f"A merge made with moerge (`moerge merge`) by **{method}**" + (f" ({paper})." if paper else "."),
        "",
        *(["Base model: `" + str(base) + "`", ""] if base else []),
        "Models merged:",
        "",
        *[f"- `{m}`" for m in dict.fromkeys(models)],
        "",
        "## Configuration",
        "",
        "This YAML reproduces the merge (`moerge merge config.yaml OUT`):",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
