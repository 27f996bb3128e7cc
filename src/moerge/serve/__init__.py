"""`moerge serve`: an OpenAI-compatible server of a routed expert library.

    catalog = Catalog.load("base-folder", "library")          # one model copy, every recipe's router on it
    engine = Engine(catalog, ServeConfig())                     # continuous batching at decode-step granularity
    app = create_app(engine)                                    # FastAPI: /v1/models, /v1/completions, ...

`catalog.py` names what is served (``base``, each expert, each recipe and ``recipe:key=value`` variants),
`engine.py` batches requests into one forward per decode step, `app.py` is the HTTP layer (FastAPI), and
`metrics.py` keeps the Prometheus counters. docs/serving.md shows it in use.
"""

from __future__ import annotations

from moerge.serve.config import ServeConfig

__all__ = ["ServeConfig"]
