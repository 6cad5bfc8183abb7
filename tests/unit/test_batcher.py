"""services/runtime/batcher.py: the router's asyncio micro-batcher, driven by plain
``asyncio.run``."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest

from services.runtime.batcher import MicroBatcher, Result
from tests.conftest import run_on_virtual_clock


def rows(*values: float, width: int = 2) -> np.ndarray:
    """One row per value, every column holding that value (row sum = value * width)."""
    return np.array([[v] * width for v in values], dtype=np.float64)


class RowSums:
    """A predict that records each call and answers row sums (labels) and the rows (proba)."""

    def __init__(self, fail_if_negative: bool = False) -> None:
        self.calls: list[np.ndarray] = []
        self.fail_if_negative = fail_if_negative

    def __call__(self, x: np.ndarray) -> Result:
        self.calls.append(x.copy())
        if self.fail_if_negative and (x < 0).any():
            raise ValueError("negative input")
        return x.sum(axis=1), x * 10

    @property
    def sizes(self) -> list[int]:
        return [len(x) for x in self.calls]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on a loop whose clock jumps to its next timer instead of waiting for it: the
    arrivals a few ms apart, the model calls' sleeps and the holds below happen in loop-time
    order however busy the machine (a stall cannot make an arrival miss a hold it is meant to
    join, or two arrivals share a tick). Gives up after 5 s of loop time."""
    return run_on_virtual_clock(asyncio.wait_for(coro, 5))


def check_own_rows(x: np.ndarray, result: Result) -> None:
    labels, proba = result
    np.testing.assert_array_equal(labels, x.sum(axis=1))
    np.testing.assert_array_equal(proba, x * 10)


def test_max_batch_size_below_one_rejected() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        MicroBatcher(RowSums(), max_batch_size=0)
    with pytest.raises(ValueError):
        MicroBatcher(RowSums(), max_batch_size=-5)


def test_concurrent_submits_merge_into_one_call() -> None:
    predict = RowSums()
    hook: list[tuple[int, int]] = []
    batcher = MicroBatcher(predict, max_batch_size=64, on_batch=lambda r, n: hook.append((r, n)))
    inputs = [rows(1), rows(2, 3), rows(4, 5, 6), rows(7)]

    async def main() -> list[Result]:
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    results = run(main())
    assert predict.sizes == [7]  # one model call for all four requests
    np.testing.assert_array_equal(predict.calls[0], np.concatenate(inputs))
    for x, result in zip(inputs, results, strict=True):
        check_own_rows(x, result)
    assert hook == [(7, 4)]
    assert (batcher.batches, batcher.rows, batcher.largest_batch) == (1, 7, 7)


def test_each_caller_gets_its_own_rows() -> None:
    # Distinct values per caller, so any mix-up in the scatter shows.
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=1000)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(int(rng.integers(1, 6)), 3)) for _ in range(50)]

    async def main() -> list[Result]:
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    results = run(main())
    assert len(predict.calls) == 1
    for x, result in zip(inputs, results, strict=True):
        check_own_rows(x, result)
        assert len(result[0]) == len(x)


def test_batches_bounded_and_oversized_request_alone() -> None:
    predict = RowSums()
    hook: list[tuple[int, int]] = []
    batcher = MicroBatcher(predict, max_batch_size=4, on_batch=lambda r, n: hook.append((r, n)))
    sizes = [3, 10, 2, 2, 1, 1, 1, 1, 4]
    inputs = [rows(*range(100 * i, 100 * i + n)) for i, n in enumerate(sizes)]

    async def main() -> list[Result]:
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    results = run(main())
    # Packed in arrival order; the 10-row request is never split and rides alone.
    assert predict.sizes == [3, 10, 4, 4, 4]
    assert hook == [(3, 1), (10, 1), (4, 2), (4, 4), (4, 1)]
    for x, result in zip(inputs, results, strict=True):
        check_own_rows(x, result)
    assert batcher.largest_batch == 10
    assert batcher.batches == 5
    assert batcher.rows == sum(sizes)


