"""A closed-loop OIP V2 gRPC load generator (``grpc.aio``): C callers for a fixed time.

The gRPC counterpart of :func:`bench.harness.wrk.measure`: ``concurrency`` callers each send one
pre-built ``ModelInferRequest`` at a time (round-robin over the given messages) through the raw
``GRPCInferenceServiceStub``, with no tritonclient wrapper on the hot path, for ``warmup_s`` (not
recorded) and then ``seconds``. It returns a :class:`bench.loadgen.LoadResult`, so reports treat
it like wrk and the aiohttp generator.

Callers share several channels (``min(concurrency, 8)`` by default). Each channel gets
``grpc.use_local_subchannel_pool``, so it opens a connection of its own instead of sharing one
subchannel per target: the router's workers bind the port with ``SO_REUSEPORT`` and the kernel
spreads *connections*, so one connection would load one worker only.

This is a Python client: on a 2-core machine it takes CPU from the server under test, so compare
it with the Python REST client (bench.loadgen), not with wrk.

Run ``python -m bench.grpc_load HOST:PORT MODEL -c 64 -d 5`` for a one-off measurement (random
rows of the model's input shape and datatype, from ``ModelMetadata``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from bench.loadgen import LoadResult

GrpcCheck = Callable[[int, pb.ModelInferResponse], bool]
"""``check(i, response)``: whether the answer to message ``i % len(messages)`` is right."""

MAX_CHANNELS = 8
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


def infer_request(
    model: str, rows: np.ndarray, datatype: str, request_id: str = ""
) -> pb.ModelInferRequest:
    """A ``ModelInferRequest`` for ``rows`` (2-D) in ``raw_input_contents``, as tritonclient sends.

    ``datatype`` is the OIP name of ``rows``' dtype (``FP32``, ``FP64``, ...); the bytes are
    little-endian, one buffer for the one input ``input-0``.
    """
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="input-0", datatype=datatype, shape=list(rows.shape))
    raw = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<")).tobytes()
    request.raw_input_contents.append(raw)
    return request


async def run_grpc_load(
    target: str,
    messages: Sequence[pb.ModelInferRequest],
    *,
    concurrency: int,
    seconds: float,
    warmup_s: float = 1.0,
    channels: int | None = None,
    timeout_s: float = 10.0,
    check: GrpcCheck | None = None,
) -> LoadResult:
    """Load ``target`` (``host:port``) with ``ModelInfer`` calls for ``warmup_s + seconds``.

    A call counts when it *starts* inside the measured window; ``seconds`` of the result run
    from the window's start until the last such call has answered. Errors are counted by gRPC
    status code name (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ...; ``OK-wrong`` when ``check``
    rejects an answer).
    """
    n_channels = channels or min(concurrency, MAX_CHANNELS)
    chans = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(n_channels)]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10) for c in chans))
        calls = [pb_grpc.GRPCInferenceServiceStub(c).ModelInfer for c in chans]
        latencies: list[float] = []
        status: Counter[str] = Counter()
        counter = 0
        t_start = time.perf_counter() + warmup_s
        t_stop = t_start + seconds
        last_end = t_start

        async def caller(k: int) -> None:
            nonlocal counter, last_end
            call = calls[k % n_channels]
            while (t0 := time.perf_counter()) < t_stop:
                i = counter
                counter += 1
                try:
                    response = await call(messages[i % len(messages)], timeout=timeout_s)
                    code = "OK" if check is None or check(i, response) else "OK-wrong"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                t1 = time.perf_counter()
                if t0 >= t_start:  # warm-up calls are not recorded
                    latencies.append(t1 - t0)
                    status[code] += 1
                    last_end = max(last_end, t1)

        await asyncio.gather(*(caller(k) for k in range(concurrency)))
    finally:
        await asyncio.gather(*(c.close() for c in chans))

    return LoadResult.from_latencies(
        latencies,
        concurrency=concurrency,
        seconds=last_end - t_start,
        ok=status["OK"],
        status=dict(status),
    )


def measure_grpc(
    target: str, messages: Sequence[pb.ModelInferRequest], *, concurrency: int, seconds: float
) -> LoadResult:
    """:func:`run_grpc_load` with its 1 s warm-up, from synchronous code (its own event loop)."""
    return asyncio.run(run_grpc_load(target, messages, concurrency=concurrency, seconds=seconds))


H2LOAD_INSTALL_HINT = "h2load not found: apt-get install -y nghttp2-client"


def h2load_path() -> str | None:
    return shutil.which("h2load")


def h2load_version() -> str | None:
    path = h2load_path()
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    return out.splitlines()[0] if out else "h2load"


def grpc_frame(message: pb.ModelInferRequest) -> bytes:
    """``message`` as a gRPC request body: uncompressed flag, 4-byte big-endian length, bytes."""
    raw = message.SerializeToString()
    return b"\0" + struct.pack(">I", len(raw)) + raw


def run_h2load(
    target: str,
    message: pb.ModelInferRequest,
    *,
    concurrency: int,
    seconds: float,
    warmup_s: float = 1.0,
    timeout_s: float = 10.0,
) -> LoadResult:
    """Load ``target`` with unary ``ModelInfer`` calls from h2load (nghttp2's C HTTP/2 client).

    A Python gRPC client needs ~250 us of CPU per call here, a quarter of a core at 1,000 calls/s,
    taken from the server under test on a 2-core machine; h2load needs a few microseconds, as wrk
    does for REST. ``concurrency`` streams are spread over ``min(concurrency, 8)`` connections
    (the router's workers share the port with SO_REUSEPORT and the kernel spreads connections).
    Every call sends ``message``.

    h2load speaks HTTP/2, not gRPC: it sees the HTTP status (200 even for a failed call) but not
    the ``grpc-status`` trailer, so ``errors`` here counts only transport-level failures. Callers
    must check the server's own failure counters around the run (bench.studies.peers does).
    """
    path = h2load_path()
    if path is None:
        raise RuntimeError(H2LOAD_INSTALL_HINT)
    conns = min(concurrency, MAX_CHANNELS)
    streams = -(-concurrency // conns)
    with tempfile.TemporaryDirectory(prefix="servery-h2load-") as tmp:
        body, log = Path(tmp) / "body.bin", Path(tmp) / "requests.log"
        body.write_bytes(grpc_frame(message))
        cmd = [
            path,
            "-t1",
            f"-c{conns}",
            f"-m{streams}",
            f"-D{max(1, round(seconds))}",
            f"--warm-up-time={max(0, round(warmup_s))}",
            f"-T{round(timeout_s)}",
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"--log-file={log}",
            f"http://{target}/inference.GRPCInferenceService/ModelInfer",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"h2load failed ({proc.returncode}): {proc.stderr or proc.stdout}")
        # one line per measured request: start (us since epoch), HTTP status, duration (us)
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    return parse_h2load(proc.stdout, rows, concurrency)


def parse_h2load(stdout: str, rows: list[list[str]], concurrency: int) -> LoadResult:
    """h2load's summary (duration, failures) and per-request log (latencies) as a LoadResult."""
    finished = re.search(r"finished in ([0-9.]+)(m?s)", stdout)
    counts = re.search(
        r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        stdout,
    )
    if finished is None or counts is None:
        raise RuntimeError(f"cannot parse h2load output:\n{stdout}")
    status: Counter[str] = Counter(r[1] for r in rows)
    latencies = [int(r[2]) / 1e6 for r in rows]  # µs in the log
    # the measured window: first start to last end in the log (h2load's "finished in" includes
    # the warm-up)
    starts = [int(r[0]) / 1e6 for r in rows]
    ends = [s + d for s, d in zip(starts, latencies, strict=True)]
    elapsed = max(ends) - min(starts) if rows else 0.0
    for key, n in (("failed", counts[4]), ("errored", counts[5]), ("timeout", counts[6])):
        if int(n):
            status[f"h2load-{key}"] = int(n)
    return LoadResult.from_latencies(
        latencies,
        concurrency=concurrency,
        seconds=elapsed,
        ok=status.get("200", 0),
        status=dict(status),
    )


def main(argv: Sequence[str] | None = None) -> None:
    from services.protocols.oip.core import NUMERIC_DTYPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="host:port of the OIP gRPC server")
    p.add_argument("model")
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("-d", "--duration", type=float, default=5.0, help="seconds after warm-up")
    args = p.parse_args(argv)
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=args.model), timeout=10)
    tensor = meta.inputs[0]
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(64, tensor.shape[-1])).astype(NUMERIC_DTYPES[tensor.datatype])
    messages = [infer_request(args.model, rows[i : i + 1], tensor.datatype) for i in range(64)]
    result = measure_grpc(
        args.target, messages, concurrency=args.concurrency, seconds=args.duration
    )
    print(result.line())
    print(result.status)


if __name__ == "__main__":
    main()
