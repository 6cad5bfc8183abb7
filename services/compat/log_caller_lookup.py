"""Skip logging's caller look-up for access-log lines when no format shows the caller.

Replaces: the standard library's ``logging/__init__.py``, ``Logger.findCaller``, on the one
logger :func:`skip_caller_lookup` is given (``bentoml.access``: an attribute of that logger
object); called by services/ops/logs.py's ``configure``. Nothing is patched by
:func:`services.compat.apply`.

Defect (a cost, not a bug): ``Logger._log`` walks the stack (``findCaller``) for every record
to fill in the caller's file, line and function, whether or not any format shows them. The
logging HOWTO ("Optimization") suggests ``logging._srcfile = None``, but that and logging's other
process-wide switches (``logThreads``, ``logProcesses``, ``logMultiprocessing``) stay as they
are: a library that sets up its logging later relies on them (vLLM's format has
``pid=%(process)d`` and the file and line; with those switched off every vLLM line of the LLM
service was a "--- Logging error ---", seen in CI's logs).

Harm: with the access log on, logging's per-record work was ~10 % of a router worker's CPU under
load; see services/compat/log_time_stamps.py for the measured total (12.8 -> 7.3 us a line).

Known for: Python 3.11 and 3.12 (it relies on ``Logger._log`` calling
``self.findCaller(stack_info, stacklevel)`` and unpacking four values). Guard: warn.
Reported upstream: not reported (the logging HOWTO's "Optimization" section describes the cost).
"""

from __future__ import annotations

import logging

# The standard library's source differs between Python versions: the line this fix relies on.
UPSTREAM_LINES = {
    "logging:Logger._log": "fn, lno, func, sinfo = self.findCaller(stack_info, stacklevel)",
}

SOURCE_FIELDS = ("pathname", "filename", "module", "funcName", "lineno")
"""Record fields that ``findCaller`` fills in."""

_NO_CALLER = ("(unknown file)", 0, "(unknown function)", None)


def _no_caller(stack_info: bool = False, stacklevel: int = 1) -> tuple[str, int, str, None]:
    return _NO_CALLER


def skip_caller_lookup(
    logger: logging.Logger,
    formatters: list[logging.Formatter | None],
    caller_free: tuple[type[logging.Formatter], ...] = (),
) -> None:
    """Skip ``logger``'s caller look-up when none of ``formatters`` (every handler its lines can
    reach) shows the caller's file, line or function; look it up again when one does.

    Only formats this can read count as known: plain ``logging.Formatter`` (its format string),
    ``None`` (the default format: the message only) and ``caller_free`` types (formatters known
    to show no caller field). Any other formatter may show anything, so the look-up stays then."""
    formats: list[str] | None = []
    for f in formatters:
        if f is None or isinstance(f, caller_free):
            continue
        if type(f) is not logging.Formatter:
            formats = None
            break
        formats.append(f._fmt or "")  # type: ignore[union-attr]
    if formats is not None:
        text = " ".join(formats)
        shown = (f"%({x})" in text or f"{{{x}" in text or f"${x}" in text for x in SOURCE_FIELDS)
        if not any(shown):
            logger.findCaller = _no_caller  # type: ignore[method-assign]
            return
    logger.__dict__.pop("findCaller", None)
