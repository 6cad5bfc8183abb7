"""How much KV cache vLLM 0.32 will have for one engine, by vLLM's own accounting, without a GPU.

vLLM sizes its KV cache at start-up (``vllm/v1/worker/gpu_worker.py`` ``determine_available_memory``
and ``vllm/v1/worker/utils.py`` ``request_memory``), per GPU::

    budget   = gpu_memory_utilization x total memory of the GPU
    kv cache = budget - weights - activation peak - CUDA graph estimate - non-torch memory

and refuses to start unless the KV cache holds one ``max_model_len``-token sequence; the log then
says ``Available KV cache memory: X GiB`` and ``Maximum concurrency for N tokens per request: Y x``.
:func:`estimate` follows that, with these inputs (GiB = 2**30 bytes):

* **weights**: parameters x bytes per parameter / tensor_parallel_size. Bytes: float32 4 (but
  ``dtype: auto`` runs float32 models in 16 bits, as vLLM does), 16-bit 2, fp8 1, 4-bit (awq,
  gptq, mxfp4) 0.5, ignoring their unquantized embeddings and norms (a few %).
* **activation peak** of vLLM's profiling run, the larger of its two phases: one forward pass of
  ``max_num_batched_tokens`` tokens, ``tokens x (3 x intermediate_size / TP + 4 x hidden_size)``
  elements (the MLP's gate/up output and activation, the residual stream), and the dummy sampler
  step over ``min(max_num_seqs, tokens)`` rows of float32 logits, ``rows x vocab x 4 bytes x 3``
  (logits, probabilities, the sorted copy top-p/top-k takes). A model, not a measurement.
* **CUDA graphs** (none with ``enforce_eager``): vLLM captures one graph per capture size, in two
  modes (FULL for decode and PIECEWISE), sizes ``1, 2, 4, 8, 16, ... `` up to
  ``min(2 x max_num_seqs, 512)`` (``vllm/config/vllm.py``), and subtracts its profile of them
  (``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS``, on by default); counted here as
  :data:`GRAPH_BYTES_PER_LAYER` per graph and layer. A model, not a measurement.
* **non-torch memory** (:data:`NON_TORCH_GIB`): cuBLAS/cuDNN workspaces and, with tensor
  parallelism, NCCL's buffers, grown after vLLM's first memory snapshot. The CUDA context itself
  (~0.5 GiB) is taken before that snapshot: it lies outside the budget.
* **KV per token** on one GPU: 2 (K, V) x layers x KV heads per GPU x head_dim x bytes, KV heads
  per GPU = max(1, KV heads // TP) (vLLM shards them, or replicates when there are fewer than TP);
  bytes: the activation dtype's, 1 with ``kv_cache_dtype: fp8`` (or ``fp8_e4m3`` / ``fp8_e5m2``).
* **Unset batch sizes** are vLLM's defaults for the OpenAI server on that GPU
  (:func:`vllm_batch_defaults`).

What is not modelled (said in the estimate's ``notes``): sliding-window attention is counted as
full attention, an upper bound on the cache a sequence needs (vLLM keeps only the window for
those layers, so it fits more); mixture-of-experts MLPs are sized by ``intermediate_size`` only.

``bench/gpu_smoke.py`` compares these numbers with vLLM's log on a real GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.llm_config import EngineKnobs

GIB = 2**30
H100_GIB = 81_559 / 1024
"""An H100 80GB's memory as the driver reports it (nvidia-smi: 81,559 MiB = 79.6 GiB)."""

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
QUANT_BYTES: dict[str, float] = {
    "fp8": 1.0,
    "fbgemm_fp8": 1.0,
    "awq": 0.5,
    "awq_marlin": 0.5,
    "gptq": 0.5,
    "gptq_marlin": 0.5,
    "mxfp4": 0.5,
}
"""Bytes per weight of the vLLM quantization methods (``--quantization`` names) sized here."""


