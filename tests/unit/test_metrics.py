"""services/ops/metrics.py: the GC pause histogram."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from services.ops import metrics
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]


def gen2() -> tuple[float, float]:
    """(count, sum) of servery_gc_pause_seconds{generation="2"} in this process."""
    samples = metrics.GC_PAUSE_SECONDS.collect()[0].samples
    values = {s.name: s.value for s in samples if s.labels.get("generation") == "2"}
    return values["servery_gc_pause_seconds_count"], values["servery_gc_pause_seconds_sum"]


def test_gc_pauses_are_recorded_per_generation() -> None:
    metrics.watch_gc()
    metrics.watch_gc()  # idempotent: one callback only
    assert sum(getattr(cb, "__servery_gc__", False) for cb in gc.callbacks) == 1
    metrics.flush_gc()
    count, total = gen2()
    gc.collect()
    metrics.flush_gc()
    count_after, total_after = gen2()
    assert count_after == count + 1
    assert total_after > total


def test_the_flush_thread_records_pauses_without_being_asked() -> None:
    metrics.watch_gc()
    metrics.flush_gc()
    count, _ = gen2()
    gc.collect()
    eventually(lambda: gen2()[0] > count, "the flush thread's next flush")
    assert gen2()[0] == count + 1


def test_collections_inside_prometheus_multiprocess_code_do_not_deadlock(tmp_path: Path) -> None:
    """A collection triggered while prometheus_client holds its multiprocess lock (new label
    children, ``inc``) must not wait on that lock: it froze a router worker for good once."""
    script = textwrap.dedent(
        """
        import gc
        from prometheus_client import Counter
        from services.ops import metrics

        metrics.watch_gc()
        gc.set_threshold(1, 1, 1)  # a collection on nearly every allocation
        counter = Counter("probe", "probe", ["k"])
        for i in range(20000):
            counter.labels(str(i % 500)).inc()
        gc.set_threshold(700, 10, 10)
        metrics.flush_gc()
        child = metrics.GC_PAUSE_SECONDS.labels("0")
        print("observed", sum(b.get() for b in child._buckets))
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    observed = float(done.stdout.split()[-1])
    assert observed > 1000  # the collections were recorded, after the fact
