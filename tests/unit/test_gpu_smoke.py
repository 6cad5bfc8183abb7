"""bench/gpu_smoke.py's checks that need no GPU: driver versions, NCCL wheels, vLLM's log line,
and that --torch-only on a machine without nvidia-smi fails loudly instead of passing."""

from __future__ import annotations

import shutil

import pytest

from bench.gpu_smoke import driver_ok, logged_kv_gib, main, nccl_wheels


@pytest.mark.parametrize(
    ("version", "ok"),
    [("575.57.08", False), ("580.65.05", False), ("580.65.06", True), ("580.82.07", True)],
)
def test_driver_minimum(version: str, ok: bool) -> None:
    assert driver_ok(version) is ok


def test_nccl_wheels_and_this_venv() -> None:
    assert nccl_wheels(["nvidia-nccl-cu12", "torch", "nvidia-nccl-cu13", "nccl4py"]) == [
        "nvidia-nccl-cu12",
        "nvidia-nccl-cu13",
    ]
    assert len(nccl_wheels()) <= 1  # the CPU venv: none, or torch's one


def test_vllm_kv_cache_log_lines() -> None:
    log = (
        "INFO 12-07 [gpu_worker.py:760] Available KV cache memory: 55.42 GiB\n"
        "INFO ... Maximum concurrency for 131,072 tokens per request: 3.46x\n"
        "(EngineCore) INFO Available KV cache memory: 12.5 GiB\n"
    )
    assert logged_kv_gib(log) == [55.42, 12.5]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine")
def test_torch_only_without_a_gpu_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--torch-only"]) == 1
    assert "FAIL  nvidia-smi on PATH" in capsys.readouterr().out
