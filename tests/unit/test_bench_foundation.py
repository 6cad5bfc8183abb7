"""bench.studies.foundation's interleaved batching gain: the medians, the table and how targets are
judged (no server: the numbers are made up, the logic is real)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.studies import foundation


def window(ok_rps: float, cpu_us: float, errors: int = 0) -> dict[str, float]:
    return {"ok_rps": ok_rps, "cpu_us": cpu_us, "errors": errors, "p99_ms": 10.0}


def test_the_gain_is_the_median_of_the_per_pair_ratios() -> None:
    g = foundation.summarize_gain(
        {
            "batched": [window(8000, 220), window(9000, 200), window(6000, 250, errors=2)],
            "off": [window(4000, 480), window(3000, 500), window(1000, 900)],
        }
    )
    # pairs 2.0, 3.0, 6.0: one outlying pair moves the median less than it would move a mean
    assert g["gains"] == [2.0, 3.0, 6.0]
    assert g["gain"] == 3.0
    assert g["ok_rps_batched"] == 8000 and g["ok_rps_off"] == 3000
    assert g["cpu_us_batched"] == 220 and g["cpu_us_off"] == 500
    assert g["errors"] == 2


def test_unpaired_runs_are_refused() -> None:
    with pytest.raises(ValueError):
        foundation.summarize_gain({"batched": [window(1, 1)], "off": []})


def result(gain: dict[str, Any] | None) -> dict[str, Any]:
    r: dict[str, Any] = {
        "framework": "xgboost",
        "n_features": 50,
        "inproc": {
            "one_by_one_rows_per_s": 5000.0,
            "one_by_one_rows": 2000,
            "batched_rows_per_s": 2e5,
            "batch_rows": 4096,
        },
        "http": {"a": {64: run(7000)}, "c": {64: run(700)}, "d": {64: run(4000)}},
        "ratios": {
            "a/c": {64: 10.0},
            "b/c": {64: None},
            "a/d": {64: 1.75},
            "b/d": {64: None},
        },
    }
    if gain is not None:
        r["gain"] = gain
    return r


def run(ok_rps: float, errors: int = 0) -> dict[str, Any]:
    return {
        "ok_rps": ok_rps,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "errors": errors,
        "server_log_errors": {},
    }


def gains(servery: float, bare: float, bare_errors: int = 0) -> dict[str, Any]:
    def one(g: float, errors: int) -> dict[str, Any]:
        return foundation.summarize_gain(
            {"batched": [window(g * 1000, 200, errors)], "off": [window(1000, 200 * g)]}
        )

    return {"servery": one(servery, 0), "bare": one(bare, bare_errors)}


def test_the_interleaved_gain_is_judged_and_the_bare_gain_reported() -> None:
    checks = foundation.target_checks({"breast_cancer_large": result(gains(3.2, 2.4))})
    texts = [f"{mark}: {what}" for mark, what in checks]
    assert "PASS: breast_cancer_large: batching gain >= 3x at c=64, interleaved median (3.20x)" in (
        texts
    )
    assert not any("a/d" in t for t in texts)  # the single-run cell is not judged twice
    bare = [t for t in texts if t.startswith("info: breast_cancer_large: bare")]
    assert bare and "gains 2.40x" in bare[0] and "480 us off, 200 us batched" in bare[0]


def test_a_low_interleaved_gain_fails_even_when_the_single_run_passes() -> None:
    r = result(gains(2.2, 2.0))
    r["ratios"]["a/d"][64] = 3.5
    checks = dict((what, mark) for mark, what in foundation.target_checks({"x_large": r}))
    assert checks["x_large: batching gain >= 3x at c=64, interleaved median (2.20x)"] == "FAIL"


def test_without_interleaved_runs_the_single_run_cell_is_judged() -> None:
    checks = foundation.target_checks({"breast_cancer_large": result(None)})
    assert ("FAIL", "breast_cancer_large: batching gain a/d >= 3x at c=64 (1.75x)") in checks


def test_errors_in_the_gain_runs_fail_the_zero_errors_target() -> None:
    checks = foundation.target_checks({"breast_cancer_large": result(gains(3.2, 2.4, 5))})
    marks = [(mark, what) for mark, what in checks if what.startswith("0 errors")]
    assert marks and marks[0][0] == "FAIL"
    assert "gain runs on bare: 5" in marks[0][1]


def test_the_gain_table_lists_each_server_with_its_cpu_per_request() -> None:
    text = foundation.gain_report({"breast_cancer_large": result(gains(3.2, 2.4))}, markdown=True)
    assert text.startswith("### Batching gain at c=64, interleaved (OIP V2 REST)")
    lines = [line for line in text.splitlines() if line.startswith("| breast_cancer_large")]
    assert len(lines) == 2
    servery = [c.strip() for c in lines[0].strip("|").split("|")]
    # model, server, batched, off, gain, pairs, CPU batched, CPU off, 1-row call (1e6/5000), err
    assert servery[1] == "servery" and servery[4] == "3.20x" and servery[8] == "200"
    assert servery[6] == "200" and servery[7] == "640"
    assert foundation.gain_report({"iris": result(None)}, markdown=True) == ""
