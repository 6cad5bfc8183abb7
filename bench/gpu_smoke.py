"""GPU smoke check (issue 25): does the GPU build run vLLM on this machine, in under 10 minutes?

    python -m bench.gpu_smoke               # everything: needs the GPU lock (make BUILD=gpu)
    python -m bench.gpu_smoke --torch-only  # a GPU host without vLLM: driver, CUDA, NCCL, memory

Steps, each printed as ``ok`` / ``FAIL`` with its numbers (exit 1 if any failed):

1. driver and CUDA: ``nvidia-smi``'s driver version against the CUDA 13 wheels' minimum
   (580.65.06); torch's CUDA build, the GPUs it sees (``CUDA_VISIBLE_DEVICES`` may hide some that
   ``nvidia-smi`` lists); one NCCL wheel installed and torch's NCCL version.
2. memory: a 1 GiB block on cuda:0 shows up in ``nvidia-smi`` for that physical GPU.
3. (not ``--torch-only``) the LLM service alone (``services.llm.service:LLM``) with SmolLM2 from
   the store on one GPU: ``/v1/models``; a streamed chat with usage; a completion with
   ``top_p``/``top_k`` (vLLM's sampler path, FlashInfer's off: ``VLLM_USE_FLASHINFER_SAMPLER=0``);
   vLLM's ``vllm:*`` metrics; the log's ``Available KV cache memory`` against
   :mod:`models.llm_memory`'s estimate for the same knobs.
4. (not ``--torch-only``) two SmolLM2 engines sharing GPU 0 at 0.4 each, both answering.

Needs ``make models-llm`` (SmolLM2 in the store). The numbers go into docs/gpu.md by hand.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIN_DRIVER = (580, 65, 6)
"""The oldest driver the CUDA 13 wheels (torch 2.13, vLLM 0.32) run on."""
KV_LOG = re.compile(r"Available KV cache memory: ([0-9.]+) GiB")


def driver_ok(version: str) -> bool:
    """Whether an ``nvidia-smi`` driver version (``580.65.06``) is at least :data:`MIN_DRIVER`."""
    parts = tuple(int(p) for p in version.strip().split("."))
    return parts >= MIN_DRIVER


def nccl_wheels(names: list[str] | None = None) -> list[str]:
    """The installed NCCL library wheels (``nvidia-nccl-cu12``, ``-cu13``, ...)."""
    if names is None:
        names = [d.metadata["Name"] or "" for d in importlib.metadata.distributions()]
    return sorted({n.lower() for n in names if n.lower().startswith("nvidia-nccl")})


def logged_kv_gib(log: str) -> list[float]:
    """Every ``Available KV cache memory: X GiB`` vLLM logged, in order (one per engine)."""
    return [float(x) for x in KV_LOG.findall(log)]


def smi(*fields: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, ok: bool, what: str, detail: Any = "") -> bool:
        self.failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {what}{f': {detail}' if detail != '' else ''}")
        return ok


def torch_checks(report: Report) -> None:
    if shutil.which("nvidia-smi") is None:
        report(False, "nvidia-smi on PATH")
        return
    rows = smi("index", "uuid", "name", "driver_version", "memory.total")
    for index, _uuid, name, driver, total in rows:
        report(
            driver_ok(driver), f"GPU {index} {name} driver {driver} >= 580.65.06", total + " MiB"
        )
    wheels = nccl_wheels()
    report(len(wheels) == 1, "one NCCL wheel", wheels)
    import torch

    report(torch.cuda.is_available(), f"torch {torch.__version__} CUDA {torch.version.cuda}")
    if not torch.cuda.is_available():
        return
    seen = torch.cuda.device_count()
    report(
        seen <= len(rows),
        f"torch sees {seen} of nvidia-smi's {len(rows)} GPUs",
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}",
    )
    report(True, "NCCL", ".".join(map(str, torch.cuda.nccl.version())))
    uuid0 = str(torch.cuda.get_device_properties(0).uuid)
    physical = next((i for i, (_, u, *_) in enumerate(rows) if uuid0 in u), None)
    if not report(physical is not None, "cuda:0 found in nvidia-smi by UUID", uuid0):
        return

    def used() -> int:
        return int(smi("memory.used")[physical][0])

    before = used()
    block = torch.ones(2**30, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    during = used()
    del block
    report(during - before >= 1024, "a 1 GiB block shows in nvidia-smi", f"+{during - before} MiB")


def start_llm(home: Path, workdir: Path, models: list[dict[str, Any]], timeout: float):
    from bench.harness.server import start_server

    config = workdir / "llm.yaml"
    config.write_text(json.dumps({"models": models}))
    env = {
        "SERVERY_LLM_ENABLED": "true",
        "SERVERY_LLM_GPUS": "1",
        "SERVERY_LLM_MODELS_FILE": str(config),
        "VLLM_USE_FLASHINFER_SAMPLER": "0",
        "HF_HUB_OFFLINE": "1",
    }
    return start_server(
        home, None, workdir, env=env, target="services.llm.service:LLM", ready_timeout=timeout
    )


def vllm_checks(report: Report, home: Path, tag: str) -> None:
    import httpx
    import torch

    from models.llm_config import EngineKnobs, LLMEntry, resolve, store_lookup
    from models.llm_memory import estimate

    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    knobs = {"name": "smollm2", "tag": tag, "max_model_len": 2048, "max_num_seqs": 64}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        server = start_llm(home, Path(tmp) / "one", [{**knobs, "gpu_memory_utilization": 0.5}], 300)
        try:
            report(True, "LLM service ready", f"{time.monotonic() - started:.0f} s")
            models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
            report([m["id"] for m in models["data"]] == ["smollm2"], "/v1/models", models["data"])
            chat = {
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 16,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            usage = None
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=chat) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage") or usage
            report(bool(usage and usage["completion_tokens"] > 0), "streamed chat, usage", usage)
            body = {"model": "smollm2", "prompt": "Paris is", "max_tokens": 8}
            done = httpx.post(
                f"{server.url}/v1/completions", json={**body, "top_p": 0.9, "top_k": 20}, timeout=60
            )
            report(done.status_code == 200, "completion with top_p/top_k", done.status_code)
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            report("vllm:num_requests_running" in metrics, "vllm:* metrics")
            logged = logged_kv_gib(server.log.read_text(errors="replace"))
            metadata, config = store_lookup(tag)
            entry = LLMEntry(**knobs, gpu_memory_utilization=0.5)
            est = estimate(
                resolve(entry, EngineKnobs()), metadata, config, gpu_memory_gib=total_gib
            )
            report(
                bool(logged),
                "vLLM's KV cache vs the estimate",
                f"logged {logged} GiB, estimated {est['kv_cache_gib']:.2f} GiB of "
                f"{est['budget_gib']:.2f} (total {total_gib:.2f} GiB)",
            )
        finally:
            server.stop()
        two = [
            {**knobs, "gpu_memory_utilization": 0.4},
            {**knobs, "name": "second", "gpu_memory_utilization": 0.4},
        ]
        server = start_llm(home, Path(tmp) / "two", two, 400)
        try:
            answers = [
                httpx.post(
                    f"{server.url}/v1/completions",
                    json={"model": name, "prompt": "Hi", "max_tokens": 4},
                    timeout=60,
                ).status_code
                for name in ("smollm2", "second")
            ]
            logged = logged_kv_gib(server.log.read_text(errors="replace"))
            report(answers == [200, 200], "two engines share GPU 0 at 0.4 each", logged)
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_smoke", description=__doc__)
    parser.add_argument("--torch-only", action="store_true", help="no vLLM: steps 1-2 only")
    parser.add_argument("--tag", default="smollm2:latest", help="the LLM to serve (store tag)")
    args = parser.parse_args(argv)
    report = Report()
    torch_checks(report)
    if not args.torch_only and not report.failed:
        from models.store import store_home

        vllm_checks(report, Path(store_home()), args.tag)
    print(f"{'FAILED' if report.failed else 'passed'}: {report.failed} check(s) failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
