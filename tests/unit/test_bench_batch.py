"""bench.studies.batch without a server: its options, the job file it uploads and how targets
are judged (the numbers are made up, the logic is real)."""

from __future__ import annotations

import json

import pytest

from bench.studies import batch


def test_defaults_quick_and_server_env() -> None:
    args = batch.parse_args([])
    assert (args.rows, args.rows_per_line, args.seconds, args.repeats) == (100_000, 32, 8, 3)
    quick = batch.parse_args(["--quick"])
    assert (quick.rows, quick.seconds, quick.repeats) == (10_000, 2, 1)
    given = batch.parse_args(["--quick", "--rows", "500", "--server-env", "A=b=c"])
    assert given.rows == 500 and given.env == {"A": "b=c"}  # what is given wins over --quick
    with pytest.raises(SystemExit):
        batch.parse_args(["--server-env", "NOEQUALS"])
    with pytest.raises(SystemExit):
        batch.parse_args(["--repeats", "0"])


def test_the_job_file_is_openai_batch_lines_of_predict_bodies() -> None:
    rows = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    groups = batch.chunked(rows, total=7, per=3)
    assert [len(g) for g in groups] == [3, 3, 1]
    assert groups[1] == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]] and groups[2] == [[1.0, 2.0]]
    lines = [json.loads(line) for line in batch.job_file(groups).splitlines()]
    assert [line["custom_id"] for line in lines] == ["r0", "r1", "r2"]
    assert {(line["method"], line["url"]) for line in lines} == {("POST", "/predict")}
    assert lines[2]["body"] == {"model": "iris", "inputs": [[1.0, 2.0]]}


def test_ratios_and_verdicts() -> None:
    # each job against the mean of the online runs on either side; median over jobs
    assert batch.neighbour_ratio([80, 40, 90], [100, 100, 100, 100]) == pytest.approx(0.8)
    assert batch.paired_ratio([12, 30, 10], [10, 10, 10]) == pytest.approx(1.2)
    with pytest.raises(ValueError):
        batch.neighbour_ratio([1.0], [1.0])
    with pytest.raises(ValueError):
        batch.paired_ratio([], [])
    verdicts = batch.evaluate(throughput=0.8, p99=1.21, failed_lines=0, errors=0)
    assert [v["ok"] for v in verdicts] == [True, False, True, True]
    text = batch.target_table(verdicts, markdown=True)
    assert "| 0.800x | >= 0.8x | PASS |" in text and "| 1.210x | <= 1.2x | FAIL |" in text


def test_the_chat_job_asks_for_a_fixed_number_of_tokens() -> None:
    lines = [json.loads(line) for line in batch.chat_file(3).splitlines()]
    assert [line["custom_id"] for line in lines] == ["c0", "c1", "c2"]
    assert {line["url"] for line in lines} == {"/v1/chat/completions"}
    body = lines[1]["body"]
    assert body["model"] == batch.LLM and body["ignore_eos"] is True
    assert body["max_tokens"] == batch.CHAT_TOKENS and "stream" not in body
    assert batch.parse_args(["--llm", "--quick"]).chat_lines == 100
