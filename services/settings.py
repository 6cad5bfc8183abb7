"""The one settings object of a servery process, read from ``SERVERY_*`` once at import.

BentoML needs some of these when the service classes are defined (workers, batching limits), so
they are read at import; request paths only ever see this object, never the environment.
"""

from __future__ import annotations

from models.config import Settings

SETTINGS = Settings()
