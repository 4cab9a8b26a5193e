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
from pathlib import Path

import numpy as np
import pytest

from ortmux.client import Client
from ortmux.worker.api.server import Worker, start_worker

from ..conftest import worker_settings
from .generation_cases import (
    EXPECTED,
    FAMILIES,
    FIXTURES,
    INFO,
    NEW,
    PROMPTS,
    decode_steps,
    generate_case,
    plain_greedy,
    prompt_ids,
    reference,
    runs,
    tokens,
)


@pytest.fixture()
def client(generation_client: Client) -> Client:
    return generation_client


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_and_peft_alone(client: Client, family: str) -> None:
    for run in runs(family):
        for number in PROMPTS:
            chunks = generate_case(client, family, run, number)
            assert tokens(chunks) == reference(family, run, number), (run, number)
            assert [c.finish_reason for c in chunks] == [""] * (NEW - 1) + ["length"]
            assert chunks[-1].usage is not None
            assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
                len(prompt_ids(number)),
                NEW,
            )


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_generations_mixing_adapters_and_lengths_stay_exact(
    generation_worker: Worker, client: Client, family: str
) -> None:
    """Every adapter, base rows and every prompt length at once, some joining while others run:
    each gives its reference tokens, and decode steps held several rows."""
    plan = [(run, number) for number in PROMPTS for run in runs(family)] * 2
    results: dict[int, list[int]] = {}
    before = decode_steps(generation_worker, family)

    def send(index: int, run: str, number: int) -> None:
        time.sleep(0.003 * (index % 5))  # some join steps already running
        results[index] = tokens(generate_case(client, family, run, number))

    threads = [threading.Thread(target=send, args=(i, *item)) for i, item in enumerate(plan)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, (run, number) in enumerate(plan):
        assert results[index] == reference(family, run, number), (index, run, number)
    steps, rows = (
        after - earlier
        for after, earlier in zip(decode_steps(generation_worker, family), before, strict=True)
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
    alone = tokens(generate_case(client, "gpt2", "base", 0, **sampled))
    results: dict[int, list[int]] = {}

    def send(index: int) -> None:
        run = runs("gpt2")[index % 3]
        results[index] = tokens(
            generate_case(client, "gpt2", run if index else "base", index % 4 if index else 0, **sampled)
        )

    threads = [threading.Thread(target=send, args=(i,)) for i in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == alone
    assert alone != reference("gpt2", "base", 0)  # it did sample
    other_seed = tokens(generate_case(client, "gpt2", "base", 0, **{**sampled, "seed": 99}))
    assert other_seed != alone


def test_a_stop_token_and_a_stop_string_end_the_generation(client: Client) -> None:
    want = reference("gpt2", "base", 1)
    chunks = generate_case(client, "gpt2", "base", 1, stop_token_ids=[want[3]])
    assert tokens(chunks) == want[: want.index(want[3]) + 1]
    assert chunks[-1].finish_reason == "stop"
    full = "".join(chunk.text for chunk in generate_case(client, "gpt2", "base", 1))
    stop = full[6:9]
    chunks = generate_case(client, "gpt2", "base", 1, stop=[stop])
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
                assert got == plain_greedy(quantized, prompt_ids(number), NEW), number
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
                results[index] = tokens(generate_case(client, "qwen2", run, number))

            threads = [threading.Thread(target=send, args=(i, *item)) for i, item in enumerate(plan)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        running.stop(0)
    for index, (run, number) in enumerate(plan):
        assert results[index] == reference("qwen2", run, number), (index, run, number)
