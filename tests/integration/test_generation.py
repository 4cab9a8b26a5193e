"""Generation on real workers: tiny decoders exported by Optimum with past (GPT-2, Llama, Qwen2),
a local tokenizer, PEFT adapters, and transformers + PEFT greedy generation as the reference
(tests/fixtures/make_generation_fixtures.py makes them; seeds keep every step's top two logits
more than 1e-3 apart, so greedy tokens do not hang on float rounding)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ortmux.client import Client, GenerationChunk, OrtmuxError
from ortmux.worker.api.server import Worker, start_worker

from ..conftest import scrape, worker_settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "generation"
INFO = json.loads((FIXTURES / "cases.json").read_text())
# Read whole: an NpzFile reads lazily from one zip handle, not safe from several threads.
EXPECTED = dict(np.load(FIXTURES / "expected.npz"))
FAMILIES = [case["model"] for case in INFO["cases"]]
NEW = INFO["new_tokens"]
PROMPTS = range(len(INFO["prompts"]))


def prompt_ids(number: int) -> list[int]:
    return EXPECTED[f"prompt/{number}"].tolist()


def reference(family: str, run: str, number: int) -> list[int]:
    return EXPECTED[f"{family}/{run}/{number}/tokens"].tolist()


def tokens(chunks: list[GenerationChunk]) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


def runs(family: str) -> list[str]:
    return ["base", f"{family}-lora0", f"{family}-lora1"]


@pytest.fixture(scope="module")
def generation_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    models = [
        arg for family in FAMILIES for arg in ("--model", f"{family}={FIXTURES / family / 'model.onnx'}")
    ]
    running = start_worker(worker_settings(tmp_path_factory.mktemp("generation"), *models))
    with Client(running.address, timeout=60) as client:
        for family in FAMILIES:
            for adapter in runs(family)[1:]:
                client.register_adapter(family, adapter, FIXTURES / adapter)
    yield running
    running.stop(0)


@pytest.fixture()
def client(generation_worker: Worker) -> Iterator[Client]:
    with Client(generation_worker.address, timeout=60) as connected:
        yield connected


def _generate(client: Client, family: str, run: str, number: int, **extra) -> list[GenerationChunk]:
    adapter = "" if run == "base" else run
    return list(
        client.generate(family, input_ids=prompt_ids(number), adapter=adapter, max_new_tokens=NEW, **extra)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_and_peft_alone(client: Client, family: str) -> None:
    for run in runs(family):
        for number in PROMPTS:
            chunks = _generate(client, family, run, number)
            assert tokens(chunks) == reference(family, run, number), (run, number)
            assert [c.finish_reason for c in chunks] == [""] * (NEW - 1) + ["length"]
            assert chunks[-1].usage is not None
            assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
                len(prompt_ids(number)),
                NEW,
            )


def _decode_steps(worker: Worker, model: str) -> tuple[float, float]:
    """(decode steps, rows over all of them) of ``model`` so far."""
    samples = scrape(worker)
    labels = (("model", model),)
    return samples[("ortmux_decode_step_rows_count", labels)], samples[
        ("ortmux_decode_step_rows_sum", labels)
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_generations_mixing_adapters_and_lengths_stay_exact(
    generation_worker: Worker, client: Client, family: str
) -> None:
    """Every adapter, base rows and every prompt length at once, some joining while others run:
    each gives its reference tokens, and decode steps held several rows."""
    plan = [(run, number) for number in PROMPTS for run in runs(family)] * 2
    results: dict[int, list[int]] = {}
    before = _decode_steps(generation_worker, family)

    def send(index: int, run: str, number: int) -> None:
        time.sleep(0.003 * (index % 5))  # some join steps already running
        results[index] = tokens(_generate(client, family, run, number))

    threads = [threading.Thread(target=send, args=(i, *item)) for i, item in enumerate(plan)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, (run, number) in enumerate(plan):
        assert results[index] == reference(family, run, number), (index, run, number)
    steps, rows = (
        after - earlier
        for after, earlier in zip(_decode_steps(generation_worker, family), before, strict=True)
    )
    assert rows / steps > 2, (steps, rows)  # rows of different adapters shared steps


class _Recording:
    """A greedy sampler that keeps every step's logits."""

    def __init__(self) -> None:
        self.logits: list[np.ndarray] = []

    def next_token(self, logits: np.ndarray) -> int:
        self.logits.append(logits.copy())
        return int(np.argmax(logits))


