"""``servery rag ingest`` throughput against a running servery (bench/studies/rag.py,
``--parts ingest``).

A synthetic corpus of ``--ingest-docs`` Markdown files (a title, sections of headings, paragraphs
and now and then a code block; sizes drawn log-normally around 4 KB, 300 B to 60 KB, as project
docs are) is written under a temporary folder and ingested by the CLI as a user runs it
(``python -m models.cli rag ingest DIR --collection ...``, a process of its own, so its start-up
counts) into the server's embedded store. Reported: the wall time, documents/s, chunks/s and
MB/s. Then the same command again, with nothing changed: it must embed nothing (the CLI's
``0 added`` and the server's ``servery_embeddings_inputs_total{use="ingest"}`` unchanged, both
checked); its time is what an idempotent re-run costs (listing the collection's documents and
hashing the files). The collection is dropped at the end.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

COLLECTION = "bench-ingest"
_LINE = re.compile(r": (\d+) added \((\d+) chunks\), (\d+) unchanged, (\d+) removed, (\d+) failed")


def write_corpus(root: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """``n`` Markdown files under ``root`` (ten to a folder); their count and sizes."""
    rng = np.random.default_rng(seed)
    # a vocabulary of made-up words with a Zipf-like use: BM25 sees common and rare terms
    letters = np.array(list("abcdefghiklmnoprstuvwy"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(3000)]
    weights = 1 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()

    stream = rng.choice(len(vocab), size=400_000, p=weights)  # drawn once: choice is slow
    at = [0]

    def sentence() -> str:
        n = int(rng.integers(6, 22))
        start = at[0] % (len(stream) - n)
        at[0] = start + n
        return " ".join(vocab[w] for w in stream[start : start + n]).capitalize() + "."

    sizes = []
    for i in range(n):
        target = int(np.clip(rng.lognormal(np.log(4000), 0.9), 300, 60_000))
        parts = [f"# Document {i}: {sentence()[:-1]}\n"]
        size = len(parts[0])
        while size < target:
            if rng.random() < 0.25:
                block = f"## {sentence()[:-1]}\n"
            elif rng.random() < 0.08:
                block = (
                    "```python\n"
                    + "\n".join(
                        f"{rng.choice(vocab)} = {rng.choice(vocab)}({int(rng.integers(100))})"
                        for _ in range(int(rng.integers(2, 8)))
                    )
                    + "\n```\n"
                )
            else:
                block = " ".join(sentence() for _ in range(int(rng.integers(2, 7)))) + "\n"
            parts.append(block)
            size += len(block) + 1
        text = "\n".join(parts)
        path = root / f"d{i // 10:04d}" / f"doc{i:05d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        sizes.append(len(text.encode()))
    return {
        "docs": n,
        "bytes": int(sum(sizes)),
        "median_bytes": float(np.median(sizes)),
        "max_bytes": int(max(sizes)),
    }


def _ingested_strings(url: str) -> float:
    """``servery_embeddings_inputs_total{use="ingest"}``, summed over models."""
    from bench.harness.server import metric_samples

    return sum(
        v
        for name, labels, v in metric_samples(f"{url}/metrics")
        if name == "servery_embeddings_inputs_total" and labels.get("use") == "ingest"
    )


def _cli(url: str, cwd: Path, *args: str) -> tuple[float, str]:
    """Run ``servery rag ...`` as a user does; its wall time and output."""
    cmd = [sys.executable, "-m", "models.cli", "rag", *args, "--url", url]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=3600)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return took, done.stdout


def _ingest(url: str, cwd: Path) -> dict[str, Any]:
    args = ("ingest", "corpus", "--collection", COLLECTION, "--no-progress")
    before = _ingested_strings(url)
    took, out = _cli(url, cwd, *args)
    found = _LINE.search(out)
    if found is None:
        raise RuntimeError(f"servery rag ingest printed no summary: {out!r}")
    added, chunks, unchanged, removed, failed = map(int, found.groups())
    return {
        "wall_s": took,
        "added": added,
        "chunks": chunks,
        "unchanged": unchanged,
        "removed": removed,
        "failed": failed,
        "embedded": _ingested_strings(url) - before,
    }


def measure(url: str, tmp: Path, docs: int) -> dict[str, Any]:
    import httpx

    work = tmp / "ingest"
    corpus = write_corpus(work / "corpus", docs)
    cli_start_s, _ = _cli(url, work, "list")  # the CLI's own start-up and one call
    first = _ingest(url, work)
    if first["added"] != docs or first["failed"]:
        raise RuntimeError(f"the first ingest did not add every document: {first}")
    again = _ingest(url, work)
    print(f"ingest re-run: {again['added']} added, {again['embedded']:.0f} embedded")
    if again["added"] or again["chunks"] or again["embedded"] or again["unchanged"] != docs:
        raise RuntimeError(f"the re-run of an unchanged corpus embedded something: {again}")
    httpx.delete(f"{url}/v1/rag/collections/{COLLECTION}", timeout=120).raise_for_status()
    return {
        "corpus": corpus,
        "cli_start_s": cli_start_s,
        "first": first,
        "rerun": again,
        "docs_per_s": docs / first["wall_s"],
        "chunks_per_s": first["chunks"] / first["wall_s"],
        "mb_per_s": corpus["bytes"] / 1e6 / first["wall_s"],
    }


def markdown(r: dict[str, Any]) -> list[str]:
    c, first, again = r["corpus"], r["first"], r["rerun"]
    return [
        f"Ingest (`servery rag ingest`, a process of its own, into the embedded store): "
        f"{c['docs']:,} synthetic Markdown files ({c['bytes'] / 1e6:.1f} MB, median "
        f"{c['median_bytes'] / 1e3:.1f} KB, largest {c['max_bytes'] / 1e3:.0f} KB), "
        f"{first['chunks']:,} chunks: **{first['wall_s']:.1f} s, {r['docs_per_s']:.1f} docs/s, "
        f"{r['chunks_per_s']:.0f} chunks/s** ({r['mb_per_s'] * 1e3:.0f} KB/s). Re-run with nothing "
        f"changed: **{again['wall_s']:.2f} s**, {again['embedded']:.0f} strings embedded "
        f"({again['unchanged']:,} unchanged; the CLI's start-up and one call: "
        f"{r['cli_start_s']:.2f} s).",
        "",
    ]
