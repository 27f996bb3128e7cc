"""Time to list and filter a library of N experts (default 1,000), against a baseline measured in the
same run: scanning every expert's metadata JSON from disk, as a catalog-less library would.

    .venv/bin/python benchmarks/bench_library.py [--experts 1000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
from moerge.experts.library import ExpertLibrary


def best_of(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--experts", type=int, default=1000)
    ap.add_argument("--keep", type=Path, help="build the library here and keep it")
    args = ap.parse_args()

    root = args.keep or Path(tempfile.mkdtemp()) / "lib"
    if root.exists():
        shutil.rmtree(root)
    lib = ExpertLibrary.create(root)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    add_times = []
    for i in range(args.experts):
        lora = {
            f"model.layers.{layer}.self_attn.{m}": LoraModule(
                torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g), 8.0
            )
            for layer in range(2)
            for m in ("q_proj", "v_proj")
        }
        md = ExpertMetadata(
            name=f"expert-{i:04d}", task=f"task-{i % 50}", tags=[f"group-{i % 7}"], base_model="tiny"
        )
        t = time.perf_counter()
        lib.add(Expert(md, lora=lora))
        add_times.append(time.perf_counter() - t)
    build = time.perf_counter() - t0

    t_open, lib2 = best_of(lambda: ExpertLibrary.open(root))
    t_list, listed = best_of(lambda: lib2.list())
    t_task, by_task = best_of(lambda: lib2.list(task="task-7"))
    t_tag, by_tag = best_of(lambda: lib2.list(tag="group-3"))

    def scan():  # baseline: no catalog, read every metadata file
        out = []
        for folder in sorted((root / "experts").iterdir()):
            out.append(ExpertMetadata(**json.loads((folder / "moerge_expert.json").read_text())["metadata"]))
        return sorted(out, key=lambda m: m.name)

    t_scan, scanned = best_of(scan)
    assert [m.name for m in scanned] == [m.name for m in listed]
    t_cli = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "moerge", "library", "list", str(root), "--task", "task-7"],
        check=True,
        capture_output=True,
    )
    t_cli = time.perf_counter() - t_cli

    n = args.experts
    print(f"library of {n} experts at {root}")
    print(f"  build: {build:.1f} s ({statistics.median(add_times) * 1e3:.1f} ms median per add)")
    print(f"  open:                {t_open * 1e3:8.2f} ms")
    print(f"  list all:            {t_list * 1e3:8.2f} ms  ({len(listed)} experts)")
    print(f"  list --task:         {t_task * 1e3:8.2f} ms  ({len(by_task)} experts)")
    print(f"  list --tag:          {t_tag * 1e3:8.2f} ms  ({len(by_tag)} experts)")
    print(f"  baseline JSON scan:  {t_scan * 1e3:8.2f} ms  (catalog is {t_scan / t_list:.1f}x faster)")
    print(f"  `moerge library list --task` CLI, whole process: {t_cli:.2f} s")
    if not args.keep:
        shutil.rmtree(root.parent)


if __name__ == "__main__":
    main()
