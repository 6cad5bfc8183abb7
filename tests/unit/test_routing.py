"""models/routing.py: weighted, sticky split of requests over a model's targets."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from bench.harness.server import ROOT
from models.routing import Split, key_point

N_KEYS = 10_000
TOLERANCE = 0.02  # +-2 percentage points


def shares(picks: list[str]) -> dict[str, float]:
    counts = Counter(picks)
    return {target: n / len(picks) for target, n in counts.items()}


# --- key_point ------------------------------------------------------------------------------------


def test_key_point_is_in_unit_interval_and_deterministic() -> None:
    points = [key_point("iris", f"user-{i}") for i in range(2000)]
    assert all(0.0 <= p < 1.0 for p in points)
    assert points == [key_point("iris", f"user-{i}") for i in range(2000)]
    assert len(set(points)) == len(points)  # 64-bit points: no collisions among 2000 keys


def test_key_point_of_the_largest_digest_stays_below_one(monkeypatch) -> None:
    """A digest of all ones must not round up to 1.0 (pick() would index past the last target)."""
    import hashlib

    import models.routing as routing

    real = hashlib.blake2b

    class AllOnes:
        def __init__(self, data: bytes = b"", *, digest_size: int = 64, **kw: object) -> None:
            self.digest_size = digest_size
            self._real = real(data, digest_size=digest_size, **kw)

        def digest(self) -> bytes:
            return b"\xff" * 8 if self.digest_size == 8 else self._real.digest()

    monkeypatch.setattr(routing.hashlib, "blake2b", AllOnes)
    point = key_point("iris", "worst-case")
    assert 0.99 < point < 1.0
    assert Split("iris", [("a", 1), ("b", 1)]).pick("worst-case") == "b"


def test_key_point_is_uniform_over_keys() -> None:
    points = [key_point("iris", f"k{i}") for i in range(N_KEYS)]
    deciles = Counter(int(p * 10) for p in points)
    assert sorted(deciles) == list(range(10))
    for decile in range(10):
        assert abs(deciles[decile] / N_KEYS - 0.1) < TOLERANCE, deciles


def test_key_point_is_the_same_in_another_process_with_another_hash_seed() -> None:
    """Python's hash() is salted per process; the route key placement must not be."""
    pairs = [("iris", "alice"), ("digits", "bob"), ("breast_cancer", "user-42"), ("a" * 64, "")]
    script = (
        "import json, sys\n"
        "from models.routing import key_point\n"
        "pairs = json.loads(sys.argv[1])\n"
        "print(json.dumps([key_point(m, k) for m, k in pairs]))\n"
    )
    import json

    points = []
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script, json.dumps(pairs)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        points.append(json.loads(out))
    here = [key_point(m, k) for m, k in pairs]
    assert points[0] == points[1] == here
    # sanity: the two child processes really had different str hashes
    hashes = [
        subprocess.run(
            [sys.executable, "-c", "print(hash('alice'))"],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "12345")
    ]
    assert hashes[0] != hashes[1]


def test_key_point_differs_by_model() -> None:
    keys = [f"u{i}" for i in range(1000)]
    a = [key_point("iris", k) for k in keys]
    b = [key_point("digits", k) for k in keys]
    assert sum(x == y for x, y in zip(a, b, strict=True)) == 0


@pytest.mark.parametrize(
    ("m1", "m2"),
    [
        ("iris", "iris2"),
        # names sharing their first 16 bytes (BLAKE2b's person field is only 16 bytes long)
        ("customer_churn_model_a", "customer_churn_model_b"),
        ("a" * 64, "a" * 63 + "b"),
    ],
)
def test_placement_is_independent_between_models(m1: str, m2: str) -> None:
    """A 10% canary of one model and a 10% canary of another should not hold the same keys."""
    keys = [f"user-{i}" for i in range(N_KEYS)]
    s1 = Split(m1, [("stable", 90), ("canary", 10)])
    s2 = Split(m2, [("stable", 90), ("canary", 10)])
    both = sum(s1.pick(k) == "canary" and s2.pick(k) == "canary" for k in keys) / N_KEYS
    # independent: P(both) ~ 0.1 * 0.1 = 0.01; identical placement would give 0.1
    assert abs(both - 0.01) < 0.01, both
    assert key_point(m1, "same-key") != key_point(m2, "same-key")


# --- Split: keyed (sticky) picks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [
        {"production": 90, "staging": 10},
        {"a": 50, "b": 30, "c": 20},
        {"a": 0.5, "b": 0.3, "c": 0.2},  # relative weights: same split as 50/30/20
    ],
)
def test_keyed_picks_follow_the_weights(weights: dict[str, float]) -> None:
    split = Split("iris", list(weights.items()))
    got = shares([split.pick(f"key-{i}") for i in range(N_KEYS)])
    total = sum(weights.values())
    assert set(got) == set(weights)
    for target, w in weights.items():
        assert abs(got[target] - w / total) < TOLERANCE, (target, got)


