"""A synthetic `PoolData` whose right member is learnable, for testing query routers without a model pool.

Queries fall into clusters (their ``tags``); each member is a specialist that answers its own clusters well and
the others poorly, and the most expensive member is a generalist, fairly good everywhere. A query's features are
its cluster's centre plus noise, its text names its cluster's topic, each member's description names the topics
it is good at. Quality is drawn per query and member (1/0, or graded with ``graded=True``), so even the oracle
sees noise a router cannot predict. Pure torch, seeded.
"""

from __future__ import annotations

import torch

from moerge.pool.query import PoolData

TOPICS = ("arithmetic", "geography", "poetry", "chemistry", "history", "music", "law", "biology")


def synthetic_pool(
    n: int = 400,
    *,
    members: int = 4,
    clusters: int = 4,
    dim: int = 16,
    noise: float = 0.5,
    good: float = 0.9,
    bad: float = 0.15,
    generalist: float = 0.6,
    graded: bool = False,
    seed: int = 0,
) -> PoolData:
    """``n`` queries in ``clusters`` clusters over ``members`` members: member ``m < members - 1`` is good
    (correct with probability ``good``) on the clusters ``c`` with ``c % (members - 1) == m`` and ``bad``
    elsewhere; the last member, the generalist, is correct with probability ``generalist`` everywhere and costs
    the most (costs 1, 2, … for the specialists, ``2·members`` for the generalist)."""
    if members < 2 or clusters < 1 or clusters > len(TOPICS):
        raise ValueError(f"synthetic_pool: need members >= 2 and 1 <= clusters <= {len(TOPICS)}")
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g) * 2.0
    tag = torch.randint(clusters, (n,), generator=g)
    features = centres[tag] + noise * torch.randn(n, dim, generator=g)
    specialists = members - 1
    p = torch.full((clusters, members), bad)
    for c in range(clusters):
        p[c, c % specialists] = good
    p[:, -1] = generalist
    chance = p[tag]  # [n, members]
    if graded:
        quality = (chance + 0.1 * torch.randn(n, members, generator=g)).clamp(0.0, 1.0)
    else:
        quality = (torch.rand(n, members, generator=g) < chance).float()
    costs = torch.tensor([float(m + 1) for m in range(specialists)] + [2.0 * members])
    names = [f"specialist{m}" for m in range(specialists)] + ["generalist"]
    descriptions = [
        "an assistant for "
        + " and ".join(TOPICS[c] for c in range(clusters) if c % specialists == m)
        + " questions"
        for m in range(specialists)
    ] + ["a general assistant for any question"]
    texts = [f"a question about {TOPICS[int(t)]} number {i}" for i, t in enumerate(tag)]
    return PoolData(
        texts=texts,
        features=features,
        quality=quality,
        members=names,
        costs=costs,
        tags=[TOPICS[int(t)] for t in tag],
        descriptions=descriptions,
    )


def split(data: PoolData, train: float = 0.5) -> tuple[PoolData, PoolData]:
    """The first ``train`` share of the queries and the rest, as two `PoolData` (queries are already shuffled)."""
    k = int(len(data.texts) * train)

    def part(sl: slice) -> PoolData:
        return PoolData(
            texts=list(data.texts[sl]),
            features=data.features[sl],
            quality=data.quality[sl],
            members=list(data.members),
            costs=data.costs,
            tags=list(data.tags[sl]) if data.tags is not None else None,
            descriptions=data.descriptions,
        )

    return part(slice(0, k)), part(slice(k, None))


def routed_quality(quality: torch.Tensor, picks: torch.Tensor) -> float:
    """Mean quality of the members ``picks`` chose (one per query)."""
    return float(quality.gather(1, picks.long().view(-1, 1)).mean())
