"""models/llm_memory.py: vLLM 0.32's KV cache accounting, pinned for two public models.

The shapes are those of the models' public config.json files on the Hugging Face hub, written
here (no download): meta-llama/Llama-3.1-8B-Instruct and Qwen/Qwen2.5-72B-Instruct. Parameter
counts: 8,030,261,248 (Llama-3.1-8B) and 72,706,203,648 (Qwen2.5-72B), the models' safetensors
totals. GPU: an H100 80GB as the driver reports it, 81,559 MiB = 79.65 GiB.
"""

from __future__ import annotations

import pytest

from models.llm_config import EngineKnobs, LLMEntry, resolve
from models.llm_memory import GIB, H100_GIB, SizingError, capture_sizes, estimate

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}
LLAMA_8B_META = {"parameters": 8_030_261_248, "context_length": 131072, "quantization": "none"}
QWEN_72B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
}
QWEN_72B_META = {"parameters": 72_706_203_648, "context_length": 32768, "quantization": "none"}
# mistralai/Mistral-7B-v0.1: every layer attends over a 4096-token window
MISTRAL_7B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "torch_dtype": "bfloat16",
}


def knobs(**kw) -> EngineKnobs:
    return resolve(LLMEntry(name="m", **kw))


def test_h100_is_what_the_driver_reports() -> None:
    assert H100_GIB == pytest.approx(79.65, abs=0.005)  # not "80 GiB"


def test_llama_31_8b_on_one_h100_with_vllm_defaults() -> None:
    """Old behaviour: weights x 1.2 + 16 full 128k sequences = 274 GiB, 'does not fit'. vLLM
    starts it: it needs one full-length sequence (16 GiB) and has room for 3.5."""
    e = estimate(knobs(), LLAMA_8B_META, LLAMA_8B, gpu_memory_gib=H100_GIB)
    assert e["kv_per_token"] == 2 * 32 * 8 * 128 * 2 == 131_072  # 128 KiB
    assert e["sequence_gib"] == 16.0  # 131,072 tokens
    assert e["weights_bytes"] == 8_030_261_248 * 2
    # vLLM's defaults on a >= 70 GiB GPU: 1024 sequences, 8192 batched tokens
    assert (e["max_num_seqs"], e["max_num_batched_tokens"]) == (1024, 8192)
    assert e["budget_gib"] == pytest.approx(0.92 * 81_559 / 1024)  # 73.28
    # activations: the sampler's 1024 x 128,256 float32 logits x 3 beat the forward pass
    # (8192 x (3 x 14336 + 4 x 4096) x 2 bytes = 0.91 GiB)
    assert e["activation_bytes"] == 1024 * 128256 * 4 * 3  # 1.47 GiB
    # 51 capture sizes (1, 2, 4, 8..248 by 8, 256..512 by 16) in two modes, 32 layers
    assert len(capture_sizes(1024, 8192)) == 51 and e["cuda_graphs"] == 102
    assert e["cuda_graphs_bytes"] == 102 * 32 * 128 * 2**10
    assert e["kv_cache_gib"] == pytest.approx(56.20, abs=0.005)
    assert e["concurrency"] == pytest.approx(3.51, abs=0.005)
    assert e["fits"] and e["notes"] == []


def test_llama_31_8b_as_the_deployment_runs_it() -> None:
    """deploy/components/llm/llm.yaml's values: utilization 0.90, 64 sequences."""
    e = estimate(
        knobs(gpu_memory_utilization=0.9, max_num_seqs=64),
        LLAMA_8B_META,
        LLAMA_8B,
        gpu_memory_gib=H100_GIB,
    )
    assert e["activation_bytes"] == 8192 * (3 * 14336 + 4 * 4096) * 2  # the forward pass now
    assert e["cuda_graphs"] == 2 * 19  # sizes up to 128 = 2 x 64
    assert e["kv_cache_gib"] == pytest.approx(55.42, abs=0.005)
    assert e["concurrency"] == pytest.approx(3.46, abs=0.005)


