"""Typed settings of batch jobs (``SERVERY_BATCH_*``; docs/batch.md)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_dir() -> Path:
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "batch"


class BatchSettings(BaseSettings):
    """Where jobs and files live, who consumes the queue, and the limits."""

    model_config = SettingsConfigDict(env_prefix="SERVERY_BATCH_", extra="ignore")

    enabled: bool = True
    """Serve ``/v1/files`` and ``/v1/batches`` on the router."""
    dir: Path = Field(default_factory=_default_dir)
    """Input, output and error files (a volume shared by routers and workers in deploy/); with
    no ``SERVERY_BATCH_REDIS_URL``, also the SQLite queue and job state. Default
    ``$BENTOML_HOME/batch``."""
    redis_url: str | None = None
    """``redis://host:port/db``: the queue and job state in Redis (production); unset: SQLite
    files in ``dir`` (embedded, no server)."""
    worker: bool = True
    """Consume the queue in this server (every router worker). deploy/ turns it off in the
    router pods and on in the batch workers' pods."""
    concurrency: int = Field(4, ge=1, le=256)
    """Lines one consumer runs at once while no online request comes (with online traffic,
    ``busy_share`` applies)."""
    busy_share: float = Field(0.1, gt=0, le=1)
    """While this server answers online requests, the share of time batch lines may take (one
    line at a time, then a pause); 1: no pacing. Online traffic goes first."""
    chunk_lines: int = Field(100, ge=1)
    """Lines per queued task: the unit that is retried and re-queued after a crash."""
    max_file_bytes: int = Field(100 * 2**20, ge=1)
    """Largest file ``POST /v1/files`` takes (413 beyond). The router's
    ``SERVERY_MAX_BODY_BYTES`` applies first."""
    max_lines: int = Field(50_000, ge=1)
    """Most lines in one batch's input file (OpenAI's limit)."""
    max_queued_lines: int = Field(1_000_000, ge=1)
    """Lines one API key may have waiting or running in all its batches (429 beyond)."""
    line_retries: int = Field(4, ge=0)
    """Retries of a line that met a transient failure (429, 502, 503, 504, a connection error)."""
    retry_delay_s: float = Field(0.5, gt=0)
    """First retry's delay; doubled at each retry."""
    lease_s: float = Field(30.0, gt=0)
    """A chunk whose worker has not reported for this long is queued again (its worker died)."""
    sweep_interval_s: float = Field(2.0, gt=0)
    """How often a consumer checks expiry, cancels, dead chunks and the metrics."""
