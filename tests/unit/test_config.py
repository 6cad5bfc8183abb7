"""models/config.py: Settings from SERVERY_* variables and the model config file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from models.config import (
    DEFAULT_MODELS_FILE,
    ConfigError,
    Framework,
    ModelConfig,
    Placement,
    Settings,
    check_model_name,
    load_model_config,
    parse_model_config,
    salvage_model_config,
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No SERVERY_* variables from the caller's shell, and no ``.env`` in the working directory."""
    for key in list(os.environ):
        if key.upper().startswith("SERVERY_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def config(*models: dict[str, Any], **top: Any) -> ModelConfig:
    return parse_model_config({"models": list(models), **top})


# --- Settings -----------------------------------------------------------------------------------


def test_settings_defaults(clean_env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.models_file == DEFAULT_MODELS_FILE
    assert s.router_workers == 2
    assert s.max_batch_size == 64
    assert s.max_rows_per_request == 1024
    assert s.service_max_batch_size == 64
    assert s.service_max_latency_ms == 50
    assert s.service_workers == 1
    assert s.model_threads == 1
    assert s.request_timeout_s == 60.0


def test_settings_from_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    values = {
        "SERVERY_MODELS_FILE": str(tmp_path / "m.yaml"),
        "SERVERY_ROUTER_WORKERS": "4",
        "SERVERY_MAX_BATCH_SIZE": "128",
        "SERVERY_MAX_ROWS_PER_REQUEST": "10",
        "SERVERY_SERVICE_MAX_BATCH_SIZE": "32",
        "SERVERY_SERVICE_MAX_LATENCY_MS": "200",
        "SERVERY_SERVICE_WORKERS": "3",
        "SERVERY_MODEL_THREADS": "8",
        "SERVERY_REQUEST_TIMEOUT_S": "2.5",
        "SERVERY_SOMETHING_UNKNOWN": "ignored",  # extra="ignore": unknown variables are harmless
    }
    for key, value in values.items():
        clean_env.setenv(key, value)
    s = Settings()
    assert s.models_file == tmp_path / "m.yaml"
    assert s.router_workers == 4
    assert s.max_batch_size == 128
    assert s.max_rows_per_request == 10
    assert s.service_max_batch_size == 32
    assert s.service_max_latency_ms == 200
    assert s.service_workers == 3
    assert s.model_threads == 8
    assert s.request_timeout_s == 2.5


def test_settings_env_names_are_case_insensitive(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("servery_router_workers", "5")
    assert Settings().router_workers == 5


def test_settings_read_dotenv_and_env_wins(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SERVERY_ROUTER_WORKERS=6\nSERVERY_MODEL_THREADS=3\n")
    clean_env.setenv("SERVERY_MODEL_THREADS", "7")
    s = Settings()
    assert s.router_workers == 6
    assert s.model_threads == 7


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("SERVERY_ROUTER_WORKERS", "0"),
        ("SERVERY_ROUTER_WORKERS", "65"),
        ("SERVERY_ROUTER_WORKERS", "two"),
        ("SERVERY_MAX_BATCH_SIZE", "0"),
        ("SERVERY_MAX_BATCH_SIZE", "65537"),
        ("SERVERY_MAX_ROWS_PER_REQUEST", "0"),
        ("SERVERY_SERVICE_MAX_BATCH_SIZE", "0"),
        ("SERVERY_SERVICE_MAX_LATENCY_MS", "0"),
        ("SERVERY_SERVICE_WORKERS", "0"),
        ("SERVERY_MODEL_THREADS", "257"),
        ("SERVERY_REQUEST_TIMEOUT_S", "0"),
        ("SERVERY_REQUEST_TIMEOUT_S", "-1"),
    ],
)
def test_settings_rejects_bad_values(clean_env: pytest.MonkeyPatch, var: str, value: str) -> None:
    clean_env.setenv(var, value)
    field = var.removeprefix("SERVERY_").lower()
    with pytest.raises(ValidationError) as info:
        Settings()
    assert [err["loc"] for err in info.value.errors()] == [(field,)]


# --- parse_model_config -------------------------------------------------------------------------


def test_minimal_config_defaults() -> None:
    cfg = config({"name": "iris"})
    (entry,) = cfg.models
    assert entry.name == "iris"
    assert entry.tag is None
    assert entry.store_tag == "iris:latest"
    assert entry.framework is None
    assert entry.placement is None
    assert entry.max_batch_size is None
    assert cfg.defaults.placement is Placement.INLINE
    assert cfg.defaults.max_batch_size is None
    assert cfg.placement_of(entry) is Placement.INLINE


@pytest.mark.parametrize(
    ("tag", "store_tag"),
    [
        ("iris_v2", "iris_v2:latest"),
        ("iris:abc123", "iris:abc123"),
        ("other:latest", "other:latest"),
    ],
)
def test_store_tag(tag: str, store_tag: str) -> None:
    (entry,) = config({"name": "iris", "tag": tag}).models
    assert entry.store_tag == store_tag


def test_framework_override() -> None:
    (entry,) = config({"name": "bc", "framework": "xgboost"}).models
    assert entry.framework is Framework.XGBOOST


def test_placement_precedence() -> None:
    cfg = config(
        {"name": "a"},
        {"name": "b", "placement": "inline"},
        defaults={"placement": "service"},
    )
    a, b = cfg.models
    assert cfg.placement_of(a) is Placement.SERVICE  # defaults
    assert cfg.placement_of(b) is Placement.INLINE  # the entry wins over defaults

    cfg = config({"name": "c", "placement": "service"})
    assert cfg.placement_of(cfg.models[0]) is Placement.SERVICE


def test_batch_size_precedence() -> None:
    settings = Settings(max_batch_size=32, _env_file=None)
    cfg = config({"name": "a", "max_batch_size": 8}, {"name": "b"}, defaults={"max_batch_size": 16})
    a, b = cfg.models
    assert cfg.batch_size_of(a, settings) == 8  # entry
    assert cfg.batch_size_of(b, settings) == 16  # defaults
    bare = config({"name": "c"})
    assert bare.batch_size_of(bare.models[0], settings) == 32  # settings


@pytest.mark.parametrize("name", ["a", "0", "iris", "breast_cancer", "iris-v2.1", "a" * 64, "9to5"])
def test_valid_names(name: str) -> None:
    assert config({"name": name}).models[0].name == name


@pytest.mark.parametrize(
    "name",
    [
        "../etc",
        "Iris",
        "a b",
        "",
        "a/b",
        "-iris",
        "iris-",
        "iris.",
        "a" * 65,
        "ïris",
        "iris\nx",
        "iris\n",
    ],
)
def test_invalid_names_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match="lowercase letters") as info:
        parse_model_config({"models": [{"name": name}]}, "my.yaml")
    assert "invalid model config my.yaml" in str(info.value)
    assert isinstance(info.value.__cause__, ValidationError)


def test_duplicate_names_rejected() -> None:
    with pytest.raises(ConfigError, match="'iris' is listed twice"):
        config({"name": "iris"}, {"name": "digits"}, {"name": "iris", "tag": "iris:v2"})


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"models": [{"name": "iris", "replicas": 2}]}, "replicas"),
        ({"models": [{"name": "iris"}], "defaults": {"gpu": True}}, "gpu"),
        ({"models": [{"name": "iris"}], "version": 1}, "version"),
    ],
)
def test_extra_keys_rejected(data: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match="Extra inputs are not permitted") as info:
        parse_model_config(data)
    assert where in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        {"models": []},
        {},
        {"models": None},
        None,
        [],
        "models",
        {"models": [{"tag": "iris:latest"}]},  # no name
        {"models": [{"name": "iris", "placement": "gpu"}]},
        {"models": [{"name": "iris", "framework": "tensorflow"}]},
        {"models": [{"name": "iris", "max_batch_size": 0}]},
        {"models": [{"name": "iris"}], "defaults": {"max_batch_size": 0}},
        {"models": [{"name": "iris"}], "defaults": {"placement": "remote"}},
    ],
)
def test_invalid_configs_rejected(data: Any) -> None:
    with pytest.raises(ConfigError, match="invalid model config <config>"):
        parse_model_config(data)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- load_model_config --------------------------------------------------------------------------


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "defaults:\n  placement: service\n  max_batch_size: 4\n"
        "models:\n  - name: iris\n    tag: iris:v1\n  - name: digits\n    placement: inline\n"
    )
    for arg in (path, str(path)):
        cfg = load_model_config(arg)
        iris, digits = cfg.models
        assert iris.store_tag == "iris:v1"
        assert cfg.placement_of(iris) is Placement.SERVICE
        assert cfg.placement_of(digits) is Placement.INLINE
        assert cfg.defaults.max_batch_size == 4


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read model config") as info:
        load_model_config(path)
    assert str(path) in str(info.value)


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read model config") as info:
        load_model_config(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("models: [\n  - name: iris\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as info:
        load_model_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "models:\n", "models: []\n"])