def test_max_batch_size_one() -> None:
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=1)
    inputs = [rows(1), rows(2), rows(3, 4)]

    async def main() -> list[Result]:
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    results = run(main())
    assert predict.sizes == [1, 1, 2]
    for x, result in zip(inputs, results, strict=True):
        check_own_rows(x, result)


def test_lone_request_needs_no_timer() -> None:
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64)
    x = rows(1, 2)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(batcher.submit(x))
        await asyncio.sleep(0)  # the task runs submit, which schedules the flush
        assert not task.done()
        assert not loop._scheduled  # type: ignore[attr-defined]  # call_soon, not a timer
        for _ in range(3):  # flush, then the task wakes up: a few ticks, no wall-clock wait
            if task.done():
                break
            await asyncio.sleep(0)
        assert task.done()
        check_own_rows(x, task.result())

    # A plain asyncio loop (not uvloop), whose timer heap ``_scheduled`` can be inspected.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main())
    assert predict.sizes == [2]


def test_later_ticks_form_new_batches() -> None:
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64)

    async def main() -> None:
        first = await asyncio.gather(batcher.submit(rows(1)), batcher.submit(rows(2)))
        second = await batcher.submit(rows(3))
        check_own_rows(rows(1), first[0])
        check_own_rows(rows(2), first[1])
        check_own_rows(rows(3), second)

    run(main())
    assert predict.sizes == [2, 1]


def test_async_predict() -> None:
    calls: list[int] = []
    hook: list[tuple[int, int]] = []

    async def predict(x: np.ndarray) -> Result:
        calls.append(len(x))
        await asyncio.sleep(0.01)  # a call to another service
        return x.sum(axis=1), x * 10

    batcher = MicroBatcher(
        predict, max_batch_size=3, is_async=True, on_batch=lambda r, n: hook.append((r, n))
    )
    inputs = [rows(1), rows(2, 3), rows(4), rows(5, 6)]

    async def main() -> list[Result]:
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    results = run(main())
    assert calls == [3, 3]
    assert sorted(hook) == [(3, 2), (3, 2)]
    for x, result in zip(inputs, results, strict=True):
        check_own_rows(x, result)
    assert not batcher._tasks  # finished tasks are not kept alive


@pytest.mark.parametrize("max_in_flight", [1, 2, 3])
def test_async_batches_in_flight_are_bounded(max_in_flight: int) -> None:
    running = 0
    peak = 0

    async def predict(x: np.ndarray) -> Result:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return x.sum(axis=1), x * 10

    batcher = MicroBatcher(predict, max_batch_size=1, is_async=True, max_in_flight=max_in_flight)

    async def main() -> list[Result]:
        return await asyncio.gather(*(batcher.submit(rows(i)) for i in range(5)))

    results = run(main())
    assert peak == max_in_flight
    assert [float(labels[0]) for labels, _ in results] == [2.0 * i for i in range(5)]


def test_async_requests_arriving_during_a_batch_leave_together() -> None:
    sizes: list[int] = []

    async def predict(x: np.ndarray) -> Result:
        sizes.append(len(x))
        await asyncio.sleep(0.02)
        return x.sum(axis=1), x

    batcher = MicroBatcher(predict, max_batch_size=64, is_async=True)

    async def main() -> list[Result]:
        first = asyncio.ensure_future(batcher.submit(rows(0)))
        await asyncio.sleep(0.005)  # the first batch is now in flight
        later = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(1, 6)]
        for _ in range(3):  # several loop ticks pass while the first batch is in flight
            await asyncio.sleep(0)
        return await asyncio.gather(first, *later)

    results = run(main())
    assert sizes == [1, 5]
    assert [float(labels[0]) for labels, _ in results] == [2.0 * i for i in range(6)]


def test_max_in_flight_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        MicroBatcher(RowSums(), max_batch_size=4, is_async=True, max_in_flight=0)


