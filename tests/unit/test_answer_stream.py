"""The worker's stream core: window, completion order, in-band errors, stop, drain (on an event
loop, as the gRPC services run it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from ortmux.worker.dataplane import InferenceRequest, InferenceResult
from ortmux.worker.errors import InvalidArgument, NotFound, Unavailable
from ortmux.worker.streaming import AnswerStream, Incoming


class Pending:
    """A take function whose futures the test completes by hand."""

    def __init__(self) -> None:
        self.futures: dict[str, Future[InferenceResult]] = {}

    async def __call__(self, build: Callable[[], InferenceRequest]) -> Future[InferenceResult]:
        request = build()
        if request.model == "missing":
            raise NotFound("model 'missing' is not served here")
        future: Future[InferenceResult] = Future()
        self.futures[request.request_id] = future
        return future

    def complete(self, request_id: str) -> None:
        self.futures[request_id].set_result(InferenceResult("m", "", {}, request_id, 0.0, 0.0, 1))


def _request(request_id: str, model: str = "m") -> InferenceRequest:
    return InferenceRequest(model=model, inputs={"x": np.zeros(1)}, request_id=request_id)


async def _endless() -> AsyncIterator[Incoming]:
    index = 0
    while True:
        yield str(index), (lambda rid=str(index): _request(rid))
        index += 1


async def _from(items: list[Incoming]) -> AsyncIterator[Incoming]:
    for item in items:
        yield item


async def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


def test_reads_no_more_than_the_window_ahead_and_answers_in_completion_order() -> None:
    async def test() -> None:
        pulled = []

        async def incoming() -> AsyncIterator[Incoming]:
            for index in range(10):
                pulled.append(index)
                yield str(index), (lambda rid=str(index): _request(rid))

        pending = Pending()
        answered: list[str] = []

        async def consume() -> None:
            async for answer in AnswerStream(incoming(), pending, window=3):
                answered.append(answer.request_id)

        consumer = asyncio.ensure_future(consume())
        await _wait_for(lambda: len(pending.futures) == 3)
        await asyncio.sleep(0.2)
        assert len(pending.futures) == 3 and len(pulled) <= 4  # three taken, at most one read ahead
        pending.complete("2")
        await _wait_for(lambda: len(pending.futures) == 4)
        for index in [0, 1, 3, *range(4, 10)]:
            await _wait_for(lambda i=index: str(i) in pending.futures)
            pending.complete(str(index))
        await consumer
        assert answered[0] == "2" and sorted(answered, key=int) == [str(i) for i in range(10)]

    run(test)


def test_errors_are_answered_in_band_and_the_stream_goes_on() -> None:
    async def test() -> None:
        def bad_message() -> InferenceRequest:
            raise InvalidArgument("inputs[x]: bad", field="inputs[x]")

        incoming = _from(
            [("a", lambda: _request("a")), ("b", bad_message), ("c", lambda: _request("c", "missing"))]
        )
        pending = Pending()
        stream = aiter(AnswerStream(incoming, pending, window=4))
        first, second = await anext(stream), await anext(stream)
        assert {(first.request_id, type(first.error)), (second.request_id, type(second.error))} == {
            ("b", InvalidArgument),
            ("c", NotFound),
        }
        pending.complete("a")
        last = await anext(stream)
        assert last.request_id == "a" and last.result is not None
        with pytest.raises(StopAsyncIteration):
            await anext(stream)

    run(test)


def test_stop_ends_the_answers_and_frees_a_reader_waiting_for_a_slot() -> None:
    async def test() -> None:
        pending = Pending()
        stream = AnswerStream(_endless(), pending, window=2)
        answers = []

        async def consume() -> None:
            answers.extend([answer async for answer in stream])

        consumer = asyncio.ensure_future(consume())
        await _wait_for(lambda: len(pending.futures) == 2)
        stream.stop()  # from the loop's thread here; any thread may call it
        await asyncio.wait_for(consumer, 5)
        assert answers == []
        await asyncio.sleep(0.1)
        assert len(pending.futures) == 2  # nothing more was read after the stop

    run(test)


def test_window_must_be_positive() -> None:
    async def test() -> None:
        with pytest.raises(ValueError):
            AnswerStream(_from([]), Pending(), window=0)

    run(test)


def test_drain_answers_what_was_taken_then_ends_unavailable() -> None:
    async def test() -> None:
        pending = Pending()
        stream = AnswerStream(_endless(), pending, window=3)
        answers: list[str] = []
        failures: list[BaseException] = []

        async def consume() -> None:
            try:
                async for answer in stream:
                    answers.append(answer.request_id)
            except Unavailable as error:
                failures.append(error)

        consumer = asyncio.ensure_future(consume())
        await _wait_for(lambda: len(pending.futures) == 3)
        await asyncio.get_running_loop().run_in_executor(None, stream.drain)  # from another thread
        await asyncio.sleep(0.1)
        assert len(pending.futures) == 3  # nothing more is taken
        for request_id in ["1", "0", "2"]:
            pending.complete(request_id)
        await asyncio.wait_for(consumer, 5)
        assert answers == ["1", "0", "2"]
        assert len(failures) == 1 and "answered the 3 requests it took" in failures[0].message

    run(test)
