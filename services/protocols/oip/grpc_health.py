"""gRPC conventions on the OIP port: ``grpc.health.v1.Health`` and server reflection.

Health answers from the router worker's registry at the moment of the call, so it follows
readiness exactly as ``/readyz`` and OIP's ``ServerReady`` do (no state to keep in step):

* service ``""`` (what Kubernetes' native ``grpc:`` probe and ``grpc_health_probe`` ask by
  default) and ``inference.GRPCInferenceService``: SERVING when the router is ready
  (:meth:`services.runtime.registry.Registry.ready`), else NOT_SERVING;
* a served model's name (``iris``): SERVING when its default version can answer now (its
  framework service reachable), NOT_SERVING when not; a name that is not served: NOT_FOUND.
  With API keys configured a per-model check needs a key that may use the model, as
  ``ModelReady`` does (the overall checks stay open: probes carry no key);
* ``Watch`` streams the same status, re-checked every ``poll_s``, and a new message when it
  changes (SERVICE_UNKNOWN for a name not served, as the protocol says).

Reflection (``grpc.reflection.v1alpha``, which ``grpcurl`` falls back to and Postman uses) lists
the inference service, health and reflection itself, and serves their descriptors: Triton's
generated ``inference`` package, so reflection describes the messages the server accepts.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime.errors import ModelNotFound, ServeryError

if TYPE_CHECKING:
    from services.gateway.auth import Keyring
    from services.runtime.registry import Registry

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

POLL_S = 1.0
"""How often ``Watch`` re-checks the status it streams."""


class HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health`` over one router worker's registry (see the module docstring).

    ``server_services``: the names that mean the whole server (``""`` and the inference
    service); ``metadata(context, name)`` reads a call's metadata and ``abort(context, error)``
    ends a call with an error's status (the OIP servicer's helpers)."""

    def __init__(
        self,
        registry: Registry,
        server_services: tuple[str, ...],
        *,
        keys: Keyring | None = None,
        metadata: Any = None,
        abort: Any = None,
        poll_s: float = POLL_S,
    ) -> None:
        self._registry = registry
        self._server = frozenset(server_services)
        self._keys = keys
        self._metadata = metadata
        self._abort = abort
        self._poll_s = poll_s

    def status(self, service: str, authorization: str | None = None) -> int:
        """The serving status of ``service``; raises ModelNotFound for a name not served and
        the auth errors for a per-model check without a key that may use it."""
        if service in self._server:
            return SERVING if self._registry.ready() else NOT_SERVING
        if self._keys is not None:
            self._keys.authenticate(authorization).check_model(service)
        problem = self._registry.problem(service)  # ModelNotFound for an unknown name
        return SERVING if problem is None else NOT_SERVING

    def _status_of(self, request: Any, context: grpc.aio.ServicerContext) -> int:
        authorization = None
        if self._keys is not None and self._metadata is not None:
            authorization = self._metadata(context, "authorization")
        return self.status(request.service, authorization)

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            status = self._status_of(request, context)
        except ServeryError as e:
            await self._abort(context, e)
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        last = None
        while True:
            try:
                status = self._status_of(request, context)
            except ModelNotFound:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN  # the protocol's answer
            except ServeryError as e:
                await self._abort(context, e)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await asyncio.sleep(self._poll_s)


def add_to(
    server: grpc.aio.Server,
    registry: Registry,
    inference_service: str,
    *,
    keys: Keyring | None = None,
    metadata: Any = None,
    abort: Any = None,
) -> HealthServicer:
    """Register health and reflection on ``server`` (before it starts); returns the health
    servicer."""
    health = HealthServicer(
        registry, ("", inference_service), keys=keys, metadata=metadata, abort=abort
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (inference_service, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    return health
