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
    EngineKnobs,
    LLMConfigError,
    LLMEntry,
    ModelInfo,
    check,
    load_config,
    parse_config,
    placement,
    resolve,
    validate,
    visible_devices,
)
from models.llm_memory import H100_GIB
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
    "intermediate_size": 1536,
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


def deployment(*llms: Mapping[str, Any], **rest: Any) -> dict[str, Any]:
    return {"models": list(llms), **rest}


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
        tasks={"large": "big", "code": "big"},
        gpu={"memory_gib": 24},
    )
    problems, estimates = check(config, lookup=lookup)
    assert problems == []
    assert [e["name"] for e in estimates] == ["small", "big"]
    assert estimates[1]["budget_gib"] == pytest.approx(0.8 * 24)
    assert estimates[1]["concurrency"] > 1


def test_validate_refuses_a_gpu_without_room_for_one_sequence() -> None:
    """vLLM refuses to start below one full-length sequence; validate says so with the numbers."""
    config = deployment(
        {"name": "big", "tag": "llama7b:v1", "max_model_len": 4096, "max_num_seqs": 1},
        gpu={"memory_gib": 16},
    )
    (problem,) = validate(config, lookup=lookup)
    # weights 6,738,415,616 x 2 = 12.55 GiB of 0.92 x 16 = 14.72; one 4096-token sequence 2 GiB
    assert problem.startswith("LLM 'big' (llama7b:v1): the KV cache left, ")
    assert "of 0.92 x 16 GiB = 14.7 GiB (weights 12.6 GiB" in problem
    assert problem.endswith("does not hold one 4096-token sequence (2.00 GiB)")
    # over two GPUs it fits, and --gpu-memory-gib overrides the declared memory
    sharded = deployment(
        {"name": "big", "tag": "llama7b:v1", "max_model_len": 4096, "tensor_parallel_size": 2},
        gpu={"memory_gib": 16, "count": 2},
    )
    assert validate(sharded, lookup=lookup) == []
    assert "of 0.92 x 6 GiB" in validate(sharded, gpu_memory_gib=6, lookup=lookup)[0]


def test_an_unset_max_model_len_fits_when_one_sequence_does() -> None:
    """Old behaviour: weights x 1.2 + 16 full-length sequences made a 7B model 'not fit' where
    vLLM starts. Now: one sequence is enough, and the concurrency is reported."""
    config = deployment({"name": "big", "tag": "llama7b:v1"}, gpu={"memory_gib": H100_GIB})
    problems, (est,) = check(config, lookup=lookup)
    assert problems == [] and est["max_model_len"] == 4096 and est["concurrency"] > 16


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


def test_shares_of_one_gpu_and_tensor_parallel_sizes_must_fit() -> None:
    """Old behaviour: every engine got 0.90 of device 0, so a second engine could never start."""
    two = deployment(
        {"name": "a", "tag": "smollm2:v1", "max_model_len": 1024},
        {"name": "b", "tag": "smollm2:v1", "max_model_len": 1024},
        gpu={"memory_gib": 80, "count": 1},
    )
    assert validate(two, lookup=lookup) == [
        "GPU 0: the engines' gpu_memory_utilization shares add up to 1.84 > 1 (a 0.92, b 0.92); "
        "vLLM would refuse to start the later ones"
    ]
    shared = {**two, "models": [{**m, "gpu_memory_utilization": 0.45} for m in two["models"]]}
    assert validate(shared, lookup=lookup) == []
    apart = {**two, "models": [two["models"][0], {**two["models"][1], "devices": [1]}]}
    assert validate(apart, lookup=lookup) == [
        "LLM 'b': needs GPU(s) [1] (tensor_parallel_size 1, devices [1]) but the service has 1 "
        "(SERVERY_LLM_GPUS)"
    ]
    assert validate(apart, gpus=2, lookup=lookup) == []
    tp = deployment({"name": "a", "tag": "smollm2:v1", "tensor_parallel_size": 2, "devices": [0]})
    assert validate(tp, gpus=2, lookup=lookup) == [
        "LLM 'a': devices [0] must list one GPU per tensor-parallel rank (2)"
    ]


