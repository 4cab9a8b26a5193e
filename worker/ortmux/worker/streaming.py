"""A stream of inference requests answered as they complete, with a bounded window (no gRPC here).

The stream reads a request only while fewer than ``window`` are unanswered, so a fast producer
is held back by transport flow control instead of growing the worker's memory. Each request is
answered once, in completion order, with its result or its own error; the stream ends after the
input ends and every accepted request is answered.

It runs on the event loop of the call that carries it: reading, waiting and answering hold no
thread; only taking a request (its admission, which may load an adapter) is handed to the
caller's ``take``, which runs it off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future

from ortmux.worker.dataplane import InferenceRequest, InferenceResult
from ortmux.worker.errors import InternalError, InvalidArgument, Unavailable, WorkerError

log = logging.getLogger(__name__)

# What a stream reads: a request id and a function building the request (it may raise an
# WorkerError for a malformed message, which is answered in-band under that id).
Incoming = tuple[str, Callable[[], InferenceRequest]]
# Builds and submits one request off the event loop: its result's future.
Take = Callable[[Callable[[], InferenceRequest]], Awaitable["Future[InferenceResult]"]]


@dataclasses.dataclass(frozen=True)
class StreamAnswer:
    request_id: str
    result: InferenceResult | None = None
    error: WorkerError | None = None


@dataclasses.dataclass(frozen=True)
class _InputEnded:
    accepted: int
    draining: bool = False  # the worker stopped reading because it is shutting down
    error: WorkerError | None = None  # a message that could not be read (not a valid message)


class _Stopped:
    """The call ended (the client cancelled or went away): stop answering."""


class AnswerStream:
    """Answers for ``incoming`` requests in completion order, at most ``window`` unanswered.

    Iterate it (``async for``) on the event loop it was made on. ``stop()`` (from any thread) is
    for a call that ended early: reading stops, and requests already queued are dropped by the
    batcher through their own ``is_active``. ``drain()`` (from any thread) is for a worker
    shutting down: reading stops, every request taken so far is answered, then the stream ends
    with UNAVAILABLE so the client sends the rest elsewhere.
    """

    def __init__(
        self, incoming: AsyncIterator[Incoming], take: Take, window: int, unique_ids: bool = False
    ) -> None:
        """``unique_ids``: every request needs an id no unanswered request of the stream has; one
        without (empty or repeated) is answered INVALID_ARGUMENT in-band and the stream goes on."""
        if window < 1:
            raise ValueError("window must be at least 1")
        self._loop = asyncio.get_running_loop()
        self._unique_ids = unique_ids
        self._in_flight: set[str] = set()  # ids taken and not yet answered (with unique_ids)
        self._incoming = incoming
        self._take_one = take
        self._answers: asyncio.Queue[StreamAnswer | _InputEnded | _Stopped] = asyncio.Queue()
        self._slots = asyncio.Semaphore(window)
        self._stopped = False
        self._accepted = 0
        self._ended = False

    def stop(self) -> None:
        self._soon(self._stop)

    def drain(self) -> None:
        self._soon(self._drain)

    def _soon(self, function: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the stream is long gone
            self._loop.call_soon_threadsafe(function)

    def _stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._answers.put_nowait(_Stopped())
            self._slots.release()  # a reader waiting for a slot wakes up and sees the stop

    def _drain(self) -> None:
        self._end(draining=True)
        self._slots.release()

    async def __aiter__(self) -> AsyncIterator[StreamAnswer]:
        reader = asyncio.ensure_future(self._read())
        answered = 0
        ended: _InputEnded | None = None
        try:
            while ended is None or answered < ended.accepted:
                item = await self._answers.get()
                if isinstance(item, _Stopped):
                    return
                if isinstance(item, _InputEnded):
                    ended = ended or item
                    continue
                answered += 1
                self._in_flight.discard(item.request_id)
                yield item
                self._slots.release()
        finally:
            self._stop()
            reader.cancel()
        if ended.error is not None:
            raise ended.error
        if ended.draining:
            raise Unavailable(
                f"the worker is shutting down: it answered the {answered} requests it took from this "
                "stream; send the others again (to another worker)",
                retry_after=1.0,
            )

    async def _read(self) -> None:
        failed = None
        try:
            async for request_id, build in self._incoming:
                await self._slots.acquire()
                if self._stopped or self._ended:
                    return
                self._accepted += 1
                await self._take(request_id, build)
        except WorkerError as error:  # a message that is not one: the stream ends with its status
            failed = error
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the transport failed or the call was cancelled mid-read
            log.debug("stream input ended early: %r", error)
        finally:
            self._end(draining=False, error=failed)

    async def _take(self, request_id: str, build: Callable[[], InferenceRequest]) -> None:
        if self._unique_ids:
            problem = (
                "a request on this stream has no request_id; each needs one to be told apart"
                if not request_id
                else f"request_id {request_id!r} is already in flight on this stream; ids must be "
                "unique among unanswered requests"
                if request_id in self._in_flight
                else ""
            )
            if problem:
                self._answers.put_nowait(
                    StreamAnswer(request_id, error=InvalidArgument(problem, field="request_id"))
                )
                return
            self._in_flight.add(request_id)
        try:
            future = await self._take_one(build)
        except WorkerError as error:
            self._answers.put_nowait(StreamAnswer(request_id, error=error))
            return
        except Exception:
            log.exception("unexpected error taking stream request %r", request_id)
            self._answers.put_nowait(StreamAnswer(request_id, error=_internal()))
            return
        future.add_done_callback(
            lambda done: self._soon(lambda: self._answers.put_nowait(_answer(request_id, done)))
        )

    def _end(self, draining: bool, error: WorkerError | None = None) -> None:
        if not self._ended:
            self._ended = True
            self._answers.put_nowait(_InputEnded(self._accepted, draining, error))


def _answer(request_id: str, done: Future[InferenceResult]) -> StreamAnswer:
    error = done.exception()
    if error is None:
        return StreamAnswer(request_id, result=done.result())
    if isinstance(error, WorkerError):
        return StreamAnswer(request_id, error=error)
    log.error("unexpected error answering stream request %r", request_id, exc_info=error)
    return StreamAnswer(request_id, error=_internal())


def _internal() -> InternalError:
    return InternalError("the worker hit an unexpected error; it is logged on the worker")
