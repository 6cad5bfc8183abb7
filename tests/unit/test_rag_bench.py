"""bench/studies/rag.py keeps the parts a run did not measure: a run of some parts merges into
the previous bench/out/rag.json, and the section shows each part under its own run's line."""

from __future__ import annotations

import json
from pathlib import Path

from bench.studies import rag

MACHINE = {"nproc": 2, "cpu": "x", "python": "3.11", "bentoml": "1.4", "client": "aiohttp"}
META_OLD = {"command": "rag --parts recall,search", "date": "2026-01-01", **MACHINE}
META_NEW = {"command": "rag --parts ttft", "date": "2026-02-01", **MACHINE}
RECALL = {"k": 4, "chunks": 10, "tune": {"recall": 0.5, "questions": 2}}
RECALL["test"] = {"recall": 1.0, "questions": 2}
SEARCH = {"10000": {k: 1.0 for k in ("search_p50_ms", "search_p99_ms", "retrieval_p50_ms")}}
SEARCH["10000"] |= {"retrieval_p99_ms": 2.0, "qdrant_local_p50_ms": 9.0}
TTFT_ = {"chunks": 5, "questions": 3, "rounds": 1, "prompt_chars_mean": 100.0, "failures": {}}
TTFT_ |= {"ttft_ms": {k: {"p50": 1.0, "p99": 2.0} for k in ("bare", "bare_prompt", "app")}}
TTFT_ |= {
    "overhead_ms": {
        k: {"p50": 1.0, "p99": 2.0} for k in ("app_minus_bare", "app_minus_bare_prompt")
    }
}
TTFT_ |= {"query_endpoint_ms": {"p50": 1.0, "p99": 2.0}}


def test_a_partial_run_keeps_the_other_parts(tmp_path: Path) -> None:
    previous = tmp_path / "rag.json"
    # written before parts carried their own run line: the file's meta is theirs
    old = {"meta": META_OLD, "recall": RECALL, "search": SEARCH, "load_average_1m": 1.5}
    previous.write_text(json.dumps(old))
    now = {"meta": META_NEW, "ttft": {**TTFT_, "meta": META_NEW}}
    result = rag.merged(now, previous)
    assert set(result) == {"meta", "recall", "search", "ttft"}
    assert result["recall"]["meta"] == META_OLD and result["recall"]["load_average_1m"] == 1.5
    assert result["ttft"]["meta"] == META_NEW
    text = rag.markdown(result)
    assert text.count("--parts recall,search") == 1 and text.count("--parts ttft") == 1
    assert text.index("Recall@4") < text.index("| 10,000 |") < text.index("TTFT, RAG app")
    again = rag.merged({"meta": META_NEW, "recall": {**RECALL, "meta": META_NEW}}, previous)
    assert again["recall"]["meta"] == META_NEW and again["search"]["meta"] == META_OLD
    assert rag.merged(now, tmp_path / "absent.json") == now


def test_the_ingest_part_writes_a_corpus_and_its_line(tmp_path: Path) -> None:
    from bench.studies import rag_ingest

    corpus = rag_ingest.write_corpus(tmp_path, 12, seed=1)
    files = sorted(tmp_path.rglob("*.md"))
    assert len(files) == corpus["docs"] == 12
    assert corpus["bytes"] == sum(f.stat().st_size for f in files)
    assert all(300 <= f.stat().st_size <= 61_000 for f in files)
    assert files[0].read_text().startswith("# Document 0: ")
    runs = {"wall_s": 2.0, "chunks": 40, "unchanged": 0, "embedded": 40.0}
    again = {"wall_s": 0.3, "chunks": 0, "unchanged": 12, "embedded": 0.0}
    part = {"corpus": corpus, "cli_start_s": 0.2, "first": runs, "rerun": again, "meta": META_NEW}
    part |= {"docs_per_s": 6.0, "chunks_per_s": 20.0, "mb_per_s": 0.05}
    text = rag.markdown(rag.merged({"meta": META_NEW, "ingest": part}, tmp_path / "absent"))
    assert "**2.0 s, 6.0 docs/s, 20 chunks/s** (50 KB/s)" in text
    assert "Re-run with nothing changed: **0.30 s**, 0 strings embedded" in text
