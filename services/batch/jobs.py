"""Files and batches as OpenAI defines them, kept in a :class:`~services.batch.state.State` and a
directory of files; what the API, the queue's workers and the sweeper do to them.

A batch's input lines are numbered (blank lines skipped) and cut into chunks of
``SERVERY_BATCH_CHUNK_LINES``; each chunk is one queued task. A line's answer is recorded under
its number with ``hsetnx``: the first answer wins, so a line that runs twice (its worker was
killed after running it and before its chunk was done, then the chunk ran again) is still
answered once. The output and error files are written from those records, in input order, when
every chunk is done (or the batch was cancelled or expired: lines without an answer then get an
error entry saying so), so every ``custom_id`` is in exactly one of them, once.

Statuses move only by compare-and-set on the batch's record (:meth:`Jobs._update`): a cancel
and a completion racing each other cannot both win.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from services.batch.metrics import FINISHED
from services.batch.settings import BatchSettings
from services.batch.state import State
from services.runtime.errors import BadRequest, PayloadTooLarge, RateLimited, ServeryError

TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/predict"})
"""Batch endpoints that name one path; OIP lines also: :data:`OIP_TEMPLATE` or one model's path."""
OIP_TEMPLATE = "/v2/models/{name}/infer"
"""The endpoint of a batch whose lines may name any model's OIP infer path."""
OIP_PATH = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer")
WINDOW = re.compile(r"([1-9][0-9]*)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class NotFound(ServeryError):
    status_code = 404
    error_type = "not_found"


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def window_s(window: str) -> int:
    """Seconds of a ``completion_window`` (OpenAI's ``24h``; servery takes any ``<n>s|m|h|d``
    up to 7 days)."""
    found = WINDOW.fullmatch(window or "")
    seconds = int(found[1]) * _UNIT[found[2]] if found else 0
    if not 0 < seconds <= 7 * 86400:
        raise BadRequest(
            f"completion_window must be like '24h' (at most 7 days), got {window!r}",
            param="completion_window",
        )
    return seconds


def endpoint_matches(endpoint: str, url: Any) -> bool:
    """Whether a line's ``url`` belongs to a batch for ``endpoint``."""
    if endpoint == OIP_TEMPLATE:
        return isinstance(url, str) and OIP_PATH.fullmatch(url) is not None
    return url == endpoint


def input_lines(data: bytes) -> list[bytes]:
    """The lines of a JSONL file that count (blank ones do not)."""
    return [line for line in data.split(b"\n") if line.strip()]


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class Jobs:
    """Files and batches of every API key (``owner``: the key's name, "" without keys)."""

    def __init__(
        self,
        state: State,
        settings: BatchSettings,
        enqueue: Callable[[str, int], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.settings = settings
        self.enqueue = enqueue
        self.clock = clock
        self.files_dir = settings.dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lines: dict[str, list[bytes]] = {}
        """The last input files' lines (files never change once written): each chunk of a
        batch reads its lines from here rather than reading and splitting the whole file."""

    # --- files ---------------------------------------------------------------------------------

    def path_of(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def put_file(self, owner: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        if purpose != "batch":
            raise BadRequest(f"purpose must be 'batch', got {purpose!r}", param="purpose")
        if len(data) > self.settings.max_file_bytes:
            raise too_large(self.settings.max_file_bytes)
        return self._write_file(new_id("file-"), owner, filename, "batch", data)

    def _write_file(
        self, file_id: str, owner: str, filename: str, purpose: str, data: bytes
    ) -> dict[str, Any]:
        tmp = self.path_of(file_id + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(self.path_of(file_id))  # whole or absent, even if the process dies here
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(self.clock()),
            "filename": filename[:256],
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
            "_owner": owner,
        }
        self.state.set("file:" + file_id, _dumps(meta))
        self.state.zadd("files:" + owner, file_id, self.clock())
        return public(meta)

    def _file_meta(self, owner: str, file_id: str) -> dict[str, Any]:
        raw = self.state.get("file:" + file_id) if _safe_id(file_id) else None
        meta = json.loads(raw) if raw else None
        if meta is None or meta["_owner"] != owner:
            raise NotFound(f"no file with id '{file_id[:64]}'", param="file_id")
        return meta  # type: ignore[no-any-return]

    def file(self, owner: str, file_id: str) -> dict[str, Any]:
        return public(self._file_meta(owner, file_id))

    def file_content(self, owner: str, file_id: str) -> Path:
        self._file_meta(owner, file_id)
        return self.path_of(file_id)

    def files(self, owner: str, purpose: str | None = None) -> list[dict[str, Any]]:
        out = []
        for file_id in reversed(self.state.zmembers("files:" + owner)):
            raw = self.state.get("file:" + file_id)
            if raw:
                meta = json.loads(raw)
                if purpose is None or meta["purpose"] == purpose:
                    out.append(public(meta))
        return out

    def delete_file(self, owner: str, file_id: str) -> dict[str, Any]:
        self._file_meta(owner, file_id)
        self.state.delete("file:" + file_id)
        self.state.zrem("files:" + owner, file_id)
        self.path_of(file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # --- batches: the API's side ----------------------------------------------------------------

    def create(
        self,
        owner: str,
        models: list[str] | None,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
    ) -> dict[str, Any]:
        """A new batch, its chunks queued; ``failed`` (with ``errors``) when its file cannot be
        run as a whole (too many lines, a ``custom_id`` twice). 429 when ``owner`` would have
        more lines waiting than ``SERVERY_BATCH_MAX_QUEUED_LINES``."""
        if (
            endpoint not in ENDPOINTS
            and endpoint != OIP_TEMPLATE
            and not (isinstance(endpoint, str) and OIP_PATH.fullmatch(endpoint))
        ):
            raise BadRequest(
                f"endpoint {str(endpoint)[:80]!r} is not one batches serve: "
                f"{', '.join(sorted(ENDPOINTS))}, {OIP_TEMPLATE} or /v2/models/<name>/infer",
                param="endpoint",
            )
        window = window_s(completion_window)
        if metadata is not None and (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or not all(isinstance(v, str) and len(k) <= 64 for k, v in metadata.items())
        ):
            raise BadRequest("metadata: at most 16 string values", param="metadata")
        meta = self._file_meta(owner, input_file_id)
        if meta["purpose"] != "batch":
            raise BadRequest("the input file's purpose is not 'batch'", param="input_file_id")
        lines = self._input(input_file_id)  # read once: its chunks take their lines from here
        errors = _validate(lines, self.settings.max_lines)
        queued = self.queued_lines(owner)
        if not errors and queued + len(lines) > self.settings.max_queued_lines:
            raise RateLimited(
                f"this API key has {queued} batch lines queued; {len(lines)} more would pass its "
                f"quota of {self.settings.max_queued_lines} (SERVERY_BATCH_MAX_QUEUED_LINES)",
                None,
            )
        now = int(self.clock())
        chunks = -(-len(lines) // self.settings.chunk_lines)
        rec: dict[str, Any] = {
            "id": new_id("batch_"),
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + window,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": metadata or {},
            "_owner": owner,
            "_models": models,
            "_chunks": chunks,
        }
        if errors:
            rec.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
        self.state.set("batch:" + rec["id"], _dumps(rec))
        self.state.zadd("batches:" + owner, rec["id"], self.clock())  # finer than created_at
        if errors:
            FINISHED.labels("failed").inc()
            return public(rec)
        self.state.zadd("active", rec["id"], now)
        self._queue_chunks(rec, range(chunks))
        started = self._update(rec["id"], _to_in_progress(now))
        return self._view(started or rec)

    def _queue_chunks(self, rec: dict[str, Any], chunks: Iterator[int] | range) -> None:
        for chunk in chunks:
            self.state.hset("chunks:" + rec["id"], str(chunk), b"q%d" % int(self.clock()))
            self.enqueue(rec["id"], chunk)

    def record(self, batch_id: str) -> dict[str, Any] | None:
        raw = self.state.get("batch:" + batch_id) if _safe_id(batch_id) else None
        return json.loads(raw) if raw else None

    def batch(self, owner: str, batch_id: str) -> dict[str, Any]:
        rec = self.record(batch_id)
        if rec is None or rec["_owner"] != owner:
            raise NotFound(f"no batch with id '{batch_id[:64]}'", param="batch_id")
        return self._view(rec)

    def batches(
        self, owner: str, after: str | None = None, limit: int = 20
    ) -> tuple[list[dict[str, Any]], bool]:
        """``owner``'s batches, newest first, after the batch ``after``; whether more follow."""
        ids = list(reversed(self.state.zmembers("batches:" + owner)))
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        page = [r for i in ids[:limit] if (r := self.record(i)) is not None]
        return [self._view(r) for r in page], len(ids) > limit

    def cancel(self, owner: str, batch_id: str) -> dict[str, Any]:
        self.batch(owner, batch_id)  # 404 for others' batches
        now = int(self.clock())

        def cancelling(rec: dict[str, Any]) -> dict[str, Any] | None:
            if rec["status"] not in ("validating", "in_progress"):
                return None  # already ending or ended: cancelling is a no-op, as OpenAI's
            return {**rec, "status": "cancelling", "cancelling_at": now}

        return self._view(self._update(batch_id, cancelling) or {})

    def queued_lines(self, owner: str) -> int:
        """Lines of ``owner``'s batches not answered yet."""
        total = 0
        for batch_id in self.state.zmembers("active"):
            rec = self.record(batch_id)
            if rec is not None and rec["_owner"] == owner and rec["status"] not in TERMINAL:
                total += rec["request_counts"]["total"] - self.state.hlen("res:" + batch_id)
        return total

    def _view(self, rec: dict[str, Any]) -> dict[str, Any]:
        """The OpenAI batch object; a running batch's counts from its lines answered so far."""
        if rec.get("status") not in TERMINAL and "id" in rec:
            counts = self.state.hgetall("cnt:" + rec["id"])
            rec = {
                **rec,
                "request_counts": {
                    "total": rec["request_counts"]["total"],
                    "completed": int(counts.get("ok", b"0")),
                    "failed": int(counts.get("err", b"0")),
                },
            }
        return public(rec)

    def _update(
        self, batch_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        """Apply ``change`` (record -> new record, or None: no change) by compare-and-set;
        the record as it is after."""
        for _ in range(1000):
            raw = self.state.get("batch:" + batch_id)
            if raw is None:
                return None
            new = change(json.loads(raw))
            if new is None:
                return json.loads(raw)  # type: ignore[no-any-return]
            if self.state.cas("batch:" + batch_id, raw, _dumps(new)):
                return new
        raise RuntimeError(f"batch {batch_id}: its record kept changing")

    # --- batches: the workers' side ------------------------------------------------------------

    def lines_of(self, rec: dict[str, Any], chunk: int) -> list[tuple[int, bytes]]:
        """``(line number, line)`` of one chunk of a batch's input."""
        lines = self._input(rec["input_file_id"])
        size = self.settings.chunk_lines
        first = chunk * size
        return list(enumerate(lines[first : first + size], start=first))

    def _input(self, file_id: str) -> list[bytes]:
        lines = self._lines.get(file_id)
        if lines is None:
            lines = input_lines(self.path_of(file_id).read_bytes())
            while len(self._lines) >= 2:  # a few running batches' files, not every file
                self._lines.pop(next(iter(self._lines)), None)
            self._lines[file_id] = lines
        return lines

    def answered(self, batch_id: str, numbers: list[int]) -> set[int]:
        got = self.state.hmget("res:" + batch_id, [str(n) for n in numbers])
        return {n for n, v in zip(numbers, got, strict=True) if v is not None}

    def answer(self, batch_id: str, number: int, ok: bool, line: dict[str, Any] | bytes) -> bool:
        """Record line ``number``'s output (``ok``) or error entry; False if it had one."""
        return self.answer_many(batch_id, [(number, ok, line)])[0]

    def answer_many(
        self, batch_id: str, answers: list[tuple[int, bool, dict[str, Any] | bytes]]
    ) -> list[bool]:
        """:meth:`answer` for several lines in one write (one transaction on SQLite, one
        round trip on Redis); which ones were first. A line is an entry, or its JSON."""
        items = [
            (str(n), (b"o" if ok else b"e") + (line if isinstance(line, bytes) else _dumps(line)))
            for n, ok, line in answers
        ]
        first = self.state.hsetnx_many("res:" + batch_id, items)
        # progress only: the final counts are recounted from the records
        for label, want in (("ok", True), ("err", False)):
            moved = sum(f for f, (_, ok, _) in zip(first, answers, strict=True) if ok is want)
            if moved:
                self.state.hincrby("cnt:" + batch_id, label, moved)
        return first

    def chunk_state(self, batch_id: str, chunk: int, value: bytes) -> None:
        """``q<t>`` queued at t, ``r<t>`` running with its lease until t, ``d`` done, ``s``
        stopped (cancel or expiry)."""
        self.state.hset("chunks:" + batch_id, str(chunk), value)

    def lease(self, batch_id: str, chunk: int) -> None:
        self.chunk_state(batch_id, chunk, b"r%d" % int(self.clock() + self.settings.lease_s))

    def sweep(self, *, queue_empty: bool = False) -> dict[str, int]:
        """What every consumer runs every ``SERVERY_BATCH_SWEEP_INTERVAL_S``: expire, finish
        cancels, queue again the chunks of dead workers, finish what is done (and redo a
        finalization whose worker died). Returns the active batches by status.

        ``queue_empty``: the queue has no task, so a chunk still marked queued after a lease
        was lost (the broker restarted without it) and is queued again."""
        now = self.clock()
        by_status: dict[str, int] = {}
        for batch_id in self.state.zmembers("active"):
            rec = self.record(batch_id)
            if rec is None or rec["status"] in TERMINAL:
                self.state.zrem("active", batch_id)
                continue
            status = rec["status"]
            by_status[status] = by_status.get(status, 0) + 1
            chunks = {int(k): v for k, v in self.state.hgetall("chunks:" + batch_id).items()}
            running = any(v[:1] == b"r" and int(v[1:]) > now for v in chunks.values())
            if status == "finalizing":
                if now - (rec["finalizing_at"] or 0) > self.settings.lease_s:
                    self.finalize(batch_id, rec.get("_ending", "completed"), redo=True)
            elif status in ("validating", "in_progress") and now >= rec["expires_at"]:
                self.finalize(batch_id, "expired")
            elif status == "cancelling":
                if not running or now - rec["cancelling_at"] > self.settings.lease_s:
                    self.finalize(batch_id, "cancelled")
            elif status == "validating":
                if now - rec["created_at"] > self.settings.lease_s:  # its creator died
                    todo = (c for c in range(rec["_chunks"]) if chunks.get(c) != b"d")
                    self._queue_chunks(rec, todo)
                    self._update(batch_id, _to_in_progress(int(now)))
            elif len(chunks) == rec["_chunks"] and all(v == b"d" for v in chunks.values()):
                self.finalize(batch_id, "completed")
            else:
                lapsed = now - self.settings.lease_s
                dead = [
                    c
                    for c, v in chunks.items()
                    if (v[:1] == b"r" and int(v[1:]) <= now)
                    or v == b"s"  # stopped by a status it no longer has
                    or (queue_empty and v[:1] == b"q" and int(v[1:]) <= lapsed)
                ]
                self._queue_chunks(rec, iter(dead))
        return by_status

    def maybe_finish(self, batch_id: str) -> None:
        """Finalize now if every chunk is done (the worker of the last chunk does)."""
        rec = self.record(batch_id)
        if rec is None or rec["status"] != "in_progress":
            return
        chunks = self.state.hgetall("chunks:" + batch_id)
        if len(chunks) == rec["_chunks"] and all(v == b"d" for v in chunks.values()):
            self.finalize(batch_id, "completed")

    def finalize(self, batch_id: str, ending: str, *, redo: bool = False) -> None:
        """Write the output and error files and end the batch as ``ending``."""
        now = int(self.clock())

        def finalizing(rec: dict[str, Any]) -> dict[str, Any] | None:
            if rec["status"] == "finalizing" and not redo:
                return None
            if rec["status"] in TERMINAL:
                return None
            return {**rec, "status": "finalizing", "finalizing_at": now, "_ending": ending}

        rec = self._update(batch_id, finalizing)
        if rec is None or rec["status"] != "finalizing" or rec["finalizing_at"] != now:
            return  # someone else finalizes, or it ended already
        ok, err = self._write_results(rec, ending)
        done = {
            **rec,
            "status": ending,
            f"{ending}_at": int(self.clock()),
            "output_file_id": ok[0],
            "error_file_id": err[0],
            "request_counts": {
                "total": rec["request_counts"]["total"],
                "completed": ok[1],
                "failed": err[1],
            },
        }
        if self._update(batch_id, lambda r: done if r == rec else None) == done:
            self.state.zrem("active", batch_id)
            FINISHED.labels(ending).inc()

    def _write_results(
        self, rec: dict[str, Any], ending: str
    ) -> tuple[tuple[str | None, int], tuple[str | None, int]]:
        results = self.state.hgetall("res:" + rec["id"])
        total = rec["request_counts"]["total"]
        missing = [n for n in range(total) if str(n) not in results]
        ids: dict[int, Any] = {}
        if missing:  # the custom_ids of lines never answered (cancelled, expired)
            lines = input_lines(self.path_of(rec["input_file_id"]).read_bytes())
            ids = {n: custom_id_of(lines[n]) for n in missing}
        why = {
            "cancelled": ("batch_cancelled", "This line was not run: the batch was cancelled."),
            "expired": (
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            ),
        }.get(ending, ("batch_failed", "This line was not run."))
        out: list[bytes] = []
        errs: list[bytes] = []
        for n in range(total):
            got = results.get(str(n))
            if got is None:
                entry = error_entry(ids.get(n), why[0], why[1])
                errs.append(_dumps(entry))
            else:
                (out if got[:1] == b"o" else errs).append(got[1:])
        owner = rec["_owner"]
        # ids derived from the batch's: a finalization redone after a crash writes the same files
        suffix = rec["id"].removeprefix("batch_")
        files = []
        for kind, lines_out in (("output", out), ("error", errs)):
            if not lines_out:
                files.append((None, 0))
                continue
            file_id = f"file-{kind}-{suffix}"
            data = b"\n".join(lines_out) + b"\n"
            self._write_file(file_id, owner, f"{rec['id']}_{kind}.jsonl", "batch_output", data)
            files.append((file_id, len(lines_out)))
        return files[0], files[1]


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """A stored object without its internal fields (``_owner`` ...)."""
    return {k: v for k, v in doc.items() if not k.startswith("_")}


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"file larger than {limit} bytes (SERVERY_BATCH_MAX_FILE_BYTES)")


def custom_id_of(line: bytes) -> Any:
    try:
        doc = orjson.loads(line)  # every line of a new batch: orjson parses it several times faster
    except ValueError:
        return None
    cid = doc.get("custom_id") if isinstance(doc, dict) else None
    return cid if isinstance(cid, str) else None


def error_entry(custom_id: Any, code: str, message: str) -> dict[str, Any]:
    """An error-file line for a line that got no HTTP answer (OpenAI's shape)."""
    return {
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def _to_in_progress(now: int) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    def change(rec: dict[str, Any]) -> dict[str, Any] | None:
        if rec["status"] != "validating":
            return None
        return {**rec, "status": "in_progress", "in_progress_at": now}

    return change


def _validate(lines: list[bytes], max_lines: int) -> list[dict[str, Any]]:
    """What fails a whole batch at creation, as OpenAI's validation does: no lines, too many,
    or a ``custom_id`` used twice. (A line that is not JSON or names an unknown model or URL
    fails alone, in the error file.)"""
    if not lines:
        return [{"code": "empty_file", "message": "the input file has no lines", "line": None}]
    if len(lines) > max_lines:
        return [
            {
                "code": "too_many_lines",
                "message": f"the input file has {len(lines)} lines; at most {max_lines} "
                "(SERVERY_BATCH_MAX_LINES)",
                "line": None,
            }
        ]
    seen: dict[str, int] = {}
    errors = []
    for n, line in enumerate(lines):
        cid = custom_id_of(line)
        if cid is None:
            continue
        if cid in seen and len(errors) < 20:
            errors.append(
                {
                    "code": "duplicate_custom_id",
                    "message": f"custom_id {cid[:64]!r} is on lines {seen[cid] + 1} and {n + 1}",
                    "param": "custom_id",
                    "line": n + 1,
                }
            )
        seen.setdefault(cid, n)
    return errors


_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")


def _safe_id(value: str) -> bool:
    """Ids become file names and keys: only ``[A-Za-z0-9_-]``."""
    return _ID.fullmatch(value) is not None
