"""The decode loop's parts alone, without a server: the scheduler (admission, prefills, chunks,
the running set), the model runner on a real ONNX Runtime session of the gpt2 fixture (its runs
against plain ORT, a failed run retried by halves) and the output step (tokens, text, finishes)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.cache import ModelCache
from ortmux.worker.engine.decoder import DecoderSpec, find_decoder
from ortmux.worker.engine.lora.feeds import FeedPool
from ortmux.worker.engine.providers import CPU
from ortmux.worker.engine.runtime import RuntimeOptions
from ortmux.worker.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from ortmux.worker.generation.job import GenerationJob
from ortmux.worker.generation.kv import KvPool
from ortmux.worker.generation.model_files import TextTokenizer
from ortmux.worker.generation.sampling import Sampler, SamplingParams
from ortmux.worker.generation.text import TextStream
from ortmux.worker.scheduler.decode_output import next_chunks
from ortmux.worker.scheduler.decode_rows import Rows
from ortmux.worker.scheduler.decode_runner import DecodeRunner
from ortmux.worker.scheduler.decode_scheduler import DecodeLimits, DecodeScheduler

from ..conftest import plain_session

GPT2 = Path(__file__).resolve().parents[1] / "fixtures" / "generation" / "gpt2"
SPEC = DecoderSpec(layers=2, kv_heads=2, head_dim=16, kv_dtype="float32", position_ids=True)


def job(prompt: int | list[int] = 4, **fields: object) -> GenerationJob:
    ids = list(range(1, prompt + 1)) if isinstance(prompt, int) else prompt
    defaults: dict[str, object] = {
        "max_new_tokens": 8,
        "sampler": Sampler(SamplingParams()),
        "text": TextStream(None),
        "stop_ids": frozenset(),
        "eos_ids": frozenset(),
        "kv_bytes": 100,
    }
    return GenerationJob(prompt_ids=ids, **{**defaults, **fields})  # type: ignore[arg-type]


# -- the scheduler -----------------------------------------------------------------------------------


def scheduler(kv_bytes: int = 10_000, **limits: int) -> DecodeScheduler:
    return DecodeScheduler("m", SPEC, KvPool(kv_bytes), DecodeLimits(**limits))


def test_admission_stops_at_the_rows_the_prefill_budget_and_the_kv_room() -> None:
    plan = scheduler(max_running=3)
    jobs = [job() for _ in range(5)]
    for each in jobs:
        plan.submit(each)
    assert plan.admit() == jobs[:3] and plan.waiting == 2
    plan.join(("rows",), Rows(jobs[:3], [], np.ones((3, 4), np.int64)))
    assert plan.admit() == [] and plan.running == 3

    budget = scheduler(max_prefill_tokens=10)
    short = [job(6, fairness_key="a"), job(6, fairness_key="b"), job(3, fairness_key="c")]
    for each in short:
        budget.submit(each)
    assert budget.admit() == [short[0], short[2]]  # 6 + 6 is over 10; 3 fits after the first
    assert budget.admit() == [short[1]]

    tight = scheduler(kv_bytes=250)
    queued = [job(), job(), job()]
    for each in queued:
        tight.submit(each)
    assert tight.admit() == queued[:2] and tight.kv.reserved_bytes == 200
    tight.kv.release(100)
    assert tight.admit() == [queued[2]]  # it kept its place while it waited for room


def test_a_full_queue_refuses_and_gone_generations_leave_it() -> None:
    plan = scheduler(max_waiting=2)
    late, cancelled = job(deadline=time.monotonic() - 1), job(is_active=lambda: False)
    plan.submit(late)
    plan.submit(cancelled)
    with pytest.raises(ResourceExhausted, match="2 generations wait"):
        plan.submit(job())
    ended = dict(plan.expired())
    assert isinstance(ended[late], DeadlineExceeded) and isinstance(ended[cancelled], Cancelled)
    assert plan.waiting == 0 and plan.kv.reserved_bytes == 0


def test_long_prompts_are_read_a_chunk_per_iteration_and_groups_split_by_what_shares_a_run() -> None:
    plan = scheduler(max_prefill_tokens=6)
    short, own, long = job(3, fairness_key="a"), job(3, exclusive=True, fairness_key="b"), job(14)
    for each in (short, own, long):
        plan.submit(each)
    first = plan.admit()
    assert first == [short, own]  # the long prompt's first chunk (6 tokens) waits for the next
    assert plan.prefills(first) == [(("rows",), [short]), (("own", id(own)), [own])]
    second = plan.admit()
    assert second == [long] and plan.prefills(second) == [] and plan.running == 1
    chunks = []
    while planned := plan.prefill_chunks():
        chunks += [chunk for _partial, chunk in planned]
        for partial, _chunk in planned:
            if partial.done == len(partial.job.prompt_ids):
                plan.drop_partial(partial)
    assert chunks == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14]] and plan.running == 0


def test_prompts_read_in_chunks_share_an_iterations_prefill_budget() -> None:
    plan = scheduler(max_prefill_tokens=8)
    first, second, third = job(5), job(5), job(5)
    for each in (first, second, third):
        plan.resume(each, 2, [])  # 2 tokens cached: 3 to read each
    assert [(p.job, chunk) for p, chunk in plan.prefill_chunks()] == [
        (first, [3, 4, 5]),
        (second, [3, 4, 5]),
        (third, [3, 4]),  # 8 tokens in all
    ]


def rows_of(*lengths: int) -> Rows:
    """Rows of the given token lengths, left-padded to the longest."""
    width = max(lengths)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    cache = [np.zeros((len(lengths), SPEC.kv_heads, width, SPEC.head_dim), np.float32)] * 4
    return Rows([job(length) for length in lengths], cache, mask)


def test_a_long_row_among_short_ones_steps_in_a_group_of_its_own() -> None:
    plan = scheduler()
    plan.join(("rows",), rows_of(64, 70, 60))
    plan.join(("rows",), rows_of(1536))  # padding every short row to 1,536: 96% of the cache
    plan.join(("rows",), rows_of(66))  # the short group pads it least
    plan.join(("rows",), rows_of(1400, 1500))  # the long group's own
    assert sorted(len(rows.jobs) for rows in plan.groups.values()) == [3, 4]
    widths = sorted(rows.mask.shape[1] for rows in plan.groups.values())
    assert widths == [70, 1536]
    plan.join(("own", 7), rows_of(5))
    assert ("own", 7) in plan.groups and len(plan.groups) == 3


def test_a_prefill_batch_is_at_most_half_padding() -> None:
    plan = scheduler()
    jobs = [job(12), job(1000), job(10), job(9), job(600), job(400)]
    lengths = [[len(each.prompt_ids) for each in batch] for _kind, batch in plan.prefills(jobs)]
    assert lengths == [[1000, 600, 400, 12], [10, 9]]  # 10 more would make it 60% padding


def test_clear_takes_every_running_generation() -> None:
    plan = scheduler(max_prefill_tokens=4)
    running, partial = job(), job(9)
    plan.join(("rows",), Rows([running], [], np.ones((1, 4), np.int64)))
    plan.submit(partial)
    plan.prefills(plan.admit())
    assert plan.clear() == [running, partial] and not plan.busy and plan.running == 0


# -- the model runner (real ONNX Runtime sessions) ---------------------------------------------------


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> DecodeRunner:
    cache = ModelCache(tmp_path_factory.mktemp("cache"))
    model = BaseModel("gpt2", GPT2 / "model.onnx", RuntimeOptions(providers=(CPU,)), cache)
    decoder = find_decoder(model.inputs, model.outputs)
    assert isinstance(decoder, DecoderSpec)
    return DecodeRunner(model, decoder, FeedPool(1 << 20))


PROMPTS = [[46, 206, 75], [40, 184], [121, 31, 257, 13], [154]]


def padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    length = max(map(len, prompts))
    ids = np.zeros((len(prompts), length), np.int64)
    mask = np.zeros((len(prompts), length), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    return ids, mask


def plain_logits(prompt: list[int]) -> np.ndarray:
    """The last position's logits of ``prompt`` alone, by a plain ONNX Runtime session."""
    session = plain_session(GPT2 / "model.onnx")
    feeds = {
        "input_ids": np.array([prompt], np.int64),
        "attention_mask": np.ones((1, len(prompt)), np.int64),
        "position_ids": np.arange(len(prompt), dtype=np.int64)[np.newaxis],
    }
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):
            feeds[spec.name] = np.zeros((1, SPEC.kv_heads, 0, SPEC.head_dim), np.float32)
    return session.run(["logits"], feeds)[0][0, -1]