class SizingError(ValueError):
    """The stored model lacks what the estimate needs (parameter count, shapes, a known dtype)."""


NON_TORCH_GIB = {"single": 0.25, "tensor_parallel": 0.75}
"""Memory outside torch's allocator grown during start-up, per GPU (see the module doc)."""
GRAPH_BYTES_PER_LAYER = 128 * 2**10
"""CUDA graph memory per captured graph and decoder layer (see the module doc)."""
SAMPLER_COPIES = 3
FORWARD_MLP_FACTOR = 3
FORWARD_HIDDEN_FACTOR = 4


def vllm_batch_defaults(memory_gib: float | None) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) vLLM 0.32's OpenAI server picks for a GPU of
    ``memory_gib`` (``EngineArgs.get_batch_defaults``): >= 160 GiB 1024 / 16384; >= 70 GiB
    1024 / 8192 (except A100s, which get the small ones); else 256 / 2048."""
    if memory_gib is not None and memory_gib >= 160:
        return 1024, 16384
    if memory_gib is not None and memory_gib >= 70:
        return 1024, 8192
    return 256, 2048


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """vLLM 0.32's default CUDA graph capture sizes (``vllm/config/vllm.py``, non-Blackwell)."""
    largest = min(max_num_seqs * 2, 512, max_num_batched_tokens)
    sizes = [i for i in (1, 2, 4) if i <= largest]
    if largest >= 8:
        sizes += list(range(8, min(largest + 1, 256), 8))
    if largest >= 256:
        sizes += list(range(256, largest + 1, 16))
    return sorted(set(sizes))


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    # Multimodal configs nest the language model's sizes under text_config.
    return config.get("text_config") or config


def resolve_dtype(knobs: EngineKnobs, metadata: Mapping[str, Any], config: Mapping[str, Any]):
    """The activation dtype vLLM will use (``auto``: the model's, float32 run in 16 bits)."""
    if knobs.dtype and knobs.dtype != "auto":
        return {"float": "float32", "half": "float16"}.get(knobs.dtype, knobs.dtype)
    model_dtype = str(
        config.get("torch_dtype") or config.get("dtype") or metadata.get("torch_dtype") or ""
    )
    return "bfloat16" if model_dtype == "bfloat16" else "float16"


def resolve_quantization(
    knobs: EngineKnobs, metadata: Mapping[str, Any], config: Mapping[str, Any]
) -> str | None:
    """The quantization vLLM will use: the knob's, else the store's, else ``config.json``'s."""
    if knobs.quantization:
        return knobs.quantization
    stored = str(metadata.get("quantization") or "none")
    if stored != "none":
        return stored
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") if isinstance(qc, Mapping) else None


