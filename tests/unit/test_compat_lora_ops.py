"""services/compat/vllm_cpu_lora_ops.py: the six CPU LoRA ops give upstream's results, except
that ``-1`` (no adapter) gets no delta.

Each replacement runs beside vLLM's own function (``upstream_ops()``, read from vLLM's module)
on the same random tensors: prefill (sgmv, several sequences) and decode (bgmv) shapes, one
adapter for all tokens, mixed adapters, ``-1``, float32 and bfloat16 weights and outputs,
``[slots, 1, out, in]`` and 3-D weights, expand's padding rules (``limit``, ``common_len``),
``add_inputs`` and ``scaling``. vLLM's function is given one more slot of zeros, and ``-1``
pointed at it: what "no adapter" means (vLLM's GPU kernels skip such tokens; upstream's tensor
indexing picked the last real slot, vllm-project/vllm#48421).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from services.compat import vllm_cpu_lora_ops as fix  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
UP = fix.upstream_ops()
SLOTS, IN, OUT, RANK = 4, 48, 40, 8

INDICES = {
    "one adapter": [2] * 7,
    "mixed, few tokens (a gather)": [0, 2, -1, 2, 1, 0, -1],
    "mixed (one product per adapter)": [0, 2, -1, 2, 1, 0, -1] * 10,
    "no adapter (-1)": [-1] * 7,
    "-1 and the last slot": [-1, SLOTS - 1, 3, -1, 0, 3, 1],
    "one token": [1],
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    # float32: summation order only; bfloat16: at most a last-bit rounding of a product
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.allclose(a.float(), b.float(), **tol(a.dtype)), (a - b).abs().max()


def weights(out: int, inp: int, dtype: torch.dtype, four_d: bool = True) -> torch.Tensor:
    w = torch.randn(SLOTS, 1, out, inp, dtype=torch.float32).to(dtype)
    return w if four_d else w.squeeze(1)


def no_adapter_slot(w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` with a slot of zeros appended and ``idx`` with -1 pointed at it."""
    zero = torch.zeros_like(w[:1])
    return torch.cat([w, zero]), torch.where(idx < 0, w.shape[0], idx)


def both(name: str, out: torch.Tensor, *args: object) -> None:
    """Run upstream's (with -1 meaning a slot of zeros) and this module's ``name`` on copies of
    ``out``; the results agree."""
    theirs, mine = out.clone(), out.clone()
    rest = list(args[2:])
    at = 0 if name.startswith("bgmv") else 2  # the indices: bgmv's own, sgmv's per sequence
    w, rest[at] = no_adapter_slot(args[1], rest[at])  # type: ignore[arg-type]
    UP[name](args[0], w, theirs, *rest)
    getattr(fix, name)(args[0], args[1], mine, *args[2:])
    same(mine, theirs)


def test_no_adapter_rows_get_no_delta() -> None:
    """Base-model tokens (-1) beside adapter tokens: shrink writes 0, expand adds nothing."""
    idx = torch.tensor([-1, 2, -1, 1])
    x = torch.randn(len(idx), IN)
    shrunk = torch.full((len(idx), RANK), 7.0)
    fix.bgmv_shrink(x, weights(RANK, IN, torch.float32), shrunk, idx, 1.0)
    assert torch.equal(shrunk[idx < 0], torch.zeros(2, RANK))
    assert shrunk[idx >= 0].abs().sum() > 0
    out = torch.randn(len(idx), OUT)
    before = out.clone()
    fix.bgmv_expand(torch.randn(len(idx), RANK), weights(OUT, RANK, torch.float32), out, idx, True)
    assert torch.equal(out[idx < 0], before[idx < 0])
    assert not torch.equal(out[idx >= 0], before[idx >= 0])


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(INDICES))
@pytest.mark.parametrize("four_d", [True, False])
def test_bgmv_shrink(dtype: torch.dtype, case: str, four_d: bool) -> None:
    idx = torch.tensor(INDICES[case])
    x = torch.randn(len(idx), IN).to(dtype)
    out = torch.zeros(len(idx), RANK, dtype=torch.float32)  # vLLM's float32 buffer
    both("bgmv_shrink", out, x, weights(RANK, IN, dtype, four_d), idx, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(INDICES))
@pytest.mark.parametrize("add_inputs", [True, False])
def test_bgmv_expand(dtype: torch.dtype, case: str, add_inputs: bool) -> None:
    idx = torch.tensor(INDICES[case])
    x = torch.randn(len(idx), RANK)  # the float32 shrink buffer
    out = torch.randn(len(idx), OUT).to(dtype)
    both("bgmv_expand", out, x, weights(OUT, RANK, dtype), idx, add_inputs)


@pytest.mark.parametrize("out_cols", [OUT - 6, OUT + 6])
def test_bgmv_expand_pads_like_upstream(out_cols: int) -> None:
    """The adapter's and the model's output widths differ: ``common_len`` columns change."""
    idx = torch.tensor(INDICES["mixed (one product per adapter)"])
    x = torch.randn(len(idx), RANK)
    out = torch.randn(len(idx), out_cols)
    both("bgmv_expand", out, x, weights(OUT, RANK, torch.float32), idx, True)


