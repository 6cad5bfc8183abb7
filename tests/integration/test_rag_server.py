"""RAG end to end on a real Bento: the router, the tiny LLM (vLLM on CPU) and the RAG service
(all-MiniLM-L6-v2 from its package, qdrant-client's embedded store). One server for the module;
the brief's LangChain pipeline runs against it too."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.harness.server import Server, cpu_llm_env, start_server
from bench.harness.store import bentoml_store
from tests.conftest import eventually, settled
from tests.integration.conftest import LLM_NAME

EMBED = "all-minilm-l6-v2"
APP = "notes-app"

DOCS = {
    "alpha.md": "# Alpha\n\nThe alpha reactor is cooled by liquid sodium and runs at 550 degrees.",
    "beta.md": "# Beta\n\nBeta station grows tomatoes in hydroponic towers under red light.",
    "gamma.txt": "Gamma rays are stopped best by thick lead shielding and concrete walls.",
    "page.html": "<html><head><style>x{}</style></head><body><h1>Delta</h1>"
    "<p>The delta glider has a wingspan of nine metres.</p></body></html>",
}


@pytest.fixture(scope="module")
def rag_store(tiny_llm_store: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny LLM's store with all-MiniLM-L6-v2 added (training/minilm.py)."""
    from training.minilm import save

    home = tmp_path_factory.mktemp("rag-store") / "bentoml"
    shutil.copytree(tiny_llm_store[0] / "models", home / "models", symlinks=True)
    with bentoml_store(home):
        save(tmp_path_factory.mktemp("minilm"), EMBED)
    return home


