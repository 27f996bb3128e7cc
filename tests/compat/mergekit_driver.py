"""Runs mergekit on a list of YAML configs in one process (mergekit's import costs ~6 s, so one process for
all). Run by the side venv's python (see `tests/compat/test_mergekit_compat.py`), not collected by pytest:
``python mergekit_driver.py JOBS.json``, where JOBS.json is ``[{"yaml": path, "out": folder, "inject_masks":
bool}, …]``; it writes ``results.json`` next to JOBS.json with each job's seconds or error.

``inject_masks`` replaces ``torch.bernoulli`` (the only random draw of mergekit's DARE and DELLA,
``mergekit/sparsify.py``) by `fixed_mask`, which moerge's side of the test applies too, so both tools draw the
same masks.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml


def fixed_uniform(numel: int) -> torch.Tensor:
    """A fixed pseudo-random value in [0, 1) per flat position of one model's tensor (a hash of the index)."""
    idx = torch.arange(numel, dtype=torch.int64)
    return ((idx * 2654435761 + 12345) % 2**32).to(torch.float64) / 2**32


def fixed_mask(p: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``torch.bernoulli(p)`` for one model's tensor, with the draw at position j fixed to `fixed_uniform`."""
    return (fixed_uniform(p.numel()).reshape(p.shape) < p).to(p.dtype)


def main(jobs_file: str) -> int:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    jobs = json.loads(Path(jobs_file).read_text())
    results = {}
    real_bernoulli = torch.bernoulli
    for job in jobs:
        torch.bernoulli = fixed_mask if job.get("inject_masks") else real_bernoulli
        try:
            cfg = MergeConfiguration.model_validate(yaml.safe_load(Path(job["yaml"]).read_text()))
            t0 = time.perf_counter()
            options = MergeOptions(
                random_seed=0, quiet=True, lora_merge_cache=str(Path(jobs_file).parent / "lora-merge-cache")
            )
            run_merge(cfg, job["out"], options, config_source=job["yaml"])
            results[job["yaml"]] = {"seconds": time.perf_counter() - t0}
        except Exception as e:  # reported per job: one failing config does not hide the others
            results[job["yaml"]] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        finally:
            torch.bernoulli = real_bernoulli
    (Path(jobs_file).parent / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
