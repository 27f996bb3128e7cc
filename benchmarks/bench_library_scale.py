"""A library of 10,000 LoRA experts: catalog operations, and routing over all of them in one forward.

Builds (once, cached under ``--out``) a library of N small random-factor LoRA experts (rank 4–8 on q_proj and
v_proj of a ~5M-parameter tiny Llama, `moerge.backbones.tiny`) with `ExpertLibrary.add_many`, their Arrow
prototypes and embedding centroids (random unit vectors under a bag-of-tokens embedder), then measures:

- catalog operations, in-process (the operation after the imports) and as a whole `moerge` process:
  ``library list`` (and that it imports no torch), ``library show``, ``library verify``, adding one more;
- routing: Arrow (token-level top-k) and embedding centroids (per-example top-k) over all N experts — expert
  factors paged from the memory-mapped stacked-factor artifact through an LRU — against the same recipe over
  32 experts (pre-stacked, today's path), one forward at batch 8×64, each configuration in its own process so
  its peak RSS is its own; also the base model alone. ``--prestacked`` adds the N experts pre-stacked in memory.

    .venv/bin/python benchmarks/bench_library_scale.py [--experts 10000] [--out DIR] [--prestacked] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = dict(hidden_size=256, num_layers=6, num_heads=8, intermediate_size=688, seed=0)
TARGETS = ("q_proj", "v_proj")
EMBED_DIM = 64
CHUNK = 500  # experts per add_many transaction while building


class BagEmbedder:
    """Examples embedded as a fixed random projection of their token counts (cheap and deterministic, so the
    routing cost measured is the router's, not an embedding model's)."""

    name = "bench-bag-of-tokens-v1"

    def __init__(self, vocab: int):
        self.proj = torch.randn(vocab, EMBED_DIM, generator=torch.Generator().manual_seed(1))

    def embed_ids(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        counts = torch.zeros(ids.shape[0], self.proj.shape[0])
        ones = torch.ones_like(ids, dtype=torch.float32) if mask is None else mask.float()
        return counts.scatter_add_(1, ids, ones) @ self.proj

    def embed_texts(self, texts):  # pragma: no cover - the benchmark routes token ids
        raise NotImplementedError


def tiny_model():
    from moerge.backbones.tiny import build_tiny_model

    model, tok = build_tiny_model(**MODEL)
    return model.eval(), tok


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_parts_mb() -> tuple[float, float]:
    """``(RssAnon, RssFile)``: memory the process owns, and file pages it maps (the kernel may drop these)."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, value = line.split(":")
                parts[key] = int(value.split()[0]) / 1024
    return parts.get("RssAnon", 0.0), parts.get("RssFile", 0.0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- building
def put_signatures(lib, experts, emb_cfg, g) -> None:
    """What `moerge library prepare` would store, computed from the experts in hand: Arrow prototypes, and
    embedding centroids (random unit vectors: the experts have no data)."""
    from moerge.transforms import arrow, centroids

    for e in experts:
        lib.put_artifact(arrow.ARROW_KIND, arrow.ARROW_CONFIG, e.name, arrow.expert_prototypes(e))
        c = torch.nn.functional.normalize(torch.randn(EMBED_DIM, generator=g), dim=0)
        lib.put_artifact(centroids.EMBED_KIND, emb_cfg, e.name, {"centroid": c, "samples": c[None].clone()})


def build(root: Path, n: int) -> dict:
    """The library of ``n`` experts with Arrow prototypes and embedding centroids (skipped when built)."""
    marker = root / "bench-built.json"
    if marker.exists():
        return json.loads(marker.read_text())
    from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
    from moerge.experts.library import ExpertLibrary
    from moerge.transforms import centroids

    model, _ = tiny_model()
    dims = {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS
    }
    if root.exists():
        import shutil

        shutil.rmtree(root)
    lib = ExpertLibrary.create(root, base_model="tiny-llama-5M")
    emb_cfg = centroids.embed_config(BagEmbedder.name)
    g = torch.Generator().manual_seed(0)
    t_add = t_sig = 0.0
    for start in range(0, n, CHUNK):
        batch = []
        for i in range(start, min(n, start + CHUNK)):
            r = 4 + i % 5
            lora = {
                m: LoraModule(
                    torch.randn(r, d_in, generator=g) / d_in**0.5,
                    torch.randn(d_out, r, generator=g) * 0.05,
                    alpha=2.0 * r,
                )
                for m, (d_in, d_out) in dims.items()
            }
            md = ExpertMetadata(name=f"expert-{i:05d}", task=f"task-{i % 100}", tags=[f"group-{i % 7}"],
                                base_model="tiny-llama-5M")  # fmt: skip
            batch.append(Expert(md, lora=lora))
        t = time.perf_counter()
        lib.add_many(batch)
        t_add += time.perf_counter() - t
        t = time.perf_counter()
        with lib.storage.deferred_sync():  # derived data: one sync per chunk, not one fsync per file
            put_signatures(lib, batch, emb_cfg, g)
            lib.storage.sync()
        t_sig += time.perf_counter() - t
        print(f"  built {min(n, start + CHUNK)}/{n} experts", file=sys.stderr, flush=True)
    from moerge.experts.stacked import ensure_stacked_factors

    t = time.perf_counter()
    ensure_stacked_factors(lib, lib.names())
    t_stack = time.perf_counter() - t
    info = {"experts": n, "add_many_s": t_add, "signatures_s": t_sig, "stacked_factors_s": t_stack}
    marker.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------------------------- catalog
def timed(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def cli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moerge", *args], capture_output=True, text=True)
    took = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"moerge {' '.join(args)} failed: {done.stderr[-2000:]}")
    return took, done


LIST_NO_TORCH = """
import sys, io, contextlib
from moerge.cli import main
sys.argv = ["moerge", "library", "list", {root!r}]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main()
    except SystemExit:
        pass
print(len(out.getvalue().splitlines()), "torch" in sys.modules)
"""


def catalog(root: Path, work: Path) -> list[tuple[str, float, float | None]]:
    """``(operation, in-process seconds, whole-process seconds)``."""
    from moerge.experts.library import ExpertLibrary

    rows = []
    t_open, lib = timed(lambda: ExpertLibrary.open(root))
    rows.append(("open the library", t_open, None))
    t_list, listed = timed(lambda: ExpertLibrary.open(root).list())
    t_cli, _ = cli("library", "list", str(root))
    rows.append((f"library list ({len(listed)} experts)", t_list, t_cli))
    t_task, _ = timed(lambda: ExpertLibrary.open(root).list(task="task-7"))
    t_cli_task, _ = cli("library", "list", str(root), "--task", "task-7")
    rows.append(("library list --task", t_task, t_cli_task))
    probe = subprocess.run([sys.executable, "-c", LIST_NO_TORCH.format(root=str(root))], capture_output=True,
                           text=True, check=True)  # fmt: skip
    lines, torch_loaded = probe.stdout.split()
    if torch_loaded != "False":
        raise SystemExit("`moerge library list` imported torch")
    name = listed[len(listed) // 2].name
    t_show, _ = timed(lambda: ExpertLibrary.open(root).get(name))
    t_cli_show, _ = cli("library", "show", str(root), name)
    rows.append(("library show", t_show, t_cli_show))
    t_verify, report = timed(lambda: ExpertLibrary.open(root).verify(), repeat=1)
    assert report.ok, report.problems[:3]
    t_cli_verify, _ = cli("library", "verify", str(root))
    rows.append((f"library verify ({report.checked} experts, checksums)", t_verify, t_cli_verify))
    extra = lib.get(name)
    folder = work / "one-more"
    lib.export_peft(name, folder, overwrite=True)

    def add_one():
        lib.add(extra.__class__(extra.metadata.model_copy(update={"name": "one-more"}), lora=extra.lora),
                overwrite=True)  # fmt: skip

    t_add, _ = timed(add_one)
    t_cli_add, _ = cli("library", "add", str(root), str(folder), "--name", "one-more-cli", "--overwrite")
    rows.append(("add one more expert", t_add, t_cli_add))
    fresh = ExpertLibrary.open(root)
    for n in ("one-more", "one-more-cli"):
        fresh.remove(n)
    return rows


# ---------------------------------------------------------------------------------------------- routing
def worker(root: Path, recipe: str, n: int, paging: str, batch: int, seq: int, k: int, repeat: int) -> dict:
    """One configuration in this process: attach, one cold forward, then ``repeat`` timed forwards on fresh
    random inputs; times and memory (RSS) as JSON."""
    from moerge.experts.library import ExpertLibrary
    from moerge.model.expert_layer import PagedExpertLayer
    from moerge.recipes import attach
    from moerge.recipes.facade import PagingConfig

    torch.set_num_threads(1)
    model, tok = tiny_model()
    lib = ExpertLibrary.open(root)
    names = lib.names()[:n]
    g = torch.Generator().manual_seed(123)
    inputs = [torch.randint(3, model.config.vocab_size, (batch, seq), generator=g) for _ in range(repeat + 1)]
    with torch.no_grad():
        model(input_ids=inputs[0])  # warm the base model's kernels before measuring memory
    rss_base = rss_mb()
    anon_base, file_base = rss_parts_mb()
    if recipe == "base":
        routed, t_attach = model, 0.0
    else:
        options = {"k": k} if recipe == "arrow" else {"k": k, "aggregation": "parameter"}
        t = time.perf_counter()
        routed = attach(model, lib, recipe, experts=names, embedder=BagEmbedder(model.config.vocab_size),
                        paging=PagingConfig(mode=paging), **options)  # fmt: skip
        t_attach = time.perf_counter() - t
    rss_attached = rss_mb()
    times = []
    with torch.no_grad():
        t = time.perf_counter()
        routed(input_ids=inputs[0])
        cold = time.perf_counter() - t
        for ids in inputs[1:]:
            t = time.perf_counter()
            routed(input_ids=ids)
            times.append(time.perf_counter() - t)
    anon, mapped = rss_parts_mb()
    layers = list(getattr(routed, "expert_layers", {}).values())
    paged = [la for la in layers if isinstance(la, PagedExpertLayer)]
    proto_mb = 0.0
    router = getattr(routed, "router", None)
    for p in getattr(router, "prototypes", {}).values():
        proto_mb += p.numel() * 4 / 2**20
    if getattr(router, "centroids", None) is not None:
        proto_mb += router.centroids.numel() * 4 / 2**20
    cache_mb = sum(la.pages.capacity * la.rank * (la.d_in + la.d_out) * 4 / 2**20 for la in paged)
    return {
        "recipe": recipe,
        "experts": n,
        "paged": bool(paged),
        "attach_s": t_attach,
        "cold_forward_s": cold,
        "forward_s": statistics.median(times),
        "rss_base_mb": rss_base,
        "rss_attached_mb": rss_attached - rss_base,
        "peak_rss_mb": peak_rss_mb() - rss_base,
        "anon_mb": anon - anon_base,
        "file_mb": mapped - file_base,
        "prototypes_mb": proto_mb,
        "cache_mb": cache_mb,
        "experts_read": sum(la.pages.reads for la in paged),
        "threads": torch.get_num_threads(),
    }


def run_worker(args, recipe: str, n: int, paging: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", recipe, str(n), paging, "--out", str(args.out),
           "--experts", str(args.experts), "--batch", str(args.batch), "--seq", str(args.seq), "--k",
           str(args.k), "--repeat", str(args.repeat)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker {recipe} {n} {paging} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=32, help="the smaller library routed for comparison")
    ap.add_argument(
        "--out", type=Path, default=None, help="where the library is built and kept (default: a temp dir)"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--prestacked", action="store_true", help="also route the N experts pre-stacked in memory"
    )
    ap.add_argument("--skip-catalog", action="store_true")
    ap.add_argument("--build-only", action="store_true", help="build (or find) the library and stop")
    ap.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the catalog and routing tables, the command and the environment as JSON "
        "(docs/results/NAME/tables.json feeds a page's <!-- results: NAME/catalog --> and NAME/routing blocks)",
    )
    ap.add_argument("--worker", nargs=3, metavar=("RECIPE", "N", "PAGING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="moerge-scale-"))
    root = args.out / f"lib-{args.experts}"
    if args.worker:
        recipe, n, paging = args.worker
        print(json.dumps(worker(root, recipe, int(n), paging, args.batch, args.seq, args.k, args.repeat)))
        return

    from moerge.tables import Column, Table, render

    t0 = t = time.perf_counter()
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    info = build(root, args.experts)
    print(f"library: {root} ({args.experts} experts; build {time.perf_counter() - t:.1f} s this run)")
    print(f"  built with add_many in {info['add_many_s']:.1f} s, signatures {info['signatures_s']:.1f} s, "
          f"stacked factors {info['stacked_factors_s']:.1f} s")  # fmt: skip
    if args.build_only:
        return
    model, _ = tiny_model()
    params = sum(p.numel() for p in model.parameters())
    print(f"base: tiny Llama {params / 1e6:.2f}M parameters ({MODEL}); LoRA on {', '.join(TARGETS)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, python "
          f"{platform.python_version()}")  # fmt: skip

    if not args.skip_catalog:
        table = Table("catalog operations", [Column("operation"), Column("in-process", right=True),
                      Column("whole `moerge` process", right=True), Column("< 1 s", right=True)])  # fmt: skip
        for op, t_in, t_cli in catalog(root, args.out):
            table.add_row(
                op, f"{t_in:.3f} s", "" if t_cli is None else f"{t_cli:.2f} s", "yes" if t_in < 1 else "no"
            )
        render(table)
        tables["catalog"] = ([c.header for c in table.columns], table.rows)

    results = [run_worker(args, "base", 0, "off")]
    for recipe in ("arrow", "embedding_centroids"):
        results.append(run_worker(args, recipe, args.small, "auto"))
        results.append(run_worker(args, recipe, args.experts, "auto"))
        if args.prestacked:
            results.append(run_worker(args, recipe, args.experts, "off"))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    base = results[0]["forward_s"]
    small = {r["recipe"]: r["forward_s"] for r in results if r["experts"] == args.small}
    table = Table(
        f"routed forward, batch {args.batch}×{args.seq}, top-{args.k}, 1 thread (median of {args.repeat})",
        [Column("recipe"), Column("experts", right=True), Column("factors"), Column("attach", right=True),
         Column("cold forward", right=True), Column("forward", right=True), Column("÷ base", right=True),
         Column(f"÷ {args.small} experts", right=True), Column("RSS after attach", right=True),
         Column("peak RSS", right=True), Column("owned / mapped after", right=True), Column("prototypes", right=True), Column("LRU cache", right=True),
         Column("experts read", right=True)],
    )  # fmt: skip
    for r in results:
        ratio = r["forward_s"] / small[r["recipe"]] if r["recipe"] in small else None
        table.add_row(
            r["recipe"], str(r["experts"]), "paged" if r["paged"] else ("pre-stacked" if r["experts"] else ""),
            f"{r['attach_s']:.2f} s", f"{r['cold_forward_s'] * 1e3:.0f} ms", f"{r['forward_s'] * 1e3:.0f} ms",
            f"{r['forward_s'] / base:.2f}", "" if ratio is None else f"{ratio:.2f}",
            f"{r['rss_attached_mb']:.0f} MB", f"{r['peak_rss_mb']:.0f} MB",
            f"{r['anon_mb']:.0f} / {r['file_mb']:.0f} MB", f"{r['prototypes_mb']:.1f} MB",
            f"{r['cache_mb']:.0f} MB", str(r["experts_read"]),
        )  # fmt: skip
    render(table)
    print(f"(RSS relative to the process after loading the base model: {results[0]['rss_base_mb']:.0f} MB)")
    if args.json:
        from moerge.bench.results_doc import write_tables

        tables["routing"] = ([c.header for c in table.columns], table.rows)
        print(f"wrote {write_tables(args.json, tables, time.perf_counter() - t0)}")


if __name__ == "__main__":
    main()
