"""Weighted mixtures of training sources (`data.train: [{path, weight}, ...]`).

An epoch of a mixture is as many draws as the sources hold records together. Each draw picks a
source with probability weight / sum of weights, and takes that source's next record in its own
shuffled order, which is reshuffled when used up: a small replay source with a large weight is
seen several times an epoch, a large one with a small weight only in part. The draws depend on
the seed and the epoch only, so every rank draws the same order (each takes its slice of it, as
for a plain dataset) and a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Source:
    """One training source as the run holds it: its name, its records' place in the joined
    dataset (`start`, `count`) and its weight (None: the sources are concatenated)."""

    name: str
    start: int
    count: int
    weight: float | None = None


def source_names(paths: list[str]) -> list[str]:
    """Short names for metrics and logs: each path's file name without extensions, made unique."""
    stems = [re.sub(r"[^A-Za-z0-9_.-]+", "_", re.sub(r"(\.jsonl)?(\.gz)?$", "", path.rstrip("/").rsplit("/", 1)[-1])) or "source"
             for path in paths]
    counts = Counter(stems)
    return [f"{i}-{stem}" if counts[stem] > 1 else stem for i, stem in enumerate(stems)]


def mixture_order(sources: list[Source], seed: int, epoch: int, rank: int | None = None) -> list[int]:
    """The joined dataset's indices for one epoch of a weighted mixture (see the module). With
    `rank`, the draws of a rank that reads shards of its own (`sources` are its records), seeded
    by its rank too."""
    total = sum(s.count for s in sources)
    weights = np.array([s.weight for s in sources], dtype=np.float64)
    rng = np.random.default_rng([seed, epoch] if rank is None else [seed, epoch, rank])
    picks = rng.choice(len(sources), size=total, p=weights / weights.sum())
    order: list[int] = []
    queues: list[list[int]] = [[] for _ in sources]
    for pick in picks.tolist():
        if not queues[pick]:
            source = sources[pick]
            queues[pick] = (source.start + rng.permutation(source.count)).tolist()[::-1]
        order.append(queues[pick].pop())
    return order


def draws_per_source(sources: list[Source], order: list[int]) -> dict[str, int]:
    """How many of `order`'s draws each source gave."""
    counts = {s.name: 0 for s in sources}
    bounds = np.array([s.start + s.count for s in sources])
    for index in np.searchsorted(bounds, np.asarray(order), side="right").tolist():
        counts[sources[index].name] += 1
    return counts
