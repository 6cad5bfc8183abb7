"""The PromQL in deploy/: read the queries of the Grafana dashboard and the rules file, and find
the metric names they select, so tests can check each exists on a running Bento's ``/metrics``.

Used by tests/unit/test_rules.py, tests/integration/test_prometheus.py (classifier metrics) and
tests/integration/test_llm.py (``vllm:*`` and ``servery_llm_*``, which only a Bento with the LLM
service exposes).

Metric names come from a small tokenizer rather than a full PromQL parser (none ships with the
Python stack, and ``promtool`` 2.42 has no parse command; the unit tests let ``promtool check
rules`` parse every query instead). It splits a query into string literals, ``[...]`` ranges and
subqueries, numbers and durations, identifiers (letters, digits, ``_`` and ``:``) and punctuation,
then drops the identifiers that are not metric names:

* everything between ``{`` and ``}`` (label matchers; a ``__name__`` matcher is refused, since
  the name it selects cannot be read off the query),
* the label lists after ``by``, ``without``, ``on``, ``ignoring``, ``group_left`` and
  ``group_right``,
* keywords and aggregation operators, and identifiers followed by ``(`` (functions: each must be
  a known PromQL function, so a typo fails instead of passing as a metric).

What is left are vector selectors' metric names as written, histogram ``_bucket``/``_sum``/
``_count`` and counter ``_total`` suffixes included, which is how the samples are named on
``/metrics`` too: the names can be compared with the exposition's sample names directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/dashboards/servery.json"
RULES = ROOT / "deploy/prometheus/servery-rules.yml"
RULE_TESTS = ROOT / "deploy/prometheus/servery-rules.test.yml"

LLM_PREFIXES = ("vllm:", "servery_llm_")
"""Metrics that only a Bento with the LLM service exposes (tests/integration/test_llm.py)."""
PROMETHEUS_MADE = frozenset({"up"})
"""Series Prometheus records about each scrape itself, never on ``/metrics``."""

AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile "
    "limitk limit_ratio".split()
)
KEYWORDS = frozenset("and or unless bool offset atan2 inf nan".split())
LABEL_LIST_KEYWORDS = frozenset("by without on ignoring group_left group_right".split())
FUNCTIONS = frozenset(
    """abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month
    day_of_week day_of_year days_in_month delta deriv exp floor histogram_avg histogram_count
    histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
    holt_winters double_exponential_smoothing hour idelta increase irate label_join label_replace
    ln log2 log10 minute month predict_linear rate resets round scalar sgn sort sort_desc
    sort_by_label sort_by_label_desc sqrt time timestamp vector year avg_over_time
    min_over_time max_over_time sum_over_time count_over_time quantile_over_time
    stddev_over_time stdvar_over_time last_over_time present_over_time mad_over_time acos acosh
    asin asinh atan atanh cos cosh sin sinh tan tanh deg pi rad""".split()
)

_TOKEN = re.compile(
    r"""
    (?P<comment>\#[^\n]*)
    | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[a-zA-Z0-9]*)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<punct>[{}(),])
    | (?P<space>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE,
)

# Grafana's variables, replaced by values that keep the query valid PromQL
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
}
_GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")


def tokens(expr: str) -> list[tuple[str, str]]:
    """``(kind, text)`` of each token of ``expr``, without spaces and comments."""
    return [
        (m.lastgroup, m.group())
        for m in _TOKEN.finditer(expr)
        if m.lastgroup not in ("space", "comment")
    ]  # type: ignore[misc]


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (see the module docstring for how)."""
    toks = tokens(expr)
    names: set[str] = set()
    braces = 0
    label_list = False  # inside by (...), on (...), ...
    expect_list = False  # just after by/without/on/...
    for i, (kind, text) in enumerate(toks):
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "punct" and text == "{":
            braces += 1
        elif kind == "punct" and text == "}":
            braces -= 1
        elif braces:
            if kind == "ident" and text == "__name__":
                raise ValueError(f"select metrics by name, not with __name__: {expr}")
        elif kind == "punct" and text == "(" and expect_list:
            label_list = True
        elif kind == "punct" and text == ")" and label_list:
            label_list = False
        elif kind == "ident" and not label_list:
            lower = text.lower()
            if lower in LABEL_LIST_KEYWORDS:
                expect_list = True
                continue
            if lower in KEYWORDS or lower in AGGREGATIONS:
                pass
            elif following == "(":
                if text not in FUNCTIONS:
                    raise ValueError(f"unknown PromQL function {text!r} in: {expr}")
            else:
                names.add(text)
        elif kind == "other" and text not in "+-*/%^=!~<>@":
            raise ValueError(f"unexpected {text!r} in: {expr}")
        expect_list = False
    if braces:
        raise ValueError(f"unbalanced braces in: {expr}")
    return names


def grafana_to_promql(expr: str) -> str:
    """``expr`` with Grafana's variables replaced: intervals by durations, template variables
    (``$model``, ``${llm}``) by ``.*`` (they only appear in ``=~`` matchers here)."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return _GRAFANA_VARIABLE.sub(".*", expr)


def dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def panels(doc: dict) -> Iterable[dict]:
    """Every panel, those inside collapsed rows included."""
    for panel in doc.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(doc: dict | None = None) -> list[tuple[str, str]]:
    """``(where, PromQL)`` of every panel target, Grafana variables replaced."""
    doc = dashboard() if doc is None else doc
    return [
        (f"panel {panel['title']!r} {target['refId']}", grafana_to_promql(target["expr"]))
        for panel in panels(doc)
        for target in panel.get("targets", [])
    ]


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.+),\s*)?(\w+)\s*\)\s*$")


def variable_queries(doc: dict | None = None) -> list[tuple[str, str]]:
    """``(where, PromQL)`` of the series selectors of the template variables' ``label_values``
    queries (Grafana functions, not PromQL)."""
    doc = dashboard() if doc is None else doc
    found = []
    for variable in doc["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(text)
        assert match and match.group(1), f"variable {variable['name']}: {text}"
        found.append((f"variable {variable['name']}", grafana_to_promql(match.group(1))))
    return found


def rules(path: Path = RULES) -> list[dict]:
    """Every rule of the rules file (recording and alerting)."""
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def rule_queries(path: Path = RULES) -> list[tuple[str, str]]:
    return [(rule.get("record") or rule["alert"], rule["expr"]) for rule in rules(path)]


def recorded(path: Path = RULES) -> set[str]:
    """The series the recording rules make."""
    return {rule["record"] for rule in rules(path) if "record" in rule}


def all_queries() -> list[tuple[str, str]]:
    return dashboard_queries() + variable_queries() + rule_queries()


def scraped_metrics() -> set[str]:
    """Every metric name that the dashboard and the rules select and that must come from a
    servery ``/metrics`` (not made by a recording rule or by Prometheus)."""
    names = set().union(*(metric_names(expr) for _, expr in all_queries()))
    return names - recorded() - PROMETHEUS_MADE


def llm_metrics() -> set[str]:
    return {n for n in scraped_metrics() if n.startswith(LLM_PREFIXES)}


def classifier_metrics() -> set[str]:
    return scraped_metrics() - llm_metrics()
