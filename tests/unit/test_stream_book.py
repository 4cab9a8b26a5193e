"""The client's per-stream bookkeeping: ids, ordering, locally answered requests, window slots."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from ortmux.client import InferRequest
from ortmux.client._streams import StreamBook
from ortmux.common import tensors
from ortmux.v1 import inference_pb2

ITEM = {"input_ids": np.zeros((1, 2), dtype=np.int64)}


def _answer(request_id: str) -> inference_pb2.InferStreamResponse:
    response = inference_pb2.InferResponse(request_id=request_id)
    tensors.encode_many({"logits": np.full((1,), float(len(request_id)), dtype=np.float32)}, response.outputs)
    return inference_pb2.InferStreamResponse(request_id=request_id, response=response)


def test_ids_default_to_positions_and_duplicates_in_flight_are_refused() -> None:
    book = StreamBook(ordered=False)
    assert book.encode(InferRequest("m", ITEM)).request_id == "0"
    assert book.encode(InferRequest("m", ITEM, request_id="x")).request_id == "x"
    with pytest.raises(ValueError, match="'x' is already in flight"):
        book.encode(InferRequest("m", ITEM, request_id="x"))
    results, freed = book.answer(_answer("x"))
    assert ([r.request_id for r in results], freed) == (["x"], 1)
    assert book.encode(InferRequest("m", ITEM, request_id="x")) is not None  # answered, so free again


def test_ordered_mode_holds_answers_until_earlier_ones_are_in() -> None:
    book = StreamBook(ordered=True)
    for _ in range(3):
        book.encode(InferRequest("m", ITEM))
    assert book.answer(_answer("2")) == ([], 0)
    assert book.answer(_answer("1")) == ([], 0)
    results, freed = book.answer(_answer("0"))
    assert ([r.request_id for r in results], freed) == (["0", "1", "2"], 3)


def test_unencodable_requests_are_answered_locally_in_their_place() -> None:
    book = StreamBook(ordered=True)
    book.encode(InferRequest("m", ITEM))
    assert book.encode(InferRequest("m", {"input_ids": np.array([["a"]], dtype=object)})) is None
    assert book.encode(InferRequest("m", [1, 2])) is None  # type: ignore[arg-type]
    book.encode(InferRequest("m", ITEM))
    results, freed = book.answer(_answer("0"))
    assert [r.request_id for r in results] == ["0", "1", "2"] and freed == 1
    assert [r.error.code for r in results[1:]] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert book.flush() == []
    results, freed = book.answer(_answer("3"))
    assert [r.request_id for r in results] == ["3"] and freed == 1


def test_an_answer_for_an_unknown_id_is_an_error() -> None:
    book = StreamBook(ordered=False)
    with pytest.raises(Exception, match="not in flight"):
        book.answer(_answer("ghost"))


def test_stream_book_rejects_what_is_not_a_request() -> None:
    with pytest.raises(TypeError, match="InferRequest"):
        StreamBook(ordered=False).encode({"input_ids": ITEM})