@pytest.mark.parametrize("is_async", [False, True])
def test_exception_fails_only_its_chunk(is_async: bool) -> None:
    sync_predict = RowSums(fail_if_negative=True)

    async def async_predict(x: np.ndarray) -> Result:
        await asyncio.sleep(0)
        return sync_predict(x)

    batcher = MicroBatcher(
        async_predict if is_async else sync_predict, max_batch_size=2, is_async=is_async
    )
    # Chunks: [bad, ok1] fails together; [ok2] in the same flush still succeeds.
    bad, ok1, ok2 = rows(-1), rows(1), rows(2)

    async def main() -> tuple[list[Any], Result]:
        first = await asyncio.gather(
            batcher.submit(bad), batcher.submit(ok1), batcher.submit(ok2), return_exceptions=True
        )
        later = await batcher.submit(rows(3, 4))  # the batcher keeps working
        return first, later

    (r_bad, r_ok1, r_ok2), later = run(main())
    assert isinstance(r_bad, ValueError)
    assert isinstance(r_ok1, ValueError)
    assert str(r_ok1) == "negative input"
    check_own_rows(ok2, r_ok2)
    check_own_rows(rows(3, 4), later)
    assert sync_predict.sizes == [2, 1, 2]
    assert batcher.batches == 2  # failed calls are not counted


def test_failed_call_skips_on_batch() -> None:
    hook: list[tuple[int, int]] = []

    def predict(x: np.ndarray) -> Result:
        raise RuntimeError("model crashed")

    batcher = MicroBatcher(predict, max_batch_size=8, on_batch=lambda r, n: hook.append((r, n)))
    with pytest.raises(RuntimeError, match="model crashed"):
        run(batcher.submit(rows(1)))
    assert hook == []


def test_cancelled_submit_is_skipped() -> None:
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64)
    gone, stays = rows(1, 2, 3), rows(4)

    async def main() -> Result:
        t_gone = asyncio.ensure_future(batcher.submit(gone))
        t_stays = asyncio.ensure_future(batcher.submit(stays))
        await asyncio.sleep(0)  # both are queued; the flush is scheduled but has not run
        assert len(batcher._pending) == 2
        assert predict.calls == []
        t_gone.cancel()
        result = await t_stays
        with pytest.raises(asyncio.CancelledError):
            await t_gone
        return result

    result = run(main())
    assert predict.sizes == [1]  # the cancelled request's rows never reached the model
    np.testing.assert_array_equal(predict.calls[0], stays)
    check_own_rows(stays, result)


def test_all_cancelled_chunk_makes_no_call() -> None:
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64)

    async def main() -> None:
        task = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0)
        task.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        assert task.cancelled()

    run(main())
    assert predict.calls == []
    assert batcher.batches == 0


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize("extra", [1, -1])
def test_wrong_number_of_results(is_async: bool, extra: int) -> None:
    hook: list[tuple[int, int]] = []

    def sync_predict(x: np.ndarray) -> Result:
        n = len(x) + extra
        return np.zeros(n), np.zeros((n, 2))

    async def async_predict(x: np.ndarray) -> Result:
        return sync_predict(x)

    batcher = MicroBatcher(
        async_predict if is_async else sync_predict,
        max_batch_size=64,
        is_async=is_async,
        on_batch=lambda r, n: hook.append((r, n)),
    )

    async def main() -> list[Any]:
        return await asyncio.gather(
            batcher.submit(rows(1)), batcher.submit(rows(2, 3)), return_exceptions=True
        )

    results = run(main())
    for r in results:
        assert isinstance(r, RuntimeError)
        assert f"batch size mismatch: {3 + extra} results for 3 rows" in str(r)
    assert hook == []
    assert batcher.batches == 0


def test_mismatched_proba_length_fails() -> None:
    def predict(x: np.ndarray) -> Result:
        return x.sum(axis=1), np.zeros((len(x) + 1, 2))

    batcher = MicroBatcher(predict, max_batch_size=64)
    with pytest.raises(RuntimeError, match="batch size mismatch"):
        run(batcher.submit(rows(1, 2)))


