"""The LLM deployment config: memory estimates against hand-computed numbers, the problems
``validate`` reports, and ``servery llm validate`` exit codes and output.

Store lookups are faked with a dict except in the CLI tests, which save a fake Hugging Face
directory (SmolLM2's real config.json, a few tiny tensors) into a temporary store.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from bench.harness.store import bentoml_store
from models.cli import llm as cli_llm
from models.llm_config import (
    GIB,
    LLMConfigError,
    LLMEntry,
    ModelInfo,
    check,
    estimate,
    load_config,
    parse_config,
    validate,
)
from models.store import StoreError

# SmolLM2-135M-Instruct's config.json (the sizes that matter) and its store metadata.
SMOL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "head_dim": 64,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "max_position_embeddings": 8192,
    "vocab_size": 49152,
    "dtype": "bfloat16",
}
SMOL_META = {"parameters": 134_515_008, "context_length": 8192, "quantization": "none"}
# Llama-2-7B-like: no head_dim (4096 / 32 = 128) and no separate KV heads (32); float16.
BIG_CONFIG = {
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "max_position_embeddings": 4096,
    "torch_dtype": "float16",
}
BIG_META = {"parameters": 6_738_415_616, "context_length": 4096, "quantization": "none"}
MODELS: dict[str, ModelInfo] = {
    "smollm2:v1": (SMOL_META, SMOL_CONFIG),
    "llama7b:v1": (BIG_META, BIG_CONFIG),
}


def lookup(tag: str) -> ModelInfo:
    if tag not in MODELS:
        raise StoreError(f"model {tag!r} is not in the model store")
    return MODELS[tag]


def smol(**kw: Any) -> LLMEntry:
    return LLMEntry(name="small", tag="smollm2:v1", **kw)


def big(**kw: Any) -> LLMEntry:
    return LLMEntry(name="big", tag="llama7b:v1", **{"max_model_len": 4096, **kw})


def deployment(*llms: Mapping[str, Any], **rest: Any) -> dict[str, Any]:
    return {"llms": list(llms), **rest}


# --- estimate ------------------------------------------------------------------------------------


def test_estimate_smollm2_fp16_by_hand() -> None:
    e = estimate(smol(dtype="float16", max_model_len=2048, max_num_seqs=16), SMOL_META, SMOL_CONFIG)
    # weights: 134,515,008 params x 2 bytes x 1.2 (CUDA graphs) = 322,836,019.2 bytes
    assert e["weights_bytes"] == pytest.approx(322_836_019.2)
    # KV per token: 2 (K, V) x 30 layers x 3 KV heads x 64 head_dim x 2 bytes = 23,040 bytes
    assert e["kv_per_token"] == 23_040
    # x 2048 tokens x 16 sequences = 754,974,720 bytes = 0.703125 GiB exactly
    assert e["kv_cache_bytes"] == 754_974_720
    assert e["kv_cache_gib"] == 0.703125
    assert e["total_gib"] == pytest.approx(1_077_810_739.2 / GIB)  # 1.0038 GiB
    assert (e["dtype"], e["quantization"], e["overhead"]) == ("float16", "none", 1.2)


def test_estimate_eager_auto_dtype_and_default_length() -> None:
    e = estimate(smol(enforce_eager=True, max_num_seqs=1), SMOL_META, SMOL_CONFIG)
    assert e["dtype"] == "bfloat16"  # auto: the model's own dtype
    assert e["weights_bytes"] == pytest.approx(134_515_008 * 2 * 1.1)  # eager: no CUDA graphs
    assert e["max_model_len"] == 8192  # default: the context length
    assert e["kv_cache_bytes"] == 23_040 * 8192


def test_estimate_tensor_parallel_shards_weights_and_kv_heads() -> None:
    e = estimate(big(max_num_seqs=1, tensor_parallel_size=2), BIG_META, BIG_CONFIG)
    assert e["weights_bytes"] == pytest.approx(6_738_415_616 * 2 * 1.2 / 2)
    # head_dim from hidden_size / heads = 128; 32 KV heads split over 2 GPUs = 16 per GPU
    assert e["kv_per_token"] == 2 * 32 * 16 * 128 * 2
    assert e["kv_cache_gib"] == 1.0


def test_estimate_kv_heads_never_below_one_per_gpu() -> None:
    e = estimate(smol(tensor_parallel_size=4, max_num_seqs=1), SMOL_META, SMOL_CONFIG)
    assert e["kv_per_token"] == 2 * 30 * 1 * 64 * 2  # 3 KV heads // 4 -> replicated, 1 per GPU


@pytest.mark.parametrize(
    ("kw", "param_bytes", "kv_bytes"),
    [
        ({"quantization": "awq"}, 0.5, 2),  # 4-bit weights, 16-bit KV cache
        ({"quantization": "fp8"}, 1.0, 2),
        ({"dtype": "float32"}, 4, 4),
        ({"dtype": "bfloat16"}, 2, 2),
    ],
)
def test_estimate_bytes_by_dtype_and_quantization(
    kw: dict[str, Any], param_bytes: float, kv_bytes: int
) -> None:
    e = estimate(big(max_num_seqs=1, **kw), BIG_META, BIG_CONFIG)
    assert e["bytes_per_parameter"] == param_bytes
    assert e["weights_bytes"] == pytest.approx(6_738_415_616 * param_bytes * 1.2)
    assert e["kv_per_token"] == 2 * 32 * 32 * 128 * kv_bytes


def test_estimate_float32_model_auto_is_16_bit_and_stored_quantization_counts() -> None:
    e = estimate(big(), BIG_META, {**BIG_CONFIG, "torch_dtype": "float32"})
    assert (e["dtype"], e["bytes_per_parameter"]) == ("float16", 2)  # vLLM downcasts float32
    e = estimate(big(), {**BIG_META, "quantization": "gptq"}, BIG_CONFIG)
    assert (e["quantization"], e["bytes_per_parameter"]) == ("gptq", 0.5)
    e = estimate(big(), BIG_META, {**BIG_CONFIG, "quantization_config": {"quant_method": "awq"}})
    assert e["quantization"] == "awq"


def test_estimate_refuses_what_it_cannot_size() -> None:
    with pytest.raises(LLMConfigError, match="no parameter count"):
        estimate(big(), {**BIG_META, "parameters": 0}, BIG_CONFIG)
    with pytest.raises(LLMConfigError, match="cannot size quantization 'bitnet'"):
        estimate(big(), {**BIG_META, "quantization": "bitnet"}, BIG_CONFIG)
    with pytest.raises(LLMConfigError, match="lacks num_hidden_layers"):
        estimate(big(), BIG_META, {"hidden_size": 4096})


# --- validate ------------------------------------------------------------------------------------


def test_validate_a_fitting_config_has_no_problems() -> None:
    config = deployment(
        {
            "name": "small",
            "tag": "smollm2:v1",
            "max_model_len": 2048,
            "gpu_memory_utilization": 0.1,
        },
        {"name": "big", "tag": "llama7b:v1", "max_num_seqs": 1, "gpu_memory_utilization": 0.8},
        tasks={"small": "small", "large": "big", "code": "big"},
        gpu={"memory_gib": 24},
    )
    problems, estimates = check(config, lookup=lookup)
    assert problems == []
    assert [e["name"] for e in estimates] == ["small", "big"]
    assert estimates[1]["available_gib"] == pytest.approx(0.8 * 24)


def test_validate_refuses_an_impossible_config_naming_the_numbers() -> None:
    config = deployment(
        {"name": "big", "tag": "llama7b:v1", "max_num_seqs": 1}, gpu={"memory_gib": 16}
    )
    # weights 6,738,415,616 x 2 x 1.2 = 15.06 GiB; KV 524,288 B/token x 4096 = 2 GiB
    assert validate(config, lookup=lookup) == [
        "LLM 'big' (llama7b:v1): needs 17.1 GiB per GPU (weights 15.1 GiB + KV cache 2.00 GiB"
        " for 1 x 4096 tokens), 0.9 x 16 GiB = 14.4 GiB available"
    ]
    # the same model over two GPUs fits: 7.53 + 1.00 GiB per GPU
    sharded = deployment(
        {"name": "big", "tag": "llama7b:v1", "max_num_seqs": 1, "tensor_parallel_size": 2},
        gpu={"memory_gib": 16, "count": 2},
    )
    assert validate(sharded, lookup=lookup) == []
    # ... and --gpu-memory-gib overrides the declared memory
    assert (
        "0.9 x 8 GiB = 7.20 GiB available" in validate(sharded, gpu_memory_gib=8, lookup=lookup)[0]
    )


def test_validate_max_model_len_above_the_context_length() -> None:
    config = deployment({"name": "small", "tag": "smollm2:v1", "max_model_len": 16384})
    assert validate(config, lookup=lookup) == [
        "LLM 'small' (smollm2:v1): max_model_len 16384 exceeds the model's context length 8192"
    ]


def test_validate_unknown_tag() -> None:
    config = deployment({"name": "x", "tag": "nope:v9"}, {"name": "small", "tag": "smollm2:v1"})
    assert validate(config, lookup=lookup) == [
        "LLM 'x' (nope:v9): model 'nope:v9' is not in the model store"
    ]


def test_validate_gpu_count_and_shared_gpu_claims() -> None:
    config = deployment(
        {"name": "a", "tag": "smollm2:v1", "max_model_len": 1024, "tensor_parallel_size": 2},
        {"name": "b", "tag": "smollm2:v1", "max_model_len": 1024},
        gpu={"memory_gib": 80, "count": 1},
    )
    assert validate(config, lookup=lookup) == [
        "LLM 'a' (smollm2:v1): tensor_parallel_size 2 needs more GPUs than the 1 declared",
        "the LLMs claim 2.7 GPUs of memory (sum of tensor_parallel_size x "
        "gpu_memory_utilization), 1 declared",
    ]


def test_validate_cpu_kv_cache_must_hold_one_full_sequence() -> None:
    # one 8192-token sequence: 23,040 x 8192 bytes = 0.18 GiB
    assert (
        validate(
            deployment({"name": "s", "tag": "smollm2:v1", "cpu_kvcache_gib": 1}), lookup=lookup
        )
        == []
    )
    problems = validate(
        deployment({"name": "s", "tag": "smollm2:v1", "cpu_kvcache_gib": 0.1}), lookup=lookup
    )
    assert problems == [
        "LLM 's' (smollm2:v1): one sequence of 8192 tokens needs 0.18 GiB of KV cache, "
        "cpu_kvcache_gib is 0.1"
    ]


def test_tasks_must_point_at_listed_llms() -> None:
    config = deployment(
        {"name": "small", "tag": "smollm2:v1"}, tasks={"small": "small", "code": "coder"}
    )
    with pytest.raises(
        LLMConfigError, match=r"tasks point at no listed LLM: code -> coder \(listed: small\)"
    ):
        parse_config(config)
    (problem,) = validate(config, lookup=lookup)  # validate reports it rather than raising
    assert "code -> coder" in problem


@pytest.mark.parametrize(
    ("llm", "message"),
    [
        ({"quantization": "bitnet"}, "unknown quantization 'bitnet'"),
        ({"gpu_memory_utilization": 1.5}, "llms.0.gpu_memory_utilization"),
        ({"dtype": "int4"}, "llms.0.dtype"),
        ({"max_num_seqs": 0}, "llms.0.max_num_seqs"),
        ({"max_len": 10}, "llms.0.max_len: Extra inputs are not permitted"),
    ],
)
def test_invalid_fields_are_named(llm: dict[str, Any], message: str) -> None:
    with pytest.raises(LLMConfigError, match=message):
        parse_config(deployment({"name": "s", "tag": "smollm2:v1", **llm}))


def test_llm_names_are_unique_and_required() -> None:
    with pytest.raises(LLMConfigError, match="repeated: s"):
        parse_config(deployment({"name": "s", "tag": "a"}, {"name": "s", "tag": "b"}))
    with pytest.raises(LLMConfigError, match="llms: List should have at least 1 item"):
        parse_config({"llms": []})


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(LLMConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("llms: [\n")
    with pytest.raises(LLMConfigError, match="cannot read"):
        load_config(tmp_path / "bad.yaml")


# --- servery llm validate ------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    """``servery llm ...`` through the module's own parser (as models.cli would register it)."""
    parser = argparse.ArgumentParser(prog="servery")
    cli_llm.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["llm", *argv])
    return args.func(args)


