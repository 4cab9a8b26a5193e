from __future__ import annotations

import asyncio

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
