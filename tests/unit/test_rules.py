"""deploy/prometheus/ and deploy/dashboards/: the rules pass ``promtool check rules`` and their
``promtool test rules`` unit tests, every alert is proven to fire and to stay quiet, the
PrometheusRule is the rules file's copy, and the Grafana dashboard is well formed with queries
that Prometheus parses.

``promtool`` comes from Debian's ``prometheus`` package, which ``make test`` installs; a missing
tool fails these tests (it never skips them). Whether the metrics the queries select exist on a
running Bento's ``/metrics`` is checked in tests/integration/test_prometheus.py (classifiers) and
tests/integration/test_llm.py (LLM).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import promql
from tests.promql import ROOT

REQUIRED_ALERTS = {
    "ServeryHighErrorRate",  # 5xx share per model
    "ServeryHighLatencyP99",  # p99 per model
    "ServeryQueueBacklog",  # classifier queue depth
    "ServeryLLMQueueBacklog",  # vLLM's waiting queue
    "ServeryModelNotReady",  # servery_model_ready == 0 on an instance
    "ServeryModelUnavailable",  # ... on every instance
    "ServeryTargetDown",  # the scrape target is down
}


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail(
            "promtool is not installed: `make test` installs it (Debian package prometheus: "
            "apt-get install -y prometheus)"
        )
    return subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# --- the rules ----------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", str(promql.RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(promql.rules())} rules found" in done.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    done = promtool("test", "rules", promql.RULE_TESTS.name, cwd=promql.RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_proven_to_fire_and_to_stay_quiet() -> None:
    """Each alert of the rules file has a promtool case where it fires and one where it does
    not (a rule nobody saw fire may never fire)."""
    alerts = {r["alert"] for r in promql.rules() if "alert" in r}
    assert REQUIRED_ALERTS <= alerts, REQUIRED_ALERTS - alerts
    cases = [
        case
        for test in yaml.safe_load(promql.RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts - fires == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"


def test_alerts_are_labelled_and_explained() -> None:
    for rule in promql.rules():
        if "alert" not in rule:
            assert ":" in rule["record"], f"{rule['record']}: name it level:metric:operations"
            continue
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule.get("for"), f"{name}: a `for` keeps one bad scrape from alerting"
        assert {"summary", "description"} <= set(rule["annotations"]), name


def test_recording_rules_cover_rates_and_quantiles_per_model_version() -> None:
    records = promql.recorded()
    for wanted in (
        "model_version:servery_requests:rate1m",
        "model:servery_requests_5xx:ratio_rate5m",
        "model_version:servery_model_request_duration_seconds:p50_rate5m",
        "model_version:servery_model_request_duration_seconds:p99_rate5m",
    ):
        assert wanted in records


def test_prometheus_rule_is_generated_from_the_rules_file() -> None:
    """deploy/components/servicemonitor/prometheusrule.yaml (Prometheus Operator) holds exactly
    the groups of deploy/prometheus/servery-rules.yml."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy/prometheus/generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    generated = yaml.safe_load(
        (ROOT / "deploy/components/servicemonitor/prometheusrule.yaml").read_text()
    )
    assert generated["kind"] == "PrometheusRule"
    assert generated["spec"]["groups"] == yaml.safe_load(promql.RULES.read_text())["groups"]
    component = yaml.safe_load(
        (ROOT / "deploy/components/servicemonitor/kustomization.yaml").read_text()
    )
    assert "prometheusrule.yaml" in component["resources"]


# --- the dashboard ------------------------------------------------------------------------------


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard query (Grafana variables replaced) is valid PromQL: promtool parses each
    as the expression of a recording rule."""
    queries = promql.dashboard_queries() + promql.variable_queries()
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboard",
                        "rules": [
                            {"record": f"dashboard:query{i}", "expr": expr}
                            for i, (_, expr) in enumerate(queries)
                        ],
                    }
                ]
            }
        )
    )
    done = promtool("check", "rules", str(rules_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(queries)} rules found" in done.stdout


def test_dashboard_is_grafana_json_with_datasource_and_model_variables() -> None:
    doc = promql.dashboard()
    assert doc["schemaVersion"] >= 36 and doc["uid"] and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dict(promql.variable_queries())["variable model"] == "servery_requests_total"
    ids = [p["id"] for p in promql.panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in promql.panels(doc):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            # the model filter applies to every classifier query that carries the label
            if "servery_requests_total" in target["expr"] or "servery_queue" in target["expr"]:
                assert 'model=~"$model"' in target["expr"], (panel["title"], target["expr"])


def test_dashboard_shows_what_operators_need_per_model_version() -> None:
    """Requests, errors, latency percentiles, batch sizes, queue, in-flight, readiness, TTFT,
    inter-token latency and tokens/s, split per model and version."""
    exprs = [expr for _, expr in promql.dashboard_queries()]
    joined = "\n".join(exprs)
    names = set().union(*(promql.metric_names(e) for e in exprs))
    for metric in (
        "servery_requests_total",
        "servery_model_request_duration_seconds_bucket",
        "servery_model_compute_seconds_bucket",
        "servery_batch_size_sum",
        "servery_batch_requests_sum",
        "servery_queue_depth",
        "servery_queue_wait_seconds_bucket",
        "servery_in_flight_requests",
        "servery_model_ready",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:generation_tokens_total",
    ):
        assert metric in names, metric
    assert 'status=~"5.."' in joined  # error rate
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (model, version, le)" in joined
    assert "sum by (model, version) (rate(servery_requests_total" in joined


def test_every_queried_metric_is_assigned_to_a_server_test() -> None:
    """Each scraped metric is checked against a running Bento by exactly one integration test:
    the LLM ones in test_llm.py, the others in test_prometheus.py."""
    llm, classifier = promql.llm_metrics(), promql.classifier_metrics()
    assert llm and classifier and not llm & classifier
    assert llm | classifier == promql.scraped_metrics()
    assert all(n.startswith("servery_") for n in classifier), classifier


# --- the metric-name tokenizer ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('rate(a_total{job="x", le=~"0.5|1"}[5m])', {"a_total"}),
        ("sum by (model, le) (rate(h_bucket[$__rate_interval]))", {"h_bucket"}),
        ("sum(a) by (model) / on (model) group_left (version) b", {"a", "b"}),
        ("a / ignoring(pid) group_left b offset 5m", {"a", "b"}),
        ('vllm:x_total{model_name="sum(y)"} > bool 0.5e3', {"vllm:x_total"}),
        ("max without (pid) (rec:a:rate5m) > 1 and c unless d or inf", {"rec:a:rate5m", "c", "d"}),
        ("histogram_quantile(0.99, sum by (le) (rate(a_bucket{}[1m:10s])))", {"a_bucket"}),
        ("# a comment naming not_a_metric\nclamp_min(a, 0)", {"a"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert promql.metric_names(promql.grafana_to_promql(expr)) == names


@pytest.mark.parametrize("expr", ['{__name__="a"}', "rat(a[5m])", "sum(a{b='c')", "a $ b"])
def test_metric_names_refuses_what_it_cannot_read(expr: str) -> None:
    with pytest.raises(ValueError):
        promql.metric_names(expr)


def test_grafana_variables_become_promql() -> None:
    assert (
        promql.grafana_to_promql('rate(a{model=~"$model",m=~"${llm}"}[$__rate_interval])')
        == 'rate(a{model=~".*",m=~".*"}[1m])'
    )
