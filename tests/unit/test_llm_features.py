"""models/llm_features.py and models/llm_lora.py: the engine features of the LLM config checked
against vLLM's own lists, their vLLM flags, and LoRA adapters in the store (no engine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from bench.harness.store import bentoml_store
from models.llm_config import EngineKnobs, LLMEntry, check, resolve
from models.llm_features import (
    adapter_problems,
    feature_problems,
    plugin_names,
    vllm_choices,
)
from models.llm_lora import Adapter, check_peft_dir, resolve_adapter, save_adapter
from models.store import StoreError
from services.llm.settings import LLMSettings, engine_argv


def knobs(**values: Any) -> EngineKnobs:
    return resolve(EngineKnobs(**values))


def test_vllm_choices_read_from_source_are_vllms_registries() -> None:
    """The lists read from vLLM's files without importing it are the ones vLLM registers: an
    upgrade that moves or renames one fails here."""
    pytest.importorskip("vllm")
    from vllm.config.lora import MaxLoRARanks
    from vllm.config.structured_outputs import StructuredOutputsBackend
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager
    from vllm.tool_parsers.tool_strict_level import ToolStrictLevelName

    choices = vllm_choices()
    assert choices is not None
    assert sorted(choices["tool_call_parser"]) == sorted(ToolParserManager.list_registered())
    assert sorted(choices["reasoning_parser"]) == sorted(ReasoningParserManager.list_registered())
    assert choices["structured_outputs_backend"] == get_args(StructuredOutputsBackend)
    assert list(choices["quantization"]) == QUANTIZATION_METHODS
    assert choices["max_lora_rank"] == get_args(MaxLoRARanks)
    assert choices["tool_strict_level"] == get_args(ToolStrictLevelName)


CHOICES = {
    "tool_call_parser": ("hermes", "llama3_json", "mistral"),
    "reasoning_parser": ("deepseek_r1", "qwen3"),
    "structured_outputs_backend": ("auto", "xgrammar", "guidance"),
    "tool_strict_level": ("auto", "function", "parameter"),
    "quantization": ("awq", "fp8"),
    "max_lora_rank": (8, 16, 32),
}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tool_call_parser": "hermez"},
         "tool_call_parser 'hermez' is not one of vLLM's: hermes, llama3_json, mistral; or one "
         "the tool_parser_plugin registers (none)"),
        ({"reasoning_parser": "r1"},
         "reasoning_parser 'r1' is not one of vLLM's: deepseek_r1, qwen3"),
        ({"structured_outputs_backend": "regex"}, "structured_outputs_backend 'regex' is not one"),
        ({"quantization": "int3"}, "quantization 'int3' is not one of vLLM's: awq, fp8"),
        ({"max_lora_rank": 12}, "max_lora_rank 12 is not one of vLLM's: 16, 32, 8"),
        ({"enable_auto_tool_choice": True}, "enable_auto_tool_choice needs a tool_call_parser"),
        ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras (2) must be >= max_loras (4)"),
        ({"chat_template": "{% for m in messages %}"}, "chat_template is not valid Jinja"),
    ],
)  # fmt: skip
def test_what_vllm_would_refuse_is_named(values: dict[str, Any], message: str) -> None:
    (problem,) = feature_problems(knobs(**values), choices=CHOICES)
    assert message in problem


def test_valid_features_have_no_problems() -> None:
    good = knobs(
        enable_auto_tool_choice=True,
        tool_call_parser="hermes",
        reasoning_parser="qwen3",
        structured_outputs_backend="xgrammar",
        quantization="fp8",
        max_lora_rank=16,
        chat_template="{{ messages[0]['content'] }}",
    )
    assert feature_problems(good, choices=CHOICES) == []


def test_a_tool_parser_plugin_adds_its_names(tmp_path: Path) -> None:
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from vllm.tool_parsers import ToolParser, ToolParserManager\n"
        '@ToolParserManager.register_module(["mine", "mine2"])\n'
        "class Mine(ToolParser): ...\n"
        'ToolParserManager.register_module(name="third")(Mine)\n'
    )
    assert plugin_names(plugin) == ("mine", "mine2", "third")
    ok = knobs(tool_call_parser="mine", tool_parser_plugin=str(plugin))
    assert feature_problems(ok, choices=CHOICES) == []
    (missing,) = feature_problems(
        knobs(tool_parser_plugin=str(tmp_path / "no.py")), choices=CHOICES
    )
    assert "tool_parser_plugin" in missing and "no.py" in missing


def test_chat_template_files_live_in_the_version(tmp_path: Path) -> None:
    (tmp_path / "tools.jinja").write_text("{{ messages | length }}")
    assert feature_problems(knobs(chat_template="tools.jinja"), tmp_path, choices=CHOICES) == []
    (missing,) = feature_problems(knobs(chat_template="nope.jinja"), tmp_path, choices=CHOICES)
    assert "chat_template file 'nope.jinja' is not in the model's version" in missing
    (outside,) = feature_problems(knobs(chat_template="../x.jinja"), tmp_path, choices=CHOICES)
    assert "inside the model's version folder" in outside


def settings(**env: str) -> LLMSettings:
    return LLMSettings(_env_file=None, **env)


def test_features_become_vllm_flags_that_vllms_parser_reads() -> None:
    entry = {
        "name": "a", "tag": "x", "enable_auto_tool_choice": True, "tool_call_parser": "hermes",
        "tool_strict_level": "parameter", "reasoning_parser": "qwen3",
        "chat_template": "tools.jinja",
        "structured_outputs_backend": "xgrammar", "structured_outputs_compact": True,
        "enable_prefix_caching": False,
        "adapters": "all", "max_loras": 2, "max_lora_rank": 32, "max_cpu_loras": 4,
    }  # fmt: skip
    s = settings(models=json.dumps([entry]))
    argv = engine_argv(s.models[0], s, "/store/x/hf", on_cpu=True)
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    assert args.enable_auto_tool_choice and args.tool_call_parser == "hermes"
    assert args.tool_strict_level == "parameter"
    assert args.reasoning_parser == "qwen3"
    assert args.chat_template == "/store/x/hf/tools.jinja"
    assert args.structured_outputs_config.backend == "xgrammar"
    assert args.structured_outputs_config.disable_any_whitespace is True
    assert args.enable_prefix_caching is False
    assert args.enable_lora and (args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (
        2,
        32,
        4,
    )
    plain = settings(models="a=x")
    assert "--enable-lora" not in engine_argv(plain.models[0], plain, "/m", on_cpu=True)


def test_the_service_refuses_an_unknown_parser_at_start() -> None:
    pytest.importorskip("vllm")
    bad = json.dumps([{"name": "a", "tag": "x", "tool_call_parser": "hermez"}])
    with pytest.raises(ValidationError, match=r"LLM 'a': tool_call_parser 'hermez' .*hermes"):
        settings(models=bad)
    service_wide = settings(models="a=x", tool_call_parser="hermes")
    assert resolve(service_wide.models[0], service_wide).tool_call_parser == "hermes"


# --- adapters ------------------------------------------------------------------------------------


def adapter(name: str, base: str = "tiny-llm", rank: int = 8) -> Adapter:
    return Adapter(name, "v1", Path("/x"), base, rank)


def test_adapter_limits_and_bases_are_checked() -> None:
    stored = {"a": adapter("a"), "b": adapter("b", base="other"), "c": adapter("c", rank=64)}

    def find(name: str) -> Adapter:
        if name not in stored:
            raise StoreError(f"no model named {name!r} in the store")
        return stored[name]

    entry = LLMEntry(name="t", tag="tiny-llm", adapters=["a", "b", "c", "d"], max_adapters=3)
    problems, found = adapter_problems(entry, resolve(entry), find, lambda base: [])
    assert found == [stored["a"]]
    assert problems == [
        "4 adapters (a, b, c, d) but max_adapters is 3",
        "adapter 'b' (b:v1) adapts 'other', not 'tiny-llm'",
        "adapter 'c' (c:v1) has rank 64 > max_lora_rank 16",
        "adapter 'd': no model named 'd' in the store",
    ]
    every = LLMEntry(name="t", tag="tiny-llm", adapters="all", max_lora_rank=64)
    problems, found = adapter_problems(every, resolve(every), find, lambda base: ["a", "c"])
    assert problems == [] and [a.name for a in found] == ["a", "c"]
    no_lora = LLMEntry(name="t", tag="tiny-llm", max_loras=2)
    assert adapter_problems(no_lora, resolve(no_lora))[0] == [
        "max_loras is set but the LLM serves no adapters (adapters:)"
    ]
    with pytest.raises(ValidationError, match="distinct store names"):
        LLMEntry(name="t", adapters=["a", "a"])


def test_validate_reports_feature_and_adapter_problems() -> None:
    def lookup(tag: str) -> Any:
        raise StoreError(f"model {tag!r} is not in the model store")

    config = {"models": [{"name": "t", "tag": "tiny-llm", "adapters": ["a"], "max_lora_rank": 7}]}
    problems, _ = check(
        config,
        lookup=lookup,
        directory=lambda tag: None,
        adapters={"resolve": lambda n: adapter(n), "listing": lambda b: []},
    )
    assert problems[0].startswith("LLM 't' (tiny-llm:latest): max_lora_rank 7 is not one of")
    assert (
        problems[1] == "LLM 't' (tiny-llm:latest): adapter 'a' (a:v1) has rank 8 > max_lora_rank 7"
    )


def peft_dir(path: Path, rank: int = 4) -> Path:
    path.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 8,
        "target_modules": ["v_proj", "q_proj"],
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(b"\0")
    return path


def test_peft_folders_are_checked(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no adapter_config\.json"):
        check_peft_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(StoreError, match="is not a LoRA adapter"):
        check_peft_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    with pytest.raises(StoreError, match="no adapter weights"):
        check_peft_dir(tmp_path)
    assert check_peft_dir(peft_dir(tmp_path / "ok"))["r"] == 4


def test_adapters_are_versions_of_a_store_model(tmp_path: Path) -> None:
    from models.llm_store import save_hf_dir

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (base / "model.safetensors").write_bytes(b"\0")
    (base / "tokenizer.json").write_text("{}")
    with bentoml_store(tmp_path / "home"):
        llm = save_hf_dir("tiny-llm", base, source="test", parameters=1)
        with pytest.raises(StoreError, match=r"not an LLM|not in the model store|no model"):
            save_adapter("style", "nope", peft_dir(tmp_path / "p0"))
        first = save_adapter("style", "tiny-llm", peft_dir(tmp_path / "p1"))
        meta = first.info.metadata
        assert meta["base"] == "tiny-llm" and meta["base_version"] == llm.tag.version
        assert meta["rank"] == 4 and meta["target_modules"] == ["q_proj", "v_proj"]
        second = save_adapter("style", "tiny-llm", peft_dir(tmp_path / "p2", rank=8))
        assert resolve_adapter("style").version == second.tag.version  # latest
        assert resolve_adapter(f"style@{first.tag.version}").rank == 4
        with pytest.raises(StoreError, match="is not a LoRA adapter"):
            save_adapter("tiny-llm", "tiny-llm", peft_dir(tmp_path / "p3"))
        with pytest.raises(StoreError, match="no version"):
            resolve_adapter("style@nosuch")


def test_random_adapters_have_pefts_names_and_shapes(tmp_path: Path) -> None:
    from safetensors import safe_open

    from training.lora import random_adapter

    config = {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = random_adapter(tmp_path, tmp_path / "a", rank=2)
    assert check_peft_dir(out)["target_modules"] == ["q_proj", "v_proj"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        prefix = "base_model.model.model.layers.1.self_attn"
        assert list(f.get_tensor(f"{prefix}.v_proj.lora_B.weight").shape) == [8, 2]
        assert list(f.get_tensor(f"{prefix}.q_proj.lora_A.weight").shape) == [2, 16]


# --- the router's LLM request metrics: the model label (services/llm/labels.py) -----------------


def test_metric_labels_name_adapters_and_their_aliases() -> None:
    from services.llm.labels import UNKNOWN_MODEL, ModelLabels, configured_names

    settings = LLMSettings(
        _env_file=None,  # type: ignore[call-arg]
        models=[
            LLMEntry(name="chat", tag="smollm2", adapters=["support-style"]),
            LLMEntry(name="tiny", tag="tiny-llm", adapters="all"),
        ],
        tasks={"small": "tiny"},
    )
    assert configured_names(settings) == {"chat", "tiny", "small", "support-style"}
    labels = ModelLabels(configured_names(settings), max_learned=2)
    # configured names keep their series whatever the answer
    assert labels.label("support-style", 200) == "support-style"
    assert labels.label("support-style", 400) == "support-style"
    assert labels.label("small", 499) == "small"
    # a name the service refused, or never answered, is client input: _unknown
    assert labels.label("random-name", 404) == UNKNOWN_MODEL
    assert labels.label("support-style@nope", 404) == UNKNOWN_MODEL
    assert labels.label("random-name", 499) == UNKNOWN_MODEL
    assert labels.label("-", 200) == UNKNOWN_MODEL  # no model in the body
    # an adapter served under `adapters: all`, and NAME@ALIAS: counted under their name once the
    # service answered them, errors after that too
    assert labels.label("store-style", 200) == "store-style"
    assert labels.label("store-style", 400) == "store-style"
    assert labels.label("support-style@production", 200) == "support-style@production"
    # bounded: past max_learned, even served names count as _unknown
    assert labels.label("third-style", 200) == UNKNOWN_MODEL
    labels.add(["rag-app"])
    assert labels.label("rag-app", 503) == "rag-app"
