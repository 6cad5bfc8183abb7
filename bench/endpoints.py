"""What ``servery bench`` sends to each endpoint, how it checks the answers, and the load loop.

* :func:`prepare` asks the server for the model's metadata (so an unreachable server or an unknown
  model fails before any load, as a :class:`BenchError`) and builds the request bodies: random rows
  of the model's width and dtype (fixed seed), or the bodies of a file.
* :func:`http_sender` and :func:`grpc_sender` give ``send(i)``: send body ``i`` round-robin, check
  the answer (one result per row sent; a complete SSE stream for OpenAI) and return an
  :data:`Outcome`; transport failures become a status key, never an exception.
* :func:`drive` runs a closed loop of C clients over ``send`` for N requests or S seconds.

Heavy imports (numpy, aiohttp, grpc) stay inside functions, so ``servery --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.llm_stream import SSEParser, StreamStats, llm_summary, sample_gpu

BODY_POOL = 64  # distinct generated bodies, sent round-robin

Outcome = tuple[bool, str, Any]
"""One request's result: (answer is right, status key for the error counts, endpoint extra)."""
Send = Callable[[int], Awaitable[Outcome]]


class BenchError(Exception):
    """A mistake the user can fix (unreachable URL, unknown model, bad body file): exit 2."""


@dataclass
class Target:
    """What a run sends: the request URL (``host:port`` for gRPC), bodies, rows each must answer."""

    endpoint: str
    url: str
    bodies: list[Any]  # bytes for HTTP, ModelInferRequest for gRPC
    rows: list[int]


# --- request bodies ---------------------------------------------------------------------------


def np_dtype(datatype: str) -> Any:
    """The numpy dtype of an OIP datatype name (``FP32`` -> float32, ``INT64`` -> int64)."""
    import numpy as np

    name = datatype.lower()
    try:
        dtype = np.dtype("float" + name[2:] if name.startswith("fp") else name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf":  # BYTES: no meaningful random rows
        raise BenchError(f"cannot generate rows of datatype {datatype}: use --body")
    return dtype


def random_rows(n_rows: int, n_features: int, dtype: Any) -> Any:
    """``n_rows`` x ``n_features`` random values of ``dtype``, the same on every run."""
    import numpy as np

    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=(n_rows, n_features)).astype(dtype)
    return rng.integers(0, 16, size=(n_rows, n_features)).astype(dtype)


def _row_blocks(args: argparse.Namespace, width: int, dtype: Any) -> list[Any]:
    """``BODY_POOL`` arrays of ``--rows-per-request`` random rows each."""
    r = args.rows_per_request
    data = random_rows(BODY_POOL * r, width, dtype)
    return [data[i * r : (i + 1) * r] for i in range(BODY_POOL)]


def prepare(args: argparse.Namespace) -> Target:
    """Check that the server answers and knows the model, and build the request bodies."""
    base = args.url.rstrip("/")
    given = _load_bodies(args.body) if args.body else None
    if args.endpoint == "oip-grpc":
        return _prepare_grpc(args, base.split("://", 1)[-1], given)
    if "://" not in base:
        raise BenchError(f"--url {args.url!r}: expected http://host:port")
    if args.endpoint == "openai":
        return _prepare_openai(args, base.removesuffix("/v1"), given)
    rest = args.endpoint == "rest"
    meta_url = f"{base}/models/{args.model}" if rest else f"{base}/v2/models/{args.model}"
    meta = get_json(meta_url, args.model)
    try:
        if rest:
            width, dtype = meta["input_schema"]["n_features"], meta["input_schema"]["dtype"]
        else:
            width, dtype = meta["inputs"][0]["shape"][-1], np_dtype(meta["inputs"][0]["datatype"])
    except (KeyError, IndexError, TypeError) as e:
        raise BenchError(f"{meta_url} does not describe the model's input: {meta}") from e
    if given is None:
        given = [_body(args.endpoint, args.model, x) for x in _row_blocks(args, width, dtype)]
    if rest:
        url, rows = f"{base}/predict", [_rest_rows(b) for b in given]
    else:
        url, rows = f"{base}/v2/models/{args.model}/infer", [_oip_rows(b) for b in given]
    return Target(args.endpoint, url, [json.dumps(b).encode() for b in given], rows)


def _body(endpoint: str, model: str, rows: Any) -> dict[str, Any]:
    if endpoint == "rest":
        return {"model": model, "inputs": rows.tolist()}
    datatype = {"f": "FP", "i": "INT", "u": "UINT"}[rows.dtype.kind] + str(rows.dtype.itemsize * 8)
    tensor = {"name": "input-0", "shape": list(rows.shape), "datatype": datatype}
    return {"inputs": [{**tensor, "data": rows.ravel().tolist()}]}


