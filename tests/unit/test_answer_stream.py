"""The worker's stream core: window, completion order, in-band errors, stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import numpy as np
import pytest

from ortmux.worker.dataplane import InferenceRequest, InferenceResult
from ortmux.worker.errors import InvalidArgument, NotFound, Unavailable
from ortmux.worker.streaming import AnswerStream, Incoming


class Pending:
    """A submit function whose futures the test completes by hand."""

    def __init__(self) -> None:
        self.futures: dict[str, Future[InferenceResult]] = {}
        self.lock = threading.Lock()

    def __call__(self, request: InferenceRequest) -> Future[InferenceResult]:
        if request.model == "missing":
            raise NotFound("model 'missing' is not served here")
        future: Future[InferenceResult] = Future()
        with self.lock:
            self.futures[request.request_id] = future
        return future

    def complete(self, request_id: str) -> None:
        with self.lock:
            future = self.futures[request_id]
        future.set_result(InferenceResult("m", "", {}, request_id, 0.0, 0.0, 1))


def _request(request_id: str, model: str = "m") -> InferenceRequest:
    return InferenceRequest(model=model, inputs={"x": np.zeros(1)}, request_id=request_id)


def _endless() -> Iterator[Incoming]:
    index = 0
    while True:
        yield str(index), (lambda rid=str(index): _request(rid))
        index += 1


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_reads_no_more_than_the_window_ahead_and_answers_in_completion_order() -> None:
    pulled = []

    def incoming() -> Iterator[Incoming]:
        for index in range(10):
            pulled.append(index)
            yield str(index), (lambda rid=str(index): _request(rid))

    pending = Pending()
    answers = iter(AnswerStream(incoming(), pending, window=3))
    answered = []
    reader = threading.Thread(target=lambda: answered.extend(a.request_id for a in answers))
    reader.start()
    _wait_for(lambda: len(pending.futures) == 3)
    time.sleep(0.2)
    assert len(pending.futures) == 3 and len(pulled) <= 4  # three taken, at most one read ahead
    pending.complete("2")
    _wait_for(lambda: len(pending.futures) == 4)
    for index in [0, 1, 3, *range(4, 10)]:
        _wait_for(lambda i=index: str(i) in pending.futures)
        pending.complete(str(index))
    reader.join(5)
    assert answered[0] == "2" and sorted(answered, key=int) == [str(i) for i in range(10)]


def test_errors_are_answered_in_band_and_the_stream_goes_on() -> None:
    def bad_message() -> InferenceRequest:
        raise InvalidArgument("inputs[x]: bad", field="inputs[x]")

    incoming = iter(
        [("a", lambda: _request("a")), ("b", bad_message), ("c", lambda: _request("c", "missing"))]
    )
    pending = Pending()
    stream = iter(AnswerStream(incoming, pending, window=4))
    first, second = next(stream), next(stream)
    assert {(first.request_id, type(first.error)), (second.request_id, type(second.error))} == {
        ("b", InvalidArgument),
        ("c", NotFound),
    }
    pending.complete("a")
    last = next(stream)
    assert last.request_id == "a" and last.result is not None
    with pytest.raises(StopIteration):
        next(stream)


def test_stop_ends_the_answers_and_frees_a_reader_waiting_for_a_slot() -> None:
    pending = Pending()
    stream = AnswerStream(_endless(), pending, window=2)
    answers = []
    consumer = threading.Thread(target=lambda: answers.extend(stream))
    consumer.start()
    _wait_for(lambda: len(pending.futures) == 2)
    stream.stop()
    consumer.join(5)
    assert not consumer.is_alive() and answers == []
    time.sleep(0.1)
    assert len(pending.futures) == 2  # nothing more was read after the stop


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AnswerStream(iter([]), Pending(), window=0)


def test_drain_answers_what_was_taken_then_ends_unavailable() -> None:
    pending = Pending()
    stream = AnswerStream(_endless(), pending, window=3)
    answers: list[str] = []
    failures: list[BaseException] = []

    def consume() -> None:
        try:
            answers.extend(answer.request_id for answer in stream)
        except Unavailable as error:
            failures.append(error)

    consumer = threading.Thread(target=consume)
    consumer.start()
    _wait_for(lambda: len(pending.futures) == 3)
    stream.drain()
    time.sleep(0.1)
    assert len(pending.futures) == 3  # nothing more is taken
    for request_id in ["1", "0", "2"]:
        pending.complete(request_id)
    consumer.join(5)
    assert answers == ["1", "0", "2"]
    assert len(failures) == 1 and "answered the 3 requests it took" in failures[0].message
