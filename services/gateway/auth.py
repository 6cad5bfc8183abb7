"""API keys and per-key rate limits for the router's HTTP and gRPC front ends.

Off unless keys are configured (``SERVERY_API_KEYS`` and/or ``SERVERY_API_KEYS_FILE``); then every
request needs ``Authorization: Bearer <key>`` (gRPC: metadata ``authorization``) except the
probes and metrics (``services.gateway.gate.OPEN_PATHS``; gRPC ``ServerLive``/``ServerReady``).
This module
is protocol-free: :mod:`services.gateway.gate` applies it to HTTP,
:mod:`services.protocols.oip.grpc` to gRPC.

Keys are kept only as SHA-256 digests. A presented key is hashed and looked up by its digest in a
dict, then confirmed with :func:`hmac.compare_digest`. The dict lookup is not constant-time, and
need not be: a client controls the key, not its digest, so timing can at most reveal something
about digests, from which no key follows (SHA-256 preimage resistance).

The keys file (YAML; JSON is YAML too) lists named keys, each plaintext or ``sha256:<hex>``, with
optional allowed models and rate limits::

    keys:
      - name: team-a
        key: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
        models: [iris, smollm2]     # optional: the model names this key may send (default: all)
        requests_per_minute: 600    # optional: default SERVERY_RATE_LIMIT_REQUESTS_PER_MINUTE
        tokens_per_minute: 20000    # optional, LLM: default SERVERY_RATE_LIMIT_TOKENS_PER_MINUTE
      - name: ci
        key: a-plaintext-key-of-16-or-more-characters

Rate limits are token buckets per key *in each router worker process* (no shared state): each
worker enforces the configured rate divided by ``SERVERY_ROUTER_WORKERS``, so the sum over a
router never exceeds it. A bucket holds one minute's worth (its burst) and refills continuously.
A request costs 1 from the request bucket; an LLM completion also costs, from the token bucket,
its estimated prompt tokens plus what it may generate (``max_tokens`` or
``max_completion_tokens``, times ``n`` and the number of prompts, parsed as vLLM parses them:
services/llm/openai_api.py), charged up front and not refunded. ``/v1`` answers carry OpenAI's
``x-ratelimit-*`` headers for the key's buckets in the worker that answered.

The keys file is re-read while serving (rotation without a restart): at most every
``SERVERY_RELOAD_INTERVAL_S``, the first request after the interval ``stat``s the file (following
symlinks, as a Kubernetes Secret volume swaps its ``..data`` link) and, when its resolved path,
inode, size or mtime changed, parses it and swaps the keyring in one assignment. Keys that stay
(same digest) keep their rate-limit buckets. A file that cannot be read or parsed keeps the
previous keys (logged as an error, counted in ``servery_api_keys_reloads_total``): a broken
rotation never opens the gate nor locks everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.config import ConfigError, Settings
from services.runtime.errors import Forbidden, RateLimited, ServeryError, Unauthenticated

MIN_KEY_LENGTH = 16
SHA256_PREFIX = "sha256:"
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")

REJECTED = Counter(
    "servery_auth_rejected",
    "Requests refused by API-key checks, by key name ('-': no or unknown key) and reason",
    ["key", "reason"],
)
RELOADS = Counter(
    "servery_api_keys_reloads",
    "Re-reads of a changed API keys file, by outcome (error: the previous keys stay)",
    ["outcome"],
)

logger = logging.getLogger("servery")


# --- configuration -------------------------------------------------------------------------------


class KeySpec(BaseModel):
    """One entry of the keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Shown in metrics and logs; never the key itself")
    key: str = Field(description="The key (16+ characters) or 'sha256:<hex digest of the key>'")
    models: list[str] | None = Field(
        None, description="Model names this key may send (classifiers and LLMs); default: all"
    )
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _KEY_NAME.match(v):
            raise ValueError(f"key name {v!r} must be 1-64 letters, digits, '.', '_', '@' or '-'")
        return v

    @field_validator("key")
    @classmethod
    def _check_key(cls, v: str) -> str:
        digest_of(v)  # raises ValueError for a malformed entry
        return v


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeySpec] = Field(min_length=1)


