"""training/tiny_llm.py: the test LLM builds offline, loads with transformers and chats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.harness.store import bentoml_store
from models.llm_store import FORMAT, SUBDIR, TASK, hf_dir


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory):
    from training import tiny_llm

    home = tmp_path_factory.mktemp("tiny-llm") / "bentoml"
    with bentoml_store(home):
        saved = tiny_llm.save("tiny-test", seed=3)
        path, model = hf_dir("tiny-test")
        yield saved, path, model


def test_stored_with_labels_and_metadata(stored) -> None:
    saved, path, model = stored
    assert model.tag == saved.tag
    assert path == Path(saved.path_of(SUBDIR))
    assert model.info.labels["task"] == TASK and model.info.labels["format"] == FORMAT
    meta = model.info.metadata
    assert meta["architecture"] == "LlamaForCausalLM"
    assert meta["context_length"] == 1024 and meta["num_layers"] == 2
    assert 500_000 < meta["parameters"] < 3_000_000
    assert meta["quantization"] == "none" and "seed 3" in meta["source"]
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == meta["vocab_size"]


def test_loads_tokenizes_with_chat_template_and_generates(stored) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path, _ = stored
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(prompt, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == prompt  # byte-level BPE round-trips text exactly
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8 or tok.eos_token_id in out[0, ids.shape[1] :]


def test_same_seed_same_weights(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from training.tiny_llm import build

    build(tmp_path / "a", seed=1)
    build(tmp_path / "b", seed=1)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
