"""A framework service serving several store versions: on-demand loads, bad versions, hot reload.

One sklearn service on its own, over a temporary store holding four versions of a tiny iris
model (oldest first): ``old`` and ``older`` are stored but not planned (``latest: 1``), ``broken``
has a damaged model file, ``current`` is the planned default.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.harness.server import Server, start_server
from bench.harness.store import bentoml_store, save_iris
from tests.conftest import eventually, eventually_async

CONFIG = "models:\n  - name: iris-svc\n    tag: iris\n    placement: service\n"
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


def local_proba(home: Path, version: str) -> np.ndarray:
    from models.config import ModelEntry
    from services.runtime.predictors import load_runtime

    with bentoml_store(home):
        runtime = load_runtime(ModelEntry(name="iris-svc", tag="iris"), version=version)
    return runtime.predict(np.asarray(ROWS, dtype=runtime.info.dtype))["predict_proba"]


@dataclass
class Versioned:
    server: Server
    home: Path
    versions: dict[str, str]
    """role (older, old, broken, current) -> version id"""


@pytest.fixture(scope="module")
def versioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Versioned]:
    home = tmp_path_factory.mktemp("versions") / "bentoml"
    with bentoml_store(home):
        versions = {role: save_iris(c=c) for role, c in [("older", 0.01), ("old", 0.1)]}
        versions["broken"] = save_iris(c=0.5)
        versions["current"] = save_iris(c=10.0)
    # model.yaml stays intact, so the store lists the version; its model file does not load
    (home / "models" / "iris" / versions["broken"] / "model.joblib").write_bytes(b"not a model")
    srv = start_server(
        home,
        CONFIG,
        tmp_path_factory.mktemp("versions-serve"),
        target="services:SklearnService",
        env={"SERVERY_RELOAD_INTERVAL_S": "0.5"},
    )
    try:
        yield Versioned(srv, home, versions)
    finally:
        srv.stop()


def predict(server: Server, version: str | None = None) -> httpx.Response:
    rows = [{"model": "iris-svc", "inputs": ROWS[0], **({"version": version} if version else {})}]
    return httpx.post(f"{server.url}/predict", json={"rows": rows}, timeout=30)


def prepare(server: Server, version: str, model: str = "iris-svc") -> httpx.Response:
    return httpx.post(
        f"{server.url}/prepare", json={"model": model, "version": version}, timeout=30
    )


def test_serves_only_the_planned_default_at_start(versioned: Versioned) -> None:
    resp = predict(versioned.server)
    assert resp.status_code == 200, resp.text
    assert resp.json()[0]["version"] == versioned.versions["current"]
    # stored but not planned: not loaded, so the public API does not offer it
    resp = predict(versioned.server, versioned.versions["old"])
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["type"] == "model_not_found"


def test_prepare_loads_an_unplanned_version(versioned: Versioned) -> None:
    srv, old = versioned.server, versioned.versions["old"]
    resp = prepare(srv, old)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"model": "iris-svc", "version": old, "loaded": True}

    async def rows() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/predict",
                        json={"rows": [{"model": "iris-svc", "version": old, "inputs": r}]},
                    )
                    for r in ROWS
                )
            )

    responses = asyncio.run(rows())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    got = np.array([r.json()[0]["probabilities"] for r in responses])
    assert {r.json()[0]["version"] for r in responses} == {old}
    np.testing.assert_allclose(got, local_proba(versioned.home, old), rtol=1e-6, atol=1e-9)
    # the versions really differ, so the check above proves which one answered
    assert not np.allclose(got, local_proba(versioned.home, versioned.versions["current"]))
    assert predict(srv).json()[0]["version"] == versioned.versions["current"]


def test_broken_version_fails_prepare_and_the_good_ones_keep_serving(versioned: Versioned) -> None:
    srv, broken = versioned.server, versioned.versions["broken"]
    for _ in range(2):  # the second answer comes from the remembered failure, same contract
        resp = prepare(srv, broken)
        assert resp.status_code == 500, resp.text
        error = resp.json()["error"]
        assert error["type"] == "model_load_failed"
        assert broken in error["message"] and "not a model" not in error["message"]
    assert predict(srv, broken).status_code == 404
    resp = predict(srv)
    assert resp.status_code == 200, resp.text
    assert resp.json()[0]["version"] == versioned.versions["current"]
    assert "Traceback" in log(srv)  # the cause is logged, not sent


@pytest.mark.parametrize(
    ("model", "version"),
    [
        ("iris-svc", "nosuchversion000"),
        ("iris-svc", "latest"),  # must not resolve to some version behind the caller's back
        ("iris-svc", "../../etc"),
        ("nope", "nosuchversion000"),
    ],
)
def test_prepare_unknown_model_or_version_is_404(
    versioned: Versioned, model: str, version: str
) -> None:
    resp = prepare(versioned.server, version, model)
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["type"] == "model_not_found"


# --- the same service class in this process (no server): what HTTP cannot observe -------------


@pytest.fixture
def in_process(versioned: Versioned, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A FrameworkService instance on the module's store; counts model loads by version."""
    from models.config import Framework
    from services.frameworks import base as framework

    config = tmp_path / "models.yaml"
    config.write_text(CONFIG)
    monkeypatch.setattr(framework.SETTINGS, "models_file", config)
    monkeypatch.setattr(framework, "freeze_heap", lambda: None)  # not this test process's heap
    loads: list[str] = []
    real = framework.load_runtime

    def counting(entry, threads=1, version=None):
        loads.append(version)
        time.sleep(0.05)  # a load long enough for the callers below to overlap it
        return real(entry, threads, version)

    monkeypatch.setattr(framework, "load_runtime", counting)

    class Service(framework.FrameworkService):
        framework = Framework.SKLEARN

    with bentoml_store(versioned.home):
        yield Service(), loads
    framework._LOADED.clear()


