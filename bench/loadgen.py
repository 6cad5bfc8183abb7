"""A closed-loop HTTP load generator (aiohttp): ``concurrency`` clients, ``requests`` in total.

httpx is too slow to load a server at c=64 on 2 cores (docs/internals/stack.md); aiohttp with
pre-encoded bodies
and one keep-alive connection per client is not the bottleneck here. Every response is checked
(status and, optionally, a caller-supplied check), so a benchmark also counts wrong answers.

Run ``python -m bench.loadgen URL BODY.json -c 64 -n 5000`` for a one-off measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Check = Callable[[int, bytes], bool]


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    ok: int
    errors: int
    status: dict[str, int] = field(default_factory=dict)
    rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0

    @property
    def ok_rps(self) -> float:
        """Successful (2xx) responses per second: fast 503s must not look like throughput."""
        return self.ok / self.seconds if self.seconds else 0.0

    @classmethod
    def from_latencies(
        cls,
        latencies_s: Any,
        *,
        concurrency: int,
        seconds: float,
        ok: int,
        status: dict[str, int],
    ) -> LoadResult:
        """A result from per-request latencies (seconds; every request sent, answered or not)."""
        ms = np.asarray(latencies_s if len(latencies_s) else [0.0], dtype=np.float64) * 1000.0
        requests = len(latencies_s)
        return cls(
            concurrency=concurrency,
            requests=requests,
            seconds=seconds,
            ok=ok,
            errors=requests - ok,
            status=dict(status),
            rps=requests / seconds if seconds else 0.0,
            p50_ms=float(np.percentile(ms, 50)),
            p95_ms=float(np.percentile(ms, 95)),
            p99_ms=float(np.percentile(ms, 99)),
            max_ms=float(ms.max()),
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok_rps": self.ok_rps}

    def line(self) -> str:
        return (
            f"c={self.concurrency:<3} n={self.requests:<6} {self.ok_rps:9.1f} ok req/s  "
            f"p50 {self.p50_ms:7.2f}  p95 {self.p95_ms:7.2f}  p99 {self.p99_ms:7.2f} ms  "
            f"errors {self.errors}"
        )


async def run_load(
    url: str,
    bodies: Sequence[bytes],
    *,
    concurrency: int,
    requests: int,
    check: Check | None = None,
    warmup: int = 0,
    timeout_s: float = 60.0,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Send ``requests`` POSTs (bodies used round-robin) from ``concurrency`` clients."""
    import aiohttp

    hdrs = {"content-type": "application/json", **(headers or {})}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    latencies = np.zeros(requests, dtype=np.float64)
    status: Counter[str] = Counter()
    ok = 0
    next_i = 0

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int) -> tuple[int, bytes]:
            async with session.post(url, data=bodies[i % len(bodies)], headers=hdrs) as resp:
                return resp.status, await resp.read()

        for i in range(warmup):
            await one(i)

        async def client() -> None:
            nonlocal next_i, ok
            while next_i < requests:
                i = next_i
                next_i += 1
                t0 = time.perf_counter()
                try:
                    code, payload = await one(i)
                except (TimeoutError, aiohttp.ClientError) as e:
                    status[type(e).__name__] += 1
                    latencies[i] = time.perf_counter() - t0
                    continue
                latencies[i] = time.perf_counter() - t0
                good = code == 200 and (check is None or check(i, payload))
                status[str(code) if code != 200 or good else "200-wrong"] += 1
                ok += good

        t_start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t_start

    return LoadResult.from_latencies(
        latencies, concurrency=concurrency, seconds=elapsed, ok=ok, status=dict(status)
    )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("body", help="JSON file with one request body, or a list of bodies")
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("-n", "--requests", type=int, default=2000)
    args = p.parse_args(argv)
    with open(args.body) as f:
        data = json.load(f)
    bodies = [json.dumps(b).encode() for b in (data if isinstance(data, list) else [data])]
    result = asyncio.run(
        run_load(args.url, bodies, concurrency=args.concurrency, requests=args.requests, warmup=10)
    )
    print(result.line())
    print(json.dumps(result.status))


if __name__ == "__main__":
    main()