@pytest.fixture
def smol_store(tmp_path: Path):
    """A temporary store with 'smollm2': SmolLM2's config.json, tiny weights, 134.5 M recorded."""
    from models.llm_store import save_hf_dir

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(SMOL_CONFIG))
    (src / "tokenizer.json").write_text("{}")
    save_file({"w": np.zeros((2, 2), np.float16)}, str(src / "model.safetensors"))
    with bentoml_store(tmp_path / "bentoml"):
        save_hf_dir("smollm2", src, source="test", parameters=SMOL_META["parameters"])
        yield tmp_path


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


CONFIG_YAML = """\
gpu: {memory_gib: 16, count: 1}
llms:
  - name: small
    tag: smollm2
    max_model_len: 2048
    dtype: float16
tasks: {small: small, code: small}
"""


def test_cli_validate_ok(smol_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_yaml(smol_store / "llms.yaml", CONFIG_YAML)
    assert run_cli("validate", path) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("small"))
    # weights 0.30 GiB + KV 0.70 GiB = 1.00 GiB of 0.9 x 16 = 14.40 GiB
    assert row.split() == [
        "small",
        "smollm2",
        "float16",
        "none",
        "2048",
        "x",
        "16",
        "0.30",
        "0.70",
        "1.00",
        "14.40",
    ]
    assert "tasks: small -> small, code -> small" in out
    assert out.rstrip().endswith("OK, 1 LLM(s) fit")


