"""Weighted, sticky assignment of requests to a model's split targets.

A request with a route key (``X-Servery-Route-Key`` over REST, ``x-servery-route-key`` gRPC
metadata) is placed by a hash of the model name and the key, so the same key lands on the same
target in every router worker and after restarts, as long as the table is unchanged. A request
without a key is placed at random by weight. The hash is BLAKE2b from the standard library: Python's
``hash()`` is salted per process and would send one key to different versions in different workers.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

_SCALE = float(1 << 53)


def key_point(model: str, key: str) -> float:
    """A point in [0, 1) fixed by ``model`` and ``key``, uniform over keys."""
    # BLAKE2b's person is at most 16 bytes: hash the name so longer names stay independent
    person = hashlib.blake2b(model.encode(), digest_size=16).digest()
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=person).digest()
    return (int.from_bytes(digest, "big") >> 11) / _SCALE  # 53 bits: exact, never rounds to 1.0


class Split(Generic[T]):
    """Targets with weights (any positive numbers); :meth:`pick` returns one target."""

    def __init__(self, model: str, targets: Sequence[tuple[T, float]]) -> None:
        if not targets:
            raise ValueError("a split needs at least one target")
        total = float(sum(w for _, w in targets))
        if not 0 < total < float("inf") or any(w < 0 for _, w in targets):
            raise ValueError("split weights must be finite, >= 0 and not all 0")
        self.model = model
        self.targets = [t for t, _ in targets]
        self.weights = [w / total for _, w in targets]
        bounds, acc = [], 0.0
        for w in self.weights:
            acc += w
            bounds.append(acc)
        bounds[-1] = 1.0  # rounding must never push a point past the last bound
        self._bounds = bounds

    def pick(self, key: str | None = None) -> T:
        point = random.random() if key is None else key_point(self.model, key)
        return self.targets[bisect.bisect_right(self._bounds, point)]