def _rest_rows(body: Any) -> int:
    if not isinstance(body.get("inputs"), list):
        raise BenchError("each /predict body needs 'inputs': a list of rows")
    return len(body["inputs"])


def _oip_rows(body: Any) -> int:
    try:
        return int(body["inputs"][0]["shape"][0])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise BenchError("each OIP body needs inputs[0].shape ([rows, features])") from e


def _load_bodies(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot read request bodies from {path}: {e}") from e
    bodies = data if isinstance(data, list) else [data]
    if not bodies or not all(isinstance(b, dict) for b in bodies):
        raise BenchError(f"{path} must hold one JSON object (a request body) or a list of them")
    return bodies


def _prepare_grpc(args: argparse.Namespace, target: str, given: list[Any] | None) -> Target:
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    from bench.grpc_load import infer_request

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=args.model), timeout=10)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise BenchError(f"model '{args.model}' not found at {target}") from e
            raise BenchError(f"cannot reach gRPC server {target}: {e.code().name}") from e
    if given is None:
        tensor = meta.inputs[0]
        blocks = _row_blocks(args, tensor.shape[-1], np_dtype(tensor.datatype))
        messages = [infer_request(args.model, x, tensor.datatype) for x in blocks]
    else:
        messages = []
        for body in given:
            _oip_rows(body)
            t = body["inputs"][0]
            x = np.asarray(t["data"], dtype=np_dtype(t["datatype"])).reshape(t["shape"])
            messages.append(infer_request(args.model, x, t["datatype"]))
    return Target("oip-grpc", target, messages, [int(m.inputs[0].shape[0]) for m in messages])


def _prepare_openai(args: argparse.Namespace, base: str, given: list[Any] | None) -> Target:
    listed = get_json(f"{base}/v1/models", args.model).get("data") or []
    if args.model not in {m.get("id") for m in listed}:
        raise BenchError(f"model '{args.model}' not found at {base}/v1/models")
    prompt = [{"role": "user", "content": args.prompt}]
    default = {"model": args.model, "messages": prompt, "max_tokens": args.max_tokens}
    bodies = []
    for body in given or [default]:
        usage = {**body.get("stream_options", {}), "include_usage": True}
        bodies.append(json.dumps({**body, "stream": True, "stream_options": usage}).encode())
    return Target("openai", f"{base}/v1/chat/completions", bodies, [1] * len(bodies))


def get_json(url: str, model: str) -> dict[str, Any]:
    """GET ``url``; a 404 means the model is unknown, no answer means the server is unreachable."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:200]
        if e.code == 404:
            raise BenchError(f"model '{model}' not found at {url} (404: {detail})") from e
        raise BenchError(f"GET {url} answered {e.code}: {detail}") from e
    except (urllib.error.URLError, OSError) as e:
        raise BenchError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from e
    except ValueError as e:  # a malformed URL, or an answer that is not JSON
        raise BenchError(f"GET {url}: {e}") from e


# --- answer checks ----------------------------------------------------------------------------


def check_rest(payload: bytes, rows: int) -> bool:
    """A ``/predict`` answer with one prediction and one probability row per row sent."""
    try:
        body = json.loads(payload)
        return len(body["predictions"]) == rows and len(body["probabilities"]) == rows
    except (ValueError, KeyError, TypeError):
        return False


def check_oip_rest(payload: bytes, rows: int) -> bool:
    """An OIP infer answer whose every output has ``rows`` rows (and the data to fill them)."""
    try:
        outputs = json.loads(payload)["outputs"]
        for out in outputs:
            size = 1
            for dim in out["shape"]:
                size *= dim
            if out["shape"][0] != rows or ("data" in out and len(out["data"]) != size):
                return False
        return bool(outputs)
    except (ValueError, KeyError, TypeError, IndexError):
        return False


def check_grpc(response: Any, rows: int) -> bool:
    """A ``ModelInferResponse`` whose every output has ``rows`` rows."""
    outputs = response.outputs
    return bool(outputs) and all(len(o.shape) > 0 and o.shape[0] == rows for o in outputs)


# --- load -------------------------------------------------------------------------------------


@asynccontextmanager
async def http_sender(target: Target, concurrency: int, timeout_s: float) -> AsyncIterator[Send]:
    """``send(i)`` POSTs body ``i`` (round-robin) over one keep-alive connection per client."""
    import aiohttp

    check = check_rest if target.endpoint == "rest" else check_oip_rest
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as s:

        async def send(i: int) -> Outcome:
            k = i % len(target.bodies)
            t0 = time.perf_counter()
            try:
                async with s.post(target.url, data=target.bodies[k]) as resp:
                    if resp.status != 200:
                        await resp.read()
                        return False, str(resp.status), None
                    if target.endpoint == "openai":
                        return await read_stream(resp.content.iter_any(), t0)
                    good = check(await resp.read(), target.rows[k])
            except (TimeoutError, aiohttp.ClientError) as e:
                return False, type(e).__name__, None
            return good, "200" if good else "200-wrong", None

        yield send


async def read_stream(
    chunks: AsyncIterator[bytes], t0: float, clock: Callable[[], float] = time.perf_counter
) -> Outcome:
    """Read an SSE chat-completion stream (``t0``: when it was sent, on ``clock``)."""
    parser, stats = SSEParser(), StreamStats(t0)
    async for chunk in chunks:
        now = clock()
        for data in parser.feed(chunk):
            stats.on_data(data, now)
    for data in parser.finish():
        stats.on_data(data, clock())
    status = stats.failure()
    return status is None, status or "200", stats


@asynccontextmanager
async def grpc_sender(target: Target, concurrency: int, timeout_s: float) -> AsyncIterator[Send]:
    """``send(i)`` calls ``ModelInfer`` with message ``i`` over one of ``min(C, 8)`` channels."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    from bench.grpc_load import CHANNEL_OPTIONS, MAX_CHANNELS

    n = min(concurrency, MAX_CHANNELS)
    chans = [grpc.aio.insecure_channel(target.url, options=CHANNEL_OPTIONS) for _ in range(n)]
    try:
        try:
            await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10) for c in chans))
        except TimeoutError as e:
            raise BenchError(f"cannot reach gRPC server {target.url}") from e
        calls = [pb_grpc.GRPCInferenceServiceStub(c).ModelInfer for c in chans]

        async def send(i: int) -> Outcome:
            k = i % len(target.bodies)
            try:
                response = await calls[i % n](target.bodies[k], timeout=timeout_s)
            except grpc.aio.AioRpcError as e:
                return False, e.code().name, None
            good = check_grpc(response, target.rows[k])
            return good, "OK" if good else "OK-wrong", None

        yield send
    finally:
        await asyncio.gather(*(c.close() for c in chans))