def test_placement_defaults_and_visible_devices() -> None:
    entries = [
        LLMEntry(name="a", tag="x", tensor_parallel_size=2),
        LLMEntry(name="b", tag="y", devices=[2], gpu_memory_utilization=0.5),
    ]
    placed = placement(entries, 3)
    assert placed.devices == {"a": [0, 1], "b": [2]} and placed.problems == []
    assert placed.shares == {0: 0.92, 1: 0.92, 2: 0.5}
    # the engine's CUDA_VISIBLE_DEVICES: its indexes into the process's own (BentoML's) list
    assert visible_devices([2], "4,5,6", 3) == "6"
    assert visible_devices([0, 1], "GPU-aa,GPU-bb", 2) == "GPU-aa,GPU-bb"
    assert visible_devices([1], None, 2) == "1"
    with pytest.raises(LLMConfigError, match="outside the visible GPUs"):
        visible_devices([2], "3,4", 2)


def test_one_order_of_defaults() -> None:
    """entry, else service-wide, else DEFAULTS (vLLM 0.32's where it has one)."""
    entry = LLMEntry(name="a", tag="x", max_num_seqs=8)
    service = EngineKnobs(max_num_seqs=64, gpu_memory_utilization=0.5, enforce_eager=True)
    knobs = resolve(entry, service)
    assert (knobs.max_num_seqs, knobs.gpu_memory_utilization, knobs.enforce_eager) == (8, 0.5, True)
    knobs = resolve(entry)
    assert knobs.gpu_memory_utilization == 0.92 and knobs.max_num_seqs == 8
    assert knobs.tensor_parallel_size == 1 and knobs.enforce_eager is False
    assert knobs.max_model_len is None  # vLLM's: the model's context length


def test_the_utilization_default_is_vllm_032s() -> None:
    """Where servery says it follows vLLM, it reads the same number vLLM's config holds."""
    from vllm.config.cache import CacheConfig

    field = CacheConfig.__dataclass_fields__["gpu_memory_utilization"].default
    assert field.default == resolve(LLMEntry(name="a")).gpu_memory_utilization == 0.92


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
        {"name": "small", "tag": "smollm2:v1"}, tasks={"chat": "small", "code": "coder"}
    )
    with pytest.raises(
        LLMConfigError, match=r"tasks point at no listed LLM: code -> coder \(listed: small\)"
    ):
        parse_config(config)
    (problem,) = validate(config, lookup=lookup)  # validate reports it rather than raising
    assert "code -> coder" in problem
    with pytest.raises(LLMConfigError, match="tasks named like a served LLM: small"):
        parse_config(deployment({"name": "small", "tag": "s"}, tasks={"small": "small"}))


@pytest.mark.parametrize(
    ("llm", "message"),
    [
        ({"gpu_memory_utilization": 1.5}, "models.0.gpu_memory_utilization"),
        ({"dtype": "int4"}, "models.0.dtype"),
        ({"max_num_seqs": 0}, "models.0.max_num_seqs"),
        ({"kv_cache_dtype": "int8"}, "models.0.kv_cache_dtype"),
        ({"devices": [0, 0]}, "models.0.devices"),
        ({"max_len": 10}, "models.0.max_len: Extra inputs are not permitted"),
    ],
)
def test_invalid_fields_are_named(llm: dict[str, Any], message: str) -> None:
    with pytest.raises(LLMConfigError, match=message):
        parse_config(deployment({"name": "s", "tag": "smollm2:v1", **llm}))


def test_llm_names_are_unique_and_required() -> None:
    with pytest.raises(LLMConfigError, match="repeated: s"):
        parse_config(deployment({"name": "s", "tag": "a"}, {"name": "s", "tag": "b"}))
    with pytest.raises(LLMConfigError, match="models: List should have at least 1 item"):
        parse_config({"models": []})
    with pytest.raises(LLMConfigError, match=r"is 'models:' \(was 'llms:'\)"):
        parse_config({"llms": [{"name": "s", "tag": "a"}]})


