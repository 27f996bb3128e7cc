"""moerge.bench: the MoErging benchmark — suites (`suites/`), configuration, the runner and its parts
(evaluation loop, baselines registry, signature preparation, metrics, models under test), results and the
report."""