def test_same_key_same_target_every_time() -> None:
    split = Split("iris", [("a", 50), ("b", 30), ("c", 20)])
    for i in range(300):
        key = f"customer-{i}"
        first = split.pick(key)
        assert all(split.pick(key) == first for _ in range(5))
    # and a second Split built from the same table agrees (another worker, after a restart)
    again = Split("iris", [("a", 50), ("b", 30), ("c", 20)])
    assert all(split.pick(f"customer-{i}") == again.pick(f"customer-{i}") for i in range(300))


def test_keyed_pick_is_not_affected_by_the_global_random_state() -> None:
    split = Split("iris", [("a", 1), ("b", 1)])
    random.seed(1)
    first = [split.pick(f"k{i}") for i in range(200)]
    random.seed(2)
    assert [split.pick(f"k{i}") for i in range(200)] == first


def test_keyed_pick_matches_key_point_and_cumulative_bounds() -> None:
    split = Split("m", [("a", 25), ("b", 25), ("c", 50)])
    for i in range(2000):
        p = key_point("m", str(i))
        expected = "a" if p < 0.25 else "b" if p < 0.5 else "c"
        assert split.pick(str(i)) == expected


def test_growing_the_canary_only_moves_keys_towards_it() -> None:
    """Stickiness under a weight change: 90/10 -> 80/20 never moves a canary key back to stable."""
    before = Split("iris", [("canary", 10), ("stable", 90)])
    after = Split("iris", [("canary", 20), ("stable", 80)])
    keys = [f"u{i}" for i in range(N_KEYS)]
    moved_back = [k for k in keys if before.pick(k) == "canary" and after.pick(k) == "stable"]
    assert moved_back == []


# --- Split: keyless (random) picks ----------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [{"production": 90, "staging": 10}, {"a": 50, "b": 30, "c": 20}],
)
def test_keyless_picks_follow_the_weights(weights: dict[str, float]) -> None:
    random.seed(20240601)
    split = Split("iris", list(weights.items()))
    got = shares([split.pick() for _ in range(N_KEYS)])
    assert set(got) == set(weights)
    total = sum(weights.values())
    for target, w in weights.items():
        assert abs(got[target] - w / total) < TOLERANCE, (target, got)


def test_keyless_picks_are_random_not_sticky() -> None:
    random.seed(7)
    split = Split("iris", [("a", 1), ("b", 1)])
    picks = [split.pick(None) for _ in range(200)]
    assert set(picks) == {"a", "b"}
    random.seed(7)
    assert [split.pick(None) for _ in range(200)] == picks  # driven by the random module


# --- Split: zero weights and validation -----------------------------------------------------------


@pytest.mark.parametrize(
    "targets",
    [
        [("zero", 0), ("a", 1), ("b", 1)],  # first
        [("a", 1), ("zero", 0), ("b", 1)],  # middle
        [("a", 1), ("b", 1), ("zero", 0)],  # last
        [("a", 0.1)] * 10 + [("zero", 0)],  # last, after weights that do not sum to 1 exactly
    ],
)
def test_zero_weight_target_is_never_picked(targets: list[tuple[str, float]]) -> None:
    split = Split("iris", targets)
    random.seed(3)
    keyed = {split.pick(f"k{i}") for i in range(N_KEYS)}
    keyless = {split.pick() for _ in range(N_KEYS)}
    assert "zero" not in keyed | keyless
    assert keyed == keyless == {t for t, w in targets if w > 0}


def test_zero_weight_target_at_the_very_edges_of_the_interval(monkeypatch) -> None:
    """Points 0.0 and just below 1.0 (the extremes random() can return) skip zero weights."""
    split = Split("iris", [("zero-first", 0), ("a", 1), ("zero-last", 0)])
    for point in (0.0, 0.5, math.nextafter(1.0, 0.0)):
        monkeypatch.setattr(random, "random", lambda point=point: point)
        assert split.pick() == "a"


def test_weights_are_normalised() -> None:
    split = Split("iris", [("a", 9), ("b", 1)])
    assert split.targets == ["a", "b"]
    assert split.weights == pytest.approx([0.9, 0.1])
    assert split.model == "iris"


def test_single_target_takes_everything() -> None:
    split = Split("iris", [("only", 3)])
    assert {split.pick(str(i)) for i in range(500)} == {"only"}
    assert {split.pick() for _ in range(500)} == {"only"}


def test_targets_may_be_any_objects() -> None:
    a, b = object(), object()
    split = Split("iris", [(a, 1), (b, 0)])
    assert split.pick("x") is a


@pytest.mark.parametrize(
    "targets",
    [
        [],
        [("a", 0)],
        [("a", 0), ("b", 0)],
        [("a", -1), ("b", 2)],
        [("a", 1), ("b", -0.5)],
        [("a", float("nan")), ("b", 1)],
        [("a", float("nan"))],
        [("a", -float("inf")), ("b", 1)],
        [("a", float("inf")), ("b", 1)],  # would give weights [nan, 0]: "a" never picked
    ],
)
def test_invalid_splits_raise(targets: list[tuple[str, float]]) -> None:
    with pytest.raises(ValueError, match="split"):
        Split("iris", targets)
