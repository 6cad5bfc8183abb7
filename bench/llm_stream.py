"""OpenAI streaming for ``servery bench``: SSE parsing, per-request stream metrics, GPU memory.

A chat completion with ``"stream": true`` answers with Server-Sent Events: ``data: {chunk JSON}``
events separated by blank lines, ending with ``data: [DONE]``; with ``stream_options:
{"include_usage": true}`` the last chunk before ``[DONE]`` carries ``usage.completion_tokens``.
Network reads split events (and lines, and multi-byte characters) anywhere, so
:class:`SSEParser` buffers bytes and decodes whole lines only.

:class:`StreamStats` times the *content* chunks of one response: TTFT is the first one's arrival
after the request was sent, inter-token latencies are the gaps between consecutive ones (chunks
read in one network read share a timestamp, so a gap of 0 is real batching by the network, not
an error). Output tokens are ``usage.completion_tokens`` when the server sends it, else one per
content chunk.

Unit-tested on byte streams here; the end-to-end test arrives with the LLM service.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

_EOL = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """Incremental Server-Sent Events parser: feed it bytes, get each event's ``data``."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event completed by ``chunk`` (multi-line data joined by ``\\n``)."""
        self._buf += chunk
        events: list[str] = []
        pos = 0
        while (m := _EOL.search(self._buf, pos)) is not None:
            if m.group() == b"\r" and m.end() == len(self._buf):
                break  # maybe the first half of a \r\n split across reads
            self._line(self._buf[pos : m.start()], events)
            pos = m.end()
        self._buf = self._buf[pos:]
        return events

    def finish(self) -> list[str]:
        """At the end of the stream: the last event even without its closing blank line.

        The SSE spec drops such an event; a benchmark is lenient, so a server that omits the final
        blank line after ``[DONE]`` is not counted as failing.
        """
        events: list[str] = []
        if self._buf:
            self._line(self._buf.rstrip(b"\r"), events)
            self._buf = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[str]) -> None:
        if not line:  # a blank line ends the event
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(b":"):  # a comment (keep-alive)
            return
        name, _, value = line.partition(b":")
        if name == b"data":  # event:, id: and retry: do not matter here
            self._data.append(value.removeprefix(b" ").decode("utf-8", errors="replace"))


@dataclass
class StreamStats:
    """Timing and token counts of one streamed chat completion (``t0``: when it was sent)."""

    t0: float
    first: float | None = None
    last: float | None = None
    gaps: list[float] = field(default_factory=list)
    content_chunks: int = 0
    usage_tokens: int | None = None
    done: bool = False
    error: str | None = None

    def on_data(self, data: str, now: float) -> None:
        """Account for one event's data, received at ``now``."""
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self.error = "stream-bad-json"
            return
        if not isinstance(chunk, dict) or "error" in chunk:
            self.error = "stream-error"
            return
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])
        deltas = [c.get("delta") or {} for c in chunk.get("choices") or []]
        # reasoning models stream their thinking as reasoning_content: tokens all the same
        if any(d.get("content") or d.get("reasoning_content") for d in deltas):
            if self.last is None:
                self.first = now
            else:
                self.gaps.append(now - self.last)
            self.last = now
            self.content_chunks += 1

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.t0

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.content_chunks

    def failure(self) -> str | None:
        """The status key of a failed stream, or None when it completed with content."""
        if self.error:
            return self.error
        if not self.done:
            return "stream-truncated"
        return None if self.content_chunks else "stream-empty"


def distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean, p50 and p99 in milliseconds (None without values)."""
    import numpy as np

    if not values_s:
        return {"mean": None, "p50": None, "p99": None}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p99 = np.percentile(ms, [50, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p99": float(p99)}


def llm_summary(streams: Sequence[StreamStats], seconds: float) -> dict[str, Any]:
    """A level's LLM numbers over its completed streams: output tok/s, TTFT, inter-token latency."""
    tokens = sum(s.output_tokens for s in streams)
    return {
        "output_tokens": tokens,
        "output_tok_s": tokens / seconds if seconds else 0.0,
        "ttft_ms": distribution_ms([s.ttft_s for s in streams if s.ttft_s is not None]),
        "itl_ms": distribution_ms([g for s in streams for g in s.gaps]),
    }


def gpu_memory_mib() -> list[int] | None:
    """Memory used on each GPU (MiB) from ``nvidia-smi``; None without it (or if it fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    cmd = [exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
        return [int(float(x)) for x in out.split()] or None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


async def sample_gpu(load: Awaitable[T], interval_s: float = 1.0) -> tuple[T, dict | None]:
    """Await ``load`` while sampling GPU memory before, every ``interval_s`` and after.

    Returns the load's result and ``{"before", "after", "peak"}`` (MiB per GPU; peak over all
    samples), or None where there is no ``nvidia-smi``.
    """
    before = await asyncio.to_thread(gpu_memory_mib)
    if before is None:
        return await load, None
    samples = [before]
    task = asyncio.ensure_future(load)
    while True:
        done, _ = await asyncio.wait([task], timeout=interval_s)
        if (sample := await asyncio.to_thread(gpu_memory_mib)) is not None:
            samples.append(sample)
        if done:
            break
    peak = [max(col) for col in zip(*samples, strict=False)]
    return task.result(), {"before": before, "after": samples[-1], "peak": peak}