def test_qwen25_72b_at_tensor_parallel_4() -> None:
    e = estimate(knobs(tensor_parallel_size=4), QWEN_72B_META, QWEN_72B, gpu_memory_gib=H100_GIB)
    # head_dim 8192 / 64 = 128; 8 KV heads / 4 GPUs = 2 per GPU
    assert e["kv_per_token"] == 2 * 80 * 2 * 128 * 2 == 81_920
    assert e["sequence_gib"] == 2.5  # 32,768 tokens
    assert e["weights_gib"] == pytest.approx(72_706_203_648 * 2 / 4 / GIB)  # 33.86
    assert e["non_torch_gib"] == 0.75  # NCCL's buffers with tensor parallelism
    assert e["kv_cache_gib"] == pytest.approx(35.93, abs=0.005)
    assert e["concurrency"] == pytest.approx(14.37, abs=0.005)
    assert e["notes"] == []  # use_sliding_window: false


def test_fp8_kv_cache_halves_the_sequence_and_doubles_the_concurrency() -> None:
    base = estimate(knobs(), LLAMA_8B_META, LLAMA_8B, gpu_memory_gib=H100_GIB)
    fp8 = estimate(knobs(kv_cache_dtype="fp8"), LLAMA_8B_META, LLAMA_8B, gpu_memory_gib=H100_GIB)
    assert fp8["kv_per_token"] == base["kv_per_token"] // 2 and fp8["kv_cache_dtype"] == "fp8"
    assert fp8["kv_cache_bytes"] == base["kv_cache_bytes"]  # the weights stay 16-bit
    assert fp8["concurrency"] == pytest.approx(2 * base["concurrency"])


def test_sliding_window_is_counted_as_full_attention_and_said_so() -> None:
    meta = {"parameters": 7_241_732_096, "context_length": 32768, "quantization": "none"}
    e = estimate(knobs(), meta, MISTRAL_7B, gpu_memory_gib=H100_GIB)
    assert e["sequence_bytes"] == 32768 * 2 * 32 * 8 * 128 * 2  # not 4096 tokens
    assert e["notes"] == ["sliding window 4096: counted as full attention (an upper bound)"]


def test_eager_has_no_graphs_and_a_small_gpu_gets_vllms_small_defaults() -> None:
    e = estimate(knobs(enforce_eager=True), LLAMA_8B_META, LLAMA_8B, gpu_memory_gib=24)
    assert e["cuda_graphs_bytes"] == 0
    assert (e["max_num_seqs"], e["max_num_batched_tokens"]) == (256, 2048)
    assert not e["fits"]  # 22 GiB - 15 GiB of weights cannot hold a 16 GiB sequence
    e = estimate(
        knobs(max_model_len=8192, enforce_eager=True), LLAMA_8B_META, LLAMA_8B, gpu_memory_gib=24
    )
    assert e["fits"]


def test_quantized_weights_and_what_cannot_be_sized() -> None:
    e = estimate(knobs(quantization="awq"), LLAMA_8B_META, LLAMA_8B, gpu_memory_gib=H100_GIB)
    assert e["bytes_per_parameter"] == 0.5 and e["kv_per_token"] == 131_072  # 16-bit KV
    e = estimate(knobs(), LLAMA_8B_META, {**LLAMA_8B, "torch_dtype": "float32"})
    assert e["dtype"] == "float16" and "kv_cache_bytes" not in e  # no GPU: no budget
    with pytest.raises(SizingError, match="no parameter count"):
        estimate(knobs(), {}, LLAMA_8B)
    with pytest.raises(SizingError, match="cannot size quantization 'bitnet'"):
        estimate(knobs(quantization="bitnet"), LLAMA_8B_META, LLAMA_8B)
    with pytest.raises(SizingError, match="lacks num_hidden_layers"):
        estimate(knobs(), LLAMA_8B_META, {"hidden_size": 4096})
