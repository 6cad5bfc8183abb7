"""``servery bench``'s GPU memory figures against a real GPU and the real ``nvidia-smi``.

The unit tests (tests/unit/test_bench_cli.py) feed :func:`bench.llm_stream.sample_gpu` a fake
``nvidia-smi``; this one checks that the real tool's output parses and that memory taken during a
load shows up in the peak. Skipped where there is no NVIDIA GPU (CI has none). On a GPU machine
without the project's serving dependencies, ``python -m pytest --noconftest
tests/integration/test_gpu_memory.py`` runs it alone (2026-11-27, one H200, torch 2.11.0+cu130:
2 passed; a 2 GiB block gave before 4 MiB, peak 2,667 MiB, after 619 MiB, the CUDA context).

``nvidia-smi`` lists every GPU of the machine, torch only those ``CUDA_VISIBLE_DEVICES`` shows
(a container or a job scheduler may show fewer, renumbered from 0): cuda:0 is found in
``nvidia-smi``'s list by UUID, never assumed to be its index 0.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
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


def smi_uuids() -> list[str]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def physical_index(device: int = 0) -> int:
    """``nvidia-smi``'s index of torch's cuda:<device> (matched by UUID)."""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    (index,) = [i for i, u in enumerate(smi_uuids()) if uuid in u]
    return index


def test_nvidia_smi_reports_every_gpu() -> None:
    used = gpu_memory_mib()
    assert used is not None and len(used) == len(smi_uuids())
    assert len(used) >= torch.cuda.device_count()  # CUDA_VISIBLE_DEVICES may hide some
    assert all(mib >= 0 for mib in used)
    assert 0 <= physical_index() < len(used)


def test_peak_covers_memory_taken_during_the_load() -> None:
    async def load() -> int:
        return await asyncio.to_thread(hold_gpu_memory, HOLD_MIB, 3.0)

    taken, gpu = asyncio.run(sample_gpu(load(), interval_s=0.5))
    assert taken == HOLD_MIB * 2**20
    assert gpu is not None
    i = physical_index()  # cuda:0 need not be nvidia-smi's GPU 0
    # the CUDA context adds a few hundred MiB on top of the block
    assert gpu["peak"][i] - gpu["before"][i] >= HOLD_MIB
    assert gpu["after"][i] < gpu["peak"][i]  # freed once the load ended