def test_unsizable_quantization_is_a_validate_problem() -> None:
    unknown, unsized = validate(
        deployment({"name": "s", "tag": "smollm2:v1", "quantization": "bitnet"}), lookup=lookup
    )
    assert "quantization 'bitnet' is not one of vLLM's: auto_awq," in unknown
    assert "cannot size quantization 'bitnet'" in unsized


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(LLMConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("models: [\n")
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
models:
  - name: small
    tag: smollm2
    max_model_len: 2048
    dtype: float16
tasks: {chat: small, code: small}
"""
DEPLOYED = Path(__file__).resolve().parents[2] / "deploy/components/llm/llm.yaml"


def test_cli_validate_ok(smol_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_yaml(smol_store / "llms.yaml", CONFIG_YAML)
    assert run_cli("validate", path) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("small"))
    # weights 134,515,008 x 2 = 0.25 GiB; budget 0.92 x 16 = 14.72 GiB; vLLM's defaults for a
    # 16 GiB GPU: 256 sequences; one 2048-token sequence is 23,040 x 2048 B = 0.044 GiB
    cells = row.split()
    assert cells[:8] == [
        "small",
        "smollm2:latest",
        "float16",
        "float16",
        "2048",
        "256",
        "0.25",
        "14.72",
    ]
    assert 13.5 < float(cells[8]) < 14.2 and cells[9].endswith("x")
    assert "tasks: chat -> small, code -> small" in out
    assert out.rstrip().endswith("OK, 1 LLM(s) fit")


def test_cli_validate_refuses_with_exit_2(
    smol_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Old behaviour: 135 M parameters 'fit' in 0.05 GiB. vLLM's non-weight memory (activations
    for 2048 tokens, the sampler's logits, CUDA graphs) does not shrink with the model."""
    path = write_yaml(smol_store / "llms.yaml", CONFIG_YAML)
    assert run_cli("validate", path, "--gpu-memory-gib", "1") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        "servery llm validate: LLM 'small' (smollm2:latest): the KV cache left"
    )
    assert "does not hold one 2048-token sequence (0.04 GiB)" in captured.err
    assert run_cli("validate", path, "--gpu-memory-gib", "1", "--json") == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert out["llms"][0]["fits"] is False and out["llms"][0]["kv_per_token"] == 23_040


def test_cli_validates_the_deployed_llm_file(
    smol_store: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file deploy/ mounts (and its docs say to validate) is read by validate with the
    service's values: old behaviour, validate rejected its 'models:' key."""
    assert run_cli("validate", str(DEPLOYED), "--gpu-memory-gib", "79.6", "--gpus", "1") == 0
    out = capsys.readouterr().out
    cells = next(line for line in out.splitlines() if line.startswith("smollm2")).split()
    assert cells[4:8] == ["2048", "64", "0.25", f"{0.90 * 79.6:.2f}"]
    # SERVERY_LLM_* reach validate as they reach the service; the file's own values win
    monkeypatch.setenv("SERVERY_LLM_MAX_MODEL_LEN", "9000")
    monkeypatch.setenv("SERVERY_LLM_MAX_NUM_SEQS", "8")
    assert run_cli("validate", str(DEPLOYED), "--gpu-memory-gib", "79.6") == 0
    assert "2048  64 " in capsys.readouterr().out
    monkeypatch.setenv("SERVERY_LLM_GPUS", "1")
    monkeypatch.setenv("SERVERY_LLM_DEVICES", "x")  # not a knob: ignored, as by the service
    two = write_yaml(
        smol_store / "two.yaml",
        DEPLOYED.read_text() + "  - {name: second, tag: smollm2, max_model_len: 2048}\n",
    )
    assert run_cli("validate", two, "--gpu-memory-gib", "79.6") == 2
    assert "shares add up to 1.82 > 1 (smollm2 0.9, second 0.92)" in capsys.readouterr().err


def test_cli_validate_unknown_tag_and_bad_file(
    smol_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_yaml(smol_store / "llms.yaml", CONFIG_YAML.replace("tag: smollm2", "tag: gone"))
    assert run_cli("validate", path) == 2
    assert (
        "LLM 'small' (gone:latest): model 'gone:latest' is not in the model store"
        in capsys.readouterr().err
    )
    path = write_yaml(
        smol_store / "bad.yaml", CONFIG_YAML.replace("code: small}", "large: nowhere}")
    )
    assert run_cli("validate", path) == 2
    assert "tasks point at no listed LLM: large -> nowhere" in capsys.readouterr().err
    assert run_cli("validate", str(smol_store / "missing.yaml")) == 2
    assert "cannot read" in capsys.readouterr().err
