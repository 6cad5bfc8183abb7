"""``servery rag``: fill, list and drop the RAG collections of a running servery.

    servery rag ingest PATH... --collection NAME [--url http://127.0.0.1:3000] [--api-key K]
                       [--chunk-chars N] [--chunk-overlap N] [--keep-missing] [--no-progress]
    servery rag list [--url ...] [--api-key K] [--json]
    servery rag drop NAME [--url ...] [--api-key K]

It talks to the server's ``/v1/rag`` API (so an embedded store keeps one owner: the RAG
service). ``ingest`` reads text, Markdown, HTML and PDF files (folders recursively), compares each
file's content hash with the collection's and sends only new and changed ones, in batches, with a
progress bar; documents of the collection under the given paths whose file is gone are removed
(``--keep-missing`` keeps them). A file that cannot be read or is refused is reported and the
rest go on (exit 1 at the end). Sources are the files' paths relative to the current folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

SUFFIXES = {".md": "text", ".markdown": "text", ".txt": "text", ".rst": "text"}
SUFFIXES |= {".html": "html", ".htm": "html", ".pdf": "pdf"}
BATCH_DOCS = 16
BATCH_BYTES = 2 << 20


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("rag", help="ingest documents into RAG collections, list, drop")
    sub = p.add_subparsers(dest="rag_command", required=True, metavar="ACTION")
    common = {"url": "http://127.0.0.1:3000", "api_key": os.environ.get("SERVERY_API_KEY")}
    ing = sub.add_parser("ingest", help="add or update files in a collection (idempotent)")
    ing.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    ing.add_argument("--collection", required=True)
    ing.add_argument("--chunk-chars", type=int, help="chunk size (default: the server's)")
    ing.add_argument("--chunk-overlap", type=int, help="overlap (default: the server's)")
    ing.add_argument("--keep-missing", action="store_true", help="keep documents of gone files")
    ing.add_argument("--no-progress", action="store_true")
    lst = sub.add_parser("list", help="collections and their chunk counts")
    lst.add_argument("--json", action="store_true", help="the list as JSON on stdout")
    drop = sub.add_parser("drop", help="delete a collection")
    drop.add_argument("name")
    for q in (ing, lst, drop):
        q.add_argument("--url", default=common["url"], help="servery's address")
        q.add_argument("--api-key", default=common["api_key"], help="(default: $SERVERY_API_KEY)")
    p.set_defaults(func=run)


class _Text(HTMLParser):
    """The visible text of an HTML page (scripts and styles dropped, blocks on their own lines)."""

    _SKIP = frozenset({"script", "style", "head", "noscript", "template"})
    _BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre"})

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n")
            if tag[0] == "h" and tag[1:].isdigit():
                self.parts.append("#" * int(tag[1:]) + " ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def pdf_text(raw: bytes) -> str:
    """A PDF's text, page by page: each page is a section headed ``# Page N``, so its chunks
    never span pages and start with their page's number. Raises ValueError for a PDF that
    cannot be read or holds no text (a scanned one)."""
    import io

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ValueError("an encrypted PDF (no text without its password)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except PyPdfError as e:
        raise ValueError(f"not a readable PDF ({e})") from None
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # malformed object trees
        raise ValueError(f"not a readable PDF ({type(e).__name__})") from None
    if not any(p.strip() for p in pages):
        raise ValueError(
            f"no extractable text in its {len(pages)} page(s): a scanned PDF? (run OCR first)"
        )
    # a line starting with '#' would read as a heading: indent it
    return "\n\n".join(
        f"# Page {n}\n\n"
        + "\n".join(" " + ln if ln.startswith("#") else ln for ln in text.splitlines())
        for n, text in enumerate(pages, 1)
        if text.strip()
    )


def read_text(path: Path) -> str:
    """A file's text (HTML reduced to its visible text, a PDF's pages to theirs). Raises
    ValueError/OSError."""
    raw = path.read_bytes()
    if SUFFIXES.get(path.suffix.lower()) == "pdf":
        return pdf_text(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if "\x00" in text:
        raise ValueError("binary content")
    if SUFFIXES.get(path.suffix.lower()) == "html":
        parser = _Text()
        parser.feed(text)
        lines = "".join(parser.parts).splitlines()
        text = "\n".join(line.strip() for line in lines)
    return text


def files_under(paths: list[str]) -> tuple[list[Path], list[str]]:
    """The files to ingest under ``paths``, and the problems with paths that do not exist."""
    found, problems = [], []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(
                f for f in path.rglob("*") if f.suffix.lower() in SUFFIXES and f.is_file()
            )
        elif path.is_file():
            found.append(path)
        else:
            problems.append(f"{name}: no such file or folder")
    return found, problems


def source_of(path: Path) -> str:
    absolute = path.resolve()
    try:
        return absolute.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return absolute.as_posix()


def content_hash(text: str) -> str:
    """As the server computes it (services/rag/chunking.py)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Client:
    def __init__(self, url: str, api_key: str | None) -> None:
        import httpx

        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:300]
            raise ServerError(resp.status_code, message)
        return resp.json()