def estimate(
    knobs: EngineKnobs,
    metadata: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    gpu_memory_gib: float | None = None,
) -> dict[str, Any]:
    """One engine's memory per GPU, from resolved ``knobs`` (:func:`models.llm_config.resolve`),
    store ``metadata`` and ``config.json``. Without ``gpu_memory_gib`` (a CPU deployment) only the
    weights and the KV cache per token and per sequence are sized."""
    text = _text_config(config)
    parameters = int(metadata.get("parameters") or 0)
    if parameters <= 0:
        raise SizingError("the store metadata has no parameter count")
    dtype = resolve_dtype(knobs, metadata, config)
    quantization = resolve_quantization(knobs, metadata, config)
    if quantization and quantization not in QUANT_BYTES:
        raise SizingError(
            f"cannot size quantization {quantization!r}; known: {', '.join(QUANT_BYTES)}"
        )
    act_bytes = DTYPE_BYTES[dtype]
    param_bytes = QUANT_BYTES[quantization] if quantization else act_bytes
    tp = knobs.tensor_parallel_size or 1
    weights = parameters * param_bytes / tp

    layers = int(text.get("num_hidden_layers") or metadata.get("num_layers") or 0)
    heads = int(text.get("num_attention_heads") or 0)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    hidden = int(text.get("hidden_size") or metadata.get("hidden_size") or 0)
    head_dim = int(text.get("head_dim") or (hidden // heads if heads else 0))
    if not (layers and kv_heads and head_dim and hidden):
        raise SizingError(
            "config.json lacks num_hidden_layers / num_key_value_heads / head_dim / hidden_size"
        )
    intermediate = int(text.get("intermediate_size") or 4 * hidden)
    vocab = int(text.get("vocab_size") or 0)
    kv_cache_dtype = knobs.kv_cache_dtype or "auto"
    kv_bytes = 1 if kv_cache_dtype.startswith("fp8") else act_bytes
    kv_per_token = 2 * layers * max(1, kv_heads // tp) * head_dim * kv_bytes
    context_length = int(metadata.get("context_length") or text.get("max_position_embeddings") or 0)
    max_model_len = knobs.max_model_len or context_length
    sequence = kv_per_token * max_model_len

    notes = []
    if text.get("sliding_window") and text.get("use_sliding_window", True):
        notes.append(
            f"sliding window {text['sliding_window']}: counted as full attention (an upper bound)"
        )
    if text.get("num_experts") or text.get("num_local_experts"):
        notes.append("mixture of experts: activations sized by intermediate_size only")
    out: dict[str, Any] = {
        "parameters": parameters,
        "dtype": dtype,
        "quantization": quantization or "none",
        "kv_cache_dtype": "fp8" if kv_bytes == 1 else dtype,
        "bytes_per_parameter": param_bytes,
        "tensor_parallel_size": tp,
        "context_length": context_length,
        "max_model_len": max_model_len,
        "kv_per_token": kv_per_token,
        "weights_bytes": weights,
        "weights_gib": weights / GIB,
        "sequence_bytes": sequence,
        "sequence_gib": sequence / GIB,
        "notes": notes,
    }
    if gpu_memory_gib is None:
        return out

    default_seqs, default_tokens = vllm_batch_defaults(gpu_memory_gib)
    max_num_seqs = knobs.max_num_seqs or default_seqs
    tokens = knobs.max_num_batched_tokens or default_tokens
    forward = (
        tokens
        * (FORWARD_MLP_FACTOR * intermediate / tp + FORWARD_HIDDEN_FACTOR * hidden)
        * act_bytes
    )
    sampler = min(max_num_seqs, tokens) * vocab * 4 * SAMPLER_COPIES
    activation = max(forward, sampler)
    sizes = [] if knobs.enforce_eager else capture_sizes(max_num_seqs, tokens)
    graphs = len(sizes) * 2 * layers * GRAPH_BYTES_PER_LAYER
    non_torch = NON_TORCH_GIB["tensor_parallel" if tp > 1 else "single"] * GIB
    utilization = knobs.gpu_memory_utilization or 0.0
    budget = utilization * gpu_memory_gib * GIB
    kv_cache = budget - weights - activation - graphs - non_torch
    concurrency = kv_cache / sequence if sequence else 0.0
    out.update(
        {
            "gpu_memory_gib": gpu_memory_gib,
            "gpu_memory_utilization": utilization,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": tokens,
            "cuda_graphs": len(sizes) * 2,
            "budget_bytes": budget,
            "activation_bytes": activation,
            "cuda_graphs_bytes": graphs,
            "non_torch_bytes": non_torch,
            "kv_cache_bytes": kv_cache,
            "budget_gib": budget / GIB,
            "activation_gib": activation / GIB,
            "cuda_graphs_gib": graphs / GIB,
            "non_torch_gib": non_torch / GIB,
            "kv_cache_gib": kv_cache / GIB,
            "kv_cache_tokens": max(0, math.floor(kv_cache / kv_per_token)),
            "concurrency": concurrency,
            "fits": kv_cache >= sequence,
        }
    )
    return out