def _logits_of(worker: Worker, family: str, jobs: list[tuple[str, int]]) -> list[list[np.ndarray]]:
    """Each job's per-step logits, the jobs submitted to the decode loop together."""
    from ortmux.worker.dataplane import GenerationRequest

    generation = worker.dataplane.generation
    recorders, streams = [], []
    for run, number in jobs:
        request = GenerationRequest(
            model=family,
            input_ids=prompt_ids(number),
            adapter="" if run == "base" else run,
            max_new_tokens=NEW,
        )
        stream = generation.generate(request)
        recorder = _Recording()
        stream._job.sampler = recorder  # the job has not been admitted yet: the loop waits for a step
        recorders.append(recorder)
        streams.append(stream)
    for stream in streams:
        list(stream)
    return [recorder.logits for recorder in recorders]


def test_logits_at_every_step_equal_the_request_alone_and_the_reference(generation_worker: Worker) -> None:
    family = "qwen2"
    jobs = [(run, number) for number in PROMPTS for run in runs(family)]
    together = _logits_of(generation_worker, family, jobs)
    for (run, number), batched in zip(jobs, together, strict=True):
        alone = _logits_of(generation_worker, family, [(run, number)])[0]
        want = EXPECTED[f"{family}/{run}/{number}/logits"]
        for step, (got, single) in enumerate(zip(batched, alone, strict=True)):
            scale = np.abs(single).max()
            assert np.abs(got - single).max() <= 1e-5 * scale, (run, number, step)
            assert np.abs(got - want[step]).max() <= 1e-4 * np.abs(want[step]).max(), (run, number, step)


