"""Every row of the error table, through a real server with the real interceptor and client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from ortmux.client import OrtmuxError
from ortmux.worker import errors
from ortmux.worker.api.errors import STATUS_BY_CODE
from ortmux.worker.api.grpc_runtime import GrpcServer
from ortmux.worker.api.interceptors import ErrorInterceptor

ERROR_CLASSES = {cls.code: cls for cls in errors.WorkerError.__subclasses__()}
SERVICE = "ortmux.test.Raiser"


async def _raise(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    code = request.decode()
    if code == "crash":
        raise RuntimeError("secret internals")
    raise ERROR_CLASSES[errors.ErrorCode(code)](
        f"failed with {code}", field="some.field", retry_after=1.5, metadata={"k": "v"}
    )


async def _raise_long(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise errors.InvalidArgument("x" * 50_000, field="f")


async def _raise_streaming(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    await _raise(request, context)


@pytest.fixture(scope="module")
def raiser() -> Iterator[grpc.Channel]:
    server = GrpcServer(interceptors=[ErrorInterceptor()])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_raise),
        "Stream": grpc.unary_stream_rpc_method_handler(_raise_streaming),
        "Long": grpc.unary_unary_rpc_method_handler(_raise_long),
    }
    server.register(
        lambda aio: aio.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    )
    port = server.register(lambda aio: aio.add_insecure_port("127.0.0.1:0"))
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(0).wait(10)
    server.close()


def test_the_table_covers_every_error_code_and_class() -> None:
    assert set(STATUS_BY_CODE) == set(errors.ErrorCode)
    assert set(ERROR_CLASSES) == set(errors.ErrorCode)
    for code, status in STATUS_BY_CODE.items():
        assert status.name == code.name


@pytest.mark.parametrize("code", list(errors.ErrorCode), ids=lambda c: c.name)
def test_each_error_becomes_its_status_with_details(raiser: grpc.Channel, code: errors.ErrorCode) -> None:
    unary = raiser.unary_unary(f"/{SERVICE}/Unary")
    with pytest.raises(grpc.RpcError) as caught:
        unary(code.value.encode(), timeout=10)
    error = OrtmuxError.from_rpc_error(caught.value)
    assert error.code == STATUS_BY_CODE[code]
    assert error.message == f"failed with {code.value}"
    assert error.reason == code.name
    assert [(v.field, v.description) for v in error.field_violations] == [("some.field", error.message)]
    assert error.retry_after == 1.5


@pytest.mark.parametrize("code", [errors.ErrorCode.NOT_FOUND, errors.ErrorCode.RESOURCE_EXHAUSTED])
def test_error_in_a_streaming_handler_ends_the_stream_with_its_status(
    raiser: grpc.Channel, code: errors.ErrorCode
) -> None:
    stream = raiser.unary_stream(f"/{SERVICE}/Stream")
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for item in stream(code.value.encode(), timeout=10):
            received.append(item)
    assert received == [b"first"]
    assert caught.value.code() == STATUS_BY_CODE[code]


def test_unexpected_exception_is_internal_without_internals(raiser: grpc.Channel) -> None:
    unary = raiser.unary_unary(f"/{SERVICE}/Unary")
    with pytest.raises(grpc.RpcError) as caught:
        unary(b"crash", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.details()
    assert caught.value.details() == "the worker hit an unexpected error; it is logged on the worker"


def test_a_long_message_is_cut_so_the_status_still_arrives(raiser: grpc.Channel) -> None:
    unary = raiser.unary_unary(f"/{SERVICE}/Long")
    with pytest.raises(grpc.RpcError) as caught:
        unary(b"", timeout=10)
    error = OrtmuxError.from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message.startswith("x" * 100)
    assert error.message.endswith("... (48000 more characters)")
