"""Run by the tests in a venv holding kserve: KServe's own gRPC client (typed contents) against a
real worker; prints one JSON line of what it got.

    python kserve_checks.py ADDRESS API_KEY
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

address, api_key = sys.argv[1:3]
headers = (("authorization", f"Bearer {api_key}"),)


async def main() -> dict:
    client = InferenceGRPCClient(address, timeout=60)
    found: dict[str, object] = {
        "live": await client.is_server_live(),
        "ready": await client.is_server_ready(),
        "model_ready": await client.is_model_ready("demo:acme-a", headers=headers),
    }
    ids = (np.arange(16, dtype=np.int64).reshape(2, 8) % 1000).tolist()
    tensor = InferInput("input_ids", [2, 8], "INT64", data=[value for row in ids for value in row])
    response = await client.infer(InferRequest("demo:acme-a", [tensor]), headers=headers)
    found["logits"] = response.outputs[0].as_numpy().tolist()
    try:
        await client.infer(InferRequest("demo:nope", [tensor]), headers=headers)
        found["unknown"] = "OK"
    except Exception as exc:  # the client raises grpc's own error
        found["unknown"] = getattr(getattr(exc, "code", lambda: None)(), "name", repr(exc))
    await client.close()
    return found


print(json.dumps(asyncio.run(main())))