def test_empty_or_modelless_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="invalid model config") as info:
        load_model_config(path)
    assert str(path) in str(info.value)


def test_invalid_entry_in_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  - name: ../etc\n")
    with pytest.raises(ConfigError) as info:
        load_model_config(path)
    assert str(path) in str(info.value)
    assert "'../etc'" in str(info.value)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """Issue 20 item 12: ``read_text`` raised UnicodeDecodeError, which no caller catches (every
    reload failed with a traceback)."""
    path = tmp_path / "models.yaml"
    path.write_bytes(b"models:\n  - name: iris\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_model_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("tag", ["../etc", "a/b:latest", "Iris", "..:v1", "iris:../x", "iris:"])
def test_tags_name_a_store_folder_by_the_model_name_rule(tag: str) -> None:
    """Issue 20 item 13: the tag's name is a folder of the store; it follows the name rule."""
    with pytest.raises(ConfigError):
        config({"name": "iris", "tag": tag})


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "A", "x" * 65, 3, None])
def test_check_model_name_is_the_one_rule(name: Any) -> None:
    with pytest.raises(ValueError, match="lowercase letters"):
        check_model_name(name)
    if isinstance(name, str):
        with pytest.raises(ConfigError, match="lowercase letters"):
            config({"name": name})


def test_salvage_keeps_the_valid_entries_and_names_the_others(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "defaults:\n  placement: service\nmodels:\n"
        "  - name: iris\n"
        "  - name: bad\n    max_queue: 0\n"
        "  - name: ../etc\n"
        "  - name: twice\n  - name: twice\n"
        "  - digits\n"
    )
    with pytest.raises(ConfigError):
        load_model_config(path)
    cfg, errors = salvage_model_config(path)
    assert [m.name for m in cfg.models] == ["iris"]
    assert cfg.placement_of(cfg.models[0]) is Placement.SERVICE
    assert set(errors) == {"bad", "models[2]", "twice", "models[5]"}
    assert "max_queue" in errors["bad"] and str(path) in errors["bad"]
    assert "listed twice" in errors["twice"]


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe", b"models: [\n", b"models: 3\n", b"defaults: {placement: gpu}\nmodels: []\n"],
)
def test_salvage_raises_when_nothing_can_be_salvaged(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "models.yaml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError):
        salvage_model_config(path)


def test_shipped_default_file() -> None:
    assert DEFAULT_MODELS_FILE.is_file()
    cfg = load_model_config(DEFAULT_MODELS_FILE)
    assert [m.name for m in cfg.models] == ["iris", "breast_cancer", "digits"]
    assert [m.store_tag for m in cfg.models] == [
        "iris:latest",
        "breast_cancer:latest",
        "digits:latest",
    ]
    assert all(cfg.placement_of(m) is Placement.INLINE for m in cfg.models)


# --- version_policy, routing, pinned tags -------------------------------------------------------


def test_version_policy_defaults_to_latest_one() -> None:
    (entry,) = config({"name": "iris"}).models
    assert entry.version_policy.latest == 1
    assert entry.version_policy.all is False
    assert entry.version_policy.specific is None
    assert entry.version_policy.describe() == "latest: 1"
    assert entry.routing is None
    # an explicit but empty policy, or all: false, is the default too
    for policy in ({}, {"all": False}, {"latest": None}):
        (e,) = config({"name": "iris", "version_policy": policy}).models
        assert e.version_policy.latest == 1 and e.version_policy.describe() == "latest: 1"


@pytest.mark.parametrize(
    ("policy", "described"),
    [
        ({"latest": 3}, "latest: 3"),
        ({"latest": 1024}, "latest: 1024"),
        ({"all": True}, "all"),
        ({"specific": ["abc", "def123"]}, "specific: abc, def123"),
        ({"all": False, "specific": ["abc"]}, "specific: abc"),
    ],
)
def test_version_policy_kinds(policy: dict[str, Any], described: str) -> None:
    (entry,) = config({"name": "iris", "version_policy": policy}).models
    assert entry.version_policy.describe() == described


@pytest.mark.parametrize(
    "policy",
    [
        {"latest": 2, "all": True},
        {"latest": 2, "specific": ["abc"]},
        {"all": True, "specific": ["abc"]},
        {"latest": 1, "all": True, "specific": ["abc"]},
    ],
)
def test_version_policy_takes_one_kind(policy: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="version_policy takes one of latest, all, specific"):
        config({"name": "iris", "version_policy": policy})


@pytest.mark.parametrize(
    "policy",
    [
        {"latest": 0},
        {"latest": -1},
        {"latest": 1025},
        {"specific": []},
        {"specific": "abc"},  # a list, not a string
        {"newest": 2},
        "latest",
    ],
)
def test_invalid_version_policies_rejected(policy: Any) -> None:
    with pytest.raises(ConfigError, match="version_policy"):
        config({"name": "iris", "version_policy": policy})


@pytest.mark.parametrize(
    ("tag", "store_name", "pinned"),
    [
        (None, "iris", None),
        ("iris", "iris", None),
        ("iris:latest", "iris", None),
        ("iris_v2", "iris_v2", None),
        ("iris:abc123", "iris", "abc123"),
        ("other:def", "other", "def"),
    ],
)
def test_store_name_and_pinned_version(
    tag: str | None, store_name: str, pinned: str | None
) -> None:
    (entry,) = config({"name": "iris", "tag": tag}).models
    assert entry.store_name == store_name
    assert entry.pinned_version == pinned


def test_pinned_tag_is_a_specific_policy() -> None:
    (entry,) = config({"name": "iris", "tag": "iris:abc123"}).models
    assert entry.version_policy.specific == ["abc123"]
    assert entry.version_policy.latest is None and entry.version_policy.all is False
    assert entry.version_policy.describe() == "specific: abc123"


def test_pinned_entry_round_trips_through_model_dump() -> None:
    (entry,) = config({"name": "iris", "tag": "iris:abc123"}).models
    again = type(entry).model_validate(entry.model_dump())
    assert again.version_policy.specific == ["abc123"]


@pytest.mark.parametrize("policy", [{"latest": 2}, {"all": True}, {"specific": ["other"]}, {}])
def test_pinned_tag_and_version_policy_together_rejected(policy: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="pins a version; use either") as info:
        config({"name": "iris", "tag": "iris:abc123", "version_policy": policy})
    assert "'iris:abc123'" in str(info.value)


def test_unpinned_tag_with_version_policy_is_fine() -> None:
    (entry,) = config(
        {"name": "iris", "tag": "iris:latest", "version_policy": {"all": True}}
    ).models
    assert entry.version_policy.all is True


def test_routing_split_and_shadow() -> None:
    (entry,) = config(
        {
            "name": "iris",
            "routing": {"split": {"production": 90, "staging": 10}, "shadow": "candidate"},
        }
    ).models
    assert entry.routing is not None
    assert entry.routing.split == {"production": 90.0, "staging": 10.0}  # kept as written
    assert entry.routing.shadow == "candidate"
    (entry,) = config({"name": "iris", "routing": {"shadow": "candidate"}}).models
    assert entry.routing is not None and entry.routing.split is None
    (entry,) = config({"name": "iris", "routing": {"split": {"a": 0, "b": 0.5}}}).models
    assert entry.routing is not None and entry.routing.split == {"a": 0.0, "b": 0.5}


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"production": -1, "staging": 10}, "finite numbers >= 0"),
        ({"production": float("nan"), "staging": 10}, "finite numbers >= 0"),
        ({"production": float("inf"), "staging": 10}, "finite numbers >= 0"),
        ({"production": -float("inf")}, "finite numbers >= 0"),
        ({"production": 0, "staging": 0}, "must not all be 0"),
        ({"production": 0}, "must not all be 0"),
        ({}, "at least 1 item"),
        ({"production": "lots"}, "valid number"),
    ],
)
def test_invalid_split_weights_rejected(split: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config({"name": "iris", "routing": {"split": split}})


def test_routing_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="Extra inputs are not permitted"):
        config({"name": "iris", "routing": {"split": {"a": 1}, "mirror": "b"}})


def test_versions_and_routing_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        "  - name: digits\n"
        "    version_policy:\n"
        "      latest: 2\n"
        "    routing:\n"
        "      split: {production: 90, staging: 10}\n"
        "      shadow: candidate\n"
        "  - name: iris\n"
        "    tag: iris:abc123\n"
    )
    digits, iris = load_model_config(path).models
    assert digits.version_policy.describe() == "latest: 2"
    assert digits.routing is not None and digits.routing.split == {"production": 90, "staging": 10}
    assert iris.version_policy.describe() == "specific: abc123"
    path.write_text("models:\n  - name: iris\n    routing:\n      split: {a: .nan, b: 1}\n")
    with pytest.raises(ConfigError, match="finite numbers >= 0"):
        load_model_config(path)
