"""Schemathesis against the router's OpenAPI spec, on a real ``bentoml serve`` (issue 7).

For every operation of ``/docs.json`` (the session's ``server``: every demo model, inline and in
its framework service) hypothesis generates requests that fit the spec (``positive``) and requests
that do not (``negative``), sends each, and checks that no answer is a 5xx and that every answer's
status code, content type and body are among those the spec documents for the operation. Hooks
mix served model names, versions and well-shaped rows and tensors into what schemathesis
generates, so the fuzzing reaches the models and not only the 404 of an unknown name.

Deterministic (``derandomize``): the same cases on every run, so a CI failure reproduces locally;
no example database is written. schemathesis's own pytest integration (``from_fixture``) cannot
run on pytest 9 (it reads ``Node._nodeid``, which pytest 9 removed), so each operation is its
own test here, driven through the public ``APIOperation.as_strategy``. The hand-written corpus of
malformed requests is ``test_malformed.py``.
"""

from __future__ import annotations

import sys
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.protocols.oip.core import ALL_DATATYPES, INPUT_NAME, OUTPUT_NAMES
from tests.integration.conftest import PLACEMENTS

TIMEOUT_S = 30
"""Client timeout per request: a hang fails the test instead of stalling the run."""

MAX_EXAMPLES = 300
"""Generated cases per operation and mode (what hypothesis stops at; operations with few
possible inputs end sooner). The whole file, server start included, takes about 90 s on 2 cores."""

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

