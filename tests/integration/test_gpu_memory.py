"""``servery bench``'s GPU memory figures against a real GPU and the real ``nvidia-smi``.

The unit tests (tests/unit/test_bench_cli.py) feed :func:`bench.llm_stream.sample_gpu` a fake
``nvidia-smi``; this one checks that the real tool's output parses and that memory taken during a
load shows up in the peak. Skipped where there is no NVIDIA GPU (CI has none). On a GPU machine
without the project's serving dependencies, ``python -m pytest --noconftest
tests/integration/test_gpu_memory.py`` runs it alone (2026-11-27, one H200, torch 2.11.0+cu130:
2 passed; a 2 GiB block gave before 4 MiB, peak 2,667 MiB, after 619 MiB, the CUDA context).
"""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from bench.llm_stream import gpu_memory_mib, sample_gpu

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        shutil.which("nvidia-smi") is None or not torch.cuda.is_available(),
        reason="needs an NVIDIA GPU with nvidia-smi and a CUDA build of torch",
    ),
]

HOLD_MIB = 2048


def hold_gpu_memory(mib: int, seconds: float) -> int:
    """Take ``mib`` MiB on GPU 0 for ``seconds``, then give it back; returns the bytes taken."""
    block = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda:0")
    block.fill_(1)  # touch it: the allocation is real, not only reserved address space
    torch.cuda.synchronize()
    size = block.numel()
    time.sleep(seconds)  # hold it while the sampler reads nvidia-smi
    del block
    torch.cuda.empty_cache()
    return size


def test_nvidia_smi_reports_every_gpu() -> None:
    used = gpu_memory_mib()
    assert used is not None and len(used) == torch.cuda.device_count()
    assert all(mib >= 0 for mib in used)


def test_peak_covers_memory_taken_during_the_load() -> None:
    async def load() -> int:
        return await asyncio.to_thread(hold_gpu_memory, HOLD_MIB, 3.0)

    taken, gpu = asyncio.run(sample_gpu(load(), interval_s=0.5))
    assert taken == HOLD_MIB * 2**20
    assert gpu is not None
    # the CUDA context adds a few hundred MiB on top of the block
    assert gpu["peak"][0] - gpu["before"][0] >= HOLD_MIB
    assert gpu["after"][0] < gpu["peak"][0]  # freed once the load ended