@pytest.fixture(scope="module")
def rag_server(rag_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("rag-serve")
    rag_file = work / "rag.yaml"
    rag_file.write_text(
        f"embeddings: {EMBED}\napps:\n"
        f"  - name: {APP}\n    collection: notes\n    llm: {LLM_NAME}\n    k: 2\n"
        f"  - name: empty-app\n    collection: nothing-here\n    llm: {LLM_NAME}\n"
    )
    env = {
        **cpu_llm_env(f"{LLM_NAME}=tiny-llm"),
        "SERVERY_RAG_ENABLED": "auto",  # the embedding model is in the store: on
        "SERVERY_RAG_FILE": str(rag_file),
        "SERVERY_RAG_MAX_DOCUMENT_BYTES": "4096",
    }
    srv = start_server(rag_store, "models:\n  - name: iris\n", work, env=env, ready_timeout=300)
    try:
        eventually(
            lambda: httpx.get(f"{srv.url}/v1/rag/collections", timeout=5).status_code == 200,
            "the RAG service answers",
            timeout=120,
            every=0.5,
        )
        yield srv
    finally:
        srv.stop()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "models.cli", "rag", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def ingested(rag_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("notes")
    (folder / "notes").mkdir()
    for name, text in DOCS.items():
        (folder / "notes" / name).write_text(text)
    (folder / "notes" / "bad.md").write_bytes(b"\xff\xfe\x00garbage")
    (folder / "notes" / "huge.md").write_text("word " * 2000)  # over the 4 KiB document limit
    done = cli("ingest", "notes", "--collection", "notes", "--url", rag_server.url, cwd=folder)
    assert done.returncode == 1, done.stderr  # two files failed, the rest went in
    assert "4 added" in done.stdout and "2 failed" in done.stdout, done.stdout
    assert "notes/bad.md: not UTF-8" in done.stderr and "notes/huge.md: 413" in done.stderr
    assert "file/s" in done.stderr or "file]" in done.stderr  # tqdm's progress bar
    return folder


def test_embeddings_match_the_model_in_process(rag_server: Server, rag_store: Path) -> None:
    import openai
    from sentence_transformers import SentenceTransformer

    from models.embeddings import st_dir

    client = openai.OpenAI(base_url=f"{rag_server.url}/v1", api_key="x")
    texts = ["the first sentence", "a second, longer sentence about vectors"]
    got = client.embeddings.create(model=EMBED, input=texts)
    assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens > 4
    b64 = httpx.post(
        f"{rag_server.url}/v1/embeddings",
        json={"model": EMBED, "input": texts, "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][1]["embedding"]), "<f4")
    with bentoml_store(rag_store):
        path, _ = st_dir(EMBED)
    local = SentenceTransformer(str(path), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), local, atol=1e-5)
    np.testing.assert_allclose(decoded, local[1], atol=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "nope", "input": "x"}, 404, "no embedding model"),
        ({"model": EMBED, "input": []}, 400, "input"),
        ({"model": EMBED, "input": [1, 2, 3]}, 400, "token ids"),
        ({"model": EMBED, "input": "x", "dimensions": 128}, 400, "384"),
        ({"model": EMBED, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ],
)
def test_embeddings_refusals(rag_server: Server, body: dict, status: int, says: str) -> None:
    resp = httpx.post(f"{rag_server.url}/v1/embeddings", json=body)
    assert resp.status_code == status, resp.text
    assert says in resp.json()["error"]["message"]


def test_ingest_reads_pdf_pages_and_reports_a_scanned_pdf(
    rag_server: Server, tmp_path: Path
) -> None:
    from tests.unit.test_rag_pdf import pdf_bytes

    (tmp_path / "pdfs").mkdir()
    manual = ["The coolant pump moves forty litres a minute.", "Replace the pump seal yearly."]
    (tmp_path / "pdfs" / "manual.pdf").write_bytes(pdf_bytes(manual))
    (tmp_path / "pdfs" / "scan.pdf").write_bytes(pdf_bytes(["", ""]))  # pages without text
    done = cli("ingest", "pdfs", "--collection", "pdfs", "--url", rag_server.url, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "1 added (2 chunks), 0 unchanged, 0 removed, 1 failed" in done.stdout, done.stdout
    assert "pdfs/scan.pdf: no extractable text in its 2 page(s)" in done.stderr, done.stderr
    found = httpx.post(
        f"{rag_server.url}/v1/rag/collections/pdfs/query",
        json={"query": "how often is the pump seal replaced", "k": 1},
        timeout=30,
    ).json()["matches"]
    assert found[0]["source"] == "pdfs/manual.pdf"
    assert found[0]["text"] == "Page 2\n\nReplace the pump seal yearly."
    assert cli("drop", "pdfs", "--url", rag_server.url, cwd=tmp_path).returncode == 0


def test_models_lists_the_llm_the_embedding_model_and_the_apps(rag_server: Server) -> None:
    ids = {m["id"] for m in httpx.get(f"{rag_server.url}/v1/models").json()["data"]}
    assert {LLM_NAME, EMBED, APP, "empty-app"} <= ids


def test_ingest_is_idempotent_and_follows_changes(rag_server: Server, ingested: Path) -> None:
    url = rag_server.url
    docs = httpx.get(f"{url}/v1/rag/collections/notes/documents").json()["documents"]
    assert sorted(d["source"] for d in docs) == sorted(f"notes/{n}" for n in DOCS)
    again = cli("ingest", "notes", "--collection", "notes", "--url", url, cwd=ingested)
    assert "0 added (0 chunks), 4 unchanged, 0 removed" in again.stdout, again.stdout
    (ingested / "notes" / "beta.md").write_text("# Beta\n\nBeta station now grows strawberries.")
    (ingested / "notes" / "gamma.txt").unlink()
    (ingested / "notes" / "bad.md").unlink()
    (ingested / "notes" / "huge.md").unlink()
    changed = cli("ingest", "notes", "--collection", "notes", "--url", url, cwd=ingested)
    assert changed.returncode == 0, changed.stderr
    assert "1 added (1 chunks), 2 unchanged, 1 removed, 0 failed" in changed.stdout
    listed = cli("list", "--url", url, cwd=ingested)
    assert "notes\t3 chunks" in listed.stdout
    as_json = json.loads(cli("list", "--json", "--url", url, cwd=ingested).stdout)
    assert ("notes", 3) in [(c["name"], c["chunks"]) for c in as_json]


def test_query_finds_the_passage_and_filters(rag_server: Server, ingested: Path) -> None:
    url = f"{rag_server.url}/v1/rag/collections/notes/query"
    found = httpx.post(url, json={"query": "how is the reactor cooled?", "k": 2}).json()
    assert found["matches"][0]["source"] == "notes/alpha.md"
    assert set(found["matches"][0]) == {"text", "source", "chunk", "score"}
    only = httpx.post(url, json={"query": "reactor", "filter": {"source": "notes/page.html"}})
    assert [m["source"] for m in only.json()["matches"]] == ["notes/page.html"]
    assert "Delta" in only.json()["matches"][0]["text"] and "x{}" not in only.text


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("notes/query", {"query": "  "}, 400),
        ("notes/query", {"query": "x", "k": 1000}, 400),
        ("notes/query", {"query": "x", "filter": {"author": "me"}}, 400),
        ("missing/query", {"query": "x"}, 404),
        ("notes/documents", {"documents": [{"source": "big", "text": "y" * 5000}]}, 413),
    ],
)
def test_rag_refusals(rag_server: Server, path: str, body: dict, status: int) -> None:
    resp = httpx.post(f"{rag_server.url}/v1/rag/collections/{path}", json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == status


def test_rag_app_streams_with_sources(rag_server: Server, ingested: Path) -> None:
    body = {
        "model": APP,
        "messages": [{"role": "user", "content": "What cools the alpha reactor?"}],
        "max_tokens": 8,
        "stream": True,
    }
    with httpx.stream("POST", f"{rag_server.url}/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        header = json.loads(resp.headers["x-servery-sources"])
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert header[0]["source"] == "notes/alpha.md" and len(header) == 2
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["sources"] == header and last["choices"] == []
    assert any(json.loads(e)["choices"] for e in events[:-2])  # the LLM's tokens came first
    whole = httpx.post(
        f"{rag_server.url}/v1/chat/completions", json={**body, "stream": False}, timeout=60
    ).json()
    assert whole["sources"] == header and whole["choices"][0]["message"]["content"] is not None


def test_rag_app_without_its_collection_is_404(rag_server: Server) -> None:
    body = {"model": "empty-app", "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.post(f"{rag_server.url}/v1/chat/completions", json=body)
    assert resp.status_code == 404 and "nothing-here" in resp.json()["error"]["message"]


def test_the_langchain_pipeline(rag_server: Server, ingested: Path) -> None:
    """The brief's pipeline, unchanged: LangChain's OpenAIEmbeddings against servery's /v1 with
    LangChain's Qdrant store, and ChatOpenAI against a servery RAG app."""
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings
    from langchain_qdrant import QdrantVectorStore

    base = f"{rag_server.url}/v1"
    # tiktoken pre-tokenizing would fetch OpenAI's encodings: servery takes the strings
    embeddings = OpenAIEmbeddings(
        model=EMBED, base_url=base, api_key="x", check_embedding_ctx_length=False
    )
    store = QdrantVectorStore.from_texts(
        list(DOCS.values()), embeddings, location=":memory:", collection_name="lc"
    )
    top = store.similarity_search("tomatoes under red light", k=1)
    assert "Beta station" in top[0].page_content
    llm = ChatOpenAI(model=APP, base_url=base, api_key="x", max_tokens=8)
    answer = llm.invoke("What cools the alpha reactor?")
    assert isinstance(answer.content, str)


def test_metrics_count_retrievals_and_embeddings(rag_server: Server, ingested: Path) -> None:
    httpx.post(f"{rag_server.url}/v1/rag/collections/notes/query", json={"query": "sodium"})
    text = httpx.get(f"{rag_server.url}/metrics").text
    assert 'servery_rag_retrieval_seconds_count{app="-",collection="notes"}' in text
    assert 'servery_embeddings_tokens_total{model="all-minilm-l6-v2",use="ingest"}' in text
    assert 'servery_llm_requests_total{model="notes-app",status="200"}' in text


def test_rag_app_chats_count_in_usage_like_llm_chats(rag_server: Server, ingested: Path) -> None:
    """A RAG app's chats count under the app's name with the engine's tokens (the passages are
    prompt tokens); the stream that did not ask for usage still ends with its sources."""

    def app_usage() -> list[int]:
        for u in httpx.get(f"{rag_server.url}/v1/usage").json()["data"][0]["results"]:
            if u["model"] == APP:
                return [u["num_model_requests"], u["input_tokens"], u["output_tokens"]]
        return [0, 0, 0]

    before = settled(app_usage, "the app's usage settled")
    body = {
        "model": APP,
        "messages": [{"role": "user", "content": "What cools the alpha reactor?"}],
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{rag_server.url}/v1/chat/completions", json=body) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert "sources" in json.loads(events[-2]) and json.loads(events[-3])["choices"]
    whole = httpx.post(
        f"{rag_server.url}/v1/chat/completions", json={**body, "stream": False}, timeout=60
    ).json()
    prompt = whole["usage"]["prompt_tokens"]
    assert prompt > 30  # the passages
    want = [before[0] + 2, before[1] + 2 * prompt, before[2] + 8]
    eventually(lambda: app_usage() == want, "the app's usage counted")
