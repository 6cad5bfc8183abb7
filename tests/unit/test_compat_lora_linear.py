"""services/compat/vllm_cpu_lora_linear.py: ``add_lora_linear`` gives what vLLM's
``PunicaWrapperCPU.add_lora_linear`` gives with servery's ops (vllm_cpu_lora_ops, whose ``-1``
means no adapter), on the same wrapper and random weights: one adapter for every token, mixed
adapters with and without ``-1``, slices of zeros (skipped), a scale, float32 and bfloat16, and
weights written into a slot after a first call (the kept plan follows the version counters).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")

from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from services.compat import vllm_cpu_lora_linear as lin  # noqa: E402
from services.compat import vllm_cpu_lora_ops as ops  # noqa: E402

SLOTS, IN, RANK = 3, 40, 8
SLICES = (24, 8, 8)  # a fused QKV layer's

INDICES = {
    "one adapter": [1] * 6,
    "mixed, with -1": [0, 2, -1, 2, 1, 0],
    "no adapter": [-1] * 5,
    "one adapter and -1": [-1, 2, 2, -1],
    "mixed, many tokens (rows per adapter)": [0, 2, -1, 2, 1, 0] * 25,
    "one adapter and -1, many tokens": [-1, 2, 2, -1] * 40,
}


@pytest.fixture(scope="module", autouse=True)
def servery_ops() -> None:
    """Upstream's method calling servery's ops (vLLM's own give -1 the last slot's adapter)."""
    import vllm.lora.punica_wrapper.punica_cpu as cpu

    ops.upstream_ops()
    kept = {name: getattr(cpu, name) for name in ops.OPS}
    for name in ops.OPS:
        setattr(cpu, name, getattr(ops, name))
    lin.UPSTREAM_METHODS.setdefault("add_lora_linear", PunicaWrapperCPU.add_lora_linear)
    lin.UPSTREAM_METHODS.setdefault("update_metadata", PunicaWrapperCPU.update_metadata)
    lin.UPSTREAM_METHODS.setdefault("add_lora_logits", PunicaWrapperCPU.add_lora_logits)
    yield
    for name, f in kept.items():
        setattr(cpu, name, f)


def wrapper(indices: list[int], prefill: bool) -> PunicaWrapperCPU:
    w = PunicaWrapperCPU(256, 256, "cpu")
    idx = torch.tensor(indices)
    w._token_lora_indices[: len(indices)].copy_(idx)
    w.indices_len[:] = [len(indices)] * 4
    w.is_prefill = prefill
    if prefill:
        w._update_prefill_metadata(w.token_lora_indices)
    setattr(w, lin.GROUPS, lin.groups(w.token_lora_indices))
    setattr(w, lin.STEP, 1)
    return w


def stacks(dtype: torch.dtype, zero_slices: tuple[int, ...] = ()) -> tuple[tuple, tuple]:
    a = tuple(torch.randn(SLOTS, 1, RANK, IN).to(dtype) for _ in SLICES)
    b = tuple(torch.randn(SLOTS, 1, size, RANK).to(dtype) for size in SLICES)
    for s in zero_slices:
        a[s].zero_()
    return a, b


def both(w: PunicaWrapperCPU, a: tuple, b: tuple, dtype: torch.dtype, scale: float = 1.0):
    x = torch.randn(w.token_lora_indices.shape[0], IN).to(dtype)
    y = torch.randn(x.shape[0], sum(SLICES)).to(dtype)
    theirs, mine = y.clone(), y.clone()
    lin.UPSTREAM_METHODS["add_lora_linear"](w, theirs, x, a, b, scale, SLICES)
    lin.add_lora_linear(w, mine, x, a, b, scale, SLICES)
    return theirs, mine, y


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = 1e-5 if a.dtype == torch.float32 else 2e-2
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol), (a - b).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("case", list(INDICES))
def test_same_as_upstream_with_servery_s_ops(case: str, prefill: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(hash(case) % 1000)
    w = wrapper(INDICES[case], prefill)
    a, b = stacks(dtype, zero_slices=(1,))
    theirs, mine, before = both(w, a, b, dtype, scale=0.5)
    close(mine, theirs)
    rows = [i for i, v in enumerate(INDICES[case]) if v < 0]
    assert torch.equal(mine[rows], before[rows])  # no adapter: untouched
    k = slice(SLICES[0], SLICES[0] + SLICES[1])  # the slice of zeros: untouched
    assert torch.equal(mine[:, k], before[:, k])


def test_a_slot_written_after_a_call_is_read_again() -> None:
    """vLLM loads an adapter into a slot in place: the kept plan (a cached float32 copy of the
    A weights) must follow, or the old adapter would keep answering."""
    torch.manual_seed(3)
    w = wrapper([1, 1, 1], prefill=False)
    a, b = stacks(torch.float32, zero_slices=(0, 1, 2))
    theirs, mine, before = both(w, a, b, torch.float32)
    assert torch.equal(mine, before) and torch.equal(theirs, before)  # all zeros: no delta
    a[0][1, 0].copy_(torch.randn(RANK, IN))  # what set_lora does
    theirs, mine, before = both(w, a, b, torch.float32)
    close(mine, theirs)
    assert not torch.equal(mine, before)
    a[0][1] = 0  # what reset_lora does
    theirs, mine, before = both(w, a, b, torch.float32)
    assert torch.equal(mine, before)


def test_cases_it_does_not_take_go_to_upstream() -> None:
    """A buffer passed in, or indices that do not match the rows: upstream's method (which
    raises for the mismatch, as it did before the replacement)."""
    w = wrapper([0, 1], prefill=False)
    a, b = stacks(torch.float32)
    x, y = torch.randn(2, IN), torch.zeros(2, sum(SLICES))
    buffer = tuple(torch.zeros(2, RANK) for _ in SLICES)
    theirs = y.clone()
    lin.UPSTREAM_METHODS["add_lora_linear"](w, theirs, x, a, b, 1.0, SLICES, buffer=buffer)
    mine = y.clone()
    lin.add_lora_linear(w, mine, x, a, b, 1.0, SLICES, buffer=tuple(t.clone() for t in buffer))
    close(mine, theirs)
    with pytest.raises(RuntimeError):
        lin.add_lora_linear(w, y, torch.randn(3, IN), a, b, 1.0, SLICES)


def test_groups() -> None:
    assert lin.groups(torch.tensor([2, 2, 2])) == [(2, None)]
    assert lin.groups(torch.tensor([-1, -1])) == []
    found = lin.groups(torch.tensor([1, -1, 0, 1]))
    assert [(slot, rows.tolist()) for slot, rows in found] == [(0, [2]), (1, [0, 3])]


def test_logits_are_skipped_only_where_no_sampled_adapter_has_lm_head_weights() -> None:
    """The logits' LoRA (``lm_head``): an adapter without it (zeros in its slot) adds nothing and
    is skipped; one with it is upstream's sum, for its rows only."""
    torch.manual_seed(5)
    vocab = 50
    w = wrapper([0, 1, -1], prefill=False)
    w._sampler_indices[:3].copy_(torch.tensor([0, 1, -1]))
    a, b = torch.zeros(SLOTS, 1, RANK, IN), torch.zeros(SLOTS, 1, vocab, RANK)
    a[2].normal_()
    b[2].normal_()  # only slot 2 (not sampled) has lm_head weights
    setattr(w, lin.SAMPLED, [0, 1])
    x, y = torch.randn(3, IN), torch.randn(3, vocab)
    mine, skipped = y.clone(), lin.SKIPPED[0]
    lin.add_lora_logits(w, mine, x, a, b, 1.0)
    assert torch.equal(mine, y) and lin.SKIPPED[0] == skipped + 1
    a[1].normal_()
    b[1].normal_()  # slot 1 gains lm_head weights: computed, for row 1 only
    theirs, mine = y.clone(), y.clone()
    lin.UPSTREAM_METHODS["add_lora_logits"](w, theirs, x, a, b, 1.0)
    lin.add_lora_logits(w, mine, x, a, b, 1.0)
    close(mine, theirs)
    assert lin.SKIPPED[0] == skipped + 1 and not torch.equal(mine[1], y[1])
    assert torch.equal(mine[[0, 2]], y[[0, 2]])
