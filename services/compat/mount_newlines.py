"""Let a path with a newline (``%0A``) reach the mounted router app, to get its JSON 404.

Replaces: BentoML 1.4.40, ``_bentoml_impl/server/mount.py``, ``PassiveMount``: wraps its
``__init__`` (Starlette 1.10.0's ``Mount.__init__``, ``starlette/routing.py``) to recompile the
pattern it compiled.

Defect: ``PassiveMount`` keeps Starlette's ``Mount`` pattern ``^/(?P<path>.*)$``, compiled by
``compile_path`` without ``re.DOTALL``, so a decoded newline anywhere in the path makes the mount
(the router's FastAPI app) never match.

Harm: BentoML answered its own ``text/plain`` 404 instead of the platform's envelope for such
paths (tests/integration/test_malformed.py, the ``newline`` cases). With ``DOTALL`` they reach
the app's own routes, whose ``[^/]+`` parameters already match newlines.

Known for: bentoml 1.4.40, starlette 1.10.0. Guard: warn (a wrapper; a mismatch at worst
brings back the text 404, or fails loudly when the app is built).
Reported upstream: Kludex/starlette#1058 ("PathConvertor doesn't match new line characters",
closed; starlette 1.10.0 still compiles paths without ``DOTALL``).
"""

from __future__ import annotations

from typing import Any

# What this fix was written against: services.compat.fingerprint() of each upstream definition.
UPSTREAM = {
    "_bentoml_impl.server.mount:PassiveMount": "e80bc65d85e371d4",
    "starlette.routing:Mount.__init__": "f776ef2ca18256be",
    "starlette.routing:compile_path": "1180943ae1d1cbf4",
}


def patch() -> None:
    """Wrap ``PassiveMount.__init__``: its ``path_regex`` recompiled with ``re.DOTALL``."""
    import re

    from _bentoml_impl.server.mount import PassiveMount

    original = PassiveMount.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.path_regex = re.compile(self.path_regex.pattern, self.path_regex.flags | re.DOTALL)

    PassiveMount.__init__ = __init__  # type: ignore[method-assign]
