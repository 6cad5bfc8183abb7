"""services/llm/settings.py: parsing SERVERY_LLM_* and building vLLM's flags (no vLLM import)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.llm.settings import GiB, LLMSettings, engine_argv, engine_devices


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
    with pytest.raises(ValidationError, match="tasks point at no listed LLM: small -> nope"):
        settings(models="tiny=tiny-llm", tasks="small=nope")
    with pytest.raises(ValidationError, match="tasks named like a served LLM: chat"):
        settings(models="tiny=tiny-llm,chat=smollm2", tasks="chat=tiny")


def test_repeated_names_and_tensor_parallel_over_gpus_rejected() -> None:
    with pytest.raises(ValidationError, match="repeat"):
        settings(models="a=x,a=y")
    with pytest.raises(ValidationError, match="tensor_parallel_size 2"):
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


def test_per_model_tensor_parallel_and_eager_are_accepted_and_used() -> None:
    """Old behaviour: validate accepted these per model and the service refused them."""
    s = settings(
        models='[{"name": "a", "tag": "x", "tensor_parallel_size": 2, "enforce_eager": true},'
        ' {"name": "b", "tag": "y", "devices": [2], "gpu_memory_utilization": 0.3,'
        ' "kv_cache_dtype": "fp8", "max_num_batched_tokens": 4096}]',
        gpus="3",
    )
    a = engine_argv(s.models[0], s, "/m", on_cpu=False)
    assert a[a.index("--tensor-parallel-size") + 1] == "2" and "--enforce-eager" in a
    assert a[a.index("--gpu-memory-utilization") + 1] == "0.92"  # vLLM 0.32's default
    b = engine_argv(s.models[1], s, "/m", on_cpu=False)
    assert b[b.index("--tensor-parallel-size") + 1] == "1" and "--enforce-eager" not in b
    assert b[b.index("--kv-cache-dtype") + 1] == "fp8"
    assert b[b.index("--max-num-batched-tokens") + 1] == "4096"
    # each engine sees only its GPUs, among those BentoML gave the process
    assert engine_devices(s.models[0], s, "5,6,7") == "5,6"
    assert engine_devices(s.models[1], s, "5,6,7") == "7"
    assert engine_devices(s.models[1], s, None) == "2"
    assert engine_devices(s.models[0], settings(models="a=x"), "0") is None  # CPU


def test_engines_that_cannot_share_their_gpu_are_refused_at_start() -> None:
    """Old behaviour: two engines both took 0.90 of device 0 and the second died in vLLM."""
    with pytest.raises(ValidationError, match=r"GPU 0: .* add up to 1.84 > 1 \(a 0.92, b 0.92\)"):
        settings(models="a=x,b=y", gpus="1")
    s = settings(models="a=x,b=y", gpus="1", gpu_memory_utilization="0.45")
    assert [engine_devices(m, s, "3") for m in s.models] == ["3", "3"]
    with pytest.raises(ValidationError, match=r"needs GPU\(s\) \[1\]"):
        settings(models='[{"name": "a", "tag": "x", "devices": [1]}]', gpus="1")


def test_the_models_file_is_the_validate_schema(tmp_path) -> None:
    path = tmp_path / "llm.yaml"
    path.write_text(
        "models:\n  - {name: a, tag: x, tensor_parallel_size: 1, max_num_seqs: 64}\n"
        "tasks: {chat: a}\ngpu: {memory_gib: 79.6, count: 1}\n"
    )
    s = settings(models_file=str(path), max_num_seqs="8", tasks="code=a")
    assert s.models[0].max_num_seqs == 64 and s.tasks == {"chat": "a", "code": "a"}
    argv = engine_argv(s.models[0], s, "/m", on_cpu=True)
    assert argv[argv.index("--max-num-seqs") + 1] == "64"  # the file's, over the env's
    path.write_text("llms:\n  - {name: a, tag: x}\n")
    with pytest.raises(ValidationError, match="'models:' \\(was 'llms:'\\)"):
        settings(models_file=str(path))
