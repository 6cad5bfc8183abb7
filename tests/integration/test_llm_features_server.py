"""The LLM config's engine features end to end: one real ``bentoml serve services:Router`` whose
tiny LLM (``training/tiny_llm.py``) has tool calling (pythonic parser, auto tool choice), a chat
template file from its store version, prefix caching and LoRA adapters from the store
(``adapters: all``), behind API keys, with the official ``openai`` client on the router's port.

The tiny model's text is gibberish, so tool calls are checked where guided decoding makes them
valid whatever the weights (named and ``required`` tool choice, ``json_schema``), and adapters are
told apart by their greedy outputs (a random adapter changes them; the same weights repeat them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.harness.server import ROOT, Server, cpu_llm_env, metric_samples, start_server
from tests.browser import chromium
from tests.conftest import eventually

openai = pytest.importorskip("openai")

KEY_ALL = "features-key-for-everything-0001"
KEY_BASE = "features-key-for-the-base-only-1"
KEY_ADAPTER = "features-key-for-one-adapter-01"
TEMPLATE = "servery-test.jinja"
TEMPLATE_TEXT = (
    "{{ '<|im_start|>system\\nservery test template<|im_end|>\\n' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONFIG = f"""models:
  - name: tiny
    tag: tiny-llm
    enable_auto_tool_choice: true
    tool_call_parser: pythonic
    chat_template: {TEMPLATE}
    structured_outputs_backend: xgrammar
    structured_outputs_compact: true
    enable_prefix_caching: true
    adapters: all
    max_loras: 2
    max_lora_rank: 8
    max_adapters: 3
