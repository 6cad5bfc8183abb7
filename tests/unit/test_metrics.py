"""services/metrics.py: the GC pause histogram."""

from __future__ import annotations

import gc

from services import metrics


def gen2() -> tuple[float, float]:
    """(count, sum) of servery_gc_pause_seconds{generation="2"} in this process."""
    samples = metrics.GC_PAUSE_SECONDS.collect()[0].samples
    values = {s.name: s.value for s in samples if s.labels.get("generation") == "2"}
    return values["servery_gc_pause_seconds_count"], values["servery_gc_pause_seconds_sum"]


def test_gc_pauses_are_recorded_per_generation() -> None:
    metrics.watch_gc()
    metrics.watch_gc()  # idempotent: one callback only
    assert sum(getattr(cb, "__servery_gc__", False) for cb in gc.callbacks) == 1
    count, total = gen2()
    gc.collect()
    count_after, total_after = gen2()
    assert count_after == count + 1
    assert total_after > total
