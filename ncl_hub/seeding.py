"""Seeds derived from several integers (a run's seed, the epoch, a sample index, a stream id).

``numpy.random.SeedSequence`` mixes the keys, so nearby tuples such as (seed, epoch) and (seed, epoch + 1) give
unrelated streams, unlike ``seed + epoch``. Every seeded stream of the data pipeline (the samplers' epoch order,
the per-sample augmentation seeds, the tensor pipeline's augmentation parameters) is derived here, so that two
streams never share keys by accident.
"""
from __future__ import annotations

from typing import List

import numpy as np

__all__ = ["derive_seed", "seed_words"]


def seed_words(*keys: int, n: int = 2) -> List[int]:
    """``n`` independent 32-bit words mixed from ``keys`` (non-negative integers)."""
    return [int(w) for w in np.random.SeedSequence([int(k) for k in keys]).generate_state(n, dtype=np.uint32)]


def derive_seed(*keys: int) -> int:
    """One 63-bit seed mixed from ``keys`` (for ``torch.Generator.manual_seed``): two words of :func:`seed_words`."""
    high, low = seed_words(*keys)
    return (high << 31) ^ low
