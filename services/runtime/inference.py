"""The one inference use case, shared by every prediction front end.

``POST /predict`` (:mod:`services.protocols.native`), OIP V2 over REST
(:mod:`services.protocols.oip.rest`) and over gRPC (:mod:`services.protocols.oip.grpc`) only
decode their protocol and encode the answer; :func:`infer` does the rest, once:

1. **route**: the model's table picks the version (the pinned one, else its split by route key,
   else its default; :meth:`services.runtime.registry.Registry.route`);
2. **validate**: the front end's decoder turns its inputs into rows for *that* version (its
   features and dtype; the one rule is :mod:`services.runtime.inputs`);
3. **batch**: the version's micro-batcher merges the rows with concurrent requests of every
   protocol and runs the model (inline, or in its framework service);
4. **check** the outputs are finite (:func:`services.runtime.inputs.check_outputs`);
5. **shadow**: a request the table routed (no pinned version) is mirrored to the model's shadow;
6. **count**: :class:`Call` counts the answer in the version's series
   (``servery_requests_total``, ``servery_model_request_duration_seconds``) or, when it failed
   before a version was chosen, in the ``unknown`` series; a successful answer also counts in
   the caller's key's usage (requests and rows: services/ops/usage.py). The front end reports
   the status it answered with (its protocol's: 400 on OIP where native says 422, 499 for a
   gRPC client gone).

Modelled on MLServer's ``DataPlane.infer``: the protocols meet the models in one place.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

import numpy as np

from services.ops import metrics
from services.ops.usage import OPEN, TALLY
from services.runtime.batcher import n_rows
from services.runtime.inputs import check_outputs

if TYPE_CHECKING:
    from services.runtime.predictors import ModelInfo
    from services.runtime.registry import Registry, ServedModel

Decoder = Callable[["ModelInfo", int], "Any | Awaitable[Any]"]
"""(the chosen version's info, the row limit) -> the request's rows, validated for that version;
raises a 4xx :class:`~services.runtime.errors.ServeryError`. May be a coroutine function (OIP REST
reads its body only once the model is known)."""


class Call:
    """One inference call from its arrival: where it is counted and what answered it."""

    __slots__ = ("key", "rows", "served", "start")

    def __init__(self) -> None:
        self.start = perf_counter()
        self.served: ServedModel | None = None
        """The version that answers, once routed."""
        self.key = OPEN
        """The caller's API key name (the front end sets it; ``-`` when keys are off)."""
        self.rows = 0
        """Rows of the request, once decoded."""

    def answered(self, status: int) -> float:
        """Count the answer (``status``, the protocol's HTTP-equivalent code); the seconds since
        arrival."""
        elapsed = perf_counter() - self.start
        served = self.served
        if served is None:
            metrics.UNKNOWN_REQUESTS.answered(status, elapsed)
        else:
            served.metrics.answered(status, elapsed)
            if status < 400:
                TALLY.add(self.key, served.info.name, rows=self.rows)
        return elapsed


class Inference:
    """What answered a request: the version, why it was chosen, and its outputs."""

    __slots__ = ("info", "outputs", "routed_by", "served")

    def __init__(self, served: ServedModel, routed_by: str, outputs: dict[str, np.ndarray]) -> None:
        self.served = served
        self.info: ModelInfo = served.info
        self.routed_by = routed_by
        self.outputs = outputs
        """The model's outputs by name (``predict``: a classifier's class index per row, or a
        regressor's prediction; ``predict_proba``: class probabilities; or a tensor model's own
        outputs), one row per input row."""


async def infer(
    registry: Registry,
    call: Call,
    model: str,
    version: str | None,
    decode: Decoder,
    max_rows: int,
    route_key: Callable[[], str | None] | None = None,
) -> Inference:
    """Route, validate, batch, check, shadow (see the module docstring); raises the
    :class:`~services.runtime.errors.ServeryError` a client's mistake or an overload is.

    ``version``: the version the request pins (id, prefix, alias), None for the routing table.
    ``route_key``: reads the request's ``x-servery-route-key``; called only when a split needs it.
    """
    routes, served, how = registry.route(model, version, route_key)
    call.served = served
    info = served.info
    x = decode(info, max_rows)
    if type(x) is not np.ndarray and inspect.isawaitable(x):
        x = await x
    call.rows = n_rows(x)
    outputs = await served.batcher.submit(x)
    check_outputs(info, outputs)
    if version is None and routes.shadow is not None:
        registry.mirror(routes, served, x, outputs)
    return Inference(served, how, outputs)
