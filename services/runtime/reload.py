"""Hot reload, the part the router and the framework services share.

Both kinds of process poll what they should serve (``models/reload.py``: the models file, the
store and the aliases) and load the versions it newly needs; they differ only in what they hold
(the router: a routing table per model, ``services/runtime/loader.py``; a framework service: the
loaded runtimes of its own framework, ``services/frameworks/base.py``). What is the same is here:

* :class:`DesiredWatch`: noticing a change (a cheap fingerprint) and reading the new desired
  state; an unusable models file is logged once per distinct error and the previous state keeps
  serving (at start: the entries valid on their own, or nothing, and the process starts);
* :class:`FailedLoads`: versions that failed to load are not retried on every poll, only once
  their model's store folder changed (or on a forced reload);
* :func:`poll`: the watcher loop that survives anything one reload raises (logged once per
  distinct error);
* :func:`release_memory`: after unloading, let a full collection reclaim what the heap freeze at
  start-up (``services/ops/heap.py``) kept out of the collector.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Generic, TypeVar

from models.aliases import AliasStore
from models.config import ConfigError, ModelConfig
from models.reload import Desired, desired, fingerprint, first_desired, read_desired

logger = logging.getLogger("servery")

Key = tuple[str, str]
"""(served name, version)"""

T = TypeVar("T")


class DesiredWatch:
    """The models file, the store and the aliases, as last read."""

    def __init__(self, models_file: Path | str, aliases: AliasStore) -> None:
        self.models_file = Path(models_file)
        self.aliases = aliases
        self.config: ModelConfig | None = None
        """The model config last read (None before the first read)."""
        self.error: str | None = None
        """Why the models file last read could not be used (None: it could)."""
        self._seen: tuple[object, ...] | None = None

    def changed(self) -> bool:
        """Whether anything changed since the last read (a few ``stat`` calls, no reads)."""
        return self._now() != self._seen

    def _now(self) -> tuple[object, ...]:
        return fingerprint(self.models_file, self.config, self.aliases)

    def first(self, config: ModelConfig | None = None) -> Desired:
        """Read the desired state at start (blocking); ``config``: one already read. Never
        raises: an unusable models file is logged and what could be salvaged from it is served
        (``Desired.config_error``, :func:`models.reload.first_desired`), so the process starts
        and picks up the fixed file at a later poll instead of exiting (a crash loop)."""
        if config is not None:
            self.config = config
            state = desired(config, self.aliases)
        else:
            state = first_desired(self.models_file, self.aliases)
            self.config = state.config
        if state.config_error is not None:
            now = "serving its valid entries" if state.config.models else "serving nothing"
            self._report(state.config_error, f"{now} until it is fixed")
        self._seen = self._now()
        return state

    async def read(self) -> tuple[Desired, tuple[object, ...]]:
        """The desired state now and the fingerprint to :meth:`settle` once it is served.

        An unusable models file raises ``ConfigError`` after logging it (once per distinct
        error, not at every change of the file); that change is then settled (not re-read every
        poll) and the previous state keeps serving."""
        seen = self._now()
        try:
            state = await asyncio.to_thread(read_desired, self.models_file, self.aliases)
        except ConfigError as e:
            self._report(str(e), "still serving the previous one")
            self._seen = seen
            raise
        if self.error is not None:
            logger.warning("model config %s is usable again", self.models_file)
            self.error = None
        self.config = state.config
        return state, seen

    def _report(self, error: str, what_now: str) -> None:
        if error != self.error:
            logger.error("model config not loaded, %s: %s", what_now, error)
        self.error = error

    def settle(self, seen: tuple[object, ...]) -> None:
        """The state read with fingerprint ``seen`` is served now."""
        self._seen = seen


class FailedLoads(Generic[T]):
    """Versions that failed to load, with what to report: not retried until their model's store
    folder changes (``AliasStore.fingerprint``), or until :meth:`clear` (a forced reload)."""

    def __init__(self, aliases: AliasStore) -> None:
        self._aliases = aliases
        self._failed: dict[Key, tuple[T, object]] = {}

    def record(self, key: Key, store_name: str, failure: T) -> None:
        self._failed[key] = (failure, self._aliases.fingerprint(store_name))

    def blocked(self, key: Key, store_name: str) -> T | None:
        """The recorded failure of ``key`` if its model's store has not changed since."""
        failed = self._failed.get(key)
        if failed is not None and failed[1] == self._aliases.fingerprint(store_name):
            return failed[0]
        return None

    def get(self, key: Key) -> T | None:
        failed = self._failed.get(key)
        return None if failed is None else failed[0]

    def forget(self, key: Key) -> None:
        self._failed.pop(key, None)

    def clear(self) -> None:
        self._failed.clear()


async def poll(interval_s: float, tick: Callable[[], Awaitable[None]], what: str) -> None:
    """Run ``tick`` every ``interval_s`` forever; a tick that raises is logged, never fatal.

    A tick that keeps failing the same way is logged with its traceback once, not at every
    poll: the next distinct error (or a success, then a failure) is logged again."""
    last: str | None = None
    while True:
        await asyncio.sleep(interval_s)
        try:
            await tick()
            last = None
        except Exception as e:  # the watcher must survive anything one reload throws
            error = f"{type(e).__name__}: {e}"
            if error != last:
                logger.exception("%s (logged once until it changes)", what)
            last = error


def release_memory() -> None:
    """Unloaded versions were frozen with the heap at start-up (``gc.freeze``): let a full
    collection reclaim any cycles among them, then freeze what is left again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