class ServerError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def ingest(args: Any, client: Client) -> int:
    from tqdm import tqdm

    files, problems = files_under(args.paths)
    base = f"/v1/rag/collections/{args.collection}/documents"
    try:
        known = {d["source"]: d["hash"] for d in client.call("GET", base)["documents"]}
    except ServerError as e:
        if e.status != 404:
            raise
        known = {}
    todo: list[dict[str, str]] = []
    seen: set[str] = set()
    unchanged = 0
    for path in files:
        source = source_of(path)
        seen.add(source)
        try:
            text = read_text(path)
        except (OSError, ValueError) as e:
            problems.append(f"{source}: {e}")
            continue
        if known.get(source) == content_hash(text):
            unchanged += 1
        else:
            todo.append({"source": source, "text": text})
    options = {
        k: v
        for k, v in (("chunk_chars", args.chunk_chars), ("chunk_overlap", args.chunk_overlap))
        if v is not None
    }
    added = chunks = 0
    bar = tqdm(total=len(todo), unit="file", disable=args.no_progress or not todo, file=sys.stderr)
    batch: list[dict[str, str]] = []

    def send(docs: list[dict[str, str]]) -> None:
        nonlocal added, chunks
        try:
            result = client.call("POST", base, json={"documents": docs, **options})
        except ServerError as e:
            if len(docs) > 1 and 400 <= e.status < 500:  # find the one refused, send the rest
                for doc in docs:
                    send([doc])
                return
            if e.status >= 500 or e.status in (401, 403, 404, 429):
                raise
            problems.append(f"{docs[0]['source']}: {e}")
            bar.update(len(docs))
            return
        added += len(result["added"])
        chunks += result["chunks"]
        bar.update(len(docs))

    for doc in todo:
        size = sum(len(d["text"]) for d in batch) + len(doc["text"])
        if batch and (len(batch) >= BATCH_DOCS or size > BATCH_BYTES):
            send(batch)
            batch = []
        batch.append(doc)
    if batch:
        send(batch)
    bar.close()
    removed: list[str] = []
    if not args.keep_missing:
        roots = [source_of(Path(p)) for p in args.paths]
        gone = [
            s
            for s in known
            if s not in seen and any(s == r or s.startswith(r.rstrip("/") + "/") for r in roots)
        ]
        if gone:
            query = [("source", s) for s in gone]
            removed = client.call("DELETE", base, params=query)["removed"]
    print(
        f"{args.collection}: {added} added ({chunks} chunks), {unchanged} unchanged, "
        f"{len(removed)} removed, {len(problems)} failed"
    )
    for problem in problems:
        print(f"  failed: {problem}", file=sys.stderr)
    return 1 if problems else 0


def run(args: Any) -> int:
    import httpx

    client = Client(args.url, args.api_key)
    try:
        if args.rag_command == "ingest":
            return ingest(args, client)
        if args.rag_command == "list":
            collections = client.call("GET", "/v1/rag/collections")["collections"]
            if args.json:
                print(json.dumps(collections, indent=2))
                return 0
            for c in collections:
                print(f"{c['name']}\t{c['chunks']} chunks")
            return 0
        client.call("DELETE", f"/v1/rag/collections/{args.name}")
        print(f"dropped {args.name}")
        return 0
    except ServerError as e:
        print(f"servery rag: {e}", file=sys.stderr)
        return 2
    except (OSError, httpx.TransportError) as e:
        print(f"servery rag: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2
