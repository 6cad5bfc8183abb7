"""The RAG app's time to first token against the bare LLM's, on one server (bench/studies/rag.py,
``--parts ttft``).

Three streams per question of bench/data/rag_eval.yaml, in rotating order, one at a time:

* ``bare``: the LLM with the user's question only;
* ``bare_prompt``: the LLM with the prompt the app builds (its system message with the
  retrieved passages, built here from the query endpoint's matches by services/rag/chat.py);
* ``app``: the RAG app (router -> RAG service: embed the question, search, build the prompt,
  then the LLM through the RAG service's proxy).

``app - bare_prompt`` is what retrieval, prompt building and the extra hop cost; ``app - bare``
adds the longer prompt's prefill. Differences are taken per question (paired), then the median.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import yaml

from bench.llm_stream import SSEParser, StreamStats

APP = "bench-app"
COLLECTION = "docs"
LLM = "tiny"
MAX_CONTEXT_TOKENS = 300
"""The tiny LLM has 1,024 positions and its tokenizer (trained on scikit-learn's dataset
descriptions) reads these docs at about 2 characters a token: passages cut to 1,200 characters
fit, 2,000 did not for a quarter of the questions."""


def app_yaml(embed: str) -> str:
    return (
        f"embeddings: {embed}\napps:\n  - name: {APP}\n    collection: {COLLECTION}\n"
        f"    llm: {LLM}\n    k: 4\n    max_context_tokens: {MAX_CONTEXT_TOKENS}\n"
    )


def stream(http: Any, url: str, body: dict[str, Any]) -> StreamStats:
    """One streamed chat; its TTFT is the first content chunk's arrival."""
    stats = StreamStats(time.perf_counter())
    parser = SSEParser()
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            stats.error = f"http-{resp.status_code}: {resp.read()[:200].decode(errors='replace')}"
            return stats
        for raw in resp.iter_raw():
            now = time.perf_counter()
            for data in parser.feed(raw):
                stats.on_data(data, now)
    for data in parser.finish():
        stats.on_data(data, time.perf_counter())
    return stats


def ingest(http: Any, url: str, docs: list[tuple[str, str]]) -> int:
    chunks = 0
    for start in range(0, len(docs), 8):
        batch = [{"source": s, "text": t} for s, t in docs[start : start + 8]]
        resp = http.post(
            f"{url}/v1/rag/collections/{COLLECTION}/documents", json={"documents": batch}
        )
        resp.raise_for_status()
        chunks += resp.json()["chunks"]
    return chunks


def measure(url: str, docs: list[tuple[str, str]], questions: list[str], rounds: int) -> dict:
    import httpx

    from services.rag.chat import context_of
    from services.rag.settings import DEFAULT_PROMPT

    http = httpx.Client(timeout=120)
    chunks = ingest(http, url, docs)
    prompts, query_ms = [], []

    def query(q: str) -> Any:
        resp = http.post(f"{url}/v1/rag/collections/{COLLECTION}/query", json={"query": q, "k": 4})
        resp.raise_for_status()
        return resp

    for q in questions:  # the app's own prompt for each question, from the query endpoint
        resp = query(q)
        context, _ = context_of(resp.json()["matches"], MAX_CONTEXT_TOKENS)
        prompts.append(DEFAULT_PROMPT.replace("{context}", context))
    common = {"stream": True, "max_tokens": 4, "temperature": 0}

    def body(kind: str, i: int) -> dict[str, Any]:
        user = {"role": "user", "content": questions[i]}
        if kind == "app":
            return {**common, "model": APP, "messages": [user]}
        if kind == "bare":
            return {**common, "model": LLM, "messages": [user]}
        return {
            **common,
            "model": LLM,
            "messages": [{"role": "system", "content": prompts[i]}, user],
        }

    kinds = ("bare", "bare_prompt", "app")
    for i in range(3):  # warm every path
        for kind in kinds:
            stream(http, url, body(kind, i))
    ttft: dict[str, list[float]] = {k: [] for k in kinds}
    paired: dict[str, list[float]] = {"app_minus_bare": [], "app_minus_bare_prompt": []}
    failures: dict[str, int] = {k: 0 for k in kinds}
    reasons: dict[str, str] = {}
    n = 0
    for _ in range(rounds):
        for i in range(len(questions)):
            order = kinds[n % 3 :] + kinds[: n % 3]
            n += 1
            got = {}
            for kind in order:
                stats = stream(http, url, body(kind, i))
                if stats.failure() or stats.ttft_s is None:
                    failures[kind] += 1
                    reasons.setdefault(kind, stats.error or str(stats.failure()))
                    continue
                got[kind] = stats.ttft_s * 1000
                ttft[kind].append(got[kind])
            t = time.perf_counter()  # retrieval alone, through the router
            query(questions[i])
            query_ms.append((time.perf_counter() - t) * 1000)
            if "app" in got and "bare" in got:
                paired["app_minus_bare"].append(got["app"] - got["bare"])
            if "app" in got and "bare_prompt" in got:
                paired["app_minus_bare_prompt"].append(got["app"] - got["bare_prompt"])
    http.close()

    def dist(values: list[float]) -> dict[str, float]:
        if not values:
            return {"p50": float("nan"), "p99": float("nan"), "n": 0}
        p50, p99 = np.percentile(values, [50, 99])
        return {"p50": float(p50), "p99": float(p99), "n": len(values)}

    return {
        "chunks": chunks,
        "questions": len(questions),
        "rounds": rounds,
        "ttft_ms": {k: dist(v) for k, v in ttft.items()},
        "overhead_ms": {k: dist(v) for k, v in paired.items()},
        "query_endpoint_ms": dist(query_ms),
        "failures": failures,
        "failure_reasons": reasons,
        "prompt_chars_mean": float(np.mean([len(p) for p in prompts])),
    }


def questions_of(path: Any) -> list[str]:
    return [i["question"] for i in yaml.safe_load(path.read_text())["items"]]


def markdown(t: dict[str, Any]) -> list[str]:
    d, o = t["ttft_ms"], t["overhead_ms"]
    hop, total = o["app_minus_bare_prompt"], o["app_minus_bare"]
    q = t["query_endpoint_ms"]
    lines = [
        f"TTFT, RAG app vs the bare LLM (tiny LLM, vLLM on CPU; {t['questions']} questions x "
        f"{t['rounds']} rounds, one stream at a time, max_tokens 4; collection of "
        f"{t['chunks']} chunks; the app's prompt is {t['prompt_chars_mean']:.0f} characters on "
        "average):",
        "",
        "| stream | TTFT p50 / p99 ms |",
        "|---|---|",
        f"| bare LLM, question only | {d['bare']['p50']:.1f} / {d['bare']['p99']:.1f} |",
        f"| bare LLM, the app's prompt | {d['bare_prompt']['p50']:.1f} / "
        f"{d['bare_prompt']['p99']:.1f} |",
        f"| RAG app | {d['app']['p50']:.1f} / {d['app']['p99']:.1f} |",
        "",
        "RAG app overhead (paired per question, p50 / p99): "
        f"**{hop['p50']:.1f} / {hop['p99']:.1f} ms** for retrieval, prompt building and the "
        f"hop through the RAG service; {total['p50']:.1f} / {total['p99']:.1f} ms over the "
        "question alone (adds the passages' prefill). The query endpoint alone (embedding, "
        f"search and the router), p50 / p99: {q['p50']:.1f} / {q['p99']:.1f} ms. "
        f"Failed streams: {json.dumps(t['failures'])}.",
        "",
    ]
    return lines
