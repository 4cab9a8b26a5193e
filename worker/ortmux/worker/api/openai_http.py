"""The OpenAI-compatible HTTP API on its own port (``http_port``): ``POST /v1/completions``,
``POST /v1/chat/completions`` (whole or as server-sent events), ``GET /v1/models`` and
``GET /health``. A thin front end over the same generation path as the gRPC services: the same
keys and tenants (``Authorization: Bearer <key>``), quotas, drain and TLS settings.

The stack is Starlette served by uvicorn: both are kept, widely deployed and fast (uvicorn runs
on uvloop where installed; its HTTP parser is pinned to h11, which ``http_protocol`` extends),
Starlette streams server-sent events from a generator, and neither brings a framework's worth of
dependencies. uvicorn runs on a thread of the worker with its own event loop; the data plane's
blocking calls go to a thread pool.

A hostile or broken client cannot hold the worker: a request's headers must arrive within
``http_header_timeout_seconds`` (``http_protocol``), its body within ``http_body_timeout_seconds``
(else 408, and the connection is closed) and be at most ``http_max_body_bytes`` (else 413: at once
when ``Content-Length`` says so, else as soon as the body passes the limit); a large body is parsed
off the event loop, and one nested deeper than ``MAX_DEPTH`` is refused; and a generation answered
whole is cancelled when its client goes away before the answer. A refused body the client goes on
sending is read and dropped by uvicorn (so the client gets the answer, not a reset) until the
header timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ortmux.worker.api import openai_convert
from ortmux.worker.api.http_protocol import MAX_HEADER_BYTES, header_timeout_protocol
from ortmux.worker.auth import Identity, KeyRing
from ortmux.worker.dataplane import DataPlane, GenerationStream
from ortmux.worker.errors import Cancelled, InternalError, InvalidArgument, WorkerError
from ortmux.worker.generation.job import Chunk
from ortmux.worker.observability.metrics import Metrics
from ortmux.worker.settings import Settings

log = logging.getLogger(__name__)
PARSE_ON_LOOP_BYTES = 64 * 1024  # larger bodies are parsed in the thread pool
MAX_DEPTH = 100  # of a request body's arrays and objects: far more than any OpenAI request holds


class AsciiJSONResponse(JSONResponse):
    """JSON with every character past ASCII escaped, as the server-sent events are written: a lone
    surrogate that came in escaped (``"\\ud800"``, valid JSON but not UTF-8) goes back escaped."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


