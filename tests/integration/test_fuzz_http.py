"""Property-based fuzzing of the OpenAI-compatible HTTP API of a real worker: completions and chat
completions with every known field set to random JSON, wrong types, huge numbers, NaN-ish values
and deep nesting, bodies that are not JSON objects or not UTF-8, and odd model names.

No answer may be a 5xx; every 4xx carries an error in OpenAI's shape; every 200 is a completion
(whole, or server-sent events); and the worker still answers a valid request at the end.
"""

from __future__ import annotations

import http.client
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ortmux.client import Client
from ortmux.worker.api.server import Worker, start_worker

from ..conftest import worker_settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "generation"
EXAMPLES = 120
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
PATHS = {False: "/v1/completions", True: "/v1/chat/completions"}
# Every field either endpoint knows, served or accepted at its neutral value, and a few it does not.
FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "user",
    "n",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "suffix",
    "parallel_tool_calls",
    "tools",
    "tool_choice",
    "response_format",
    "functions",
    "",
]


class Deep:
    """A value nested ``depth`` arrays deep, written out by :func:`_encode` (``json.dumps`` of the
    test process would itself run out of recursion)."""

    def __init__(self, depth: int, leaf: object) -> None:
        self.depth = depth
        self.leaf = leaf

    def __repr__(self) -> str:
        return f"Deep({self.depth}, {self.leaf!r})"


def _encode(body: dict) -> bytes:
    """The body as JSON text (NaN and Infinity as Python writes them), nested values spelled out."""
    fields = []
    for key, value in body.items():
        text = json.dumps(value.leaf) if isinstance(value, Deep) else json.dumps(value)
        if isinstance(value, Deep):
            text = "[" * value.depth + text + "]" * value.depth
        fields.append(f"{json.dumps(key)}: {text}")
    return ("{" + ", ".join(fields) + "}").encode()


ODD_NUMBERS: list[object] = [-1, -(2**63), 0, 1, 2, 2**31, 2**63, 2**64, 10**30, 10**400, -(10**400)]
ODD_NUMBERS += [1e308, -1e308, 5e-324, -0.0, 0.5, float("nan"), float("inf"), float("-inf"), True, None]
ODD_TEXT = ["NaN", "nan", "-Infinity", "inf", "1e999", "0x10", " 1", "", "\x00", "\ud800", "fox\udfff"]
ODD_TEXT += ["\ufffd", "qwen2", "qwen2:lora0", "x" * 300]
ODD = [*ODD_NUMBERS, *ODD_TEXT, [], {}, [None], [[]], {"": None}, ["fox"] * 20, [5, 6, 7]]
ODD += [
    [{"role": "user", "content": "fox\udfff"}],
    [{"role": "\ud800", "content": "fox"}],
    [{"role": "user"}],
]
DEPTHS = [99, 100, 101, 500, 900, 970, 990, 2000, 20_000]
PAD = "u" * (70 * 1024)  # a "user" this long takes the body past the size parsed on the event loop

scalars = st.one_of(
    st.sampled_from(ODD_NUMBERS),
    st.sampled_from(ODD_TEXT),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
deep = st.builds(Deep, st.sampled_from(DEPTHS), scalars)
models = st.one_of(
    st.sampled_from(["qwen2", "qwen2:lora0", "nope", "qwen2:nope", "", ":", "qwen2:", ":lora0", "QWEN2"]),
    st.sampled_from(
        [
            "qwen2:a:b",
            "qwen2:../../etc/passwd",
            "qwen2:\x00",
            "qwen2: lora0",
            "qwen2:\ud800",
            "qwen2:" + "x" * 300,
        ]
    ),
    st.text(max_size=30).map(lambda name: f"qwen2:{name}"),
    st.text(max_size=30),
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]) | json_values, "content": json_values}
    )
    | json_values,
    min_size=0,
    max_size=3,
)
sensible = {
    "model": models,
    "prompt": st.sampled_from(["the quick brown fox", [5, 6, 7], ["fox"], [[5, 6]], [], [-1], [10**6]]),
    "messages": messages,
    "max_tokens": st.integers(min_value=1, max_value=2),
    "max_completion_tokens": st.integers(min_value=1, max_value=2),
    "stream": st.booleans(),
    "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": False}, {}]),
}


def _valid(chat: bool, max_tokens: int = 1) -> dict:
    body: dict = {"model": "qwen2", "max_tokens": max_tokens}
    if chat:
        body["messages"] = [{"role": "user", "content": "tokens stream"}]
    else:
        body["prompt"] = "the quick brown fox"
    return body


