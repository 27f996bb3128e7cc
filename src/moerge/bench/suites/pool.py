"""The model-pool suite: whole models of different sizes and specialities on the synthetic world, with each
member's measured quality on every query of a routing split (what query routers learn from) and of an eval
split (what they are scored on), for routing among whole models (`moerge.pool`, issue 16).

Members (``PoolSuiteConfig``), all sharing the synthetic suite's character tokenizer:

- ``small``: the base model cut to its first layer (`moerge.pool.members.truncate_layers`) with a multitask LoRA
  trained on it and merged — the cheap generalist;
- ``multitask``: the base with the synthetic suite's multitask LoRA merged;
- ``base+<task>``: the base with one held-in expert merged (`moerge.model.routed.merge_into`) — a specialist per
  task, from the LoRA library for free;
- ``large``: a wider, deeper tiny Llama (``large``: 128 wide, 4 layers) trained here on the pretraining mixture
  plus every held-in task's training data — the expensive generalist.

Queries are the held-in tasks' prompts (tagged with their task): the routing split is ``n_routing`` new inputs per
task from a seeded stream of its own (disjoint from every training, validation and eval input), the eval split
is the synthetic suite's eval examples. A member's quality on a query is greedy exact match of the whole answer
(`moerge.bench.metrics.span_exact_match`, 1 or 0); its cost is `moerge.pool.members.linear_flops_per_token`
(relative units) beside the measured seconds per query. Query features are the default sentence embedder's
(MiniLM where installed, else the base model's hidden states; its name is recorded).

The build is cached in ``<root>/pool-<hash of the config>/`` (``pool.json``, ``routing.jsonl`` /
``eval.jsonl``, ``routing.safetensors`` / ``eval.safetensors`` with features and quality, ``members/`` with the
trained ``small`` and ``large`` models), written to a temporary sibling and renamed into place.

A real-text variant (SmolLM2-135M, a layer-truncated SmolLM2 and SmolLM2 with each domain expert merged) is
described by a `moerge.pool.members.PoolConfig` and not built by this module yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from moerge.backbones.tiny import TinyModelConfig
from moerge.bench.suites.build import default_root
from moerge.bench.suites.format import Example
from moerge.bench.suites.synthetic import SyntheticSuiteConfig, _rng, _unique_inputs, task_defs
from moerge.errors import SuiteError
from moerge.pool.query import PoolData
from moerge.train.lora import TrainConfig
from moerge.train.pretrain import PretrainConfig

POOL_SUITE_VERSION = 1


class PoolSuiteConfig(BaseModel):
    """Everything that determines the pool suite; its hash names the cache folder."""

    model_config = ConfigDict(extra="forbid")

    synthetic: SyntheticSuiteConfig = Field(default_factory=SyntheticSuiteConfig)
    n_routing: int = Field(48, ge=4, description="routing-split queries per held-in task")
    small_layers: int = Field(1, ge=1, description="decoder layers the small member keeps")
    small: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            steps=300, lr=1e-2, batch_size=32, seq_len=32, rank=8, alpha=16.0, warmup_steps=20
        )
    )
    large_model: TinyModelConfig = Field(
        default_factory=lambda: TinyModelConfig(
            hidden_size=128, num_layers=4, num_heads=4, intermediate_size=344
        )
    )
    large: PretrainConfig = Field(
        default_factory=lambda: PretrainConfig(steps=600, lr=2e-3, batch_size=32, seq_len=64, warmup_steps=30)
    )
    specialists: bool = Field(True, description="a member per held-in expert (the base with it merged)")
    progress: bool = Field(True, description="progress bars (not part of the hash)")

    @classmethod
    def reduced(cls, **overrides: Any) -> PoolSuiteConfig:
        """A small build for tests (seconds)."""
        base: dict[str, Any] = dict(
            synthetic=SyntheticSuiteConfig.reduced(n_tasks=3, progress=False),
            n_routing=8,
            small=TrainConfig(steps=8, lr=1e-2, batch_size=8, seq_len=32, rank=4, alpha=8.0),
            large_model=TinyModelConfig(hidden_size=48, num_layers=2, num_heads=2, intermediate_size=96),
            large=PretrainConfig(steps=20, lr=3e-3, batch_size=16, seq_len=64, warmup_steps=2),
            progress=False,
        )
        base.update(overrides)
        return cls(**base)

    def key(self) -> str:
        data = self.model_dump(mode="json", exclude={"progress"})
        data["synthetic"] = self.synthetic.key()
        for part in ("small", "large"):
            data[part].pop("progress", None)
        blob = json.dumps({"version": POOL_SUITE_VERSION, "config": data}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PoolSuite:
    """A built pool suite: the members' names, descriptions and costs, and the two splits as `PoolData`."""

    name: str
    routing: PoolData
    eval: PoolData
    members: list[dict[str, Any]]
    info: dict[str, Any]
    root: Path | None = None


