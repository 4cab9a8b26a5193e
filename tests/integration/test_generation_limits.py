"""Generation's bounds and lifecycle on real workers (the fixtures of test_generation.py):
cancellation, the KV bound, drain, timeouts, tenant token quotas, what GetModel says, and a
precise status for every bad request, the worker serving on."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from ortmux.client import Client, GenerationChunk, OrtmuxError
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.paged_model import PagedModel

from ..conftest import scrape, worker_settings
from .generation_cases import (
    FIXTURES,
    NEW,
    decode_steps,
    gauge,
    generate_case,
    generations_kv_bytes,
    prompt_ids,
    reference,
    runs,
    tokens,
)


@pytest.fixture()
def client(generation_client: Client) -> Client:
    return generation_client


def loop_model(worker: Worker, model: str) -> BaseModel | PagedModel:
    """The model a running decode loop runs (the loop starts with the model's first generation)."""
    return next(loop for loop in worker.dataplane.generation.loops() if loop.name == model).executes


@contextmanager
def slow_steps(worker: Worker, model: str, seconds: float, fault=None) -> Iterator[list[int]]:
    """Each run of ``model``'s decode loop takes ``seconds`` more (so a test acts within a
    generation's life, however fast the machine), and raises ``fault(inputs)`` when it names one.
    The runs' row counts are listed."""
    target = loop_model(worker, model)
    real = target.run
    runs: list[int] = []

    def run(inputs, *args, **kwargs):
        runs.append(len(inputs["input_ids"]))
        time.sleep(seconds)
        error = fault(inputs) if fault else None
        if error:
            raise error
        return real(inputs, *args, **kwargs)

    target.run = run  # type: ignore[method-assign]
    try:
        yield runs
    finally:
        del target.run


def test_closing_the_stream_frees_the_sequence_within_a_step(
    generation_worker: Worker, client: Client
) -> None:
    list(client.generate("gpt2", input_ids=prompt_ids(0), max_new_tokens=1))  # the loop runs
    before = scrape(generation_worker)[("ortmux_generated_tokens_total", (("model", "gpt2"),))]
    with slow_steps(generation_worker, "gpt2", 0.05):  # 50 tokens: 2.5 s if nothing cancels them
        stream = client.generate("gpt2", input_ids=prompt_ids(0), max_new_tokens=50)
        next(stream)
        next(stream)
        stream.close()
        deadline = time.monotonic() + 10
        while gauge(generation_worker, "ortmux_generations_running", "gpt2") or generations_kv_bytes(
            generation_worker
        ):
            assert time.monotonic() < deadline, "the cancelled sequence still runs"
            time.sleep(0.02)
    generated = scrape(generation_worker)[("ortmux_generated_tokens_total", (("model", "gpt2"),))] - before
    assert generated < 10, f"{generated} tokens were generated for a stream closed after 2"


def test_a_step_that_fails_for_one_generation_fails_that_one_alone(
    generation_worker: Worker, client: Client
) -> None:
    list(client.generate("gpt2", input_ids=prompt_ids(0), max_new_tokens=1))  # the loop runs
    cases = [(run, number) for run in runs("gpt2")[:2] for number in range(2)]
    poisoned = prompt_ids(2)
    # The poisoned generation's third decode step feeds its third token, which no other case
    # ever feeds: a run holding it fails.
    marker = reference("gpt2", "base", 2)[2]
    assert all(marker not in reference("gpt2", run, number) for run, number in cases)

    def fault(inputs) -> Exception | None:
        ids = inputs["input_ids"]
        return RuntimeError("an injected fault") if ids.shape[1] == 1 and (ids == marker).any() else None

    results: dict[object, object] = {}

    def send(key: object, **request) -> None:
        try:
            results[key] = tokens(list(client.generate("gpt2", max_new_tokens=NEW, **request)))
        except OrtmuxError as error:
            results[key] = error

    with slow_steps(generation_worker, "gpt2", 0.02, fault) as steps:
        threads = [
            threading.Thread(
                target=send,
                args=((run, number),),
                kwargs={"input_ids": prompt_ids(number), "adapter": "" if run == "base" else run},
            )
            for run, number in cases
        ]
        threads.append(threading.Thread(target=send, args=("poisoned",), kwargs={"input_ids": poisoned}))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    failed = results["poisoned"]
    assert isinstance(failed, OrtmuxError) and failed.code == grpc.StatusCode.INTERNAL, failed
    assert "failed to generate" in failed.message and "an injected fault" in failed.message
    for run, number in cases:
        assert results[(run, number)] == reference("gpt2", run, number), (run, number)
    assert max(steps) == len(cases) + 1, "the generations never shared a step"
    assert not generations_kv_bytes(generation_worker)
    assert tokens(generate_case(client, "gpt2", "base", 1)) == reference("gpt2", "base", 1)


@pytest.mark.parametrize("paged", [False, True])
def test_the_kv_bound_makes_generations_wait_and_refuses_one_that_cannot_fit(
    tmp_path: Path, paged: bool
) -> None:
    """Room for one generation of 5 + 40 tokens: one that alone cannot fit is refused; of two,
    the dense cache admits one at a time (each reserves its whole length), the paged cache admits
    both and preempts the newer when blocks run out, which recomputes and gives the same tokens."""
    # gpt2 fixture: 2 layers x 2 (key, value) x 2 heads x 16 x 4 bytes = 512 bytes per token.
    prompt = prompt_ids(0)
    one = 48 * 512  # 45 tokens, 3 blocks of 16
    flags = ["--model", f"gpt2={FIXTURES / 'gpt2' / 'model.onnx'}", "--kv-cache-bytes", str(one)]
    running = start_worker(worker_settings(tmp_path, *flags, "--paged-kv-cache", str(paged).lower()))
    try:
        with Client(running.address, timeout=60) as client:
            assert client.model_info("gpt2").kv_cache == ("paged" if paged else "dense")
            with pytest.raises(OrtmuxError) as caught:
                list(client.generate("gpt2", input_ids=prompt, max_new_tokens=44))
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over the worker's" in caught.value.message and "(kv_cache_bytes)" in caught.value.message
            done: list[list[GenerationChunk]] = []

            def send() -> None:
                done.append(list(client.generate("gpt2", input_ids=prompt, max_new_tokens=40)))

            threads = [threading.Thread(target=send) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        assert [len(chunks) for chunks in done] == [40, 40]
        assert tokens(done[0]) == tokens(done[1])
        steps, rows = decode_steps(running, "gpt2")
        preempted = scrape(running).get(("ortmux_kv_preemptions_total", (("model", "gpt2"),)), 0)
        if paged:  # both ran, until the blocks ran out
            assert rows > steps and preempted >= 1
        else:  # room for one: the other waited, and no decode step ever held both
            assert max(chunks[-1].queue_seconds for chunks in done) > 0.005
            assert steps and rows == steps and not preempted
    finally:
        running.stop(0)


def test_drain_lets_running_generations_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    running = start_worker(worker_settings(tmp_path, "--model", f"gpt2={FIXTURES / 'gpt2' / 'model.onnx'}"))
    try:
        with Client(running.address, timeout=60) as client:
            stream = client.generate("gpt2", input_ids=prompt_ids(0), max_new_tokens=30)
            next(stream)
            running.dataplane.drain()
            with pytest.raises(OrtmuxError) as caught:
                list(client.generate("gpt2", input_ids=prompt_ids(1), max_new_tokens=3))
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert len(list(stream)) == 29
    finally:
        running.stop(0)


def test_get_model_says_what_generates(client: Client) -> None:
    info = client.model_info("qwen2")
    assert (info.generates, info.context_length, info.has_tokenizer) == (True, 64, True)


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        ({"model": "qwen2", "input_ids": [5, 100000]}, "INVALID_ARGUMENT", "input_ids holds 100000"),
        ({"model": "qwen2", "input_ids": [5, -1]}, "INVALID_ARGUMENT", "input_ids holds -1"),
        ({"model": "qwen2", "prompt": ""}, "INVALID_ARGUMENT", "the prompt is empty"),
        (
            {"model": "qwen2", "input_ids": [5], "temperature": -1.0},
            "INVALID_ARGUMENT",
            "temperature must be",
        ),
        ({"model": "qwen2", "input_ids": [5], "top_p": 0.0}, "INVALID_ARGUMENT", "top_p must be in (0, 1]"),
        ({"model": "qwen2", "input_ids": [5], "top_k": -2}, "INVALID_ARGUMENT", "top_k must be"),
        (
            {"model": "qwen2", "input_ids": [5] * 60, "max_new_tokens": 10},
            "INVALID_ARGUMENT",
            "exceed the model's context of 64 tokens",
        ),
        ({"model": "nope", "input_ids": [5]}, "NOT_FOUND", "nope"),
        ({"model": "qwen2", "input_ids": [5], "adapter": "nope"}, "NOT_FOUND", "adapter 'nope'"),
    ],
)
def test_bad_generation_requests_get_precise_statuses(
    client: Client, arguments: dict, code: str, message: str
) -> None:
    model = arguments.pop("model")
    with pytest.raises(OrtmuxError) as caught:
        list(client.generate(model, **arguments))
    assert caught.value.code.name == code
    assert message in caught.value.message
    assert tokens(generate_case(client, "qwen2", "base", 0)) == reference("qwen2", "base", 0)  # serving on