def test_cli_validate_refuses_with_exit_2(
    smol_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_yaml(smol_store / "llms.yaml", CONFIG_YAML)
    assert run_cli("validate", path, "--gpu-memory-gib", "1") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "servery llm validate: LLM 'small' (smollm2): needs 1.00 GiB per GPU (weights 0.30 GiB"
        " + KV cache 0.70 GiB for 16 x 2048 tokens), 0.9 x 1 GiB = 0.90 GiB available\n"
    )
    assert run_cli("validate", path, "--gpu-memory-gib", "1", "--json") == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert out["llms"][0]["kv_cache_bytes"] == 754_974_720


def test_cli_validate_unknown_tag_and_bad_file(
    smol_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_yaml(smol_store / "llms.yaml", CONFIG_YAML.replace("tag: smollm2", "tag: gone"))
    assert run_cli("validate", path) == 2
    assert (
        "LLM 'small' (gone): model 'gone:latest' is not in the model store"
        in capsys.readouterr().err
    )
    path = write_yaml(
        smol_store / "bad.yaml", CONFIG_YAML.replace("code: small}", "large: nowhere}")
    )
    assert run_cli("validate", path) == 2
    assert "tasks point at no listed LLM: large -> nowhere" in capsys.readouterr().err
    assert run_cli("validate", str(smol_store / "missing.yaml")) == 2
    assert "cannot read" in capsys.readouterr().err
