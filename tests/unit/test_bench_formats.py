"""bench.studies.formats without a server: its options, the models file it serves, the run order,
the /metrics arithmetic and how targets are judged (the numbers are made up, the logic is real)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from bench.studies import formats
from models.config import parse_model_config


def test_defaults_and_quick() -> None:
    args = formats.parse_args([])
    assert (args.seconds, args.repeats, args.concurrency, args.quick) == (5, 10, 64, False)
    quick = formats.parse_args(["--quick", "--seconds", "9", "--repeats", "7"])
    assert (quick.seconds, quick.repeats) == (2, 1)  # --quick wins: a smoke run
    args = formats.parse_args(["--seconds", "3", "--repeats", "4", "-c", "16"])
    assert (args.seconds, args.repeats, args.concurrency) == (3, 4, 16)


@pytest.mark.parametrize("bad", [["--seconds", "0"], ["--repeats", "0"], ["-c", "0"]])
def test_nonpositive_options_are_refused(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        formats.parse_args(bad)


def test_subjects_are_each_model_saved_three_ways() -> None:
    assert formats.SUBJECTS == (
        "iris_large_bentoml",
        "iris_large",
        "iris_large_onnx",
        "breast_cancer_large_bentoml",
        "breast_cancer_large",
        "breast_cancer_large_onnx",
    )
    assert {formats.model_of(s) for s in formats.SUBJECTS[:3]} == {"iris_large"}
    assert {(t.subject, t.baseline, t.minimum) for t in formats.TARGETS} == {
        ("iris_large_bentoml", "iris_large", 0.9),
        ("breast_cancer_large_bentoml", "breast_cancer_large", 0.9),
        ("iris_large_onnx", "iris_large", 5.0),
        ("breast_cancer_large_onnx", "breast_cancer_large", 1.0),
    }


def test_models_file_pins_every_subject_inline() -> None:
    tags = {
        "iris_large_bentoml": "iris_large_bentoml:bbbb",
        "iris_large": "iris_large:nnnn",
        "iris_large_onnx": "iris_large:oooo",
    }
    config = parse_model_config(yaml.safe_load(formats.models_yaml(tags)))
    entries = {e.name: e for e in config.models}
    assert list(entries) == list(tags)
    assert {n: e.store_tag for n, e in entries.items()} == tags
    # native and compiled: two entries of one store name, each pinned to its own version
    assert entries["iris_large"].version_policy.specific == ["nnnn"]
    assert entries["iris_large_onnx"].version_policy.specific == ["oooo"]
    assert {config.placement_of(e).value for e in config.models} == {"inline"}


def test_bodies_are_single_row_fp32_oip() -> None:
    import json

    import numpy as np

    (body,) = formats.bodies(np.array([[5.1, 3.5, 1.4, 0.2]]))
    assert json.loads(body) == {
        "inputs": [
            {
                "name": "input-0",
                "shape": [1, 4],
                "datatype": "FP32",
                "data": np.float32([5.1, 3.5, 1.4, 0.2]).tolist(),
            }
        ]
    }


def test_run_order_keeps_compared_pairs_adjacent_and_alternates() -> None:
    orders = [formats.run_order(r) for r in range(4)]
    for order in orders:
        assert sorted(order) == sorted(formats.SUBJECTS)
        for t in formats.TARGETS:  # each ratio's two runs are back to back
            assert abs(order.index(t.subject) - order.index(t.baseline)) == 1
    assert orders[1] == orders[0][:3][::-1] + orders[0][3:][::-1]
    assert orders[2][0].startswith("breast_cancer_large")  # models' order flips every two
    assert len({tuple(o) for o in orders}) == 4


def test_totals_and_delta_read_the_batcher_series_per_model() -> None:
    labels = {"model": "m", "version": "v1", "placement": "inline"}
    samples = [
        ("servery_batch_size_sum", labels, 120.0),
        ("servery_batch_size_count", labels, 10.0),
        ("servery_batch_size_bucket", {**labels, "le": "1.0"}, 3.0),
        ("servery_model_compute_seconds_sum", labels, 0.5),
        ("servery_model_compute_seconds_count", labels, 10.0),
        ("servery_batch_size_sum", {**labels, "version": "v2"}, 5.0),
        ("servery_requests_total", {"model": "m", "version": "v1", "status": "200"}, 99.0),
    ]
    got = formats.totals(samples)
    assert got == {"m": {"rows": 125.0, "batches": 10.0, "compute_s": 0.5, "calls": 10.0}}
    moved = formats.delta(got["m"], {"rows": 25.0, "batches": 2.0, "compute_s": 0.1, "calls": 2})
    assert moved == pytest.approx({"rows": 100.0, "batches": 8.0, "compute_s": 0.4, "calls": 8})
    assert formats.delta(got["m"], None) == got["m"]  # no series before the first call
    assert formats.mean_batch([moved, moved]) == pytest.approx(12.5)
    assert formats.mean_call_ms([moved]) == pytest.approx(50.0)
    assert formats.mean_batch([{}]) is None


def cell(rps: float, rows: float = 640, batches: float = 64, errors: int = 0) -> dict[str, Any]:
    return {
        "rps": rps,
        "p50_ms": 10.0,
        "p99_ms": 30.0,
        "errors": errors,
        "rows": rows,
        "batches": batches,
        "compute_s": 0.64,
        "calls": batches,
        "cpu_us": 300.0,
    }


def runs_with(**rps: list[float]) -> dict[str, list[dict[str, Any]]]:
    base = {s: [cell(1000.0), cell(1000.0), cell(1000.0)] for s in formats.SUBJECTS}
    base.update({s: [cell(r) for r in v] for s, v in rps.items()})
    return base


def test_ratios_are_medians_of_paired_repeats() -> None:
    runs = runs_with(iris_large=[1000, 500, 2000], iris_large_onnx=[5000, 3000, 8000])
    # per repeat 5.0, 6.0, 4.0
    assert formats.paired(runs, "iris_large_onnx", "iris_large") == pytest.approx(5.0)
    # per repeat 4.0, 6.0, 4.5: the median is 4.5, where a ratio of medians says 4000 / 1000
    runs = runs_with(iris_large=[1000, 500, 2000], iris_large_onnx=[4000, 3000, 9000])
    assert formats.paired(runs, "iris_large_onnx", "iris_large") == pytest.approx(4.5)
    runs["iris_large_onnx"][0]["cpu_us"] = 100.0
    assert formats.paired(runs, "iris_large_onnx", "iris_large", "cpu_us") == 1.0
    with pytest.raises(ValueError):
        formats.paired({"a": [cell(1)], "b": []}, "a", "b")


def test_evaluate_passes_and_fails_each_target() -> None:
    runs = runs_with(
        iris_large=[1000, 1000, 1000],
        iris_large_onnx=[6000, 6000, 4000],
        iris_large_bentoml=[950, 880, 920],
        breast_cancer_large_bentoml=[850, 880, 800],
        breast_cancer_large_onnx=[1100, 900, 1000],
    )
    verdicts = {v["check"].split(" ")[0]: v for v in formats.evaluate(runs, {"x": 0})}
    assert verdicts["iris_large_onnx"]["ok"] and verdicts["iris_large_onnx"]["ratio"] == 6.0
    assert verdicts["iris_large_bentoml"]["ok"]  # 0.92 >= 0.9
    assert not verdicts["breast_cancer_large_bentoml"]["ok"]  # 0.85
    assert verdicts["breast_cancer_large_onnx"]["ok"]  # exactly 1.0
    assert verdicts["failed"]["ok"] and verdicts["answers"]["ok"]
    assert all(v["ok"] for k, v in verdicts.items() if k.endswith(":"))  # mean batch 10


def test_evaluate_fails_without_batching_errors_or_wrong_answers() -> None:
    runs = runs_with()
    runs["iris_large_onnx"] = [cell(1000, rows=64, batches=64)] * 3  # mean batch 1
    runs["iris_large"][1]["errors"] = 2
    verdicts = formats.evaluate(runs, {"iris_large_onnx": 1})
    failed = {v["check"] for v in verdicts if not v["ok"]}
    assert "iris_large_onnx: mean batch under load" in failed
    assert "failed requests" in failed
    assert any(c.startswith("answers") for c in failed)
    assert "PASS" in formats.target_table(verdicts, True)
    assert "FAIL" in formats.target_table(verdicts, False)


def test_subject_table_names_format_and_ratio_to_native() -> None:
    runs = runs_with(iris_large_onnx=[5000, 5000, 5000])
    text = formats.subject_table(runs, True, {"iris_large_onnx": {1: 0.0114, 16: 0.04}})
    line = next(r for r in text.splitlines() if r.startswith("| iris_large_onnx "))
    assert "bentoml.onnx (compiled)" in line and "| 5.000 |" in line and "| 10.0 |" in line
    # router CPU per request, its paired ratio, in-process CPU per call of 1 and 16 rows
    assert line.endswith("| 300 | 1.000 | 0.011 / 0.040 |")
    assert "| - / - |" in text  # not measured
    assert "| bentoml.xgboost |" in text and "| servery (sklearn) |" in text
