"""Write the Prometheus Operator form of servery's rules from the plain rules file.

    python deploy/prometheus/generate.py           # rewrite the PrometheusRule
    python deploy/prometheus/generate.py --check   # exit 1 if it is out of date (tests do this)

deploy/prometheus/servery-rules.yml is the one source (promtool checks and tests it);
deploy/components/servicemonitor/prometheusrule.yaml wraps the same groups in a PrometheusRule
(monitoring.coreos.com/v1) for clusters that run the Prometheus Operator. kustomize cannot embed
one file's YAML inside another object's field, hence this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "servery-rules.yml"
TARGET = HERE.parent / "components/servicemonitor/prometheusrule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/servery-rules.yml by deploy/prometheus/generate.py: edit that
# file and rerun the script (tests/unit/test_rules.py fails while this copy differs).
# servery's recording and alerting rules for the Prometheus Operator; the Prometheus that selects
# the ServiceMonitor must also select this object (its ruleSelector).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # multi-line queries and descriptions stay readable block scalars
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(SOURCE.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "servery", "labels": {"app.kubernetes.io/name": "servery"}},
        "spec": {"groups": groups},
    }
    body = yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            script = Path(__file__).relative_to(HERE.parents[1])
            print(f"{TARGET} is out of date: run python {script}")
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
