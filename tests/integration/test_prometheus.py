"""A real Prometheus scrapes a real Bento: the numbers it stores are the requests sent, servery's
recording and alerting rules evaluate on them, and every metric the Grafana dashboard and the
rules select exists on ``/metrics``.

Prometheus is Debian's ``prometheus`` package (``make test`` installs it; a missing binary fails
the module, it never skips). It listens on 127.0.0.1 on a free port with its own temporary
storage, scrapes the Bento every second, loads deploy/prometheus/servery-rules.yml, and is stopped
by PID (its process group) at the end, like the Bento.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.harness.server import (
    Server,
    ServerProcess,
    free_port,
    launch,
    metric_samples,
    start_server,
)
from tests import promql
from tests.conftest import eventually
from tests.integration.conftest import dataset

# iris in the router, breast_cancer in its framework service: both placements' series
MODELS = (
    "defaults:\n  placement: inline\nmodels:\n  - name: iris\n"
    "  - name: breast_cancer\n    placement: service\n"
)
JOB = "servery"  # ServeryTargetDown watches jobs named servery*
SCRAPE_S = 1
POLL_S = 0.5  # how often a test asks Prometheus again (it scrapes and evaluates every second)
# requests sent per (model, kind); "bad" rows have the wrong width (4xx)
LOAD = {("iris", "good"): 240, ("iris", "bad"): 17, ("breast_cancer", "good"): 120}
LOAD |= {("breast_cancer", "bad"): 9, ("no-such-model", "good"): 5}


@pytest.fixture(scope="module")
def bento(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(demo_store, MODELS, tmp_path_factory.mktemp("prom-serve"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def prometheus(bento: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a Prometheus scraping ``bento`` every second, with servery's rules."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus is not installed: `make test` installs it (Debian package prometheus: "
            "apt-get install -y prometheus)"
        )
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": "1s"},
                "rule_files": [str(promql.RULES)],
                "scrape_configs": [
                    {
                        "job_name": JOB,
                        "scrape_timeout": f"{SCRAPE_S}s",
                        "static_configs": [{"targets": [bento.url.removeprefix("http://")]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = ServerProcess(
        url=url,
        proc=launch(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            cwd=work,
            env={"PATH": "/usr/bin:/bin"},
            log=work / "prometheus.log",
        ),
        log=work / "prometheus.log",
    )
    proc.wait_ready(
        lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, "prometheus"
    )
    try:
        # the first scrape has landed
        proc.wait_ready(lambda: values(url, f'up{{job="{JOB}"}}') == {(): 1.0}, 30, "scrape")
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def sent(bento: Server, prometheus: str) -> Counter[tuple[str, str]]:
    """Send LOAD (8 clients at once) once Prometheus scrapes; ``(model, status) -> count`` of the
    answers, as the router counts them (an unknown model counts as ``_unknown``)."""
    rows = {m: dataset(m)[:64].tolist() for m in ("iris", "breast_cancer")}
    rows["no-such-model"] = rows["iris"]
    jobs = []
    for (model, kind), n in LOAD.items():
        for i in range(n):
            row = rows[model][i % 64]
            jobs.append((model, [row[:-1]] if kind == "bad" else [row]))
    with httpx.Client(base_url=bento.url, timeout=30) as client:

        def post(job: tuple[str, list[list[float]]]) -> tuple[str, str]:
            model, inputs = job
            response = client.post("/predict", json={"model": model, "inputs": inputs})
            return ("_unknown" if model == "no-such-model" else model, str(response.status_code))

        with ThreadPoolExecutor(8) as pool:
            answers = Counter(pool.map(post, jobs))
    good = {k: n for k, n in answers.items() if k[1] == "200"}
    assert good == {("iris", "200"): 240, ("breast_cancer", "200"): 120}, answers
    assert all(s.startswith("4") for (_, s) in answers if s != "200"), answers
    return answers


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    """``/api/v1/query`` (instant, now): the result vector; fails on a query error."""
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def values(prometheus: str, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
    """``expr``'s instant vector as ``(values of labels) -> value``."""
    return {
        tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
        for r in query(prometheus, expr)
    }


