"""services/ops/heap.py: the worker's heap frozen after start-up."""

from __future__ import annotations

import gc

from services.ops.heap import freeze_heap


def test_freeze_heap() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
