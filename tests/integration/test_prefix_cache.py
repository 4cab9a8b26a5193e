"""Automatic prefix caching on real workers (the gpt2 generation fixture and its adapters): a
prompt that starts like an earlier one prefills only the rest and gives the same tokens (plain
ONNX Runtime's greedy tokens on the base); blocks never cross adapters, a replaced adapter's old
content, or tenants; cached blocks count in the KV pool and give way to generations."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ortmux.client import Client
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.auth import key_digest

from ..conftest import scrape, worker_settings
from .generation_cases import FIXTURES, plain_greedy, tokens

MODEL = FIXTURES / "gpt2" / "model.onnx"
NEW = 10
# 42 tokens: two full blocks and 10 more; the fixture's context is 64 positions
SHARED = [(7 * i + 3) % 370 + 5 for i in range(32)]
PROMPT = [*SHARED, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
OTHER_END = [*SHARED, 40, 41, 42, 43]


def sample(worker: Worker, name: str) -> float:
    return scrape(worker).get((name, (("model", "gpt2"),)), 0.0)


def hits(worker: Worker) -> float:
    return sample(worker, "ortmux_prefix_cache_hit_tokens_total")


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    running = start_worker(worker_settings(tmp_path_factory.mktemp("prefix"), "--model", f"gpt2={MODEL}"))
    with Client(running.address, timeout=60) as client:
        for adapter in ("gpt2-lora0", "gpt2-lora1"):
            client.register_adapter("gpt2", adapter, FIXTURES / adapter)
    yield running
    running.stop(0)


def generate(client: Client, prompt: list[int], adapter: str = "") -> list[int]:
    return tokens(list(client.generate("gpt2", input_ids=prompt, adapter=adapter, max_new_tokens=NEW)))


def test_a_shared_start_is_prefilled_once_and_gives_the_same_tokens(worker: Worker) -> None:
    with Client(worker.address, timeout=60) as client:
        before = hits(worker)
        first = generate(client, PROMPT)
        assert hits(worker) == before  # nothing was cached yet
        again = generate(client, PROMPT)
        assert hits(worker) == before + 32  # both full blocks, not the tokens after them
        other = generate(client, OTHER_END)
        assert hits(worker) == before + 64
    assert first == again == plain_greedy(MODEL, PROMPT, NEW)
    assert other == plain_greedy(MODEL, OTHER_END, NEW)
    prefix, total = sample(worker, "ortmux_prefix_cache_bytes"), scrape(worker)[("ortmux_kv_cache_bytes", ())]
    # 2 layers x (key, value) x 2 heads x 16 dims x 4 bytes = 512 bytes per token; 2 blocks cached
    assert prefix == 32 * 512 == total  # the pool holds the cached blocks and nothing else now


def test_blocks_never_cross_adapters_or_a_replaced_adapters_old_content(worker: Worker) -> None:
    prompt = [*reversed(SHARED), 1, 2, 3]
    with Client(worker.address, timeout=60) as client:
        before = hits(worker)
        base, lora0, lora1 = (generate(client, prompt, name) for name in ("", "gpt2-lora0", "gpt2-lora1"))
        assert hits(worker) == before  # three scopes: three misses
        assert len({tuple(base), tuple(lora0), tuple(lora1)}) == 3
        client.register_adapter("gpt2", "swap", FIXTURES / "gpt2-lora0")
        assert generate(client, prompt, "swap") == lora0  # the same content: its blocks
        assert hits(worker) == before + 32
        client.register_adapter("gpt2", "swap", FIXTURES / "gpt2-lora1", replace=True)
        assert generate(client, prompt, "swap") == lora1  # the name's new content: lora1's blocks
        assert hits(worker) == before + 64
        fresh = [*prompt[:-3], 9, 9, 9]  # a continuation none of them saw
        client.register_adapter("gpt2", "swap", FIXTURES / "gpt2-lora0", replace=True)
        swapped = generate(client, fresh, "swap")
        assert hits(worker) == before + 96  # lora0's blocks again: the shared 32 tokens
        assert swapped == generate(client, fresh, "gpt2-lora0")
        assert generate(client, prompt, "") == base


def test_cached_blocks_give_way_to_generations(tmp_path: Path) -> None:
    # 4 blocks of room (16 tokens of 512 bytes each): a 17-token prompt leaves one block cached;
    # a 42-token prompt with 10 new tokens needs all four blocks, so the cached one must go.
    running = start_worker(
        worker_settings(tmp_path, "--model", f"gpt2={MODEL}", "--kv-cache-bytes", str(64 * 512))
    )
    try:
        with Client(running.address, timeout=30) as client:
            generate(client, [*SHARED[:16], 1])
            assert sample(running, "ortmux_prefix_cache_bytes") == 16 * 512
            long = [token + 1 for token in PROMPT]
            assert generate(client, long) == plain_greedy(MODEL, long, NEW)
            assert sample(running, "ortmux_prefix_cache_bytes") == 0
    finally:
        running.stop(0)


def test_tenants_share_no_blocks_unless_base_sharing_is_on(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        "".join(
            f'[[key]]\nsha256 = "{key_digest(key)}"\ntenant = "{tenant}"\nrole = "tenant"\n\n'
            for key, tenant in (("acme-key", "acme"), ("rival-key", "rival"))
        )
    )
    for shared, expected in ((False, 0), (True, 32)):
        data = tmp_path / f"data-{shared}"
        flags = ["--model", f"gpt2={MODEL}", "--api-keys-file", str(keys)]
        settings = worker_settings(data, *flags, "--prefix-cache-shared-base", str(shared).lower())
        running = start_worker(settings)
        try:
            for key in ("acme-key", "rival-key"):
                with Client(running.address, timeout=60, api_key=key) as client:
                    assert generate(client, PROMPT) == plain_greedy(MODEL, PROMPT, NEW)
            assert hits(running) == expected
        finally:
            running.stop(0)
        shutil.rmtree(data, ignore_errors=True)