def test_a_model_that_cannot_generate_or_has_no_tokenizer_is_failed_precondition(tmp_path: Path) -> None:
    model = tmp_path / "no-tokenizer"
    shutil.copytree(FIXTURES / "gpt2", model)
    (model / "tokenizer.json").unlink()
    running = start_worker(
        worker_settings(
            tmp_path / "data", "--model", f"m={model / 'model.onnx'}", "--model", "d=" + _demo(tmp_path)
        )
    )
    try:
        with Client(running.address, timeout=60) as client:
            with pytest.raises(OrtmuxError) as text:
                list(client.generate("m", prompt="the quick"))
            with pytest.raises(OrtmuxError) as demo:
                list(client.generate("d", input_ids=[1, 2]))
            assert tokens(
                list(client.generate("m", input_ids=prompt_ids(0), max_new_tokens=NEW))
            ) == reference("gpt2", "base", 0)
    finally:
        running.stop(0)
    assert text.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no tokenizer.json beside it: send input_ids" in text.value.message
    assert demo.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "model 'd' cannot generate: it has no past_key_values.N.key/value inputs" in demo.value.message


def _demo(tmp_path: Path) -> str:
    from ortmux.worker.demo import ensure_demo_model

    return str(ensure_demo_model(tmp_path / "demo"))