@st.composite
def bodies(draw: st.DrawFn, chat: bool) -> dict:
    """A request that starts valid (a small one: 1 or 2 new tokens), with some fields changed (a
    length that is still valid is at most the fixture's context of 64 tokens: fast to generate)."""
    body = _valid(chat, draw(st.integers(min_value=1, max_value=2)))
    if draw(st.booleans()):
        body["user"] = PAD
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        choices = [json_values, deep] + ([sensible[field]] * 3 if field in sensible else [])
        body[field] = draw(st.one_of(choices))
    for field in draw(st.lists(st.sampled_from(list(body)), max_size=1)):
        del body[field]
    return body


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b"[]", b"1", b'"s"', b"null", b"NaN", b"{}", b'{"model": "qwen2"}']),
    st.sampled_from([b'{"model": "\xff\xfe"}', b"\xef\xbb\xbf{}", b'{"model": "\\ud800"}', b"\x00" * 10]),
    st.sampled_from([b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000]),
    st.sampled_from([b'{"model": "qwen2", "max_tokens": 1' + b"0" * 5000 + b"}"]),
    st.just(b'{"model": "qwen2", "prompt": "' + b"fox " * 40_000 + b'", "max_tokens": 1}'),
    st.text(max_size=100).map(str.encode),
)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    root = tmp_path_factory.mktemp("fuzz-http")
    model = root / "qwen2"
    shutil.copytree(FIXTURES / "qwen2", model)
    (model / "chat_template.jinja").write_text(TEMPLATE)
    running = start_worker(
        worker_settings(root / "data", "--model", f"qwen2={model / 'model.onnx'}", "--http-port", "0")
    )
    with Client(running.address, timeout=60) as client:
        client.register_adapter("qwen2", "lora0", FIXTURES / "qwen2-lora0")
    yield running
    running.stop(0)


def _post(worker: Worker, path: str, payload: bytes) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", worker.http_port, timeout=60)
    try:
        connection.request("POST", path, payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        connection.close()


def _problem(worker: Worker, chat: bool, payload: bytes) -> str | None:
    """What is wrong with the worker's answer to ``payload``, or None."""
    status, kind, answer = _post(worker, PATHS[chat], payload)
    shown = (
        f"{PATHS[chat]} {payload[:200]!r}{'...' if len(payload) > 200 else ''} -> {status} {answer[:300]!r}"
    )
    try:
        if status >= 400:
            error = json.loads(answer)["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert isinstance(error["message"], str) and isinstance(error["type"], str)
            assert status < 500
        elif kind.startswith("text/event-stream"):
            assert status == 200
            events = [line[6:] for line in answer.decode().split("\n") if line.startswith("data: ")]
            assert all("choices" in json.loads(event) for event in events[:-1])
            assert events[-1] == "[DONE]" or "error" in json.loads(events[-1])
        else:
            assert status == 200
            whole = json.loads(answer)
            assert whole["object"] == ("chat.completion" if chat else "text_completion")
            assert len(whole["choices"]) == 1 and whole["usage"]["completion_tokens"] >= 1
    except (AssertionError, ValueError, KeyError, IndexError, TypeError):
        return shown
    return None


def _check(worker: Worker, chat: bool, payload: bytes) -> None:
    problem = _problem(worker, chat, payload)
    assert problem is None, problem


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_every_field_with_every_odd_value_gets_a_deliberate_answer(worker: Worker, chat: bool) -> None:
    """Not left to chance: each known field set to each odd value (and nested deep), in a request
    that is otherwise valid, small and large (parsed on the event loop and in the thread pool)."""
    values = [*ODD, *(Deep(depth, 1) for depth in DEPTHS)]
    problems = []
    for field in FIELDS:
        for value in values:
            for pad in (False, True) if isinstance(value, Deep) or field == "seed" else (False,):
                body = {**_valid(chat), field: value}
                if pad and field != "user":
                    body["user"] = PAD
                problems.append(_problem(worker, chat, _encode(body)))
    found = [problem for problem in problems if problem is not None]
    assert not found, "\n".join(found)


@FUZZ
@given(body=bodies(chat=False))
def test_fuzzed_completions_get_deliberate_answers(worker: Worker, body: dict) -> None:
    _check(worker, False, _encode(body))


@FUZZ
@given(body=bodies(chat=True))
def test_fuzzed_chat_completions_get_deliberate_answers(worker: Worker, body: dict) -> None:
    _check(worker, True, _encode(body))


@FUZZ
@given(chat=st.booleans(), payload=raw_bodies)
def test_fuzzed_bytes_get_deliberate_answers(worker: Worker, chat: bool, payload: bytes) -> None:
    _check(worker, chat, payload)


def test_the_worker_still_serves_after_the_fuzzing(worker: Worker) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", worker.http_port, timeout=60)
    try:
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    body = {"model": "qwen2:lora0", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}
    status, _, answer = _post(worker, PATHS[False], json.dumps(body).encode())
    assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 2
