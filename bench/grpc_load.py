"""A closed-loop OIP V2 gRPC load generator (``grpc.aio``): C callers for a fixed time.

The gRPC counterpart of :func:`bench.wrk.measure`: ``concurrency`` callers each send one
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
import time
from collections import Counter
from collections.abc import Callable, Sequence

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

    ms = np.asarray(latencies or [0.0]) * 1000.0
    requests = len(latencies)
    elapsed = last_end - t_start
    return LoadResult(
        concurrency=concurrency,
        requests=requests,
        seconds=elapsed,
        ok=status["OK"],
        errors=requests - status["OK"],
        status=dict(status),
        rps=requests / elapsed if elapsed else 0.0,
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        p99_ms=float(np.percentile(ms, 99)),
        max_ms=float(ms.max()),
    )


def measure_grpc(
    target: str, messages: Sequence[pb.ModelInferRequest], *, concurrency: int, seconds: float
) -> LoadResult:
    """:func:`run_grpc_load` with its 1 s warm-up, from synchronous code (its own event loop)."""
    return asyncio.run(run_grpc_load(target, messages, concurrency=concurrency, seconds=seconds))


def main(argv: Sequence[str] | None = None) -> None:
    from services.oip import NUMERIC_DTYPES

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
