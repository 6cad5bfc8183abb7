"""Versioning for a model placed in its framework service: the router asks the service to load a
version (``prepare``) before routing to it, so promotes and broken versions behave as inline."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.harness.server import start_server
from tests.integration.test_versioning import NAME, RELOAD_S, Env, save_constant

CONFIG = f"models:\n  - name: {NAME}\n    placement: service\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    home = tmp_path_factory.mktemp("versioning-svc") / "bentoml"
    versions = [save_constant(home, k) for k in (0, 1)]
    workdir = tmp_path_factory.mktemp("versioning-svc-serve")
    server = start_server(home, CONFIG, workdir, env={"SERVERY_RELOAD_INTERVAL_S": str(RELOAD_S)})
    e = Env(server, home, workdir / "models.yaml", versions)
    try:
        yield e
    finally:
        e.client.close()
        server.stop()


def test_service_placed_model_follows_promote_and_rollback(env: Env) -> None:
    from tests.integration.test_versioning import servery_cli

    v0, v1 = env.versions
    assert env.predict().json()["version"] == v1
    servery_cli(env.home, "promote", NAME, v0)
    env.wait(env.answers_with(v0, "alias:production"), "service model promoted")
    body = env.predict().json()
    assert body["predictions"] == [0], "the service must have computed it with the old version"
    servery_cli(env.home, "rollback", NAME)
    env.wait(env.answers_with(v1, "latest"), "service model rolled back")


def test_service_placed_corrupt_version_keeps_old(env: Env) -> None:
    v1 = env.versions[1]
    with env.corrupt_version():
        for _ in range(20):
            r = env.predict()
            assert r.status_code == 200 and r.json()["version"] == v1
            assert r.json()["predictions"] == [1]
        assert env.client.get("/readyz").status_code == 200