def test_bgmv_expand_one_row_broadcasts_like_upstream() -> None:
    """One output row of the op and several of the tensor: upstream adds it to every row."""
    idx = torch.tensor([3])
    x = torch.randn(1, RANK)
    out = torch.randn(5, OUT)
    both("bgmv_expand", out, x, weights(OUT, RANK, torch.float32), idx, True)
    both("bgmv_expand", out, x, weights(OUT, RANK, torch.float32), idx, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(INDICES))
@pytest.mark.parametrize("add_inputs", [True, False])
def test_bgmv_expand_slice(dtype: torch.dtype, case: str, add_inputs: bool) -> None:
    idx = torch.tensor(INDICES[case])
    x = torch.randn(len(idx), RANK)
    out = torch.randn(len(idx), 3 * OUT).to(dtype)
    both("bgmv_expand_slice", out, x, weights(OUT, RANK, dtype), idx, OUT, OUT, add_inputs)


def prefill(lora: list[int], lengths: list[int]) -> tuple[torch.Tensor, ...]:
    """vLLM's prefill metadata: start offsets, lengths, per-sequence adapter indices."""
    seq_len = torch.tensor(lengths)
    start = torch.cumsum(seq_len, 0) - seq_len
    return start, seq_len, torch.tensor(lora), len(lengths), max(lengths), int(seq_len.sum())


SEQUENCES = {
    "one adapter": ([1], [37]),
    "mixed": ([0, -1, 2, 0], [5, 11, 1, 60]),
    "two sequences, same adapter": ([3, 3], [9, 4]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(SEQUENCES))
def test_sgmv_ops(dtype: torch.dtype, case: str) -> None:
    meta = prefill(*SEQUENCES[case])
    tokens = meta[-1]
    x = torch.randn(tokens, IN).to(dtype)
    buffer = torch.zeros(tokens, RANK)
    both("sgmv_shrink", buffer, x, weights(RANK, IN, dtype), *meta, 0.25)
    h = torch.randn(tokens, RANK)
    for add_inputs in (True, False):
        out = torch.randn(tokens, OUT).to(dtype)
        both("sgmv_expand", out, h, weights(OUT, RANK, dtype), *meta, add_inputs)
        wide = torch.randn(tokens, 2 * OUT).to(dtype)
        both("sgmv_expand_slice", wide, h, weights(OUT, RANK, dtype), *meta, OUT, OUT, add_inputs)


@pytest.mark.parametrize(
    ("case", "column"),
    [("one adapter", False), ("mixed (one product per adapter)", False),
     ("mixed, few tokens (a gather)", False), ("one adapter", True)],
)  # fmt: skip
def test_which_cases_take_the_replacement(case: str, column: bool) -> None:
    """vLLM's shapes run here; any other (indices as a column) goes to vLLM's function."""
    idx = torch.tensor(INDICES[case])
    before = fix.CALLS[0]
    w = weights(RANK, IN, torch.float32, four_d=False)
    given = idx.unsqueeze(1) if column else idx
    fix.bgmv_shrink(torch.randn(len(idx), IN), w, torch.zeros(len(idx), RANK), given, 1.0)
    assert fix.CALLS[0] - before == int(not column)


def test_same_errors_as_upstream_for_bad_indices() -> None:
    x = torch.randn(3, IN)
    out = torch.zeros(3, RANK)
    for idx in (torch.tensor([0, SLOTS, 1]), torch.tensor([0, 1])):  # out of range; too few
        with pytest.raises((IndexError, RuntimeError)):
            UP["bgmv_shrink"](x, weights(RANK, IN, torch.float32), out.clone(), idx, 1.0)
        with pytest.raises((IndexError, RuntimeError)):
            fix.bgmv_shrink(x, weights(RANK, IN, torch.float32), out.clone(), idx, 1.0)


def test_replace_ops_rebinds_every_name_vllm_looks_up() -> None:
    """In a fresh interpreter (nothing else is patched here): PunicaWrapperCPU's module globals,
    the package's and the ops module's names are this module's after replace_ops(); with
    SERVERY_VLLM_CPU_LORA_OPS=0 they stay vLLM's."""
    code = """
import json, os
from services.compat import vllm_cpu_lora_ops as fix
import vllm.lora.punica_wrapper.punica_cpu as cpu, vllm.lora.ops.torch_ops as pkg
before = fix.in_force()
done = fix.replace_ops()
print(json.dumps({"before": before, "done": done, "after": fix.in_force(),
                  "pkg": all(getattr(pkg, n) is getattr(fix, n) for n in fix.OPS)}))
"""
    env_on = {k: v for k, v in os.environ.items() if k != fix.DISABLE_ENV}
    for env, expected in (
        (env_on, {"before": False, "done": True, "after": True, "pkg": True}),
        ({**env_on, fix.DISABLE_ENV: "0"}, {"before": False, "done": False, "after": False,
                                             "pkg": False}),
    ):  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
