"""The "rag" section of bench/RESULTS.md and the merge of a run's parts into bench/out/rag.json
(bench/studies/rag.py): each part under its own run's line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.harness.results import OUT_DIR, run_line
from bench.studies import rag_ingest, rag_ttft

OUT_JSON = OUT_DIR / "rag.json"
PARTS = ("recall", "embeddings", "search", "ttft", "ingest")


def merged(result: dict[str, Any], previous_json: Path = OUT_JSON) -> dict[str, Any]:
    """This run's parts over the previous run's (bench/out/rag.json): parts not run keep their
    latest results. Results written before parts carried their own run line take the file's."""
    try:
        previous = json.loads(previous_json.read_text())
    except (OSError, ValueError):
        return result
    out = {"meta": result["meta"]}
    for part in PARTS:
        old = previous.get(part)
        if isinstance(old, dict) and "meta" not in old and "meta" in previous:
            old = {**old, "meta": previous["meta"]}
            if "load_average_1m" in previous:
                old["load_average_1m"] = previous["load_average_1m"]
        if part in result or old:
            out[part] = result.get(part) or old
    return out


def part_run(part: dict[str, Any], shown: list[Any]) -> list[str]:
    """A part's run line (command, date, load), unless the part before had the same run."""
    meta = part.get("meta")
    if meta is None or (shown and shown[-1] == meta):
        return []
    shown.append(meta)
    line = run_line(meta)
    if "load_average_1m" in part:
        line += f" Load average (1 min) at the end: {part['load_average_1m']:.1f}."
    return [line, ""]


def markdown(result: dict[str, Any]) -> str:
    """The section: each part under its run's line, parts of one run together (by date)."""
    lines = ["## RAG (issue 22)", ""]
    shown: list[Any] = []
    parts = sorted(
        (p for p in PARTS if p in result),
        key=lambda p: (result[p].get("meta", {}).get("date", ""), PARTS.index(p)),
    )
    for part in parts:
        lines += part_run(result[part], shown) + PART_MARKDOWN[part](result[part])
    return "\n".join(lines) + "\n"


def recall_markdown(r: dict[str, Any]) -> list[str]:
    return [
        f"Recall@{r['k']} over {r['chunks']} chunks of docs/ and README "
        f"(bench/data/rag_eval.yaml): **test {r['test']['recall']:.3f}** "
        f"({r['test']['questions']} held-out questions; target >= 0.9), "
        f"tune {r['tune']['recall']:.3f} ({r['tune']['questions']}).",
        "",
    ]


def embeddings_markdown(e: dict[str, Any]) -> list[str]:
    lines = [
        "| repeat | servery strings/s | p50 / p99 ms | in-process (32 at a time) "
        "| one 512 batch | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(e["runs"]):
        s, p = run["servery"], run["in_process"]
        lines.append(
            f"| {i} | {s['strings_per_s']:.0f} | {s['p50_ms']:.0f} / {s['p99_ms']:.0f} | "
            f"{p['sequential_32']:.0f} | {p['one_batch_512']:.0f} | {run['ratio']:.2f}x |"
        )
    return [
        *lines,
        "",
        f"Embeddings, c=16 x 32 strings: **{e['ratio']:.2f}x** in-process (median; target >= 0.9).",
        "",
    ]


def search_markdown(search: dict[str, Any]) -> list[str]:
    lines = [
        "Hybrid search (dense + BM25, rank fusion). Ours: the embedded store's in-process "
        "index; qdrant local: the same query by qdrant-client's local mode, in the same run.",
        "",
        "| chunks | search p50 / p99 ms | qdrant local p50 ms | retrieval (embed + search) "
        "p50 / p99 ms |",
        "|---|---|---|---|",
    ]
    for size, s in search.items():
        if size.isdigit():  # beside the sizes: the run's meta and load
            lines.append(
                f"| {int(size):,} | {s['search_p50_ms']:.1f} / {s['search_p99_ms']:.1f} | "
                f"{s.get('qdrant_local_p50_ms', float('nan')):.1f} | "
                f"{s['retrieval_p50_ms']:.1f} / {s['retrieval_p99_ms']:.1f} |"
            )
    return [*lines, ""]


PART_MARKDOWN = {
    "recall": recall_markdown,
    "embeddings": embeddings_markdown,
    "search": search_markdown,
    "ttft": rag_ttft.markdown,
    "ingest": rag_ingest.markdown,
}
