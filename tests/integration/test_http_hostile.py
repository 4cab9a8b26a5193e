"""Hostile and broken clients of the OpenAI-compatible HTTP API, against a real worker over real
sockets: bodies over the size limit (declared or chunked), connections that send nothing or
trickle their headers or body, and a client that goes away in the middle of a generation answered
whole. None of them may hold the worker, and it keeps serving the clients that behave."""

from __future__ import annotations

import http.client
import json
import select
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ortmux.worker.api.server import Worker, start_worker

from ..conftest import scrape, worker_settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "generation"
MAX_BODY = 64 * 1024
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
CLOSED_WITHIN = 10.0  # generous: the point is that the worker closes at all, not how exactly
CONTEXT = 8192  # the fixture states 64; its graph computes positions, so a long generation fits
LONG = 8000  # tokens: many seconds of decoding on the fixture, so a disconnect lands mid-way


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    root = tmp_path_factory.mktemp("hostile")
    model = root / "qwen2"
    shutil.copytree(FIXTURES / "qwen2", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    running = start_worker(
        worker_settings(
            root / "data",
            "--model",
            f"qwen2={model / 'model.onnx'}",
            "--http-port",
            "0",
            "--http-max-body-bytes",
            str(MAX_BODY),
            "--http-header-timeout-seconds",
            str(HEADER_TIMEOUT),
            "--http-body-timeout-seconds",
            str(BODY_TIMEOUT),
        )
    )
    yield running
    running.stop(0)


@pytest.fixture()
def openai_client(worker: Worker):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{worker.http_port}/v1", api_key="x", max_retries=0)
    yield client
    client.close()


def _connect(worker: Worker) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", worker.http_port), timeout=CLOSED_WITHIN)
    return sock


def _head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket) -> tuple[int, dict, http.client.HTTPResponse]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read()), response


def _closed(sock: socket.socket, within: float) -> bool:
    """Whether the peer closes ``sock`` within ``within`` seconds (reading and dropping what comes)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if readable:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionError:
                return True
    return False


def _trickle(sock: socket.socket, data: bytes, interval: float, within: float) -> bool:
    """Send ``data`` a byte every ``interval`` seconds until the peer answers or closes; whether it
    did within ``within`` seconds."""
    deadline = time.monotonic() + within
    for byte in data:
        if time.monotonic() > deadline:
            return False
        try:
            sock.send(bytes([byte]))
        except OSError:
            return True
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            return True
    return False


def _assert_openai_error(body: dict, code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == code


def _still_serving(openai_client) -> None:
    answer = openai_client.completions.create(model="qwen2", prompt=[5, 6, 7], max_tokens=2, temperature=0)
    assert answer.usage.completion_tokens == 2


def test_an_over_limit_content_length_is_answered_413_without_its_body(worker: Worker, openai_client) -> None:
    with _connect(worker) as sock:
        sock.sendall(_head("/v1/completions", f"Content-Length: {96 * 1024 * 1024}"))  # and no body
        status, body, _ = _response(sock)
    assert status == 413
    _assert_openai_error(body, "request_body_too_large")
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.APIStatusError) as caught:  # a real client sending it all sees the 413
        openai_client.completions.create(model="qwen2", prompt="fox " * MAX_BODY, max_tokens=1)
    assert caught.value.status_code == 413
    _still_serving(openai_client)


def test_a_chunked_body_is_answered_413_once_it_passes_the_limit(worker: Worker, openai_client) -> None:
    piece = b"x" * (16 * 1024)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    with _connect(worker) as sock:
        sock.sendall(_head("/v1/chat/completions", "Transfer-Encoding: chunked"))
        for _ in range(MAX_BODY // len(piece) + 1):  # just past the limit, and never the last chunk
            sock.sendall(chunk)
        status, body, _ = _response(sock)
    assert status == 413
    _assert_openai_error(body, "request_body_too_large")
    _still_serving(openai_client)


def test_a_connection_that_sends_nothing_is_closed(worker: Worker) -> None:
    with _connect(worker) as sock:
        started = time.monotonic()
        assert _closed(sock, CLOSED_WITHIN)
    assert time.monotonic() - started >= HEADER_TIMEOUT / 2


@pytest.mark.parametrize("after_a_response", [False, True])
def test_trickled_headers_are_cut_off(worker: Worker, after_a_response: bool) -> None:
    with _connect(worker) as sock:
        if after_a_response:  # a kept-alive connection: the timer runs again from the response's end
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, body, response = _response(sock)
            assert status == 200 and body == {"status": "ok"} and not response.will_close
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
        assert _trickle(sock, head, 0.1, CLOSED_WITHIN), "the worker kept a trickling client"
        assert _closed(sock, CLOSED_WITHIN)


@pytest.mark.parametrize("interval", [None, 0.1])  # the body stalls, or trickles in
def test_a_body_that_does_not_arrive_in_time_is_answered_408(
    worker: Worker, openai_client, interval: float | None
) -> None:
    with _connect(worker) as sock:
        sock.sendall(_head("/v1/completions", "Content-Length: 1000") + b'{"model": ')
        if interval is not None:
            assert _trickle(sock, b" " * 990, interval, CLOSED_WITHIN), "the worker kept a trickling body"
        status, body, response = _response(sock)
        assert status == 408 and response.will_close
        _assert_openai_error(body, "request_body_timeout")
        assert _closed(sock, CLOSED_WITHIN)
    _still_serving(openai_client)


def _sample(worker: Worker, name: str, **labels: str) -> float:
    return scrape(worker).get((name, tuple(sorted(labels.items()))), 0.0)


def _wait_for(condition, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_whole_answer_is_cancelled_when_its_client_goes_away(worker: Worker, openai_client) -> None:
    def running() -> float:
        return _sample(worker, "ortmux_generations_running", model="qwen2")

    def tokens() -> float:
        return _sample(worker, "ortmux_generated_tokens_total", model="qwen2")

    def cancelled() -> float:
        return _sample(worker, "ortmux_http_requests_total", path="/v1/completions", status="499")

    request = json.dumps({"model": "qwen2", "prompt": [5, 6, 7], "max_tokens": LONG, "temperature": 0})
    before, answered_499 = tokens(), cancelled()
    sock = _connect(worker)
    try:
        sock.sendall(_head("/v1/completions", f"Content-Length: {len(request)}") + request.encode())
        assert _wait_for(lambda: running() == 1, 30), "the generation did not start"
        time.sleep(0.5)
    finally:
        sock.close()
    assert _wait_for(lambda: running() == 0, CLOSED_WITHIN), "the generation went on without its client"
    generated = tokens() - before
    assert 0 < generated < LONG / 2
    assert _wait_for(lambda: cancelled() == answered_499 + 1, CLOSED_WITHIN)
    time.sleep(0.5)
    assert tokens() - before == generated  # nothing more was generated for it
    _still_serving(openai_client)
