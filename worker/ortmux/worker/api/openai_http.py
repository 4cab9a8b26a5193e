"""The OpenAI-compatible HTTP API on its own port (``http_port``): ``POST /v1/completions``,
``POST /v1/chat/completions`` (whole or as server-sent events), ``GET /v1/models`` and
``GET /health``. A thin front end over the same generation path as the gRPC services: the same
keys and tenants (``Authorization: Bearer <key>``), quotas, drain and TLS settings.

The stack is Starlette served by uvicorn: both are kept, widely deployed and fast (uvicorn runs
on uvloop and httptools where installed), Starlette streams server-sent events from a generator,
and neither brings a framework's worth of dependencies. uvicorn runs on a thread of the worker
with its own event loop; the data plane's blocking calls go to a thread pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ortmux.worker.api import openai_convert
from ortmux.worker.auth import Identity, KeyRing
from ortmux.worker.dataplane import DataPlane
from ortmux.worker.errors import InternalError, InvalidArgument, WorkerError
from ortmux.worker.observability.metrics import Metrics
from ortmux.worker.settings import Settings

log = logging.getLogger(__name__)


class OpenAIApi:
    def __init__(self, dataplane: DataPlane, keys: KeyRing, metrics: Metrics) -> None:
        self._dataplane = dataplane
        self._keys = keys
        self._metrics = metrics
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
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

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
        return JSONResponse({"object": "list", "data": listed})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        identity = self._identify(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"the request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        gone = threading.Event()
        generation = openai_convert.generation_request(
            body, chat, identity.tenant, None, lambda: not gone.is_set()
        )
        stream = await run_in_threadpool(self._dataplane.generate, generation)
        answer = openai_convert.Answer(str(body["model"]), chat)
        if not body.get("stream"):
            try:
                chunks = await run_in_threadpool(list, stream)
            finally:
                stream.close()
            return JSONResponse(answer.whole("".join(chunk.text for chunk in chunks), chunks[-1]))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            iterator = iter(stream)
            first = True
            try:
                while True:
                    chunk = await run_in_threadpool(next, iterator, None)
                    if chunk is None:
                        break
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


def _error(error: WorkerError) -> Response:
    status, body, headers = openai_convert.error_body(error)
    return JSONResponse(body, status_code=status, headers=headers)


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
        config = uvicorn.Config(api.app, log_level="warning", lifespan="off", access_log=False, **tls)
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