def _broken_hook(rows: int, requests: int) -> None:
    raise RuntimeError("hook broke")


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize("broken", ["hook", "result"])
def test_broken_hook_or_result_never_leaves_a_request_hanging(is_async: bool, broken: str) -> None:
    def sync_predict(x: np.ndarray) -> Any:
        return None if broken == "result" else (x.sum(axis=1), x)

    async def async_predict(x: np.ndarray) -> Any:
        return sync_predict(x)

    batcher = MicroBatcher(
        async_predict if is_async else sync_predict,
        max_batch_size=64,
        is_async=is_async,
        on_batch=_broken_hook if broken == "hook" else None,
    )

    if broken == "hook":  # metrics failing must not fail a request the model answered
        labels, _ = run(batcher.submit(rows(1)))
        assert labels.shape == (1,)
    else:  # a malformed result fails the request (not TimeoutError: it is answered)
        with pytest.raises((RuntimeError, TypeError)):
            run(batcher.submit(rows(1)))


# --- holds: a lone request may wait for company under load --------------------------------------

HOLD_S = 0.05  # in loop time (run()): arrivals 5 ms apart are well inside it


def test_hold_gathers_requests_arriving_on_later_ticks() -> None:
    """Like gRPC calls: one per loop turn, a few ms apart; the hold merges them into one call."""
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64, hold_s=HOLD_S)

    async def main() -> None:
        async def late(i: int) -> Result:
            await asyncio.sleep(0.005 * i)
            return await batcher.submit(rows(i + 1))

        results = await asyncio.gather(*(late(i) for i in range(4)))
        for i, r in enumerate(results):
            check_own_rows(rows(i + 1), r)

    run(main())
    assert predict.sizes == [4]
    assert (batcher.holds, batcher.useful_holds) == (1, 1)


def test_without_hold_later_ticks_are_separate_batches() -> None:
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64)

    async def main() -> None:
        async def late(i: int) -> Result:
            await asyncio.sleep(0.005 * i)
            return await batcher.submit(rows(i + 1))

        await asyncio.gather(*(late(i) for i in range(4)))

    run(main())
    assert predict.sizes == [1, 1, 1, 1]
    assert batcher.holds == 0


def test_wasted_holds_back_off_for_sequential_traffic() -> None:
    """c=1: each hold gathers nobody, so the batcher holds after 1, 2, 4, ... skipped flushes."""
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64, hold_s=0.001)

    async def main() -> None:
        for i in range(40):
            check_own_rows(rows(i), await batcher.submit(rows(i)))

    run(main())
    assert predict.sizes == [1] * 40
    # held: request 1, then after skipping 1, 2, 4, 8, 16 flushes: requests 3, 6, 11, 20, 37
    assert (batcher.holds, batcher.useful_holds) == (6, 0)


def test_useful_hold_resets_the_backoff() -> None:
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64, hold_s=HOLD_S)

    async def main() -> None:
        for i in range(3):  # holds at 1 and 3 waste; the backoff is now 2 flushes
            await batcher.submit(rows(i))
        await batcher.submit(rows(3))  # skipped (backoff 2 -> 1)
        await batcher.submit(rows(4))  # skipped (backoff 1 -> 0)

        async def late(i: int) -> Result:
            await asyncio.sleep(0.005 * i)
            return await batcher.submit(rows(10 + i))

        await asyncio.gather(*(late(i) for i in range(3)))  # held, gathers 3: backoff reset
        await asyncio.gather(*(late(i) for i in range(2)))  # held again at once, gathers 2

    run(main())
    assert predict.sizes == [1, 1, 1, 1, 1, 3, 2]
    assert (batcher.holds, batcher.useful_holds) == (4, 2)


def test_hold_ends_early_when_a_full_batch_waits() -> None:
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=4, hold_s=10.0)  # run() gives up after 5 s

    async def main() -> None:
        async def late(i: int) -> Result:
            await asyncio.sleep(0.002 * i)
            return await batcher.submit(rows(i))

        await asyncio.gather(*(late(i) for i in range(4)))

    run(main())
    assert predict.sizes == [4]


def test_several_requests_on_the_first_tick_are_not_held() -> None:
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64, hold_s=10.0)

    async def main() -> None:
        await asyncio.gather(*(batcher.submit(rows(i)) for i in range(3)))

    run(main())
    assert predict.sizes == [3]
    assert batcher.holds == 0


