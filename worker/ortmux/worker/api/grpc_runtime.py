"""Where the gRPC services run: ``grpc.aio`` servers on the process's gRPC event loop thread, so an
open call (a Generate, an InferStream, a health watch) holds no thread, and the data plane's
blocking work handed to bounded executors whose size caps the work running at once, never the
calls open.

Three executors, so one kind of traffic cannot starve another: ``requests`` for admitting
inference and generation requests (quick: checks, quotas, an adapter's first load), ``control``
for model and adapter management and listings, ``uploads`` for adapter uploads. Waiting for a
batch or for the next token happens on the loop. Health and reflection answer on the loop itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import _async as health_async

Result = TypeVar("Result")


class Offload:
    """Runs blocking functions on a bounded pool, with the caller's context variables (the
    caller's identity among them)."""

    def __init__(self, workers: int, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def __call__(self, function: Callable[..., Result], *args: Any) -> Result:
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._pool, context.run, function, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrpcServer:
    """A ``grpc.aio`` server run on its own event loop thread, driven from synchronous code:
    :meth:`register` the services, :meth:`add_port`, then :meth:`start` and :meth:`stop`.
    ``executors`` are shut down with it."""

    def __init__(self, executors: tuple[Offload, ...] = (), **options: Any) -> None:
        self.loop, self._thread = _grpc_loop()
        self.executors = executors

        async def create() -> grpc.aio.Server:
            return grpc.aio.server(**options)

        self.server: grpc.aio.Server = self.call(create())

    def call(self, coroutine: Coroutine[Any, Any, Result], timeout: float | None = 30.0) -> Result:
        """Run ``coroutine`` on the loop and wait for its result (not from the loop's own thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def run(self, coroutine: Coroutine[Any, Any, object]) -> None:
        """Run ``coroutine`` on the loop: waited for from another thread, so what it does is done
        when this returns; started and not waited for from the loop's own thread."""
        if threading.current_thread() is self._thread:
            self.loop.create_task(coroutine)
        elif self.loop.is_running():
            self.call(coroutine, timeout=10)

    def register(self, add: Callable[[grpc.aio.Server], Result]) -> Result:
        """``add(server)`` on the loop (the server's methods for services and ports must run there)."""

        async def on_loop() -> Result:
            return add(self.server)

        return self.call(on_loop())

    def start(self) -> None:
        self.call(self.server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stop taking calls; those open may finish within ``grace`` seconds. The event is set
        once every call has ended. Once only: grpc.aio's shutdown is not to be called twice."""
        stopped = threading.Event()

        async def stop() -> None:
            await self.server.stop(grace)
            stopped.set()

        asyncio.run_coroutine_threadsafe(stop(), self.loop)
        return stopped

    def close(self) -> None:
        """End the executors (after :meth:`stop`); the loop serves the process's other servers."""
        for executor in self.executors:
            executor.close()


_loop_lock = threading.Lock()
_loop: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None


def _grpc_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """The process's gRPC event loop and its thread, started on first use. One for every server
    of the process: grpc.aio polls its core through one process-wide completion queue, which
    wakes every loop bound to it."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=_run_forever, args=(loop,), name="ortmux-grpc-loop", daemon=True)
            thread.start()
            _loop = loop, thread
        return _loop


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


class Health:
    """grpc's asyncio health servicer, set from synchronous code."""

    def __init__(self, server: GrpcServer) -> None:
        self._server = server
        self.servicer = health_async.HealthServicer()

    def set(self, service: str, status: int) -> None:
        self._server.run(self.servicer.set(service, status))

    def enter_graceful_shutdown(self) -> None:
        self._server.run(self.servicer.enter_graceful_shutdown())


async def result_of(future: Future[Result], timeout: float | None = None) -> Result:
    """The result of a future another thread completes, awaited on the running loop. Unlike
    ``asyncio.wrap_future``, a call that ends early leaves the future alone (its owner completes
    it, and drops work whose caller went away)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def done(_future: Future[Result]) -> None:
        loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

    future.add_done_callback(done)
    await asyncio.wait_for(waiter, timeout)
    return future.result()


def is_active(context: grpc.aio.ServicerContext) -> Callable[[], bool]:
    """Whether the call is still open (the caller neither cancelled nor went away). grpc.aio's
    ``done()`` and ``cancelled()`` stay False for a call the client cancelled; its done
    callbacks run, at once."""
    ended = threading.Event()
    context.add_done_callback(lambda _context: ended.set())
    return lambda: not ended.is_set()