def suite_folder(config: PoolSuiteConfig, root: str | Path | None = None) -> Path:
    return Path(root or default_root()).expanduser() / f"pool-{config.key()}"


def build_pool_suite(
    config: PoolSuiteConfig | None = None, root: str | Path | None = None, force: bool = False
) -> PoolSuite:
    """The pool suite for ``config``: loaded from the cache, or built (the synthetic suite first, if needed) and
    cached."""
    config = config or PoolSuiteConfig()
    folder = suite_folder(config, root)
    if (folder / "pool.json").is_file() and not force:
        return load_pool_suite(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        _build(partial, config, root)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return load_pool_suite(folder)


def load_pool_suite(folder: str | Path) -> PoolSuite:
    """A pool suite from its folder (`build_pool_suite` writes one)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / "pool.json").read_text())
    except (OSError, ValueError) as e:
        raise SuiteError(
            f"{folder} is not a built pool suite ({e}); rebuild it with `moerge bench --suite pool`"
        ) from e
    members = meta["members"]
    names = [m["name"] for m in members]
    costs = torch.tensor([float(m["flops_per_token"]) for m in members], dtype=torch.float64)
    descriptions = [m.get("description", "") for m in members]
    splits = {}
    for split in ("routing", "eval"):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines() if line]
        t = load_file(str(folder / f"{split}.safetensors"))
        splits[split] = PoolData(
            texts=[r["text"] for r in rows], features=t["features"], quality=t["quality"], members=names,
            costs=costs, tags=[r["tag"] for r in rows], descriptions=descriptions,
        )  # fmt: skip
    return PoolSuite(meta["name"], splits["routing"], splits["eval"], members, meta, folder)


def routing_examples(config: SyntheticSuiteConfig, suite: Any, n: int) -> list[tuple[str, Example]]:
    """``n`` new examples per held-in task, disjoint from its training, validation and eval inputs."""
    out: list[tuple[str, Example]] = []
    for d in task_defs(config):
        task = suite.task(d.name)
        used = {ex.text for ex in task.eval + task.validation + task.train}
        used_inputs = {t.split(d.sep)[0].split(" ")[-1] for t in used}
        inputs = _unique_inputs(
            _rng(config.seed, "pool-routing", d.name), d.alphabet, n, config.min_len,
            config.max_len, need=lambda s, used_inputs=used_inputs: s not in used_inputs,
        )  # fmt: skip
        out += [(d.name, Example.from_prompt(s + d.sep, d.apply(s), [d.name])) for s in inputs]
    return out


def member_quality(
    model: Any, tokenizer: Any, examples: list[tuple[str, Example]], batch_size: int = 64
) -> torch.Tensor:
    """``[N]`` exact match (1/0: every answer token right under greedy decoding, teacher-forced) per example."""
    from moerge.bench.metrics import span_exact_match
    from moerge.bench.suites.format import collate

    out = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = [ex for _, ex in examples[i : i + batch_size]]
            batch = collate("pool", chunk, tokenizer, [])
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            em = span_exact_match(logits, batch)
            starts = torch.tensor([0] + [len(ex.targets) for ex in chunk]).cumsum(0)
            out += [float(em[starts[j] : starts[j + 1]].min()) for j in range(len(chunk))]
    return torch.tensor(out)


def _build(out: Path, config: PoolSuiteConfig, root: str | Path | None) -> None:
    from safetensors.torch import save_file

    from moerge.backbones.embedder import default_embedder
    from moerge.backbones.tiny import build_tiny_model
    from moerge.bench.suites.format import collate
    from moerge.bench.suites.synthetic import build_synthetic_suite
    from moerge.experts.library import ExpertLibrary
    from moerge.model.routed import merge_into
    from moerge.pool.members import (
        PoolMember,
        frozen,
        linear_flops_per_token,
        measure_seconds,
        truncate_layers,
    )
    from moerge.progress import quiet_transformers
    from moerge.train.lora import train_multitask_expert
    from moerge.train.pretrain import pretrain_model

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if config.synthetic.threads:
        torch.set_num_threads(config.synthetic.threads)
    try:
        syn = build_synthetic_suite(config.synthetic, root=root)
        base, tok = syn.load_base()
        frozen(base)
        lib = syn.open_library()
        held = [t for t in syn.tasks if t.held_in]
        data = {t.name: t.training_rows() for t in held}
        members: list[PoolMember] = []
        timings: dict[str, float] = {}

        t = time.perf_counter()
        small = truncate_layers(base, config.small_layers)
        expert = train_multitask_expert(
            small, tok, data, config.small.model_copy(update={"progress": config.progress}), name="small"
        )
        with torch.no_grad():
            merge_into(small, expert)
        members.append(PoolMember("small", frozen(small), tok,
                                  f"the base cut to {config.small_layers} layer(s), a multitask LoRA merged"))  # fmt: skip
        timings["small"] = time.perf_counter() - t

        multi = ExpertLibrary.open(syn.baselines).get("multitask") if syn.baselines else None
        if multi is not None:
            m = frozen(merge_into(_copy(base), multi))
            members.append(PoolMember("multitask", m, tok, "the base with the multitask LoRA merged"))
        if config.specialists:
            for task in held:
                m = frozen(merge_into(_copy(base), lib.get(task.name)))
                members.append(PoolMember(f"base+{task.name}", m, tok, f"the base with expert {task.name} merged: "
                                          f"{task.description}"))  # fmt: skip

        t = time.perf_counter()
        large, _ = build_tiny_model(config.large_model)
        pre_rows = [json.loads(line) for line in (Path(syn.root) / "pretrain.jsonl").read_text().splitlines()]
        rows = pre_rows + [r for rs in data.values() for r in rs]
        pretrain_model(large, tok, rows, config.large.model_copy(update={"progress": config.progress}))
        members.append(PoolMember("large", frozen(large), tok,
                                  "a 4x wider-and-deeper model trained on the pretraining mixture and every task"))  # fmt: skip
        timings["large"] = time.perf_counter() - t

        splits = {
            "routing": routing_examples(config.synthetic, syn, config.n_routing),
            "eval": [(task.name, ex) for task in held for ex in task.eval],
        }
        embedder = default_embedder(base, tok)
        for split, examples in splits.items():
            quality = torch.stack([member_quality(m.model, tok, examples) for m in members], dim=1)
            prompts = [ex.text[: ex.targets[0][0]] for _, ex in examples]
            feats = embedder.embed_texts(prompts).float().contiguous()
            save_file({"features": feats, "quality": quality.contiguous()}, str(out / f"{split}.safetensors"))
            (out / f"{split}.jsonl").write_text(
                "".join(json.dumps({"text": p, "tag": tag}) + "\n" for p, (tag, _) in zip(prompts, examples))
            )
        batch = collate("pool", [ex for _, ex in splits["eval"][:64]], tok, [])
        seconds = measure_seconds(members, batch.input_ids, batch.attention_mask)
        for m, s in zip(members, seconds):
            m.flops_per_token = linear_flops_per_token(m.model)
            m.seconds_per_query = s
        with quiet_transformers():
            for name, model in (("small", small), ("large", large)):
                model.save_pretrained(out / "members" / name)
                tok.save_pretrained(out / "members" / name)
        meta = {
            "name": f"pool-{config.key()}",
            "version": POOL_SUITE_VERSION,
            "synthetic": syn.name,
            "embedder": getattr(embedder, "name", type(embedder).__name__),
            "config": config.model_dump(mode="json"),
            "members": [
                {
                    "name": m.name,
                    "description": m.description,
                    "flops_per_token": m.flops_per_token,
                    "seconds_per_query": round(m.seconds_per_query or 0.0, 8),
                }
                for m in members
            ],  # fmt: skip
            "timings_s": {
                **{k: round(v, 2) for k, v in timings.items()},
                "total": round(time.perf_counter() - t0, 2),
            },
        }
        (out / "pool.json").write_text(json.dumps(meta, indent=2))
    finally:
        torch.set_num_threads(threads)


def _copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)
