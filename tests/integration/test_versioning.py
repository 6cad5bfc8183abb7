"""Model versioning against a real ``bentoml serve``: aliases, pins, split, shadow, hot reload.

One server per module, on a store of its own holding versions of model ``vm`` that are told apart
by their answers: version k of a constant classifier predicts class k for every row, so a response
proves which version computed it, not just which version it names. Tests change the store
(``servery models promote``/``rollback`` in a subprocess, new versions) and the models file while
the server runs, and wait for the router's polling reload (0.5 s here) to show on every router
worker (``Env.wait``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench.harness.server import ROOT, Server, metric_samples, start_server
from tests.conftest import (
    WAIT_S,
    bentoml_store,
    eventually,
    eventually_async,
    on_every_router_worker,
)

NAME = "vm"
ROW = [[5.1, 3.5, 1.4, 0.2]]
RELOAD_S = 0.5
CLASSES = ["zero", "one", "two", "three"]


def save_constant(home: Path, k: int, *, corrupt: bool = False) -> str:
    """Save a version of ``vm`` that predicts class ``k`` for every row; returns its version."""
    import bentoml
    from sklearn.dummy import DummyClassifier

    from models.store import MODEL_FILES, data_sha256, save_model

    x = np.random.default_rng(0).normal(size=(8, 4))
    y = np.arange(8) % len(CLASSES)
    clf = DummyClassifier(strategy="constant", constant=k).fit(x, y)
    with bentoml_store(home):
        saved = save_model(
            NAME,
            "sklearn",
            clf,
            feature_names=["a", "b", "c", "d"],
            class_names=CLASSES,
            metrics={"k": k},
            params={},
            data_hash=data_sha256(x, y),
            dtype="float64",
        )
        if corrupt:
            # Damage the stored model file itself: the version lists fine but cannot be loaded.
            Path(saved.path_of(MODEL_FILES["sklearn"])).write_bytes(b"not a pickle")
            bentoml.models.get(saved.tag)  # still readable metadata
    return saved.tag.version


def servery_cli(home: Path, *args: str) -> str:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    out = subprocess.run(
        [sys.executable, "-m", "models.cli", "models", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def config(**extra: str) -> str:
    lines = [
        "models:",
        f"  - name: {NAME}",
        "    version_policy:",
        f"      {extra.pop('policy', 'latest: 2')}",
    ]
    if "routing" in extra:
        lines += ["    routing:", *[f"      {line}" for line in extra.pop("routing").splitlines()]]
    return "\n".join(lines) + "\n"


class Env:
    """The running server, its store and models file, and helpers to change them."""

    def __init__(self, server: Server, home: Path, models_file: Path, versions: list[str]):
        self.server, self.home, self.models_file = server, home, models_file
        self.versions = versions
        self.client = httpx.Client(base_url=server.url, timeout=30)

    def predict(
        self, version: str | None = None, client: httpx.Client | None = None, **headers: str
    ) -> httpx.Response:
        body: dict[str, Any] = {"model": NAME, "inputs": ROW}
        if version is not None:
            body["version"] = version
        return (client or self.client).post("/predict", json=body, headers=headers)

    def write_config(self, text: str) -> None:
        # write-then-rename, as editors and Kubernetes ConfigMaps do: never a half-written file
        tmp = self.models_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.models_file)

    def wait(self, check: Callable[[httpx.Client], bool], what: str) -> None:
        """Wait until ``check(client)`` holds on every router worker (each reloads on its own
        poll; :func:`tests.conftest.on_every_router_worker`), so that any request afterwards,
        on any connection, sees the change."""
        try:
            on_every_router_worker(self.server, check, what, WAIT_S)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.server.log_tail(30)}") from e

    def answers_with(
        self, version: str, routed_by: str | None = None
    ) -> Callable[[httpx.Client], bool]:
        def check(client: httpx.Client) -> bool:
            r = self.predict(client=client)
            ok = r.status_code == 200 and r.json()["version"] == version
            return ok and (routed_by is None or r.json()["routed_by"] == routed_by)

        return check

    @contextlib.contextmanager
    def corrupt_version(self) -> Iterator[str]:
        """Save a version whose model file is damaged; yields it once ``GET /models`` reports its
        failed load, and deletes it from the store afterwards."""
        bad = save_constant(self.home, 3, corrupt=True)
        try:

            def reported(client: httpx.Client) -> bool:
                described = client.get(f"/models/{NAME}").json()
                return any(e["version"] == bad for e in described["load_errors"])

            self.wait(reported, "the failed load shows in /models")
            yield bad
        finally:
            with bentoml_store(self.home):
                import bentoml

                bentoml.models.delete(f"{NAME}:{bad}")

    def reset(self) -> None:
        """No aliases, the default config: the newest version answers."""
        (self.home / "models" / NAME / "servery-aliases.json").unlink(missing_ok=True)
        self.write_config(config())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    home = tmp_path_factory.mktemp("versioning") / "bentoml"
    versions = [save_constant(home, k) for k in (0, 1)]
    workdir = tmp_path_factory.mktemp("versioning-serve")
    server = start_server(home, config(), workdir, env={"SERVERY_RELOAD_INTERVAL_S": str(RELOAD_S)})
    e = Env(server, home, workdir / "models.yaml", versions)
    try:
        yield e
    finally:
        e.client.close()
        server.stop()


@pytest.fixture(autouse=True)
def _reset(env: Env) -> Iterator[None]:
    env.reset()
    env.wait(env.answers_with(env.versions[1], "latest"), "reset to the newest version")
    yield


def test_default_is_newest_then_production_alias(env: Env) -> None:
    v0, v1 = env.versions
    r = env.predict()
    assert r.status_code == 200
    assert (r.json()["version"], r.json()["routed_by"], r.json()["predictions"]) == (
        v1,
        "latest",
        [1],
    )
    servery_cli(env.home, "promote", NAME, v0, "--alias", "production")
    env.wait(env.answers_with(v0, "alias:production"), "promote to production")
    r = env.predict()
    assert r.json()["predictions"] == [0], "the answer must come from the promoted version"


def test_pinned_versions_prefixes_and_aliases(env: Env) -> None:
    v0, v1 = env.versions
    servery_cli(env.home, "promote", NAME, v0, "--alias", "staging")
    env.wait(lambda c: env.predict("staging", c).status_code == 200, "staging alias served")
    for ref, version, how in [
        (v0, v0, "version"),
        (v1[:6], v1, "version"),
        ("staging", v0, "alias:staging"),
        ("latest", v1, "latest"),
    ]:
        r = env.predict(ref)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["version"], body["routed_by"]) == (version, how), ref
        assert body["predictions"] == [env.versions.index(version)]
    missing = env.predict("nosuchversion")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "model_not_found"
    assert "nosuchversion" in missing.json()["error"]["message"]


def test_version_outside_policy_is_404_with_reason(env: Env) -> None:
    v0, v1 = env.versions
    env.write_config(config(policy="latest: 1"))
    env.wait(lambda c: env.predict(v0, c).status_code == 404, "policy latest: 1 drops the older")
    body = env.predict(v0).json()
    assert "not served" in body["error"]["message"] and "latest: 1" in body["error"]["message"]
    models = env.client.get(f"/models/{NAME}").json()
    assert [v["version"] for v in models["versions"]] == [v1]
    assert models["version_policy"] == "latest: 1"


def test_oip_rest_and_grpc_name_the_version(env: Env) -> None:
    import tritonclient.grpc as grpcclient

    v0, v1 = env.versions
    servery_cli(env.home, "promote", NAME, v0, "--alias", "staging")
    env.wait(lambda c: env.predict("staging", c).status_code == 200, "staging alias served")
    tensor = {"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": ROW[0]}
    r = env.client.post(f"/v2/models/{NAME}/versions/staging/infer", json={"inputs": [tensor]})
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == v0
    assert r.json()["parameters"] == {"routed_by": "alias:staging"}
    r = env.client.post(f"/v2/models/{NAME}/infer", json={"inputs": [tensor]})
    assert (r.json()["model_version"], r.json()["parameters"]["routed_by"]) == (v1, "latest")
    meta = env.client.get(f"/v2/models/{NAME}").json()
    assert sorted(meta["versions"]) == sorted([v0, v1])

    client = grpcclient.InferenceServerClient(env.server.grpc_url)
    try:
        inp = grpcclient.InferInput("input-0", [1, 4], "FP64")
        inp.set_data_from_numpy(np.asarray(ROW, dtype=np.float64))
        result = client.infer(NAME, [inp], model_version="staging")
        response = result.get_response()
        assert response.model_version == v0
        assert response.parameters["routed_by"].string_param == "alias:staging"
        assert result.as_numpy("predict").tolist() == [0]
        assert client.infer(NAME, [inp]).get_response().model_version == v1
    finally:
        client.close()


def test_load_through_promote_and_rollback_loses_nothing(env: Env) -> None:
    """≥ 32 concurrent clients run while production is promoted and rolled back: every request
    answers 200, from one of the two versions, and the answer matches the version it names."""
    v0, v1 = env.versions
    clients = 32
    results: list[tuple[int, str | None, list[int] | None]] = []
    switched: list[str] = []

    async def client(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=env.server.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    r = await http.post("/predict", json={"model": NAME, "inputs": ROW})
                except httpx.HTTPError as e:
                    results.append((-1, repr(e), None))
                    continue
                body = r.json()
                results.append((r.status_code, body.get("version"), body.get("predictions")))

    def answered_by(version: str, since: int) -> bool:
        """Answers from ``version`` among those since ``since``: traffic ran across the switch."""
        return sum(r[1] == version for r in results[since:]) >= 50

    async def operator(stop: asyncio.Event) -> None:
        # each step waits for the traffic to show it, not for a time long enough for it
        await eventually_async(lambda: len(results) >= clients, "the load running")
        await asyncio.to_thread(servery_cli, env.home, "promote", NAME, v0)
        switched.append("promote")
        mark = len(results)
        await eventually_async(lambda: answered_by(v0, mark), "answers from the promoted one")
        await asyncio.to_thread(servery_cli, env.home, "rollback", NAME)
        switched.append("rollback")
        mark = len(results)
        await eventually_async(lambda: answered_by(v1, mark), "answers after the rollback")
        stop.set()

    async def main() -> None:
        stop = asyncio.Event()
        await asyncio.gather(operator(stop), *(client(stop) for _ in range(clients)))

    asyncio.run(main())
    assert switched == ["promote", "rollback"]
    failures = [r for r in results if r[0] != 200]
    assert not failures, f"{len(failures)} of {len(results)} failed, e.g. {failures[:3]}"
    by_version = {v0: 0, v1: 0}
    for _, version, predictions in results:
        assert version in by_version, version
        assert predictions == [env.versions.index(version)], (version, predictions)
        by_version[version] += 1
    assert by_version[v0] > 0 and by_version[v1] > 0, by_version
    # after the rollback the newest version (no production alias any more) answers again
    env.wait(env.answers_with(v1, "latest"), "the newest version after the rollback")


def test_corrupt_version_keeps_old_serving(env: Env) -> None:
    v0, v1 = env.versions
    env.write_config(config(policy="latest: 1"))
    env.wait(lambda c: env.predict(v0, c).status_code == 404, "policy latest: 1")
    with env.corrupt_version() as bad:
        for _ in range(20):
            r = env.predict()
            assert r.status_code == 200 and r.json()["version"] == v1
        assert env.client.get("/readyz").status_code == 200
        assert env.client.get("/v2/health/ready").status_code == 200
        described = env.client.get(f"/models/{NAME}").json()
        assert described["default_version"] == v1
        assert any("previous table" in w for w in described["warnings"])
        report = env.client.post("/admin/reload", json={}).json()
        assert report["ok"] is False and f"{NAME}:{bad}" in report["failed"]
        assert f"{NAME}:{bad}" not in report.get("loaded", [])
        assert any(
            name == "servery_model_load_failures_total" and labels.get("version") == bad
            for name, labels, _ in metric_samples(f"{env.server.url}/metrics")
        )
    env.reset()
    env.wait(env.answers_with(v1, "latest"), "the good version after the bad one is deleted")


def test_split_weights_and_sticky_keys(env: Env) -> None:
    v0, v1 = env.versions
    servery_cli(env.home, "promote", NAME, v0, "--alias", "production")
    servery_cli(env.home, "promote", NAME, v1, "--alias", "staging")
    env.write_config(config(routing="split: {production: 80, staging: 20}"))

    def split_on(client: httpx.Client) -> bool:
        routing = client.get(f"/models/{NAME}").json()["routing"]["split"]
        return [(s["target"], s["version"]) for s in routing] == [
            ("production", v0),
            ("staging", v1),
        ]

    env.wait(split_on, "the split table")
    n = 600
    seen = [env.predict().json() for _ in range(n)]
    staging = sum(b["version"] == v1 for b in seen) / n
    assert 0.13 <= staging <= 0.27, staging  # 20 % +- 7 points (binomial sd ~1.6 points)
    assert {b["routed_by"] for b in seen} == {"split:production", "split:staging"}
    for b in seen:
        assert b["predictions"] == [env.versions.index(b["version"])]
    # the same key always lands on the same version; different keys reach both
    placed = {}
    for key in (f"user-{i}" for i in range(40)):
        got = {env.predict(**{"X-Servery-Route-Key": key}).json()["version"] for _ in range(5)}
        assert len(got) == 1, (key, got)
        placed[key] = got.pop()
    assert set(placed.values()) == {v0, v1}
    # a pinned request bypasses the split
    assert all(env.predict(v1).json()["version"] == v1 for _ in range(10))
    counts = {
        labels["version"]: value
        for name, labels, value in metric_samples(f"{env.server.url}/metrics")
        if name == "servery_requests_total"
        and labels.get("model") == NAME
        and labels.get("status") == "200"
    }
    assert counts.get(v0, 0) > 0 and counts.get(v1, 0) > 0, counts


def test_shadow_is_counted_never_returned(env: Env) -> None:
    v0, v1 = env.versions
    servery_cli(env.home, "promote", NAME, v0, "--alias", "candidate")
    env.write_config(config(routing="shadow: candidate"))

    def shadow_on(client: httpx.Client) -> bool:
        return client.get(f"/models/{NAME}").json()["routing"]["shadow"] == v0

    env.wait(shadow_on, "the shadow")

    def shadow_counts() -> dict[str, float]:
        return {
            labels["outcome"]: value
            for name, labels, value in metric_samples(f"{env.server.url}/metrics")
            if name == "servery_shadow_requests_total" and labels.get("version") == v0
        }

    before = shadow_counts()
    n = 50
    for _ in range(n):
        r = env.predict()
        assert r.json()["version"] == v1 and r.json()["predictions"] == [1]
    # pinned requests are not copied
    for _ in range(5):
        assert env.predict(v1).json()["version"] == v1

    def copies_counted() -> dict[str, float] | None:  # copies run after the client's answer
        after = shadow_counts()
        return after if after.get("disagree", 0) - before.get("disagree", 0) >= n else None

    after = eventually(copies_counted, f"{n} shadow copies counted", every=0.2)
    # v0 predicts class 0, the answer (v1) class 1: every copy disagrees, none errs
    assert after.get("disagree", 0) - before.get("disagree", 0) == n
    assert after.get("error", 0) == before.get("error", 0)
    assert after.get("agree", 0) == before.get("agree", 0)
    # and each copy is logged (logger servery.shadow) with both versions
    line = f"primary={v1} shadow={v0} rows=1 outcome=disagree"
    eventually(lambda: line in env.server.log.read_text(), "the shadow log line", every=0.2)


def test_admin_reload_applies_at_once(env: Env) -> None:
    v0, _ = env.versions
    servery_cli(env.home, "promote", NAME, v0)
    report = env.client.post("/admin/reload", json={}).json()
    assert report["ok"] is True, report
    assert "models reloaded" in env.server.log.read_text()
    # the worker that took the call switched already; the other follows within its poll
    env.wait(env.answers_with(v0, "alias:production"), "both workers after /admin/reload")


def test_new_version_is_served_after_save(env: Env) -> None:
    v0, v1 = env.versions
    v2 = save_constant(env.home, 2)
    try:
        env.wait(env.answers_with(v2, "latest"), "a newly saved version")
        # latest: 2 now serves v1 and v2, and v0 is unloaded
        env.wait(lambda c: env.predict(v0, c).status_code == 404, "the oldest unloaded")
        assert env.predict(v1).json()["predictions"] == [1]
    finally:
        with bentoml_store(env.home):
            import bentoml

            bentoml.models.delete(f"{NAME}:{v2}")


def test_random_pins_never_fail_during_reloads(env: Env) -> None:
    """Pinned requests for a version that stays served never fail while aliases move."""
    v0, v1 = env.versions
    rng = random.Random(0)
    for i in range(6):
        servery_cli(env.home, "promote", NAME, [v0, v1][i % 2])
        for _ in range(20):
            pin = rng.choice([v0, v1])
            r = env.predict(pin)
            assert r.status_code == 200 and r.json()["version"] == pin


def test_model_with_nothing_to_serve_is_listed_and_leaves_readyz_200(env: Env) -> None:
    """A model added by hot reload that cannot be planned is the same in every replica: it is
    listed not ready, but /readyz stays 200 for the models served (issue 20 item 7; it was 503,
    taking every replica out of the Service)."""

    def ghost_listed(c: httpx.Client) -> bool:
        return "ghost" in {m["name"] for m in c.get("/models").json()["models"]}

    env.write_config(config() + "  - name: ghost\n")  # no such model in the store
    env.wait(ghost_listed, "ghost listed")
    env.wait(lambda c: c.get("/readyz").status_code == 200, "/readyz still 200")
    listed = {m["name"]: m for m in env.client.get("/models").json()["models"]}
    assert listed["ghost"]["ready"] is False and "no versions" in listed["ghost"]["error"]
    assert listed[NAME]["ready"] is True
    missing = env.client.post("/predict", json={"model": "ghost", "inputs": ROW})
    assert missing.status_code == 404 and "no versions" in missing.json()["error"]["message"]
    assert env.predict().status_code == 200  # the others keep serving
    env.reset()
    env.wait(lambda c: not ghost_listed(c), "ghost no longer listed")