"""
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            # xgrammar lets raw control characters into strings, which strict JSON parsers
            # (Python's, pydantic's) refuse: a pattern keeps the tiny model's city printable
            "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


def servery(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"BENTOML_HOME": str(home), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run(
        [sys.executable, "-m", "models.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def adapters_dir(tiny_llm_store: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """Two random adapters of the tiny LLM (different seeds) and one of too high a rank."""
    from training.lora import random_adapter

    out = tmp_path_factory.mktemp("adapters")
    base = tiny_llm_store[1]
    return {
        "one": random_adapter(base, out / "one", seed=1),
        "two": random_adapter(base, out / "two", seed=2),
        "wide": random_adapter(base, out / "wide", seed=3, rank=16),
    }


@pytest.fixture(scope="module")
def features_server(
    tiny_llm_store: tuple[Path, Path],
    adapters_dir: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    home, hf = tiny_llm_store
    (hf / TEMPLATE).write_text(TEMPLATE_TEXT)  # a file in the stored version, as documented
    added = servery(home, "llm", "lora", "add", "tiny-style", "--base", "tiny-llm",
                    str(adapters_dir["one"]))  # fmt: skip
    assert added.returncode == 0, added.stderr
    work = tmp_path_factory.mktemp("llm-features")
    (work / "llm.yaml").write_text(CONFIG)
    keys = {
        "keys": [
            {"name": "all", "key": KEY_ALL},
            {"name": "base", "key": KEY_BASE, "models": ["tiny"]},
            {"name": "adapter", "key": KEY_ADAPTER, "models": ["tiny-private"]},
        ]
    }
    (work / "keys.yaml").write_text(json.dumps(keys))
    env = {
        **cpu_llm_env(models_file=str(work / "llm.yaml")),
        "SERVERY_API_KEYS_FILE": str(work / "keys.yaml"),
        "SERVERY_RELOAD_INTERVAL_S": "0.5",
    }
    srv = start_server(home, "models:\n  - name: iris\n", work, env=env, ready_timeout=300)
    srv.home = home  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(features_server: Server) -> Iterator[Any]:
    url = f"{features_server.url}/v1"
    with openai.OpenAI(base_url=url, api_key=KEY_ALL, max_retries=0) as c:
        yield c


def calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_choice_returns_parseable_calls(client: Any, choice: Any) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=CHAT, tools=[WEATHER], tool_choice=choice, max_tokens=80,
        parallel_tool_calls=False,
    )  # fmt: skip
    message = reply.choices[0].message
    ((name, args),) = calls(message)
    assert name == "get_weather" and isinstance(args["city"], str)
    assert message.tool_calls[0].id and message.tool_calls[0].type == "function"


def test_streamed_tool_call_deltas_add_up_to_a_call(client: Any) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(
        model="tiny", messages=CHAT, tools=[WEATHER], tool_choice=choice, max_tokens=80,
        stream=True, parallel_tool_calls=False,
    )  # fmt: skip
    names, arguments = [], ""
    for chunk in stream:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.function.name:
                names.append(delta.function.name)
            arguments += delta.function.arguments or ""
    assert names == ["get_weather"]
    assert isinstance(json.loads(arguments)["city"], str)


def test_auto_tool_choice_is_accepted_with_a_parser(client: Any) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=CHAT, tools=[WEATHER], tool_choice="auto", max_tokens=8
    )
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_json_schema_output_validates(client: Any) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "A person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        max_tokens=80,
    )
    doc = json.loads(reply.choices[0].message.content)
    assert set(doc) == {"name", "age"}
    assert isinstance(doc["name"], str) and isinstance(doc["age"], int)


def test_chat_template_file_from_the_store_version(client: Any, tiny_llm_store: Any) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_store[1])
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    ids = tokenizer.apply_chat_template(
        CHAT, chat_template=TEMPLATE_TEXT, add_generation_prompt=True
    )["input_ids"]
    assert reply.usage.prompt_tokens == len(ids)


def test_console_chat_picks_an_adapter_and_shows_its_tool_calls(
    features_server: Server, tmp_path: Path
) -> None:
    """The console's chat playground (services/console/static/chat.js) in headless Chromium on
    this server (an LLM server of its own for one browser test would cost more than the test):
    the adapter in the model picker, tools from the settings, the streamed call assembled."""
    errors: list[str] = []
    with chromium() as browser:
        page = browser.new_page()
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
        page.goto(f"{features_server.url}/console/#/chat/tiny-style")
        page.wait_for_selector("#view-key:not([hidden])")
        page.fill("#key-input", KEY_ALL)
        page.press("#key-input", "Enter")
        option = page.wait_for_selector("#chat-model option[value='tiny-style']",
                                        state="attached")  # fmt: skip
        assert option.inner_text() == "tiny-style (LoRA adapter of tiny)"
        assert page.input_value("#chat-model") == "tiny-style"
        page.click("summary:has-text('Settings')")
        page.fill("#chat-max-tokens", "80")
        page.fill("#chat-tools", "not json")
        page.press("#chat-input", "Enter")
        assert page.inner_text("#chat-error").startswith("Tools: not JSON")
        page.fill("#chat-tools", json.dumps([WEATHER]))
        page.select_option("#chat-tool-choice", "required")
        page.fill("#chat-input", "What is the weather in Paris?")
        page.press("#chat-input", "Enter")
        page.wait_for_selector("#chat-log li.assistant[data-state='done']", timeout=60_000)
        calls = page.locator("#chat-log li.assistant ol.tool-calls li")
        assert calls.count() >= 1
        assert calls.nth(0).get_attribute("data-name") == "get_weather"
        text = calls.nth(0).inner_text()
        assert text.startswith("get_weather(") and text.endswith(")"), text
        assert isinstance(json.loads(text[len("get_weather(") : -1])["city"], str)
        assert "tool call" in page.inner_text("#chat-stats")
        assert page.inner_text("#chat-error") == ""
    assert errors == [], errors


def test_the_model_worker_runs_servery_s_lora_ops(client: Any, features_server: Server) -> None:
    """services/compat/vllm_cpu_lora_ops.py and vllm_cpu_lora_linear.py are in force in the
    engine's model worker (another process): the service logs the worker's own report, and the
    worker logs the first layer it ran with an adapter."""
    greedy(client, "tiny-style")

    def log() -> str:
        return features_server.log.read_text(errors="replace")

    report = eventually(
        lambda: [ln for ln in log().splitlines() if "vllm_cpu_lora_ops in the model workers" in ln],
        "the service's report of the worker",
    )
    assert "'replaced': True, 'in_force': True, 'linear': True" in report[0]
    eventually(lambda: "servery vllm_cpu_lora_linear: first call" in log(), "a call", 30)


def greedy(client: Any, model: str) -> str:
    reply = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    return reply.choices[0].text


def card_ids(client: Any) -> dict[str, Any]:
    return {c.id: c for c in client.models.list().data}


def test_adapter_lifecycle(client: Any, features_server: Server, adapters_dir: Any) -> None:
    """add -> listed -> used -> promote/rollback -> removed, greedy outputs telling the weights
    apart, all while serving (vLLM's dynamic LoRA loading, no restart)."""
    home = features_server.home  # type: ignore[attr-defined]
    base = greedy(client, "tiny")
    card = card_ids(client)["tiny-style"]
    assert card.parent == "tiny" and card.root.startswith("tiny-style:")
    v1 = card.root.split(":")[1]
    one = greedy(client, "tiny-style")
    assert one != base and greedy(client, "tiny-style") == one

    # a new version is picked up (no production alias yet: latest serves)
    added = servery(home, "llm", "lora", "add", "tiny-style", "--base", "tiny-llm",
                    str(adapters_dir["two"]))  # fmt: skip
    assert added.returncode == 0, added.stderr
    eventually(lambda: greedy(client, "tiny-style") not in (one, base), "version 2 serves", 60)
    two = greedy(client, "tiny-style")
    assert card_ids(client)["tiny-style"].root != card.root

    # promote v1 to production: NAME follows it; NAME@latest is still v2
    done = servery(home, "models", "promote", "tiny-style", v1)
    assert done.returncode == 0, done.stderr
    eventually(lambda: greedy(client, "tiny-style") == one, "production (v1) serves", 60)
    assert greedy(client, "tiny-style@latest") == two
    assert card_ids(client)["tiny-style@latest"].parent == "tiny"
    done = servery(home, "models", "rollback", "tiny-style")
    assert done.returncode == 0, done.stderr
    eventually(lambda: greedy(client, "tiny-style") == two, "rolled back to latest", 60)

    # per-adapter metrics
    samples = metric_samples(f"{features_server.url}/metrics")
    assert any(
        name == "servery_llm_adapter_requests_total"
        and labels == {"adapter": "tiny-style", "version": v1, "base": "tiny"}
        and value >= 3
        for name, labels, value in samples
    )
    # the router's request series name the adapter (and NAME@ALIAS), not _unknown
    routed = {
        labels["model"]
        for name, labels, _ in samples
        if name == "servery_llm_requests_total" and labels["status"] == "200"
    }
    assert {"tiny", "tiny-style", "tiny-style@latest"} <= routed

    # too high a rank for max_lora_rank 8: not loaded, so not listed
    wide = servery(home, "llm", "lora", "add", "tiny-wide", "--base", "tiny-llm",
                   str(adapters_dir["wide"]))  # fmt: skip
    assert wide.returncode == 0, wide.stderr
    # removed: unloaded, then a 404
    gone = servery(home, "llm", "lora", "remove", "tiny-style")
    assert gone.returncode == 0, gone.stderr
    eventually(lambda: "tiny-style" not in card_ids(client), "the adapter is unlisted", 60)
    assert "tiny-wide" not in card_ids(client)
    with pytest.raises(openai.NotFoundError):
        greedy(client, "tiny-style")
    assert greedy(client, "tiny") == base


def test_a_restricted_key_cannot_use_an_adapter_it_is_not_given(
    features_server: Server, adapters_dir: Any
) -> None:
    home = features_server.home  # type: ignore[attr-defined]
    added = servery(home, "llm", "lora", "add", "tiny-private", "--base", "tiny-llm",
                    str(adapters_dir["one"]))  # fmt: skip
    assert added.returncode == 0, added.stderr
    url = f"{features_server.url}/v1"
    with openai.OpenAI(base_url=url, api_key=KEY_ALL, max_retries=0) as everything:
        eventually(lambda: "tiny-private" in card_ids(everything), "the adapter is listed", 60)
        assert greedy(everything, "tiny-private")
    with openai.OpenAI(base_url=url, api_key=KEY_BASE, max_retries=0) as limited:
        assert set(card_ids(limited)) == {"tiny"}
        with pytest.raises(openai.PermissionDeniedError):
            greedy(limited, "tiny-private")
        assert greedy(limited, "tiny")
    # a key given the adapter may name it at an alias or version too, not its base
    with openai.OpenAI(base_url=url, api_key=KEY_ADAPTER, max_retries=0) as given:
        assert greedy(given, "tiny-private@latest") == greedy(given, "tiny-private")
        with pytest.raises(openai.PermissionDeniedError):
            greedy(given, "tiny")


def test_an_unknown_parser_fails_at_start_naming_the_valid_ones(
    tiny_llm_store: tuple[Path, Path], tmp_path: Path
) -> None:
    """The service's settings refuse it before any engine starts; ``servery llm validate`` says
    the same."""
    config = tmp_path / "llm.yaml"
    config.write_text("models:\n  - name: tiny\n    tag: tiny-llm\n    tool_call_parser: hermez\n")
    out = servery(tiny_llm_store[0], "llm", "validate", str(config))
    assert out.returncode == 2
    assert "tool_call_parser 'hermez' is not one of vLLM's:" in out.stderr
    assert "hermes" in out.stderr and "llama3_json" in out.stderr
    # what `bentoml serve` imports first: the service module reads its settings at import
    env = {**os.environ, "BENTOML_HOME": str(tiny_llm_store[0]), "SERVERY_LLM_ENABLED": "true"}
    env["SERVERY_LLM_MODELS_FILE"] = str(config)
    started = subprocess.run(
        [sys.executable, "-c", "import services.llm.service"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode != 0
    assert "tool_call_parser 'hermez' is not one of vLLM's:" in started.stderr
