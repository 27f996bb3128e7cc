"""Routing among whole models (the survey's classifier family): a pool of named models, each with a cost, and
query-level routers that pick one member per query (RouteLLM, Zooter, Routoo, benchmark-kNN, description
routing). ``query.py`` holds what every query router shares: the data it learns from (`PoolData`), its
interface (`QueryRouter`) and the cost-aware choice (`choose`)."""
