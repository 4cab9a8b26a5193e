"""The ortmux thin client: talk to ortmux workers from any Python service.

    from ortmux.client import Client, InferRequest

    with Client("localhost:50051") as client:
        outputs = client.infer("demo", {"input_ids": ids})
        for result in client.stream_infer(InferRequest("demo", {"input_ids": x}) for x in batches):
            print(result.request_id, result.outputs if result.ok else result.error)

Needs only grpcio, protobuf and numpy; no ONNX Runtime.
"""

from ortmux.client._aio import AsyncClient
from ortmux.client._client import Client
from ortmux.client._errors import FieldViolation, OrtmuxError
from ortmux.client._types import (
    AdapterInfo,
    AdapterTargetInfo,
    GenerationChunk,
    GenerationUsage,
    InferRequest,
    InferResult,
    ModelInfo,
    ModelStats,
    TensorInfo,
    UnadaptableInfo,
)

__all__ = [
    "AdapterInfo",
    "AdapterTargetInfo",
    "AsyncClient",
    "Client",
    "FieldViolation",
    "GenerationChunk",
    "GenerationUsage",
    "InferRequest",
    "InferResult",
    "ModelInfo",
    "ModelStats",
    "OrtmuxError",
    "TensorInfo",
    "UnadaptableInfo",
]