def test_a_run_of_left_padded_rows_gives_each_row_its_own_logits(runner: DecodeRunner) -> None:
    ids, mask = padded(PROMPTS)
    result = runner.run([job() for _ in PROMPTS], ids, mask, runner.empty_cache(len(PROMPTS)))
    assert result.kept == [0, 1, 2, 3] and not result.failed
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(result.logits[row], plain_logits(prompt), rtol=1e-4, atol=1e-4)
    assert [part.shape for part in result.present] == [(4, 2, 4, 16)] * 4


POISON = 999  # past the fixture's vocabulary (380): ONNX Runtime fails a run holding it


def test_a_failed_run_is_retried_by_halves_and_only_the_blamed_rows_fail(
    runner: DecodeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []
    real = runner.model.run

    def run(inputs, *args, **kwargs):  # counts the runs
        runs.append(len(inputs["input_ids"]))
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(runner.model, "run", run)
    prompts = [PROMPTS[0], [POISON, 2], PROMPTS[1], PROMPTS[2], [3, POISON], PROMPTS[0]]
    ids, mask = padded(prompts)
    result = runner.run([job() for _ in prompts], ids, mask, runner.empty_cache(len(prompts)))
    assert sorted(result.failed) == [1, 4] and result.kept == [0, 2, 3, 5]
    assert all("idx=999" in str(error) for error in result.failed.values())
    for row, index in enumerate(result.kept):
        np.testing.assert_allclose(result.logits[row], plain_logits(prompts[index]), rtol=1e-4, atol=1e-4)
    assert [part.shape[0] for part in result.present] == [4] * 4
    assert len(runs) <= 2 * len(prompts) - 1

    runs.clear()
    ids, mask = padded([[POISON], [POISON]])
    result = runner.run([job(), job()], ids, mask, runner.empty_cache(2))
    assert result.kept == [] and sorted(result.failed) == [0, 1] and runs == [2, 1, 1]


# -- the output step ------------------------------------------------------------------------------


class Times:
    def __init__(self) -> None:
        self.first = self.later = 0

    def token(self, first: bool, seconds: float) -> None:
        if first:
            self.first += 1
        else:
            self.later += 1


def one_hot(*tokens: int, vocab: int = 50) -> np.ndarray:
    logits = np.zeros((len(tokens), vocab), np.float32)
    logits[np.arange(len(tokens)), tokens] = 10
    return logits


def test_each_row_gets_its_token_and_the_reason_it_finished() -> None:
    tokenizer = TextTokenizer(GPT2 / "tokenizer.json")
    going, eos, stop_id, length, stop_text = (
        job(),
        job(eos_ids=frozenset({7})),
        job(stop_ids=frozenset({9})),
        job(max_new_tokens=1),
        job(text=TextStream(tokenizer, stop=[tokenizer.decode([31])])),
    )
    jobs = [going, eos, stop_id, length, stop_text]
    times = Times()
    chunks = next_chunks(jobs, one_hot(5, 7, 9, 11, 31), times)
    assert [chunk.token_ids for chunk in chunks] == [(5,), (7,), (9,), (11,), (31,)]
    assert [chunk.finish_reason for chunk in chunks] == ["", "eos", "stop", "length", "stop"]
    assert chunks[4].text == ""  # the stop string is not sent
    assert [each.generated for each in jobs] == [[5], [7], [9], [11], [31]]
    assert chunks[3].completion_tokens == 1 and chunks[3].prompt_tokens == 4
    assert times.first == 5 and times.later == 0
    next_chunks([going], one_hot(6), times)
    assert going.generated == [5, 6] and times.later == 1
