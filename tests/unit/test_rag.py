"""RAG pieces without a server: chunking, the answer's sources, the router's /v1 split, the
store's filters and its 503 when a Qdrant server is down, the /v1 allow-list, settings, and
all-MiniLM-L6-v2 imported from its package into a store."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.harness.store import bentoml_store
from services.llm.openai_api import route_of
from services.rag import chat
from services.rag.chunking import chunk, content_hash
from services.rag.routing import V1Split
from services.rag.settings import RagApp, RagSettings
from services.rag.store import StoreDown, VectorStore, check_filter
from services.runtime.errors import BadRequest
from tests.conftest import Sent


def test_chunks_stay_within_size_overlap_and_carry_their_heading() -> None:
    text = "# Guide\n\n## Install\n\n" + "\n\n".join(
        f"Paragraph {i} " + "x" * 150 for i in range(12)
    )
    chunks = chunk("guide.md", text, size=500, overlap=200)
    assert len(chunks) > 3 and all(len(c.text) <= 500 for c in chunks)
    assert all(c.text.startswith("Guide > Install\n\n") for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert {c.doc_hash for c in chunks} == {content_hash(text)}
    # each chunk after the first starts with the last paragraph of the one before
    assert chunks[1].text.split("\n\n")[1] == chunks[0].text.split("\n\n")[-1]


def test_a_fenced_hash_is_not_a_heading_and_long_lines_are_cut() -> None:
    text = "# T\n\n```\n# not a heading\n```\n\n" + "word " * 400
    chunks = chunk("a.md", text, size=300, overlap=0)
    assert all(c.text.startswith("T\n\n") for c in chunks) and "# not a heading" in chunks[0].text
    assert all(len(c.text) <= 300 for c in chunks)
    with pytest.raises(ValueError, match="overlap"):
        chunk("a.md", text, size=300, overlap=300)


def test_question_context_and_rewrite() -> None:
    doc = {
        "model": "app",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "why?"}]}],
    }
    assert chat.question_of(doc) == "why?"
    with pytest.raises(BadRequest):
        chat.question_of({"messages": [{"role": "user", "content": "  "}]})
    matches = [
        {"text": "t" * 400, "source": f"s{i}", "chunk": i, "score": 1.0 - i / 10} for i in range(4)
    ]
    context, sources = chat.context_of(matches, max_tokens=250)  # ~1000 characters: two fit
    assert [s["source"] for s in sources] == ["s0", "s1"] and context.startswith("[1] s0\n")
    app = RagApp(name="app", collection="c", llm="tiny")
    out = json.loads(chat.rewrite(doc, app, context))
    assert out["model"] == "tiny" and out["messages"][0]["role"] == "system"
    assert context in out["messages"][0]["content"] and out["messages"][1:] == doc["messages"]


def test_sources_join_a_stream_before_done_and_a_whole_answer() -> None:
    sources = [{"n": 1, "source": "a.md", "chunk": 0, "score": 0.9}]

    async def run(ctype: bytes, parts: list[bytes]) -> Sent:
        sent = Sent()
        send = chat.with_sources(sent, sources)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]}
        )
        for i, part in enumerate(parts):
            await send(
                {"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1}
            )
        return sent

    stream = asyncio.run(
        run(b"text/event-stream", [b'data: {"choices": [1]}\n\n', b"data: [DONE]\n\n"])
    )
    assert json.loads(stream.headers["x-servery-sources"]) == sources
    body = b"".join(m.get("body", b"") for m in stream.messages[1:]).decode()
    events = [e[6:] for e in body.split("\n\n") if e]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["sources"] == sources
    whole = asyncio.run(run(b"application/json", [b'{"choices": [', b"]}"]))
    assert whole.body == {"choices": [], "sources": sources}
    assert whole.headers["content-length"] == str(len(json.dumps(whole.body)))


def _app(name: str, seen: list[tuple[str, bytes]]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        seen.append((name, message.get("body", b"")))

    return app


@pytest.mark.parametrize(
    ("method", "path", "body", "to"),
    [
        ("POST", "/v1/chat/completions", b'{"model": "docs"}', "rag"),
        ("POST", "/v1/chat/completions", b'{"model": "tiny"}', "llm"),
        ("POST", "/v1/completions", b'{"model": "docs"}', "llm"),
        ("GET", "/v1/models", b"", "rag"),
        ("POST", "/v1/embeddings", b"{}", "rag"),
        ("DELETE", "/v1/rag/collections/x", b"", "rag"),
    ],
)
def test_the_router_splits_v1(method: str, path: str, body: bytes, to: str) -> None:
    seen: list[tuple[str, bytes]] = []
    split = V1Split(_app("llm", seen), _app("rag", seen), frozenset({"docs"}), 1 << 20)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode()}
    asyncio.run(split(scope, receive, Sent()))
    assert seen == [(to, body)]  # the body read to decide is replayed whole


def test_rag_routes_are_allow_listed_by_raw_path() -> None:
    def route(path: str) -> Any:
        return route_of({"path": path, "raw_path": path.encode()})

    assert route("/v1/embeddings").methods == {"POST"}
    assert route("/v1/rag/collections/docs/query").path == "/v1/rag/collections/docs/query"
    assert route("/v1/rag/collections/docs/documents").methods == {"GET", "POST", "DELETE"}
    for bad in ("/v1/rag/collections/../query", "/v1/rag/collections/a%2Fb/query", "/v1/rag/x"):
        assert route(bad) is None, bad


def test_filters() -> None:
    assert check_filter({"source": ["a.md", "b.md"], "chunk": 0}) == {
        "source": ["a.md", "b.md"],
        "chunk": 0,
    }
    for bad in ({"author": "me"}, {"source": 3}, {"chunk": "x"}, ["source"], {"source": []}):
        with pytest.raises(BadRequest):
            check_filter(bad)


def test_the_embedded_store_filters_and_lists(tmp_path: Path) -> None:
    store = VectorStore(3, path=tmp_path / "q")
    store.ensure("c")
    chunks = chunk("a.md", "alpha", 100, 0) + chunk("b.md", "beta", 100, 0)
    store.upsert("c", chunks, np.eye(3, dtype=np.float32)[:2])
    found = store.search("c", np.array([1, 0, 0], np.float32), 2, {"source": "b.md"})
    assert [m["source"] for m in found] == ["b.md"]
    assert store.documents("c")["a.md"]["hash"] == content_hash("alpha")
    store.delete_sources("c", ["a.md"])
    assert store.collections() == [{"name": "c", "chunks": 1}]
    store.close()


def test_a_qdrant_server_down_is_503_naming_it() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    store = VectorStore(3, url=f"http://127.0.0.1:{port}", timeout_s=1)
    with pytest.raises(StoreDown, match=f"Qdrant server at http://127.0.0.1:{port}") as err:
        store.search("c", np.zeros(3, np.float32), 1)
    assert err.value.status_code == 503


def test_settings_auto_follow_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.minilm import save

    rag_file = tmp_path / "rag.yaml"
    rag_file.write_text("embeddings: all-minilm-l6-v2\napps: []\n")
    settings = RagSettings(file=rag_file)
    monkeypatch.setenv("SERVERY_QDRANT_URL", "http://q:6333")
    assert RagSettings().qdrant_url == "http://q:6333"
    with bentoml_store(tmp_path / "home"):
        assert not settings.active(llm_enabled=True)
        stored = save(tmp_path / "st")
        assert stored.info.metadata["dimensions"] == 384
        assert stored.info.labels["task"] == "feature-extraction"
        assert settings.active(llm_enabled=True) and not settings.active(llm_enabled=False)
    assert not RagSettings(enabled=False, file=rag_file).active(llm_enabled=True)


def test_the_shipped_rag_file() -> None:
    rag = RagSettings().rag_file()
    assert rag.embeddings == "all-minilm-l6-v2"
    (app,) = rag.apps
    assert (app.name, app.collection, app.llm) == ("servery-docs", "servery-docs", "smollm2")


def test_the_eval_set_points_at_passages_that_exist() -> None:
    """bench/data/rag_eval.yaml: 30+ questions, both splits, each phrase in its document (a docs
    edit that removes one fails here, not silently in the recall)."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    items = yaml.safe_load((root / "bench/data/rag_eval.yaml").read_text())["items"]
    assert len(items) >= 30 and {i["split"] for i in items} == {"tune", "test"}
    missing = [i for i in items if i["phrase"] not in (root / i["source"]).read_text()]
    assert not missing, missing
