"""services/compat/vllm_cpu_lora_ops.py inside a real vLLM engine (CPU, the tiny LLM, random
rank-8 adapters): the model worker, a process vLLM spawns, runs servery's LoRA ops once
``servery_lora_ops`` is called in it (as services/llm/service.py does), and greedy outputs are
the same token for token as with vLLM's own ops, in the same engine.

Batches: all prompts on one adapter, two adapters mixed (``max_loras: 2``, both loaded, so the
slots do not move), and the base model alone. With servery's ops, base requests batched with
adapter requests answer as the base model alone does (vLLM 0.32's own ops apply the last slot's
adapter to them, index -1, vllm-project/vllm#48421, so that batch is not compared with them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.harness.server import ROOT

pytest.importorskip("vllm")

SCRIPT = r"""
import json, sys
from pathlib import Path
from training.tiny_llm import build
from training.lora import random_adapter
from services.compat import vllm_cpu_lora_ops as fix
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

root = Path(sys.argv[1])
build(root / "tiny")
loras = [LoRARequest(f"a{i}", i + 1, str(random_adapter(root / "tiny", root / f"a{i}", seed=i + 1)))
         for i in range(2)]
llm = LLM(model=str(root / "tiny"), enable_lora=True, max_loras=2, max_lora_rank=8,
          max_model_len=512, worker_extension_cls=fix.EXTENSION, kv_cache_memory_bytes=1 << 28)
greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
prompts = [f"The capital of France is {i} " * (1 + 20 * (i % 3)) for i in range(8)]

def outputs(beside=False):
    batches = {"one adapter": loras[0], "two adapters": [loras[i % 2] for i in range(8)],
               "base": None}
    if beside:  # base requests in even places, the last slot's adapter in odd ones
        batches["base beside an adapter"] = [None if i % 2 == 0 else loras[1] for i in range(8)]
    return {name: [list(o.outputs[0].token_ids)
                   for o in llm.generate(prompts, greedy, lora_request=lora, use_tqdm=False)]
            for name, lora in batches.items()}

vllms = outputs()
first = llm.collective_rpc("servery_lora_ops")
servery = outputs(beside=True)
second = llm.collective_rpc("servery_lora_ops")
print("RESULT " + json.dumps({"vllm": vllms, "servery": servery, "first": first,
                              "second": second}))
"""


def test_the_model_worker_runs_servery_s_ops_with_the_same_greedy_outputs(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SERVERY_VLLM_CPU_LORA_OPS"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    (first,), (second,) = result["first"], result["second"]
    # the worker is another process, and servery's ops are what PunicaWrapperCPU calls there
    assert first["pid"] != os.getpid() and first["pid"] == second["pid"]
    assert first["replaced"] and first["in_force"] and first["linear"]
    assert first["calls"] == first["linear_calls"] == 0
    # ... and what it ran for the second round of requests: the layers' fused products
    # (vllm_cpu_lora_linear), the version counters of the weights readable in the worker
    assert second["linear_calls"] > 0, second
    beside = result["servery"].pop("base beside an adapter")
    assert result["servery"] == result["vllm"]
    # a base request batched with adapter requests gets no adapter (vLLM's ops gave it a1's)
    assert beside[0::2] == result["servery"]["base"][0::2]
    assert beside[1::2] == result["servery"]["two adapters"][1::2]
    assert result["vllm"]["one adapter"] != result["vllm"]["base"]  # the adapter counts