def some(result: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    assert result, "no series (yet)"
    return result


def test_prometheus_counts_every_request_sent(
    prometheus: str, bento: Server, sent: Counter[tuple[str, str]]
) -> None:
    """``servery_requests_total`` as Prometheus scraped it equals the answers the clients got,
    per model and status, and equals the Bento's own ``/metrics``."""
    expected = {key: float(n) for key, n in sent.items()}

    def counted() -> bool:
        got = values(
            prometheus,
            f'sum by (model, status) (servery_requests_total{{job="{JOB}"}})',
            "model",
            "status",
        )
        assert {k: v for k, v in got.items() if v} == expected
        return True

    eventually(counted, "the requests counted", every=POLL_S)
    assert values(prometheus, 'sum(servery_requests_total{model="iris"})') == {
        (): float(sum(n for (m, _), n in sent.items() if m == "iris"))
    }
    direct: Counter[tuple[str, str]] = Counter()
    for name, labels, value in metric_samples(f"{bento.url}/metrics"):
        if name == "servery_requests_total" and value:
            direct[labels["model"], labels["status"]] += int(value)
    assert direct == sent


def test_recording_rules_evaluate_to_sensible_numbers(
    prometheus: str, sent: Counter[tuple[str, str]]
) -> None:
    """servery's recording rules, evaluated by Prometheus on the scraped series."""
    iris_sent = sum(n for (m, _), n in sent.items() if m == "iris")

    def rates() -> dict[tuple[str, ...], float]:
        got = values(prometheus, "model_version:servery_requests:rate1m", "model", "version")
        assert {m for m, _ in got} >= {"iris", "breast_cancer", "_unknown"}, got
        return got

    rate = sum(
        v
        for (m, _), v in eventually(rates, "the request rates", every=POLL_S).items()
        if m == "iris"
    )
    # per-second rate over the last minute: the load took seconds, so at most the whole load
    # (Prometheus extrapolates a window's edges by up to half a scrape interval each)
    assert 0 < rate * 60 <= 2 * iris_sent, rate

    # 4xx are the clients' mistakes: no server error was sent, so the 5xx share is 0, not absent
    ratio = eventually(
        lambda: some(values(prometheus, "model:servery_requests_5xx:ratio_rate5m", "model")),
        "the 5xx ratio",
        every=POLL_S,
    )
    assert ratio[("iris",)] == 0 and ratio[("breast_cancer",)] == 0, ratio

    def latency() -> dict[tuple[str, ...], float]:
        got = values(
            prometheus,
            "model_version:servery_model_request_duration_seconds:p99_rate5m",
            "model",
        )
        assert ("iris",) in got and ("breast_cancer",) in got, got
        return got

    for model, p99 in eventually(latency, "the latency quantiles", every=POLL_S).items():
        assert 0 < p99 < 10, (model, p99)  # the buckets' range; the demo models answer in ms
    p50 = values(prometheus, "model_version:servery_model_request_duration_seconds:p50_rate5m")
    assert p50 and all(v > 0 for v in p50.values()), p50

    batch = eventually(
        lambda: some(
            values(
                prometheus, "model_version_placement:servery_batch_size:mean_rate5m", "placement"
            )
        ),
        "the mean batch sizes",
        every=POLL_S,
    )
    assert set(batch) == {("inline",), ("service",)} and all(v >= 1 for v in batch.values())


def test_rules_load_and_stay_quiet_on_a_healthy_bento(
    prometheus: str, sent: Counter[tuple[str, str]]
) -> None:
    """Prometheus loaded every rule, evaluates each without error, and no alert is pending or
    firing: every model is ready, the target is up, queues are short and 4xx are not errors."""

    def healthy() -> list[dict[str, Any]]:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        assert len(loaded) == len(promql.rules())
        bad = [(r["name"], r["health"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
        assert not bad, bad
        return loaded

    eventually(healthy, "every rule loaded and healthy", every=POLL_S)
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    # every `for` is longer than this test, so nothing can fire yet; a pending alert shows its
    # condition holds. Latency is the one condition a busy test machine may meet.
    active = {a["labels"]["alertname"] for a in alerts} - {"ServeryHighLatencyP99"}
    assert not active, alerts
    assert values(prometheus, "max by (model) (servery_model_ready)", "model") == {
        ("iris",): 1.0,
        ("breast_cancer",): 1.0,
    }


def test_dashboard_and_rule_metrics_exist_on_metrics(
    bento: Server, sent: Counter[tuple[str, str]]
) -> None:
    """Every classifier metric the dashboard and the rules select is on the Bento's /metrics
    (the vLLM and servery_llm_* ones: tests/integration/test_llm.py)."""
    exposed = {name for name, _, _ in metric_samples(f"{bento.url}/metrics")}
    wanted = promql.classifier_metrics()
    assert wanted - exposed == set(), f"not on /metrics: {sorted(wanted - exposed)}"


def test_dashboard_queries_return_data(prometheus: str, sent: Counter[tuple[str, str]]) -> None:
    """Prometheus evaluates every classifier query of the dashboard, and each has data after the
    load (except the 5xx share: none was sent)."""
    queries = [
        (where, expr)
        for where, expr in promql.dashboard_queries() + promql.variable_queries()
        if not promql.metric_names(expr) & promql.llm_metrics()
    ]
    assert queries

    def answered() -> bool:
        empty = [
            where
            for where, expr in queries
            if 'status=~"5.."' not in expr and not query(prometheus, expr)
        ]
        assert not empty, empty
        return True

    eventually(answered, "data for every dashboard query", every=POLL_S)