def test_generated_tokens_per_minute_are_a_tenant_quota(tmp_path: Path) -> None:
    running = start_worker(
        worker_settings(
            tmp_path,
            "--model",
            f"gpt2={FIXTURES / 'gpt2' / 'model.onnx'}",
            "--tenant-max-generated-tokens-per-minute",
            "20",
        )
    )
    try:
        with Client(running.address, timeout=60) as client:
            with pytest.raises(OrtmuxError) as too_big:
                list(client.generate("gpt2", input_ids=prompt_ids(0), max_new_tokens=21))
            chunks = list(
                client.generate("gpt2", input_ids=prompt_ids(0), max_new_tokens=12, stop_token_ids=[])
            )
            assert len(chunks) == 12
            with pytest.raises(OrtmuxError) as over:
                list(client.generate("gpt2", input_ids=prompt_ids(0), max_new_tokens=12))
            stopped = reference("gpt2", "base", 0)
            short = list(
                client.generate(
                    "gpt2", input_ids=prompt_ids(0), max_new_tokens=8, stop_token_ids=[stopped[0]]
                )
            )
            assert len(short) == 1  # took 8, used 1: 7 went back
            assert len(list(client.generate("gpt2", input_ids=prompt_ids(0), max_new_tokens=7))) == 7
    finally:
        running.stop(0)
    assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and too_big.value.reason == "QUOTA_TOKENS"
    assert "more than tenant 'default' may generate in a minute" in too_big.value.message
    assert over.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and over.value.retry_after


def test_the_timeout_bounds_the_whole_generation(client: Client) -> None:
    got: list[GenerationChunk] = []
    with pytest.raises(OrtmuxError) as caught:
        for chunk in client.generate("gpt2", input_ids=prompt_ids(0), max_new_tokens=50, timeout=0.05):
            got.append(chunk)
            time.sleep(0.01)  # a slow reader: the deadline passes mid-generation
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(got) < 50
    assert tokens(generate_case(client, "gpt2", "base", 0)) == reference("gpt2", "base", 0)
