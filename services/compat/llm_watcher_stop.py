"""Stop the LLM service's worker without signalling its children (vLLM's engine processes).

Replaces: BentoML 1.4.40, ``bentoml/serving.py``, ``create_watcher``: wrapped; the LLM
service's watcher gets ``stop_children=False``, every other watcher is unchanged.

Defect: ``create_watcher`` makes every circus watcher with ``stop_children=True``: on SIGTERM
circus signals each worker's child processes too, and vLLM's engine core aborts every request
in flight the moment it gets SIGTERM (``vllm/v1/engine/core.py``).

Harm: LLM streams in flight at SIGTERM were cut before the service's graceful shutdown
(services/ops/shutdown.py) could let them finish (tests/integration/test_graceful_shutdown.py).
The LLM worker stops its engines itself in its shutdown hook; circus still kills the whole tree
if the worker outlives ``graceful_timeout`` (a day since bentoml/BentoML#5024). Applied in the
``bentoml serve`` process, where BentoML imports ``services`` before it creates the watchers.

Known for: bentoml 1.4.40. Guard: warn (a wrapper setting one attribute; a mismatch at worst
brings back the cut streams).
Reported upstream: not reported.
"""

from __future__ import annotations

import itertools
from typing import Any

# What this fix was written against: services.compat.fingerprint() of each upstream definition.
UPSTREAM = {
    "bentoml.serving:create_watcher": "aaaba47f02157fd0",
}

SERVICE = "llm"
"""The BentoML service name (``--service-name``) whose worker keeps its children."""


def serves(args: list[str], service: str) -> bool:
    """Whether a BentoML worker command line serves ``service`` (``--service-name NAME``)."""
    return any(a == "--service-name" and b == service for a, b in itertools.pairwise(args))


def patch() -> None:
    """Wrap ``bentoml.serving.create_watcher``: the LLM worker's watcher leaves its children."""
    import bentoml.serving

    original = bentoml.serving.create_watcher

    def create_watcher(name: str, args: list[str], **kwargs: Any) -> Any:
        watcher = original(name, args, **kwargs)
        if serves(args, SERVICE):
            watcher.stop_children = False
        return watcher

    bentoml.serving.create_watcher = create_watcher  # type: ignore[assignment]
