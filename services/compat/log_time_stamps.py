"""Render a log format's time stamp once per second when it shows nothing finer.

Replaces: the standard library's ``logging/__init__.py``, ``Formatter.formatTime``, on each
formatter :func:`cache_seconds` is given (an attribute of that formatter object, nothing
process-wide); called by services/ops/logs.py's ``configure`` for the formatters BentoML set up.
Nothing is patched by :func:`services.compat.apply`.

Defect (a cost, not a bug): ``Formatter.format`` calls ``formatTime`` for every record, and with
a ``datefmt`` (BentoML's has seconds resolution) that is ``time.strftime`` per line.

Harm: with the access log on (a line per request), logging's per-record work was ~10 % of a
router worker's CPU under load (py-spy, XGBoost OIP REST at c=64); this, the caller look-up
(services/compat/log_caller_lookup.py) and the deferred writes together took one access line
from 12.8 to 7.3 us.

Known for: Python 3.11 and 3.12 (it relies on ``Formatter.format`` calling
``self.formatTime(record, self.datefmt)``). Guard: warn.
Reported upstream: not reported (the standard library's documented behaviour).
"""

from __future__ import annotations

import logging
from typing import Any

# The standard library's source differs between Python versions: the line this fix relies on.
UPSTREAM_LINES = {
    "logging:Formatter.format": "record.asctime = self.formatTime(record, self.datefmt)",
}


def cache_seconds(formatter: logging.Formatter | None) -> None:
    """Render ``formatter``'s time stamp once per second when its ``datefmt`` has no finer field
    (``time.strftime`` has none; without a datefmt the default shows milliseconds). Only plain
    ``logging.Formatter`` objects, once each (idempotent)."""
    if (
        type(formatter) is not logging.Formatter
        or not formatter.datefmt
        or "formatTime" in vars(formatter)  # done already (or someone else's)
    ):
        return
    render = formatter.formatTime
    last: list[Any] = [None, ""]

    def format_time(record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = (int(record.created), datefmt)
        if second != last[0]:
            last[1] = render(record, datefmt)
            last[0] = second
        return last[1]  # type: ignore[no-any-return]

    formatter.formatTime = format_time  # type: ignore[method-assign]
