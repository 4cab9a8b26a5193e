"""Server interceptors (``grpc.aio``): ortmux errors -> gRPC statuses (applied once, here), RPC
metrics, and the caller's identity."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from ortmux.worker.api.errors import to_rpc_status
from ortmux.worker.audit import audit
from ortmux.worker.auth import SINGLE_TENANT, Identity, KeyRing
from ortmux.worker.errors import InternalError, InvalidArgument, WorkerError
from ortmux.worker.observability.metrics import Metrics

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    if not isinstance(exc, WorkerError):
        if not context.done():
            log.exception("unexpected error in %s", method, exc_info=exc)
        exc = InternalError("the worker hit an unexpected error; it is logged on the worker")
    status = rpc_status.to_status(to_rpc_status(exc))
    await context.abort(status.code, status.details, status.trailing_metadata)


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


async def _responses(behavior: Behavior, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
    """The responses of a streaming behavior: an async generator, or a coroutine that writes them
    with ``context.write`` (then nothing is yielded here)."""
    produced = behavior(request, context)
    if isinstance(produced, Awaitable):
        await produced
        return
    async for response in produced:
        yield response


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
    if hasattr(request, "__aiter__"):
        return _decoded_stream(request)
    return request


async def _decoded_stream(requests: AsyncIterator) -> AsyncIterator:
    async for item in requests:
        yield _decoded(item)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns every exception leaving a servicer into a status with google.rpc details.

    WorkerError keeps its code and message; anything else is logged with its traceback and
    answered INTERNAL without internals.
    """

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
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
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(_decoded(request), context)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _aborted(exc):
                    raise
                await _abort(context, method, exc)

        return guarded

    @staticmethod
    def _stream(behavior: Behavior, method: str) -> Behavior:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in _responses(behavior, _decoded(request), context):
                    yield response
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _aborted(exc):
                    raise
                await _abort(context, method, exc)

        return guarded


def _aborted(exc: BaseException) -> bool:
    """Whether ``exc`` is grpc's own signal that the call was already aborted."""
    return type(exc).__name__ == "AbortError"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts calls by method and final status code, and times them. Outermost interceptor."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap_handler(handler, handler_call_details.method, self._unary, self._stream)

    def _finish(
        self, method: str, context: grpc.aio.ServicerContext, started: float, failed: bool | None
    ) -> None:
        """``failed`` None: the call was cancelled (the client went away, or its deadline passed)."""
        code = _status_code(context.code())
        if code is None:
            code = (
                grpc.StatusCode.CANCELLED
                if failed is None
                else (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
            )
        self._metrics.rpcs.labels(method, code.name).inc()
        self._metrics.rpc_seconds.labels(method).observe(time.perf_counter() - started)
        self._metrics.rpcs_in_flight.labels(method).dec()

    def _unary(self, behavior: Behavior, method: str) -> Behavior:
        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            self._metrics.rpcs_in_flight.labels(method).inc()
            failed: bool | None = True
            try:
                response = await behavior(request, context)
                failed = False
                return response
            except asyncio.CancelledError:
                failed = None
                raise
            finally:
                self._finish(method, context, started, failed)

        return timed

    def _stream(self, behavior: Behavior, method: str) -> Behavior:
        async def timed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            self._metrics.rpcs_in_flight.labels(method).inc()
            failed: bool | None = True
            try:
                async for response in _responses(behavior, request, context):
                    yield response
                failed = False
            except (asyncio.CancelledError, GeneratorExit):
                failed = None
                raise
            finally:
                self._finish(method, context, started, failed)

        return timed


def _status_code(code: object) -> grpc.StatusCode | None:
    """The status a call was aborted with, as grpc.StatusCode (grpc.aio may report it as an int)."""
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return next((status for status in grpc.StatusCode if status.value[0] == code), None)


_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar("ortmux_identity", default=SINGLE_TENANT)


def current_identity() -> Identity:
    """Who makes the call being served (set by AuthInterceptor in the call's own task)."""
    return _identity.get()


def _api_key(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip()
        if key == "x-api-key" and isinstance(value, str):
            return value.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
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

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._OPEN):
            return handler
        return _wrap_handler(handler, method, self._unary, self._stream)

    def _identify(self, context: grpc.aio.ServicerContext, method: str) -> Identity:
        try:
            return self._keys.identify(_api_key(context))
        except WorkerError as error:
            audit("auth.refused", tenant="", result=error.code.name, method=method, peer=context.peer() or "")
            raise

    def _unary(self, behavior: Behavior, method: str) -> Behavior:
        async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _identity.set(self._identify(context, method))  # the call's own task: reset with it
            return await behavior(request, context)

        return authenticated

    def _stream(self, behavior: Behavior, method: str) -> Behavior:
        async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            _identity.set(self._identify(context, method))
            async for response in _responses(behavior, request, context):
                yield response

        return authenticated