def test_async_batchers_never_hold() -> None:
    calls: list[int] = []

    async def predict(x: np.ndarray) -> Result:
        calls.append(len(x))
        return x.sum(axis=1), x * 10

    batcher = MicroBatcher(predict, max_batch_size=64, is_async=True, hold_s=10.0)

    async def main() -> None:
        check_own_rows(rows(1), await batcher.submit(rows(1)))

    run(main())
    assert calls == [1] and batcher.holds == 0


def test_negative_hold_is_rejected() -> None:
    with pytest.raises(ValueError, match="hold_s must be >= 0"):
        MicroBatcher(RowSums(), max_batch_size=4, hold_s=-1)


def test_closed_loop_clients_coming_back_are_awaited() -> None:
    """After a batch of 8 is answered, its clients return a few ms apart: one batch, not four."""
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64, hold_s=HOLD_S)

    async def main() -> None:
        await asyncio.gather(*(batcher.submit(rows(i)) for i in range(8)))

        async def back(i: int) -> Result:
            await asyncio.sleep(0.003 * i)
            return await batcher.submit(rows(i))

        # two arrive on the first tick: the lone-request probe would not hold them (n > 1),
        # but 2 * 2 < 8 (the last batch) does, and the three that follow join them
        results = await asyncio.gather(
            batcher.submit(rows(9)), batcher.submit(rows(10)), *(back(i) for i in range(1, 4))
        )
        check_own_rows(rows(9), results[0])

    run(main())
    assert predict.sizes == [8, 5]


def test_coming_back_hold_ends_once_the_last_batch_is_back() -> None:
    """No waiting out the timer when everyone expected has arrived (run() gives up after 5 s)."""
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64, hold_s=10.0)

    async def main() -> None:
        await asyncio.gather(*(batcher.submit(rows(i)) for i in range(4)))

        async def back(i: int) -> Result:
            await asyncio.sleep(0.002 * i)
            return await batcher.submit(rows(i))

        await asyncio.gather(batcher.submit(rows(7)), *(back(i) for i in range(1, 4)))

    run(main())
    assert predict.sizes == [4, 4]


def test_full_queue_sheds_at_once_and_admits_again_when_answered() -> None:
    """max_queue unanswered requests: the next fails at once (QueueFull, a 503 Overloaded);
    once answers go out the batcher admits again, and nothing it admitted is lost."""
    from services.runtime.batcher import QueueFull
    from services.runtime.errors import Overloaded

    release = asyncio.Event()

    async def predict(x: np.ndarray) -> Result:
        await release.wait()  # a slow model service
        return x.sum(axis=1), x * 10

    batcher = MicroBatcher(predict, max_batch_size=64, is_async=True, max_queue=3)

    async def main() -> None:
        admitted = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(3)]
        await asyncio.sleep(0.01)
        assert batcher.queued == 3
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(rows(9))
        assert isinstance(refused.value, Overloaded)  # routes answer 503 + Retry-After
        assert refused.value.status_code == 503 and refused.value.headers()["Retry-After"]
        assert batcher.shed == 1 and batcher.queued == 3
        release.set()
        for i, result in enumerate(await asyncio.gather(*admitted)):
            check_own_rows(rows(i), result)
        assert batcher.queued == 0
        check_own_rows(rows(7), await batcher.submit(rows(7)))

    run(main())


def test_cancelled_requests_leave_the_queue() -> None:
    """A client that goes away frees its place (its future is cancelled)."""
    release = asyncio.Event()

    async def predict(x: np.ndarray) -> Result:
        await release.wait()
        return x.sum(axis=1), x * 10

    batcher = MicroBatcher(predict, max_batch_size=64, is_async=True, max_queue=2)

    async def main() -> None:
        gone = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(2)]
        await asyncio.sleep(0.01)
        for task in gone:
            task.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        assert batcher.queued == 0
        release.set()
        check_own_rows(rows(5), await batcher.submit(rows(5)))

    run(main())


def test_max_queue_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        MicroBatcher(RowSums(), max_batch_size=4, max_queue=0)