def test_concurrent_on_demand_loads_load_a_version_once(versioned: Versioned, in_process) -> None:
    svc, loads = in_process
    older = versioned.versions["older"]
    assert loads == [versioned.versions["current"]]  # start-up: the plan only

    async def burst():
        return await asyncio.gather(*(svc._ensure("iris-svc", older) for _ in range(8)))

    runtimes = asyncio.run(burst())
    assert loads.count(older) == 1
    assert all(r is runtimes[0] for r in runtimes) and runtimes[0].info.version == older


def test_unplanned_versions_unload_only_after_the_grace(versioned: Versioned, in_process) -> None:
    from services.frameworks import base as framework

    svc, _ = in_process
    current, old, older = (versioned.versions[k] for k in ("current", "old", "older"))

    async def load_both():
        await svc._ensure("iris-svc", old)
        await svc._ensure("iris-svc", older)

    asyncio.run(load_both())
    assert svc._sweep() == []  # just used: within the grace
    for key in list(svc._last_used):  # everything idle for longer than the grace now
        svc._last_used[key] -= svc._grace_s + 1
    svc._last_used[("iris-svc", old)] = time.monotonic()  # ... except one just used
    assert svc._sweep() == [("iris-svc", older)]  # the planned default stays, idle or not
    assert sorted(framework._LOADED["iris-svc"].runtimes) == sorted([current, old])
    assert framework._LOADED["iris-svc"].default == current


def test_the_watcher_survives_a_failing_reload(in_process) -> None:
    svc, _ = in_process
    calls = []

    async def failing() -> None:
        calls.append(1)
        raise RuntimeError("store on fire")

    svc._reconcile = failing
    svc._desired.settle(())  # "changed" on every tick

    async def run() -> bool:
        task = asyncio.create_task(svc._watch(0.01))
        # three reloads: the watcher went on after the first two failed
        await eventually_async(lambda: len(calls) >= 3 or task.done(), "a third reload")
        alive = not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return alive

    assert asyncio.run(run()) and len(calls) >= 3


def test_a_broken_new_version_leaves_the_default_where_it_was(
    versioned: Versioned, tmp_path: Path
) -> None:
    """The newest version is the plan's default; when it cannot load, the old default stays."""
    import shutil

    srv, current = versioned.server, versioned.versions["current"]
    staging = tmp_path / "bentoml"
    with bentoml_store(staging):
        bad = save_iris(c=1.0)
    (staging / "models" / "iris" / bad / "model.joblib").write_bytes(b"not a model")
    # move it in whole (same file system: an atomic rename), so no reload sees it half-broken
    incoming = versioned.home / f".incoming-{bad}"
    shutil.copytree(staging / "models" / "iris" / bad, incoming)
    incoming.rename(versioned.home / "models" / "iris" / bad)

    eventually(
        lambda: f"version {bad} failed to load" in log(srv),
        f"the failed load of {bad} in the log",
        every=0.2,
    )
    resp = predict(srv)
    assert resp.status_code == 200, resp.text
    assert resp.json()[0]["version"] == current
    assert prepare(srv, bad).status_code == 500


def log(server: Server) -> str:
    return server.log.read_text(errors="replace")


def test_new_version_becomes_the_default_without_restart(versioned: Versioned) -> None:
    """Last in this module: it changes the store the other tests read."""
    srv, before = versioned.server, versioned.versions["current"]
    with bentoml_store(versioned.home):
        newest = save_iris(c=100.0)

    def answered_by_newest() -> bool:
        resp = predict(srv)
        assert resp.status_code == 200, resp.text
        return resp.json()[0]["version"] == newest

    eventually(answered_by_newest, f"the service answering with {newest}", every=0.2)
    np.testing.assert_allclose(
        [r["probabilities"] for r in predict_rows(srv)],
        local_proba(versioned.home, newest),
        rtol=1e-6,
        atol=1e-9,
    )
    # the previous default left the plan but stays loaded for the grace period
    resp = predict(srv, before)
    assert resp.status_code == 200, resp.text
    assert resp.json()[0]["version"] == before


def predict_rows(server: Server) -> list[dict]:
    rows = [{"model": "iris-svc", "inputs": r} for r in ROWS]
    resp = httpx.post(f"{server.url}/predict", json={"rows": rows}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()
