"""LLMs in the store: Hugging Face directory checks, the save/load round trip,
``servery llm import-hf``, and parameter counting from safetensors headers.

The "model" is a fake Hugging Face directory (a config.json, a tokenizer.json and a small
safetensors file written with the ``safetensors`` package): the store never loads weights.
"""

from __future__ import annotations

import argparse
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from bench.harness.store import bentoml_store
from models.cli import llm as cli_llm
from models.llm_config import LLMConfigError, safetensors_parameters
from models.llm_store import check_hf_dir, hf_dir, save_hf_dir
from models.store import StoreError

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
    "vocab_size": 16,
    "dtype": "float16",
}
TENSORS = {  # 16*8 + 2*(8*8) + 8 = 264 parameters
    "model.embed_tokens.weight": np.zeros((16, 8), np.float16),
    "model.layers.0.mlp.weight": np.ones((8, 8), np.float16),
    "model.layers.1.mlp.weight": np.ones((8, 8), np.float16),
    "model.norm.weight": np.ones((8,), np.float16),
}
N_PARAMS = 16 * 8 + 2 * 8 * 8 + 8


def write_hf_dir(path: Path, config: dict[str, Any] = CONFIG, shards: int = 1) -> Path:
    """A minimal Hugging Face model directory: config, tokenizer file, ``shards`` weight files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    names = sorted(TENSORS)
    for i in range(shards):
        part = {n: TENSORS[n] for n in names[i::shards]}
        save_file(part, str(path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    with bentoml_store(tmp_path / "bentoml") as home:
        yield home


# --- check_hf_dir --------------------------------------------------------------------------------


def test_check_hf_dir_returns_the_config(tmp_path: Path) -> None:
    assert check_hf_dir(write_hf_dir(tmp_path / "m")) == CONFIG


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("config.json", "no config.json"),
        ("model-00001-of-00001.safetensors", "has no weights"),
        ("tokenizer.json", "has no tokenizer"),
    ],
)
def test_check_hf_dir_names_what_is_missing(tmp_path: Path, remove: str, message: str) -> None:
    path = write_hf_dir(tmp_path / "m")
    (path / remove).unlink()
    with pytest.raises(StoreError, match=message):
        check_hf_dir(path)


def test_check_hf_dir_rejects_a_file_and_bad_json(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is not a directory"):
        check_hf_dir(tmp_path / "file")
    path = write_hf_dir(tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(StoreError, match="not readable JSON"):
        check_hf_dir(path)


# --- save_hf_dir / hf_dir ------------------------------------------------------------------------


def test_save_hf_dir_round_trip(tmp_path: Path, store: Path) -> None:
    src = write_hf_dir(tmp_path / "m")
    saved = save_hf_dir("tiny", src, source="unit test", parameters=N_PARAMS, metadata={"extra": 1})
    path, bento_model = hf_dir("tiny")  # no version: latest
    assert bento_model.tag == saved.tag
    assert path.is_relative_to(store)
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in src.iterdir())
    assert json.loads((path / "config.json").read_text()) == CONFIG
    meta = bento_model.info.metadata
    assert meta["parameters"] == N_PARAMS
    assert meta["context_length"] == 512
    assert meta["architecture"] == "LlamaForCausalLM"
    assert meta["num_layers"] == 2
    assert meta["torch_dtype"] == "float16"
    assert meta["quantization"] == "none"
    assert meta["source"] == "unit test"
    assert meta["extra"] == 1
    assert bento_model.info.labels["task"] == "text-generation"
    assert safetensors_parameters(path) == N_PARAMS  # the weights came along intact


def test_hf_dir_errors(store: Path) -> None:
    from bench.harness.store import save_iris

    with pytest.raises(StoreError, match="not in the model store"):
        hf_dir("nothing")
    save_iris("iris")
    with pytest.raises(StoreError, match="is not an LLM"):
        hf_dir("iris")


# --- parameters from safetensors headers ---------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_safetensors_parameters_sums_every_shard(tmp_path: Path, shards: int) -> None:
    path = write_hf_dir(tmp_path / "m", shards=shards)
    assert len(list(path.glob("*.safetensors"))) == shards
    assert safetensors_parameters(path) == N_PARAMS


def test_safetensors_parameters_reads_only_the_header(tmp_path: Path) -> None:
    # A header for a 7-billion-element tensor with no data behind it: counted, never read.
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "w": {"dtype": "F16", "shape": [7, 1000, 1000, 1000], "data_offsets": [0, 0]},
            "b": {"dtype": "F16", "shape": [], "data_offsets": [0, 2]},  # a scalar is 1
        }
    ).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert safetensors_parameters(tmp_path) == 7 * 10**9 + 1


def test_safetensors_parameters_errors(tmp_path: Path) -> None:
    with pytest.raises(LLMConfigError, match=r"no \*\.safetensors"):
        safetensors_parameters(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(LLMConfigError, match="implausible"):
        safetensors_parameters(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"nope!")
    with pytest.raises(LLMConfigError, match="not a readable safetensors file"):
        safetensors_parameters(tmp_path)


# --- servery llm import-hf -----------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    """``servery llm ...`` through the module's own parser (as models.cli would register it)."""
    parser = argparse.ArgumentParser(prog="servery")
    cli_llm.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["llm", *argv])
    return args.func(args)


def test_import_hf_counts_parameters_from_headers(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_hf_dir(tmp_path / "m", shards=2)
    assert run_cli("import-hf", str(src), "--name", "tiny", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"] == N_PARAMS
    assert out["parameters_from"] == "safetensors headers"
    assert out["context_length"] == 512
    assert out["source"] == f"local directory {src.resolve()}"
    path, bento_model = hf_dir(out["tag"])
    assert bento_model.info.metadata["parameters"] == N_PARAMS
    assert len(list(path.glob("*.safetensors"))) == 2


def test_import_hf_with_given_parameters_and_quantization(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_hf_dir(tmp_path / "m")
    argv = ["import-hf", str(src), "--name", "tiny-awq", "--parameters", "1000"]
    assert run_cli(*argv, "--quantization", "awq", "--source", "hand-made") == 0
    text = capsys.readouterr().out
    assert "1,000 parameters (--parameters)" in text
    assert "quantization awq" in text
    meta = hf_dir("tiny-awq")[1].info.metadata
    assert (meta["parameters"], meta["quantization"], meta["source"]) == (1000, "awq", "hand-made")


def test_import_hf_refuses_a_non_model_dir(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert run_cli("import-hf", str(tmp_path / "empty"), "--name", "x") == 2
    err = capsys.readouterr().err
    assert err.startswith("servery llm import-hf: ")
    assert "no config.json" in err
    assert not (store / "models" / "x").exists()
