from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from ortmux.client import AsyncClient, Client, OrtmuxError
from ortmux.worker.api.server import Worker


def test_async_client_has_the_same_methods_as_the_sync_one() -> None:
    public = {name for name in dir(Client) if not name.startswith("_")} - {"close"}
    assert public <= {name for name in dir(AsyncClient) if not name.startswith("_")}


def test_async_client_infers_and_raises_the_same_error(worker: Worker, token_ids: np.ndarray) -> None:
    async def scenario() -> tuple[list[str], np.ndarray, OrtmuxError]:
        async with AsyncClient(worker.address) as client:
            names = [model.name for model in await client.list_models()]
            results = await asyncio.gather(
                *(client.infer("demo", {"input_ids": token_ids}) for _ in range(4))
            )
            with pytest.raises(OrtmuxError) as caught:
                await client.infer("missing", {"input_ids": token_ids})
            return names, results[0]["logits"], caught.value

    names, logits, error = asyncio.run(scenario())
    assert names == ["demo"]
    with Client(worker.address) as sync_client:
        np.testing.assert_array_equal(logits, sync_client.infer("demo", {"input_ids": token_ids})["logits"])
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.message == "model 'missing' is not served here; served: demo"


def test_async_client_uploads_adapters_and_calls_progress(
    worker: Worker, tmp_path: Path, token_ids: np.ndarray
) -> None:
    from ..demo_adapters import write_peft

    peft = write_peft(tmp_path / "peft", seed=11)
    progress: list[tuple[int, int]] = []

    async def scenario() -> tuple[str, np.ndarray]:
        async with AsyncClient(worker.address) as client:
            info = await client.register_adapter(
                "demo", "async-up", peft, chunk_bytes=4096, progress=lambda s, t: progress.append((s, t))
            )
            logits = (await client.infer("demo", {"input_ids": token_ids}, adapter="async-up"))["logits"]
            await client.delete_adapter("demo", "async-up")
            return info.format, logits

    fmt, logits = asyncio.run(scenario())
    assert fmt == "peft_lora"
    assert progress and progress[-1][0] == progress[-1][1] == sum(p.stat().st_size for p in peft.iterdir())
    with Client(worker.address) as client:
        client.register_adapter("demo", "sync-up", peft)
        np.testing.assert_array_equal(
            logits, client.infer("demo", {"input_ids": token_ids}, adapter="sync-up")["logits"]
        )
        client.delete_adapter("demo", "sync-up")