def digest_of(entry: str) -> bytes:
    """The SHA-256 digest a key entry stands for: ``sha256:<hex>`` as given, else the key's own.

    Raises ValueError for a plaintext key shorter than 16 characters or with whitespace, and for
    a ``sha256:`` entry that is not 64 hex digits. The message never repeats the key."""
    if entry.startswith(SHA256_PREFIX):
        hex_digest = entry[len(SHA256_PREFIX) :].lower()
        if not _HEX64.match(hex_digest):
            raise ValueError("a 'sha256:' key entry needs 64 hex digits after the prefix")
        return bytes.fromhex(hex_digest)
    if len(entry) < MIN_KEY_LENGTH or any(c.isspace() for c in entry) or "," in entry:
        raise ValueError(
            f"API keys need {MIN_KEY_LENGTH}+ characters without whitespace or commas "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return hash_key(entry)


def hash_key(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def parse_env_keys(text: str) -> list[KeySpec]:
    """``SERVERY_API_KEYS``: comma-separated keys (plaintext or ``sha256:<hex>``), named
    ``env-1``, ``env-2``, ... in order; they may use every model and get the default limits."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    try:
        return [KeySpec(name=f"env-{i}", key=e) for i, e in enumerate(entries, 1)]
    except ValidationError as e:
        raise ConfigError(f"invalid SERVERY_API_KEYS: {_first_error(e)}") from None


def parse_keys_file(path: Path | str) -> list[KeySpec]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the API keys file {path}: {e}") from e
    except yaml.YAMLError:
        # no YAML detail: the parser's message quotes the offending line, which may be a key
        raise ConfigError(f"the API keys file {path} is not valid YAML/JSON") from None
    try:
        return KeysFile.model_validate(data).keys
    except ValidationError as e:
        raise ConfigError(f"invalid API keys file {path}: {_first_error(e)}") from None


def _first_error(e: ValidationError) -> str:
    """The problems of a key list without the rejected values (they may be keys)."""
    errors = e.errors(include_url=False, include_input=False, include_context=False)
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}" for err in errors)


# --- token buckets and keys ----------------------------------------------------------------------


class TokenBucket:
    """``per_minute`` tokens a minute, refilled continuously, holding at most one minute's worth
    (at least 1). ``clock`` is injectable for tests (seconds, monotonic)."""

    __slots__ = ("capacity", "clock", "last", "rate", "tokens")

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = max(per_minute, 1.0)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.clock = clock
        self.last = clock()

    def wait_s(self, cost: float) -> float:
        """Seconds until ``cost`` tokens are available (0: now; inf: never, over capacity)."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if cost <= self.tokens:
            return 0.0
        if cost > self.capacity:
            return math.inf
        return (cost - self.tokens) / self.rate

    def take(self, cost: float) -> None:
        self.tokens -= cost

    def headers(self, kind: str) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-{limit,remaining,reset}-<kind>`` for this bucket (call
        :meth:`wait_s` first: it refills up to now)."""
        reset = (self.capacity - self.tokens) / self.rate if self.rate else 0.0
        return [
            (b"x-ratelimit-limit-" + kind.encode(), b"%d" % int(self.capacity)),
            (b"x-ratelimit-remaining-" + kind.encode(), b"%d" % max(0, int(self.tokens))),
            (b"x-ratelimit-reset-" + kind.encode(), duration(reset).encode()),
        ]


def duration(seconds: float) -> str:
    """``seconds`` as OpenAI writes its rate-limit resets (Go's duration format): ``20ms``,
    ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


@dataclass(eq=False)
class ApiKey:
    """A known key: its digest, the models it may use (None: all) and its buckets."""

    name: str
    digest: bytes
    models: frozenset[str] | None = None
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None

    @property
    def reads_llm_body(self) -> bool:
        """Whether an LLM request must be read before forwarding (model check, token cost)."""
        return self.models is not None or self.tokens is not None

    def allows(self, model: str | None) -> bool:
        """Whether the key may use ``model``. A key listing ``NAME`` may also use ``NAME@REF``
        (a LoRA adapter at an alias or version: the same model, services/llm/adapters.py); a
        key listing ``NAME@REF`` may use that reference only, not ``NAME`` nor other aliases."""
        if self.models is None or model in self.models:
            return True
        if model is None:
            return False
        name, sep, _ = model.partition("@")
        return bool(sep) and name in self.models

    def check_model(self, model: str | None) -> None:
        if not self.allows(model):
            REJECTED.labels(self.name, "forbidden").inc()
            what = f"model '{model}'" if model else "a request that names no model"
            raise Forbidden(f"this API key may not use {what}")

    def admit(self, tokens: int = 0) -> None:
        """Charge one request (and ``tokens`` LLM tokens), or raise :class:`RateLimited`."""
        wait = self.requests.wait_s(1) if self.requests is not None else 0.0
        if tokens and self.tokens is not None:
            token_wait = self.tokens.wait_s(tokens)
            if token_wait == math.inf:
                REJECTED.labels(self.name, "rate_limited").inc()
                raise RateLimited(
                    f"this request may generate {tokens} tokens, more than this API key may use "
                    f"at once ({self.tokens.capacity:g} tokens per router worker); lower "
                    "max_tokens",
                    None,
                )
            wait = max(wait, token_wait)
        if wait > 0:
            REJECTED.labels(self.name, "rate_limited").inc()
            raise RateLimited(
                f"rate limit of this API key reached; retry in {wait:.1f} s",
                max(1, math.ceil(wait)),
            )
        if self.requests is not None:
            self.requests.take(1)
        if tokens and self.tokens is not None:
            self.tokens.take(tokens)

    def rate_headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers for this key's buckets in this router worker (the
        limits are the worker's share, ``SERVERY_ROUTER_WORKERS``); none for an unlimited key."""
        out: list[tuple[bytes, bytes]] = []
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                bucket.wait_s(0)  # refill up to now
                out += bucket.headers(kind)
        return out


class AdminGuard:
    """Who may call ``/admin/`` (the router's ``POST /admin/reload``).

    * ``Authorization: Bearer <SERVERY_ADMIN_TOKEN>`` when a token is set, or an API key that may
      use every model (a key limited to some models is refused 403: the reload report lists
      every model, version and error);
    * with neither keys nor a token (local use), anyone, but an unsafe method only with
      ``Content-Type: application/json``: a cross-site HTML form cannot send that without a
      CORS preflight, which the router never answers;
    * an address that failed ``failures_per_minute`` times in the last minute is refused 429
      before its credentials are even looked at (a token bucket per client address, at most
      ``max_addresses`` remembered, the least recently failing forgotten first).
    """

    def __init__(
        self,
        token: str | None,
        keys: Keyring | None,
        *,
        failures_per_minute: float = 10,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._expected = None if token is None else f"Bearer {token}".encode()
        self.keys = keys
        self.failures_per_minute = failures_per_minute
        self.max_addresses = max_addresses
        self.clock = clock
        self._failures: OrderedDict[str, TokenBucket] = OrderedDict()

    def check(
        self, authorization: str | None, client: str, method: str, content_type: str | None
    ) -> ApiKey | None:
        """The admitted caller's key (None: the admin token, or open mode); raises 401, 403,
        415 or 429 (:class:`~services.runtime.errors.ServeryError`)."""
        if self._expected is None and self.keys is None:
            media = (content_type or "").partition(";")[0].strip().lower()
            if method not in ("GET", "HEAD", "OPTIONS") and media != "application/json":
                raise ServeryError.with_status(
                    415,
                    "admin endpoints without SERVERY_ADMIN_TOKEN or API keys accept only "
                    "'Content-Type: application/json' (no cross-site form posts)",
                )
            return None
        bucket = self._failures.get(client)
        if bucket is not None and (wait := bucket.wait_s(1)) > 0:
            REJECTED.labels("-", "admin_throttled").inc()
            raise RateLimited(
                f"too many failed admin attempts from this address; retry in {wait:.0f} s",
                max(1, math.ceil(wait)),
            )
        given = (authorization or "").encode()
        if self._expected is not None and hmac.compare_digest(given, self._expected):
            return None
        if self.keys is None:
            self._failed(client)
            raise Unauthenticated(
                "admin endpoints need 'Authorization: Bearer <SERVERY_ADMIN_TOKEN>'",
                invalid_token=authorization is not None,
            )
        try:
            key = self.keys.authenticate(authorization)
        except Unauthenticated:
            self._failed(client)
            raise
        if key.models is not None:
            REJECTED.labels(key.name, "forbidden").inc()
            raise Forbidden(
                "admin endpoints need an API key that may use every model, or the admin token"
            )
        key.admit()
        return key

    def _failed(self, client: str) -> None:
        bucket = self._failures.pop(client, None)
        if bucket is None:
            bucket = TokenBucket(self.failures_per_minute, self.clock)
            if len(self._failures) >= self.max_addresses:
                self._failures.popitem(last=False)
        bucket.wait_s(0)
        bucket.take(1)
        self._failures[client] = bucket  # most recent last


def _by_digest(keys: Iterable[ApiKey]) -> dict[bytes, ApiKey]:
    by_digest: dict[bytes, ApiKey] = {}
    for key in keys:
        if key.digest in by_digest:
            raise ConfigError(
                f"API keys '{by_digest[key.digest].name}' and '{key.name}' are the same"
            )
        by_digest[key.digest] = key
    return by_digest


def _carry(old: TokenBucket | None, new: TokenBucket | None) -> TokenBucket | None:
    """The bucket a staying key keeps: its old one when the rate is unchanged, else the new one
    holding no more than the old held (a changed limit is no way to a fresh burst)."""
    if old is None or new is None:
        return new
    if old.rate == new.rate and old.capacity == new.capacity:
        return old
    old.wait_s(0)  # refill up to now
    new.tokens = min(new.capacity, old.tokens)
    return new


FileSignature = tuple[object, ...]


def file_signature(path: Path) -> FileSignature:
    """What changes when ``path``'s content is replaced: the resolved path (a Secret volume swaps
    a symlink), inode, size and mtime of what it points to, or the error reading them."""
    try:
        st = os.stat(path)  # follows symlinks
    except OSError as e:
        return ("error", e.errno)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Keyring:
    """The keys of one router worker, by SHA-256 digest; with :meth:`watch`, re-read from their
    file when it changes (checked on :meth:`authenticate`, at most every ``interval_s``)."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_digest = _by_digest(keys)
        self._path: Path | None = None
        self._load: Callable[[], list[ApiKey]] | None = None
        self._signature: FileSignature | None = None
        self._interval_s = 0.0
        self._clock: Callable[[], float] = time.monotonic
        self._next_check = math.inf

    def __len__(self) -> int:
        return len(self._by_digest)

    def names(self) -> list[str]:
        return sorted(k.name for k in self._by_digest.values())

    def watch(
        self,
        path: Path,
        load: Callable[[], list[ApiKey]],
        interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        signature: FileSignature | None = None,
    ) -> None:
        """Re-read the keys with ``load()`` when ``path`` changes, checked at most every
        ``interval_s``; ``signature``: the file's when the current keys were read (default: now)."""
        self._path, self._load, self._interval_s, self._clock = path, load, interval_s, clock
        self._signature = file_signature(path) if signature is None else signature
        self._next_check = clock() + interval_s

    def replace(self, keys: Iterable[ApiKey]) -> None:
        """Switch to ``keys`` in one assignment; a key already known (same digest) keeps its
        rate-limit buckets. Raises ConfigError (two entries with one key) and changes nothing."""
        new = _by_digest(keys)
        for digest, key in new.items():
            old = self._by_digest.get(digest)
            if old is not None:
                key.requests = _carry(old.requests, key.requests)
                key.tokens = _carry(old.tokens, key.tokens)
        self._by_digest = new

    def refresh(self) -> bool:
        """Re-read the keys file now if it changed since it was last read; True if it was.

        A file that cannot be read or parsed keeps the current keys (logged, never the keys)."""
        if self._path is None or self._load is None:
            return False
        self._next_check = self._clock() + self._interval_s
        signature = file_signature(self._path)
        if signature == self._signature:
            return False
        self._signature = signature  # a broken file is reported once, not at every check
        before = set(self.names())
        try:
            self.replace(self._load())
        except Exception as e:  # whatever the file holds, a request never fails for it
            # ConfigError messages never quote a key; others (e.g. a binary file) say only what
            why = str(e) if isinstance(e, ConfigError) else f"{self._path}: {type(e).__name__}"
            RELOADS.labels("error").inc()
            logger.error("API keys not reloaded, still using the previous %d: %s", len(self), why)
            return False
        RELOADS.labels("ok").inc()
        after = set(self.names())
        logger.warning(
            "API keys reloaded from %s: %d keys; added %s, removed %s",
            self._path,
            len(after),
            sorted(after - before) or "none",
            sorted(before - after) or "none",
        )
        return True

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of an ``Authorization`` header value; :class:`Unauthenticated` if none is."""
        if self._path is not None and self._clock() >= self._next_check:
            self.refresh()
        if not authorization:
            REJECTED.labels("-", "unauthenticated").inc()
            raise Unauthenticated("this server needs an API key: 'Authorization: Bearer <key>'")
        scheme, _, presented = authorization.partition(" ")
        digest = hash_key(presented.strip())
        key = self._by_digest.get(digest)
        if scheme.lower() != "bearer" or key is None or not hmac.compare_digest(key.digest, digest):
            REJECTED.labels("-", "unauthenticated").inc()
            raise Unauthenticated("invalid API key", invalid_token=True)
        return key


def keyring(settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> Keyring | None:
    """The keys configured in ``settings`` (file, then environment), or None: auth is off.

    Limits are divided by ``settings.router_workers``: every worker enforces its share. The keys
    file is re-read when it changes (checked every ``settings.reload_interval_s``)."""
    if not enabled(settings):
        return None
    path = settings.api_keys_file
    signature = None if path is None else file_signature(path)  # before reading: no change lost
    ring = Keyring(load_keys(settings, clock=clock))
    if path is not None:
        ring.watch(
            path,
            lambda: load_keys(settings, clock=clock),
            settings.reload_interval_s,
            clock=clock,
            signature=signature,
        )
    return ring


def load_keys(settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> list[ApiKey]:
    """Read and check every configured key (file, then environment) with fresh buckets; raises
    ConfigError with the problem (never the key)."""
    specs: list[KeySpec] = []
    if settings.api_keys_file is not None:
        specs += parse_keys_file(settings.api_keys_file)
    specs += parse_env_keys(_env_keys(settings))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"API key names must be unique: {sorted(names)}")
    workers = settings.router_workers

    def bucket(per_minute: float | None) -> TokenBucket | None:
        return None if per_minute is None else TokenBucket(per_minute / workers, clock)

    return [
        ApiKey(
            name=s.name,
            digest=digest_of(s.key),
            models=None if s.models is None else frozenset(s.models),
            requests=bucket(s.requests_per_minute or settings.rate_limit_requests_per_minute),
            tokens=bucket(s.tokens_per_minute or settings.rate_limit_tokens_per_minute),
        )
        for s in specs
    ]


def enabled(settings: Settings) -> bool:
    """Whether keys are configured: a keys file, or a non-empty ``SERVERY_API_KEYS``."""
    return settings.api_keys_file is not None or bool(_env_keys(settings).strip(" ,"))


def _env_keys(settings: Settings) -> str:
    return "" if settings.api_keys is None else settings.api_keys.get_secret_value()
