"""Hypothesis settings for the property tests: derandomized (the same examples every run, so CI is
deterministic), no deadline (the machine is shared), no example database written into the repo.

``MOERGE_FUZZ=N`` runs N times as many examples, randomized (for hunting bugs locally, not for CI)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

fuzz = float(os.environ.get("MOERGE_FUZZ", "0") or 0)
settings.register_profile(
    "moerge",
    derandomize=not fuzz,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
    ],
)
settings.load_profile("moerge")