def test_seeded_sampling_gives_the_same_tokens_whatever_the_batch_mates(client: Client) -> None:
    sampled = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 1234}
    alone = tokens(_generate(client, "gpt2", "base", 0, **sampled))
    results: dict[int, list[int]] = {}

    def send(index: int) -> None:
        run = runs("gpt2")[index % 3]
        results[index] = tokens(
            _generate(client, "gpt2", run if index else "base", index % 4 if index else 0, **sampled)
        )

    threads = [threading.Thread(target=send, args=(i,)) for i in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == alone
    assert alone != reference("gpt2", "base", 0)  # it did sample
    other_seed = tokens(_generate(client, "gpt2", "base", 0, **{**sampled, "seed": 99}))
    assert other_seed != alone


def test_a_stop_token_and_a_stop_string_end_the_generation(client: Client) -> None:
    want = reference("gpt2", "base", 1)
    chunks = _generate(client, "gpt2", "base", 1, stop_token_ids=[want[3]])
    assert tokens(chunks) == want[: want.index(want[3]) + 1]
    assert chunks[-1].finish_reason == "stop"
    full = "".join(chunk.text for chunk in _generate(client, "gpt2", "base", 1))
    stop = full[6:9]
    chunks = _generate(client, "gpt2", "base", 1, stop=[stop])
    text = "".join(chunk.text for chunk in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_eos_from_the_generation_config_ends_it_and_is_not_text(tmp_path: Path) -> None:
    model = tmp_path / "gpt2"
    shutil.copytree(FIXTURES / "gpt2", model)
    want = reference("gpt2", "base", 0)
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = want[4]
    (model / "generation_config.json").write_text(json.dumps(config))
    running = start_worker(worker_settings(tmp_path / "data", "--model", f"m={model / 'model.onnx'}"))
    try:
        with Client(running.address, timeout=60) as client:
            chunks = list(client.generate("m", input_ids=prompt_ids(0), max_new_tokens=NEW))
    finally:
        running.stop(0)
    first = want.index(want[4])
    assert tokens(chunks) == want[: first + 1]
    assert chunks[-1].finish_reason == "eos" and chunks[-1].token_ids == (want[4],)


def test_text_prompts_are_encoded_with_the_tokenizer(client: Client) -> None:
    chunks = list(client.generate("llama", prompt=INFO["prompts"][2], max_new_tokens=NEW))
    assert tokens(chunks) == reference("llama", "base", 2)


def _gauge(worker: Worker, name: str, model: str) -> float:
    return scrape(worker)[(name, (("model", model),))]


def test_closing_the_stream_frees_the_sequence_within_a_step(
    generation_worker: Worker, client: Client
) -> None:
    stream = client.generate("gpt2", input_ids=prompt_ids(0), max_new_tokens=50)
    next(stream)
    next(stream)
    stream.close()
    deadline = time.monotonic() + 10
    while (
        _gauge(generation_worker, "ortmux_generations_running", "gpt2")
        or scrape(generation_worker)[("ortmux_kv_cache_bytes", ())]
    ):
        assert time.monotonic() < deadline, "the cancelled sequence still runs"
        time.sleep(0.02)


def test_the_kv_bound_makes_generations_wait_and_refuses_one_that_cannot_fit(tmp_path: Path) -> None:
    # gpt2 fixture: 2 layers x 2 (key, value) x 2 heads x 16 x 4 bytes = 512 bytes per token.
    prompt = prompt_ids(0)
    one = (len(prompt) + 40) * 512
    running = start_worker(
        worker_settings(
            tmp_path, "--model", f"gpt2={FIXTURES / 'gpt2' / 'model.onnx'}", "--kv-cache-bytes", str(one)
        )
    )
    try:
        with Client(running.address, timeout=60) as client:
            with pytest.raises(OrtmuxError) as caught:
                list(client.generate("gpt2", input_ids=prompt, max_new_tokens=41))
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
        # Room for one: the other waited, and no decode step ever held both.
        assert max(chunks[-1].queue_seconds for chunks in done) > 0.005
        steps, rows = _decode_steps(running, "gpt2")
        assert steps and rows == steps
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
    assert tokens(_generate(client, "qwen2", "base", 0)) == reference("qwen2", "base", 0)  # serving on


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


def test_the_cli_streams_generated_text(generation_worker: Worker) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ortmux.worker.cli",
            "generate",
            "--target",
            generation_worker.address,
            "--model",
            "gpt2",
            "--max-new-tokens",
            str(NEW),
            INFO["prompts"][1],
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    with Client(generation_worker.address) as client:
        want = "".join(
            chunk.text for chunk in client.generate("gpt2", prompt=INFO["prompts"][1], max_new_tokens=NEW)
        )
    assert result.stdout == want
    assert f"[length: {len(prompt_ids(1))} prompt + {NEW} generated tokens]" in result.stderr


def _plain_greedy(path: Path, ids: list[int], new: int) -> list[int]:
    """Greedy decoding with plain ONNX Runtime, one sequence, the cache fed back each step."""
    from ..conftest import plain_session

    session = plain_session(path)
    names = [i.name for i in session.get_inputs()]
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    feeds = {p.name: np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32) for p in pasts}
    tokens_, current = [], list(ids)
    length = 0
    for _ in range(new):
        feeds["input_ids"] = np.array([current], np.int64)
        feeds["attention_mask"] = np.ones((1, length + len(current)), np.int64)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(length, length + len(current), dtype=np.int64)[None]
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        token = int(np.argmax(outputs["logits"][0, -1]))
        tokens_.append(token)
        length += len(current)
        current = [token]
        for past in pasts:
            feeds[past.name] = outputs[past.name.replace("past_key_values", "present")]
    return tokens_


def test_an_int8_base_generates_what_plain_onnx_runtime_greedy_decoding_gives(tmp_path: Path) -> None:
    model = tmp_path / "qwen2-int8"
    shutil.copytree(FIXTURES / "qwen2", model)
    quantized = model / "model.onnx"
    (model / "model.onnx").rename(model / "float.onnx")
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[1] / "quantize_fixture.py"),
            "int8-matmul",
            str(model / "float.onnx"),
            str(quantized),
        ],
        check=True,
        capture_output=True,
    )
    running = start_worker(worker_settings(tmp_path / "data", "--model", f"q={quantized}"))
    try:
        with Client(running.address, timeout=60) as client:
            for number in PROMPTS:
                got = tokens(list(client.generate("q", input_ids=prompt_ids(number), max_new_tokens=NEW)))
                assert got == _plain_greedy(quantized, prompt_ids(number), NEW), number
    finally:
        running.stop(0)


def test_long_prompts_prefilled_in_chunks_give_the_same_tokens(tmp_path: Path) -> None:
    """With max_prefill_tokens 2 every prompt is read a chunk per iteration, between the running
    rows' steps, concurrently with the others: the tokens are the reference's."""
    running = start_worker(
        worker_settings(
            tmp_path, "--model", f"qwen2={FIXTURES / 'qwen2' / 'model.onnx'}", "--max-prefill-tokens", "2"
        )
    )
    try:
        with Client(running.address, timeout=60) as client:
            for adapter in runs("qwen2")[1:]:
                client.register_adapter("qwen2", adapter, FIXTURES / adapter)
            plan = [(run, number) for number in PROMPTS for run in runs("qwen2")]
            results: dict[int, list[int]] = {}

            def send(index: int, run: str, number: int) -> None:
                results[index] = tokens(_generate(client, "qwen2", run, number))

            threads = [threading.Thread(target=send, args=(i, *item)) for i, item in enumerate(plan)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        running.stop(0)
    for index, (run, number) in enumerate(plan):
        assert results[index] == reference("qwen2", run, number), (index, run, number)


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
    assert tokens(_generate(client, "gpt2", "base", 0)) == reference("gpt2", "base", 0)