async def drive(
    send: Send,
    *,
    concurrency: int,
    requests: int | None = None,
    seconds: float | None = None,
    progress: Any | None = None,
) -> tuple[Any, list[Any]]:
    """A closed loop of ``concurrency`` clients for ``requests`` calls or ``seconds``;
    ``progress`` (a tqdm bar, models/progress.py) counts the answers.

    Returns a :class:`bench.loadgen.LoadResult` and the extras of the good answers. In duration
    mode a call counts when it starts inside the window, and the window ends when the last such
    call has answered.
    """

    from bench.loadgen import LoadResult

    latencies: list[float] = []
    status: Counter[str] = Counter()
    extras: list[Any] = []
    started = 0
    t_start = time.perf_counter()
    t_stop = t_start + seconds if seconds is not None else float("inf")

    async def client() -> None:
        nonlocal started
        while (started < requests) if requests is not None else (time.perf_counter() < t_stop):
            i, started = started, started + 1
            t0 = time.perf_counter()
            good, code, extra = await send(i)
            latencies.append(time.perf_counter() - t0)
            status[code] += 1
            if good:
                extras.append(extra)
            if progress is not None:
                progress.update(1)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t_start
    result = LoadResult.from_latencies(
        latencies, concurrency=concurrency, seconds=elapsed, ok=len(extras), status=dict(status)
    )
    return result, extras


async def run_levels(target: Target, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One record per concurrency level, each in a fresh client (connections, warm-up); a
    progress bar per level on a terminal's stderr (unless ``--no-progress``)."""
    from models.progress import bar

    sender = grpc_sender if target.endpoint == "oip-grpc" else http_sender
    records = []
    for c in args.concurrency:
        async with sender(target, c, args.timeout) as send:
            if args.warmup > 0:
                await drive(send, concurrency=min(c, args.warmup), requests=args.warmup)
            total = args.requests if args.duration is None else None
            desc = f"c={c}" if total else f"c={c}, {args.duration:g} s"
            off = getattr(args, "no_progress", False)
            with bar(total=total, unit="req", desc=desc, off=off) as answered:
                load = drive(
                    send,
                    concurrency=c,
                    requests=args.requests,
                    seconds=args.duration,
                    progress=answered,
                )
                (result, extras), gpu = await sample_gpu(load)
        record = {**result.as_dict(), "gpu_memory_mib": gpu}
        if target.endpoint == "openai":
            record["llm"] = llm_summary(extras, result.seconds)
        print(result.line(), file=sys.stderr, flush=True)
        records.append(record)
    return records