class Refused(Exception):
    """A request refused for an HTTP reason that has no worker error code (413, 408): answered in
    OpenAI's error shape, and with ``Connection: close`` when ``close``."""

    def __init__(self, status: int, message: str, code: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.close = close

    def response(self) -> Response:
        error = {"message": self.message, "type": "invalid_request_error", "param": None, "code": self.code}
        return AsciiJSONResponse(
            {"error": error}, status_code=self.status, headers={"Connection": "close"} if self.close else None
        )


class OpenAIApi:
    def __init__(
        self, dataplane: DataPlane, keys: KeyRing, metrics: Metrics, settings: Settings | None = None
    ) -> None:
        settings = settings or Settings()
        self._dataplane = dataplane
        self._keys = keys
        self._metrics = metrics
        self._max_body = settings.http_max_body_bytes
        self._body_timeout = settings.http_body_timeout_seconds
        self.app = Starlette(
            routes=[
                Route("/health", self._timed("/health", self.health), methods=["GET"]),
                Route("/v1/models", self._timed("/v1/models", self.models), methods=["GET"]),
                Route("/v1/completions", self._timed("/v1/completions", self.completions), methods=["POST"]),
                Route(
                    "/v1/chat/completions",
                    self._timed("/v1/chat/completions", self.chat_completions),
                    methods=["POST"],
                ),
            ]
        )

    def _timed(self, path: str, handler: Callable[[Request], Awaitable[Response]]) -> Callable:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except WorkerError as error:
                response = _error(error)
            except Refused as refusal:
                response = refusal.response()
            except ClientDisconnect:  # never delivered; counted as nginx's "client closed request"
                response = _error(Cancelled("the client closed the connection before the answer"))
            except Exception:
                log.exception("HTTP %s failed", path)
                response = _error(
                    InternalError("the worker hit an unexpected error; it is logged on the worker")
                )
            self._metrics.observe_http(path, response.status_code, time.perf_counter() - started)
            return response

        return endpoint

    def _identify(self, request: Request) -> Identity:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        return self._keys.identify(key.strip() if scheme.lower() == "bearer" else None)

    async def health(self, request: Request) -> Response:
        ready = self._dataplane.ready()
        return AsciiJSONResponse(
            {"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503
        )

    async def models(self, request: Request) -> Response:
        identity = self._identify(request)
        listed = []
        for model in self._dataplane.list_models():
            if self._dataplane.describe_generation(model).decoder is None:
                continue
            listed.append({"id": model.name, "object": "model", "created": 0, "owned_by": "ortmux"})
            for info in self._dataplane.list_adapters(identity, model.name):
                name = f"{model.name}:{info.adapter_id}"
                listed.append(
                    {"id": name, "object": "model", "created": int(info.created_at), "owned_by": "ortmux"}
                )
        return AsciiJSONResponse({"object": "list", "data": listed})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _read_body(self, request: Request) -> bytes:
        """The request's body, read as it comes: 413 once it is over the limit (before any of it is
        read when ``Content-Length`` says so), 408 when it has not all come in time."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body:
            raise Refused(413, self._too_large(), "request_body_too_large")

        async def read() -> bytes:
            body = bytearray()
            async with contextlib.aclosing(request.stream()) as parts:
                async for part in parts:
                    body += part
                    if len(body) > self._max_body:
                        raise Refused(413, self._too_large(), "request_body_too_large")
            return bytes(body)

        try:
            return await asyncio.wait_for(read(), self._body_timeout)
        except TimeoutError:
            message = f"the request body did not arrive within {self._body_timeout:g} seconds"
            raise Refused(408, message, "request_body_timeout", close=True) from None

    def _too_large(self) -> str:
        return f"the request body is over the worker's limit of {self._max_body} bytes (http_max_body_bytes)"

    async def _generate(self, request: Request, chat: bool) -> Response:
        identity = self._identify(request)
        raw = await self._read_body(request)
        body = _parse(raw) if len(raw) <= PARSE_ON_LOOP_BYTES else await run_in_threadpool(_parse, raw)
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        gone = threading.Event()
        generation = openai_convert.generation_request(
            body, chat, identity.tenant, None, lambda: not gone.is_set()
        )
        stream = await run_in_threadpool(self._dataplane.generate, generation)
        answer = openai_convert.Answer(str(body["model"]), chat)
        if not body.get("stream"):
            chunks = await _whole(request, stream, gone)
            if chunks is None:  # the client went away: the answer could not be delivered
                return _error(Cancelled("the client closed the connection before the answer"))
            return AsciiJSONResponse(answer.whole("".join(chunk.text for chunk in chunks), chunks[-1]))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            first = True
            try:
                async for chunk in stream:  # awaited on the event loop: no thread per stream
                    yield f"data: {json.dumps(answer.chunk(chunk, first))}\n\n"
                    first = False
                    if chunk.finish_reason and include_usage:
                        yield f"data: {json.dumps(answer.usage_chunk(chunk))}\n\n"
                yield "data: [DONE]\n\n"
            except WorkerError as error:
                yield f"data: {json.dumps(openai_convert.error_body(error)[1])}\n\n"
            finally:  # also when the client went away (the task is cancelled)
                gone.set()
                stream.close()

        return StreamingResponse(events(), media_type="text/event-stream")


def _parse(raw: bytes) -> object:
    """A request body as JSON. Refused when it is not JSON (or not UTF-8, or holds an integer too
    long to read), and when it nests deeper than ``MAX_DEPTH``: the parser's own bound depends on
    the stack it runs on, and the request's values must stay shallow enough to convert and show."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"the request body is not JSON: {exc}") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(body, MAX_DEPTH):
        raise InvalidArgument(f"the request body nests arrays and objects deeper than {MAX_DEPTH} levels")
    return body


def _deeper_than(value: object, limit: int) -> bool:
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


async def _whole(request: Request, stream: GenerationStream, gone: threading.Event) -> list[Chunk] | None:
    """All the chunks of a generation, or None when its client went away first: then the
    generation is cancelled (its sequence leaves the decode loop within a step) and its thread
    pool call has ended before this returns."""
    collecting = asyncio.ensure_future(_collect(stream))
    watching = asyncio.ensure_future(_disconnected(request))
    watching.add_done_callback(_drop_result)
    abandoned = False
    try:
        await asyncio.wait((collecting, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():  # the client is gone, or this request is being cancelled
            abandoned = True
            gone.set()
            stream.close()
            collecting.add_done_callback(_drop_result)
    await asyncio.wait((watching,))
    if not abandoned:
        stream.close()
        return collecting.result()
    with contextlib.suppress(WorkerError):  # the stream ends with Cancelled once closed
        await collecting
    return None


async def _collect(stream: GenerationStream) -> list[Chunk]:
    return [chunk async for chunk in stream]


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (uvicorn's receive() answers nothing else once
    the body is read, until the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _drop_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


def _error(error: WorkerError) -> Response:
    status, body, headers = openai_convert.error_body(error)
    return AsciiJSONResponse(body, status_code=status, headers=headers)


class HttpServer:
    """uvicorn serving the API on a thread of its own, on a socket bound before it starts (so port
    0 picks a free port that is known at once)."""

    def __init__(self, api: OpenAIApi, settings: Settings) -> None:
        import uvicorn

        self._socket = socket.create_server((settings.host, settings.http_port), reuse_port=False)
        self.port = self._socket.getsockname()[1]
        tls = {}
        if settings.tls_cert_file:
            tls = {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
            if settings.tls_client_ca_file:
                tls |= {"ssl_ca_certs": settings.tls_client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            api.app,
            http=header_timeout_protocol(settings.http_header_timeout_seconds),  # pinned: h11, guarded
            ws="none",  # no WebSocket routes; an upgrade would hand the connection to another protocol
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            log_level="warning",
            lifespan="off",
            access_log=False,
            **tls,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="ortmux-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _serve(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._socket]))

    def stop(self, grace: float) -> None:
        self._server.should_exit = True
        self._thread.join(grace + 5)
