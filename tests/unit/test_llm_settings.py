"""services/llm/settings.py: parsing SERVERY_LLM_* and building vLLM's flags (no vLLM import)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.llm.settings import GiB, LLMSettings, engine_argv


def settings(**env: str) -> LLMSettings:
    return LLMSettings(_env_file=None, **env)


def test_models_forms() -> None:
    s = settings(models="chat=smollm2:latest,tiny-llm")
    assert [(m.name, m.tag) for m in s.models] == [
        ("chat", "smollm2:latest"),
        ("tiny-llm", "tiny-llm:latest"),
    ]
    s = settings(models='[{"name": "a", "tag": "x:1", "max_model_len": 512}]')
    assert s.models[0].max_model_len == 512


def test_tasks_map_to_served_models() -> None:
    s = settings(models="tiny=tiny-llm,chat=smollm2", tasks="small=tiny,large=chat")
    assert s.tasks == {"small": "tiny", "large": "chat"}
    assert settings(models="tiny=tiny-llm", tasks='{"code": "tiny"}').tasks == {"code": "tiny"}
    with pytest.raises(ValidationError, match="not a served LLM"):
        settings(models="tiny=tiny-llm", tasks="small=nope")
    with pytest.raises(ValidationError, match="name of a served LLM"):
        settings(models="tiny=tiny-llm,chat=smollm2", tasks="chat=tiny")


def test_repeated_names_and_tensor_parallel_over_gpus_rejected() -> None:
    with pytest.raises(ValidationError, match="repeat"):
        settings(models="a=x,a=y")
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        settings(models="a=x", gpus="1", tensor_parallel_size="2")


def test_engine_flags_cpu_and_gpu() -> None:
    s = settings(models='[{"name": "a", "tag": "x", "cpu_kvcache_gib": 0.5}]', enforce_eager="true")
    argv = engine_argv(s.models[0], s, "/m", on_cpu=True)
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(int(0.5 * GiB))
    assert "--enforce-eager" in argv and "--gpu-memory-utilization" not in argv
    s = settings(models="a=x", gpus="2", tensor_parallel_size="2", gpu_memory_utilization="0.8")
    argv = engine_argv(s.models[0], s, "/m", on_cpu=False)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.8"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert "--kv-cache-memory-bytes" not in argv
    assert s.resources() == {"gpu": 2} and settings(models="a=x").resources() == {}


def test_default_cpu_kv_cache_is_bounded() -> None:
    s = settings(models="a=x")
    argv = engine_argv(s.models[0], s, "/m", on_cpu=True)
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(GiB)
