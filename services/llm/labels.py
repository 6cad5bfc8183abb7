"""The ``model`` label of the router's LLM request metrics (``servery_llm_requests_total``,
``servery_llm_request_duration_seconds``): bounded, though a request's ``model`` is client input.

A name keeps its own series when it is one the config serves (an LLM's served name, a task, a RAG
app, a LoRA adapter listed in an entry's ``adapters:``), or once the LLM service has answered a
request naming it successfully (status below 400): that covers adapters the service loads while
serving (``adapters: all``) and ``NAME@ALIAS`` / ``NAME@VERSION``, which are counted under the
name as sent, so a canary alias is told apart from production. vLLM answers 404 for a name it does
not serve, so random names never get a series; past :data:`MAX_LEARNED` learned names (the
config caps adapters per LLM with ``max_adapters``) the rest count as ``_unknown``, as unknown
names do (services/ops/usage.py bounds its own ``model`` label the same way).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

UNKNOWN_MODEL = "_unknown"
MAX_LEARNED = 256
"""Names learned from successful answers that one router worker keeps a series for."""


def configured_names(settings: Any) -> set[str]:
    """Served names, task names and listed adapters of the LLM service's settings
    (``services/llm/settings.py``)."""
    names = {m.name for m in settings.models} | set(settings.tasks)
    for entry in settings.models:
        if isinstance(entry.adapters, list):
            names.update(entry.adapters)
    return names


class ModelLabels:
    """Maps a request's ``model`` and answer status to its metrics label."""

    def __init__(self, names: Iterable[str], max_learned: int = MAX_LEARNED) -> None:
        self.names = set(names)
        self.learned: set[str] = set()
        self.max_learned = max_learned

    def add(self, names: Iterable[str]) -> None:
        """More configured names (RAG apps)."""
        self.names.update(names)

    def label(self, model: str, status: int) -> str:
        if model in self.names or model in self.learned:
            return model
        if model and model != "-" and status < 400 and len(self.learned) < self.max_learned:
            self.learned.add(model)
            return model
        return UNKNOWN_MODEL
