"""Server interceptors: ortmux errors -> gRPC statuses (applied once, here), and RPC metrics."""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_status import rpc_status

from ortmux.worker.api.errors import to_rpc_status
from ortmux.worker.audit import audit
from ortmux.worker.auth import SINGLE_TENANT, Identity, KeyRing
from ortmux.worker.errors import InternalError, InvalidArgument, WorkerError
from ortmux.worker.observability.metrics import Metrics

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _abort(context: grpc.ServicerContext, method: str, exc: Exception) -> None:
    if not isinstance(exc, WorkerError):
        if context.is_active():
            log.exception("unexpected error in %s", method, exc_info=exc)
        exc = InternalError("the worker hit an unexpected error; it is logged on the worker")
    context.abort_with_status(rpc_status.to_status(to_rpc_status(exc)))


def _wrap_handler(
    handler: grpc.RpcMethodHandler,
    method: str,
    wrap_unary: Callable,
    wrap_stream: Callable,
    deserializer: Callable | None = None,
) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behavior is wrapped; ``wrap_stream`` for streamed responses.
    ``deserializer`` replaces the handler's request deserializer."""
    deserializer = deserializer or handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary, method), deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary(handler.stream_unary, method), deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream, method), deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap_stream(handler.stream_stream, method), deserializer, handler.response_serializer
    )


class _Undecodable:
    """A request message whose bytes did not parse (gRPC would answer INTERNAL for it)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable | None) -> Callable | None:
    """``deserializer`` returning an :class:`_Undecodable` instead of raising, so the behavior
    can answer INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(exc)

    return parse


def _decoded(request: Any) -> Any:
    """The request, or InvalidArgument when its bytes were not a valid message; a stream of
    requests is checked message by message."""
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid protobuf message of this method: {request.error}")
    if isinstance(request, Iterator):
        return (_decoded(item) for item in request)
    return request


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns every exception leaving a servicer into a status with google.rpc details.

    WorkerError keeps its code and message; anything else is logged with its traceback and
    answered INTERNAL without internals.
    """

    def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap_handler(
            handler,
            handler_call_details.method,
            self._unary,
            self._stream,
            _tolerant(handler.request_deserializer),
        )

    @staticmethod
    def _unary(behavior: Behavior, method: str) -> Behavior:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(_decoded(request), context)
            except Exception as exc:
                _abort(context, method, exc)

        return guarded

    @staticmethod
    def _stream(behavior: Behavior, method: str) -> Behavior:
        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(_decoded(request), context)
            except Exception as exc:
                _abort(context, method, exc)

        return guarded


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts calls by method and final status code, and times them. Outermost interceptor."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap_handler(handler, handler_call_details.method, self._unary, self._stream)

    def _finish(self, method: str, context: grpc.ServicerContext, started: float, failed: bool) -> None:
        code = context.code() if hasattr(context, "code") else None
        if code is None:
            code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
        self._metrics.rpcs.labels(method, code.name).inc()
        self._metrics.rpc_seconds.labels(method).observe(time.perf_counter() - started)
        self._metrics.rpcs_in_flight.labels(method).dec()

    def _unary(self, behavior: Behavior, method: str) -> Behavior:
        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            self._metrics.rpcs_in_flight.labels(method).inc()
            failed = True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                self._finish(method, context, started, failed)

        return timed

    def _stream(self, behavior: Behavior, method: str) -> Behavior:
        def timed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            self._metrics.rpcs_in_flight.labels(method).inc()
            failed = True
            try:
                yield from behavior(request, context)
                failed = False
            finally:
                self._finish(method, context, started, failed)

        return timed


_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar("ortmux_identity", default=SINGLE_TENANT)


def current_identity() -> Identity:
    """Who makes the call being served (set by AuthInterceptor for the handler's thread)."""
    return _identity.get()


def _api_key(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip()
        if key == "x-api-key" and isinstance(value, str):
            return value.strip()
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Resolves the caller's API key to an identity before the servicer runs; health checks and
    reflection need no key. Innermost, so ErrorInterceptor answers UNAUTHENTICATED."""

    # Health, reflection and the Open Inference Protocol's liveness and readiness probes.
    _OPEN = (
        "/grpc.health.v1.Health/",
        "/grpc.reflection.",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    )

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys

    def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._OPEN):
            return handler
        return _wrap_handler(handler, method, self._unary, self._stream)

    def _identify(self, context: grpc.ServicerContext, method: str) -> Identity:
        try:
            return self._keys.identify(_api_key(context))
        except WorkerError as error:
            audit("auth.refused", tenant="", result=error.code.name, method=method, peer=context.peer() or "")
            raise

    def _unary(self, behavior: Behavior, method: str) -> Behavior:
        def authenticated(request: Any, context: grpc.ServicerContext) -> Any:
            token = _identity.set(self._identify(context, method))
            try:
                return behavior(request, context)
            finally:
                _identity.reset(token)

        return authenticated

    def _stream(self, behavior: Behavior, method: str) -> Behavior:
        def authenticated(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            token = _identity.set(self._identify(context, method))
            try:
                yield from behavior(request, context)
            finally:
                _identity.reset(token)

        return authenticated
