"""Adapters of every kind in generation, and their lifecycle, on real workers (the fixtures of
test_generation.py): a weight override, fed to whole runs, decodes in steps of its own beside LoRA
and base rows; deleting an adapter that generations use waits for them; a base the worker
quantizes to 4 bits generates what plain ONNX Runtime greedy decoding of that graph gives, and
takes LoRA adapters."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ortmux.client import Client, OrtmuxError
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.dataplane import GenerationRequest

from ..conftest import worker_settings
from .generation_cases import FIXTURES, NEW, PROMPTS, plain_greedy, prompt_ids, reference, tokens

EMBEDDING = "model.embed_tokens.weight"


def _concurrently(client: Client, model: str, plan: list[tuple[str, int]]) -> list[list[int]]:
    """Each (adapter, prompt) of ``plan`` generated at once; the tokens of each, in plan order."""
    results: dict[int, list[int]] = {}

    def send(index: int, adapter: str, number: int) -> None:
        chunks = client.generate(model, input_ids=prompt_ids(number), adapter=adapter, max_new_tokens=NEW)
        results[index] = tokens(list(chunks))

    threads = [threading.Thread(target=send, args=(i, *item)) for i, item in enumerate(plan)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [results[index] for index in range(len(plan))]


def test_a_weight_override_decodes_in_steps_of_its_own_beside_lora_rows(tmp_path: Path) -> None:
    source = FIXTURES / "qwen2" / "model.onnx"
    graph = onnx.load(str(source))
    embedding = next(tensor for tensor in graph.graph.initializer if tensor.name == EMBEDDING)
    scaled = numpy_helper.to_array(embedding) * np.float32(1.25)
    np.savez(tmp_path / "scaled.npz", **{EMBEDDING: scaled})
    embedding.CopyFrom(numpy_helper.from_array(scaled, EMBEDDING))  # the reference: that graph, plain
    changed = tmp_path / "changed" / "model.onnx"
    changed.parent.mkdir()
    onnx.save(graph, str(changed))
    running = start_worker(
        worker_settings(tmp_path / "data", "--model", f"qwen2={source}", "--overridable", EMBEDDING)
    )
    try:
        with Client(running.address, timeout=60) as client:
            assert (
                client.register_adapter("qwen2", "scaled", tmp_path / "scaled.npz").format
                == "weight_override"
            )
            client.register_adapter("qwen2", "qwen2-lora0", FIXTURES / "qwen2-lora0")
            plan = [(adapter, number) for number in PROMPTS for adapter in ("scaled", "qwen2-lora0", "")]
            got = _concurrently(client, "qwen2", plan)
        for (adapter, number), generated in zip(plan, got, strict=True):
            if adapter == "scaled":
                want = plain_greedy(changed, prompt_ids(number), NEW)
            else:
                want = reference("qwen2", adapter or "base", number)
            assert generated == want, (adapter, number)
        assert any(got[i] != got[i + 2] for i in range(0, len(plan), 3))  # the override changes tokens
    finally:
        running.stop(0)


class _HeldSampler:
    """Greedy, but the first token waits for ``gate``: the generation stays running meanwhile."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.reached = threading.Event()

    def next_token(self, logits: np.ndarray) -> int:
        self.reached.set()
        self.gate.wait(30)
        return int(np.argmax(logits))


def test_deleting_an_adapter_waits_for_the_generations_using_it(generation_worker: Worker) -> None:
    with Client(generation_worker.address, timeout=60) as client:
        client.register_adapter("gpt2", "doomed", FIXTURES / "gpt2-lora0")
        request = GenerationRequest(
            model="gpt2", input_ids=prompt_ids(0), adapter="doomed", max_new_tokens=NEW
        )
        stream = generation_worker.dataplane.generation.generate(request)
        held = _HeldSampler()
        stream._job.sampler = held  # not admitted yet: the loop picks jobs up between steps
        chunks: list = []
        consumer = threading.Thread(target=lambda: chunks.extend(stream))
        consumer.start()
        assert held.reached.wait(10)
        deleted = threading.Event()

        def delete() -> None:
            client.delete_adapter("gpt2", "doomed")
            deleted.set()

        deleter = threading.Thread(target=delete)
        deleter.start()
        time.sleep(0.5)
        assert not deleted.is_set(), "the delete returned while a generation used the adapter"
        with pytest.raises(OrtmuxError) as refused:  # no new generation takes an adapter being deleted
            list(client.generate("gpt2", input_ids=prompt_ids(1), adapter="doomed", max_new_tokens=2))
        assert refused.value.code == grpc.StatusCode.NOT_FOUND
        held.gate.set()
        consumer.join(30)
        deleter.join(30)
        assert deleted.is_set()
        assert [token for chunk in chunks for token in chunk.token_ids] == reference("gpt2", "gpt2-lora0", 0)
        assert "doomed" not in {info.adapter_id for info in client.list_adapters("gpt2")}


def test_a_base_quantized_to_4_bits_generates_and_takes_lora_adapters(tmp_path: Path) -> None:
    from ortmux.worker.engine.quantize import quantize_model

    source = FIXTURES / "qwen2" / "model.onnx"
    scratch = tmp_path / "int4"
    scratch.mkdir()
    quantized = quantize_model("int4", source, scratch, label="reference")  # the worker's own tool
    running = start_worker(
        worker_settings(tmp_path / "data", "--model", f"qwen2={source}", "--quantize", "int4")
    )
    try:
        with Client(running.address, timeout=60) as client:
            client.register_adapter("qwen2", "qwen2-lora0", FIXTURES / "qwen2-lora0")
            plan = [(adapter, number) for number in PROMPTS for adapter in ("", "qwen2-lora0")]
            alone = [
                tokens(list(client.generate("qwen2", input_ids=prompt_ids(n), adapter=a, max_new_tokens=NEW)))
                for a, n in plan
            ]
            together = _concurrently(client, "qwen2", plan)
        for (adapter, number), generated in zip(plan, alone, strict=True):
            if not adapter:
                assert generated == plain_greedy(quantized, prompt_ids(number), NEW), number
        assert together == alone
        assert any(alone[i] != alone[i + 1] for i in range(0, len(plan), 2))  # the adapter changes tokens
    finally:
        running.stop(0)