# Every operation of the spec. Pinned on purpose: test_spec_lists_these_operations fails when a
# route is added or removed, so a new route gets fuzzed (or its exclusion is written down here).
OPERATIONS = [
    ("GET", "/healthz"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/predict"),
    ("GET", "/models"),
    ("GET", "/models/{name}"),
    ("POST", "/admin/reload"),
    ("GET", "/v1/usage"),
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/versions/{version}"),
    ("GET", "/v2/models/{name}/ready"),
    ("GET", "/v2/models/{name}/versions/{version}/ready"),
    ("POST", "/v2/models/{name}/infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
]
# Negative cases need something the spec constrains: a body, or a parameter with a schema that
# some value breaks (path parameters are plain strings: every string fits them).
NEGATIVE = {"/predict", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"}

N_FEATURES = {"iris": 4, "breast_cancer": 30, "digits": 64}

MAX_MAGNITUDE = sys.float_info.max
"""Generated numbers reach the largest float: finite inputs whose scores overflow are refused 422
(services/runtime/predictors.py ``check_scores``), never answered 500 or with NaN."""


def _numbers() -> st.SearchStrategy[float | int]:
    """Finite JSON numbers, extreme ones included (the client cannot send NaN/Infinity)."""
    return st.one_of(
        st.floats(-MAX_MAGNITUDE, MAX_MAGNITUDE),
        st.integers(-(2**70), 2**70),
        st.sampled_from([0, -0.0, 5e-324, 3.4e38, -3.5e38, MAX_MAGNITUDE]),
    )


def _version(served: str) -> st.SearchStrategy[str]:
    """A version for a model serving ``served``: itself, a prefix, an alias (set or not), none."""
    return st.sampled_from([served, served[:5], "latest", "production", "0000000000000000"])


def _predict_body(name: str, served: str) -> st.SearchStrategy[dict[str, Any]]:
    n = N_FEATURES[PLACEMENTS[name]]
    width = st.sampled_from([n] * 8 + [n - 1, n + 1, 0])
    rows = width.flatmap(
        lambda w: st.lists(st.lists(_numbers(), min_size=w, max_size=w), min_size=1, max_size=4)
    )
    return st.fixed_dictionaries(
        {"model": st.just(name), "inputs": rows}, optional={"version": _version(served)}
    )


@st.composite
def _infer_body(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """An OIP infer body for served model ``name``: mostly well-formed, sometimes subtly not."""
    n = N_FEATURES[PLACEMENTS[name]]
    rows = draw(st.integers(1, 4))
    datatype = draw(st.sampled_from(["FP64", "FP32", "FP64", "FP32", "INT64", *ALL_DATATYPES]))
    right = st.just([rows, n])
    shape = draw(st.one_of(right, right, st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)))
    values = draw(st.lists(_numbers(), min_size=rows * n, max_size=rows * n))
    nested = [values[i * n : (i + 1) * n] for i in range(rows)]
    tensor = {
        "name": draw(st.sampled_from([INPUT_NAME] * 6 + ["input-1"])),
        "datatype": datatype,
        "shape": shape,
        "data": draw(st.sampled_from([values, nested])),
    }
    body: dict[str, Any] = {"inputs": [tensor]}
    if draw(st.booleans()):
        output = st.fixed_dictionaries(
            {"name": st.sampled_from([*OUTPUT_NAMES, "nope"])},
            optional={"parameters": st.fixed_dictionaries({"binary_data": st.booleans()})},
        )
        body["outputs"] = draw(st.lists(output, max_size=3))
    if draw(st.booleans()):
        body["id"] = draw(st.text(max_size=20))
    if draw(st.booleans()):
        body["parameters"] = {"binary_data_output": draw(st.booleans())}
    return body


@pytest.fixture(scope="module")
def api_schema(server) -> schemathesis.BaseSchema:
    """The router's spec from the running server, with hooks that aim the cases at the models."""
    models = httpx.get(f"{server.url}/models", timeout=TIMEOUT_S).json()["models"]
    served = {m["name"]: m["version"] for m in models}  # name -> its (only) served version
    names = st.sampled_from(sorted(served))
    config = schemathesis.Config.from_dict(
        {"base-url": server.url, "request-timeout": TIMEOUT_S, "generation": {"database": "none"}}
    )
    schema = schemathesis.openapi.from_url(
        f"{server.url}/docs.json", config=config, timeout=TIMEOUT_S
    )

    def aim(params: dict[str, Any], name: str) -> st.SearchStrategy[dict[str, Any]]:
        """``params`` with a served ``name`` and, if it has one, a version for that model."""
        fixed = {k: st.just(v) for k, v in params.items()} | {"name": st.just(name)}
        if "version" in params:
            fixed["version"] = _version(served[name])
        return st.fixed_dictionaries(fixed)

    @schema.hook
    def before_generate_path_parameters(context, strategy):
        # Half the cases: a served model name (and a version of it), the rest as generated.
        def mix(params: dict[str, Any] | None) -> st.SearchStrategy[dict[str, Any] | None]:
            if not params or "name" not in params:
                return st.just(params)
            return st.one_of(names.flatmap(lambda n: aim(params, n)), st.just(params))

        return strategy.flatmap(mix)

    @schema.hook
    def flatmap_case(context, case):
        # Bodies schemathesis cannot guess (a served model's name and row width, a tensor shape
        # that matches its data): half the cases get one, for the model of the case's path.
        if context.operation.path == "/predict":

            def predict(name: str) -> st.SearchStrategy[Any]:
                return _predict_body(name, served[name]).map(lambda b: _derive(case, b))

            return st.one_of(names.flatmap(predict), st.just(case))
        name = case.path_parameters.get("name") if case.path_parameters else None
        if not context.operation.path.endswith("/infer") or name not in served:
            return st.just(case)
        return st.one_of(_infer_body(name).map(lambda b: _derive(case, b)), st.just(case))

    return schema


def _derive(case: Any, body: Any) -> Any:
    derived = case.derive()
    derived.body = body
    derived.media_type = "application/json"
    return derived


@pytest.fixture(scope="module", autouse=True)
def _hypothesis_home(tmp_path_factory: pytest.TempPathFactory):
    """Hypothesis's caches (constants from the source, unicode tables) go to a temporary
    directory: with no database they still went to ``.hypothesis/`` in the checkout."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


def test_spec_lists_these_operations(api_schema) -> None:
    ops = [r.ok() for r in api_schema.get_all_operations()]
    assert sorted((op.method.upper(), op.path) for op in ops) == sorted(OPERATIONS)


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [(*op, GenerationMode.POSITIVE) for op in OPERATIONS]
    + [(*op, GenerationMode.NEGATIVE) for op in OPERATIONS if op[1] in NEGATIVE],
)
def test_openapi_fuzz(api_schema, method: str, path: str, mode: GenerationMode) -> None:
    """Every generated request: no 5xx; status, content type and body as the spec documents."""
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same cases every run: a CI failure reproduces locally
        database=None,  # no .hypothesis/ directory in the repository
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=TIMEOUT_S)

    fuzz()
