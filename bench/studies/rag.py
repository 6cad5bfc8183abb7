"""RAG (issue 22): retrieval quality on a held-out question set, embeddings throughput through
servery against the same model in-process, and vector-search latency of the embedded store.

    python -m bench.studies.rag [--seconds 20] [--repeats 2] [--sizes 10000,100000] [--quick]
                                [--parts recall,embeddings,search,ttft,ingest]
                                [--ingest-docs 1000]

* **recall@k** (k = 4): the docs/ and README chunked as the RAG service chunks them
  (services/rag/chunking.py, the service's default size/overlap), embedded with all-MiniLM-L6-v2
  in this process, searched in qdrant-client's embedded store. Questions in
  bench/data/rag_eval.yaml carry a split: ``tune`` questions are the only ones any setting was
  chosen on; the reported recall is on ``test``. Target: >= 0.9.
* **embeddings throughput**, c=16 clients x 32 strings per request: servery (router -> RAG
  service, ``POST /v1/embeddings``) against ``SentenceTransformer.encode`` of 32 strings back to
  back in this process (the same model bare, one process), in alternating repeats. Also the
  in-process rate of one 512-string batch (what merging 16 requests can reach). Target: servery
  >= 0.9x in-process.
* **search latency** at each ``--sizes`` chunk count: random unit vectors in the embedded store
  (in memory: the same search as with a folder, without the slow SQLite writes),
  p50/p99 of the search alone and of query embedding + search (what a retrieval costs). Target:
  retrieval <= 30 ms p50 at 10 k chunks.
* **TTFT overhead** of a RAG app over the bare LLM (the tiny LLM on vLLM CPU), on the same
  server as the embeddings part: bench/studies/rag_ttft.py.
* **ingest throughput** of ``servery rag ingest`` (``--ingest-docs`` synthetic Markdown files)
  into that server's embedded store, and the cost of re-running it unchanged (nothing embedded):
  bench/studies/rag_ingest.py.

Writes bench/out/rag.json and the "rag" section of bench/RESULTS.md (bench/studies/rag_report.py).
A run of some parts keeps the other parts' latest results (from bench/out/rag.json), each with
its own run line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.harness.results import OUT_DIR, RESULTS_MD, write_section
from bench.studies import rag_ingest, rag_ttft
from bench.studies.rag_report import OUT_JSON, PARTS, markdown, merged

ROOT = Path(__file__).resolve().parents[2]
EVAL = ROOT / "bench" / "data" / "rag_eval.yaml"
EMBED = "all-minilm-l6-v2"
K = 4


def corpus() -> list[tuple[str, str]]:
    files = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
    return [(f.relative_to(ROOT).as_posix(), f.read_text()) for f in files]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def recall(embedder: Any, tmp: Path) -> dict[str, Any]:
    from services.rag.chunking import chunk
    from services.rag.settings import RagSettings
    from services.rag.store import VectorStore

    settings = RagSettings()
    chunks = [
        c for s, t in corpus() for c in chunk(s, t, settings.chunk_chars, settings.chunk_overlap)
    ]
    store = VectorStore(embedder.dimensions, path=tmp / "recall")
    store.ensure("docs")
    store.upsert("docs", chunks, embedder.encode([c.text for c in chunks]))
    items = yaml.safe_load(EVAL.read_text())["items"]
    out: dict[str, Any] = {"chunks": len(chunks), "k": K}
    for split in ("tune", "test"):
        mine = [i for i in items if i["split"] == split]
        vectors = embedder.encode([i["question"] for i in mine])
        missed = []
        for item, vector in zip(mine, vectors, strict=True):
            top = store.search("docs", vector, K, text=item["question"])
            if not any(m["source"] == item["source"] and item["phrase"] in m["text"] for m in top):
                missed.append(item["question"])
        out[split] = {
            "questions": len(mine),
            "recall": 1 - len(missed) / len(mine),
            "missed": missed,
        }
    store.close()
    return out


def texts(n: int, seed: int) -> list[str]:
    words = "model serve batch token vector query stream router latency cache".split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(8, 24)))) for _ in range(n)]


def in_process(embedder: Any, seconds: float) -> dict[str, float]:
    batch = texts(32, 1)
    embedder.encode(batch)  # warm
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        embedder.encode(batch)
        done += 32
    seq = done / (time.perf_counter() - start)
    big = texts(512, 2)
    start = time.perf_counter()
    embedder.encode(big)
    return {"sequential_32": seq, "one_batch_512": 512 / (time.perf_counter() - start)}


async def through_servery(url: str, seconds: float, concurrency: int = 16) -> dict[str, float]:
    import aiohttp

    bodies = [json.dumps({"model": EMBED, "input": texts(32, 10 + i)}).encode() for i in range(64)]
    done = errors = 0
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(i: int, session: Any) -> None:
        nonlocal done, errors
        n = i
        while time.perf_counter() < stop:
            t = time.perf_counter()
            async with session.post(
                f"{url}/v1/embeddings",
                data=bodies[n % 64],
                headers={"content-type": "application/json"},
            ) as resp:
                await resp.read()
                if resp.status == 200:
                    done += 32
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
            n += concurrency

    async with aiohttp.ClientSession() as session:
        for b in bodies[:2]:  # warm
            async with session.post(f"{url}/v1/embeddings", data=b) as resp:
                await resp.read()
        start = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
        took = time.perf_counter() - start
    return {
        "strings_per_s": done / took,
        "errors": errors,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
    }


def search_latency(embedder: Any, sizes: list[int], tmp: Path, queries: int) -> dict[str, Any]:
    from services.rag.chunking import Chunk
    from services.rag.store import VectorStore

    rng = np.random.default_rng(0)
    out = {}
    questions = texts(queries, 3)
    for size in sizes:
        # in memory: local mode with a path writes each point to SQLite (100 k took over 20
        # minutes here); its search is the same brute force over the same arrays
        store = VectorStore(embedder.dimensions)
        store.ensure("c")
        vectors = rng.standard_normal((size, embedder.dimensions)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        words = texts(size, 4)
        chunks = [Chunk(f"doc{i // 10}.md", i % 10, words[i], "h") for i in range(size)]
        for start in range(0, size, 5000):
            store.upsert("c", chunks[start : start + 5000], vectors[start : start + 5000])
        store.search("c", vectors[0], K, text=questions[0])  # fills the in-process index
        search, total, qdrant = [], [], []
        for i, q in enumerate(questions):
            t0 = time.perf_counter()
            v = embedder.encode([q])[0]
            t1 = time.perf_counter()
            store.search("c", v, K, text=q)
            t2 = time.perf_counter()
            search.append((t2 - t1) * 1000)
            total.append((t2 - t0) * 1000)
            if i < 20:  # the baseline: qdrant-client local mode's own (Python) hybrid search
                t3 = time.perf_counter()
                store.qdrant_search("c", v, K, text=q)
                qdrant.append((time.perf_counter() - t3) * 1000)
        out[str(size)] = {
            "search_p50_ms": pct(search, 50),
            "search_p99_ms": pct(search, 99),
            "retrieval_p50_ms": pct(total, 50),
            "retrieval_p99_ms": pct(total, 99),
            "qdrant_local_p50_ms": pct(qdrant, 50),
        }
        store.close()
    return out


def start_servery(tmp: Path) -> Any:
    """One server: the tiny LLM, the embedding model and one RAG app (rag_ttft.py)."""
    from bench.harness.server import cpu_llm_env, start_server
    from bench.harness.store import bentoml_store
    from training.minilm import save
    from training.tiny_llm import save as save_tiny

    home = tmp / "store" / "bentoml"
    with bentoml_store(home):
        save_tiny("tiny-llm")
        save(tmp / "st", EMBED)
    (tmp / "rag.yaml").write_text(rag_ttft.app_yaml(EMBED))
    env = {
        **cpu_llm_env("tiny=tiny-llm"),
        "SERVERY_RAG_FILE": str(tmp / "rag.yaml"),
    }
    srv = start_server(home, "models: []\n", tmp / "serve", env=env, ready_timeout=300)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if httpx.get(f"{srv.url}/v1/rag/collections", timeout=5).status_code == 200:
            return srv
        time.sleep(0.5)
    srv.stop()
    raise RuntimeError("the RAG service did not start")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.studies.rag", description=__doc__)
    p.add_argument("--seconds", type=float, default=20.0, help="per throughput run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--rounds", type=int, default=3, help="ttft: rounds over the questions")
    p.add_argument("--ingest-docs", type=int, default=1000, help="ingest: files in the corpus")
    p.add_argument(
        "--quick", action="store_true", help="5 s runs, 1 repeat, 10 k only, 200 files to ingest"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats, args.sizes, args.queries = 5.0, 1, "10000", 50
        args.rounds, args.ingest_docs = 1, 200
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}: choose from {','.join(PARTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import os
    import shlex
    import sys

    from bench.harness.store import bentoml_store
    from bench.report import machine

    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    parts = set(args.parts.split(","))
    meta = machine(" ".join(["python -m bench.studies.rag", *map(shlex.quote, raw)]), "aiohttp")
    result: dict[str, Any] = {"meta": meta}
    with tempfile.TemporaryDirectory(prefix="bench-rag-") as tmp_name:
        tmp = Path(tmp_name)
        from services.rag.embedder import Embedder
        from training.minilm import save

        with bentoml_store(tmp / "local"):
            stored = save(tmp / "st-local", EMBED)
            from models.embeddings import st_dir

            embedder = Embedder(EMBED, st_dir(str(stored.tag))[0])
        if "recall" in parts:
            result["recall"] = recall(embedder, tmp)
            print(
                "recall:", json.dumps({s: result["recall"][s]["recall"] for s in ("tune", "test")})
            )
        if "search" in parts:
            sizes = [int(s) for s in args.sizes.split(",")]
            result["search"] = search_latency(embedder, sizes, tmp, args.queries)
            print("search:", json.dumps(result["search"]))
        if parts & {"embeddings", "ttft", "ingest"}:
            srv = start_servery(tmp)
            runs = []
            try:
                if "ingest" in parts:  # first: into a fresh server's store
                    result["ingest"] = rag_ingest.measure(srv.url, tmp, args.ingest_docs)
                    print("ingest:", json.dumps(result["ingest"]))
                if "ttft" in parts:
                    result["ttft"] = rag_ttft.measure(
                        srv.url, corpus(), rag_ttft.questions_of(EVAL), args.rounds
                    )
                    print("ttft:", json.dumps(result["ttft"]))
                for r in range(args.repeats if "embeddings" in parts else 0):
                    order = ("servery", "in_process") if r % 2 == 0 else ("in_process", "servery")
                    run = {}
                    for who in order:
                        if who == "servery":
                            run[who] = asyncio.run(through_servery(srv.url, args.seconds))
                        else:
                            run[who] = in_process(embedder, args.seconds)
                    run["ratio"] = (
                        run["servery"]["strings_per_s"] / run["in_process"]["sequential_32"]
                    )
                    print(f"embeddings repeat {r}:", json.dumps(run))
                    runs.append(run)
            finally:
                srv.stop()
            if runs:
                result["embeddings"] = {
                    "runs": runs,
                    "ratio": statistics.median(r["ratio"] for r in runs),
                }
    load = os.getloadavg()[0]  # latency here means little on a busy machine
    for part in PARTS:
        if part in result:
            result[part] |= {"meta": meta, "load_average_1m": load}
    result = merged(result)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(result, indent=2))
    write_section(RESULTS_MD, "rag", markdown(result))
    print(f"wrote {OUT_JSON} and the rag section of {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
