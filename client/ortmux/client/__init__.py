"""The ortmux thin client: talk to ortmux workers from any Python service.

    from ortmux.client import Client

    with Client("localhost:50051") as client:
        outputs = client.infer("demo", {"input_ids": ids})

Needs only grpcio, protobuf and numpy; no ONNX Runtime.
"""

from ortmux.client._aio import AsyncClient
from ortmux.client._client import Client
from ortmux.client._errors import FieldViolation, OrtmuxError
from ortmux.client._types import AdapterInfo, AdapterTargetInfo, ModelInfo, ModelStats, TensorInfo

__all__ = [
    "AdapterInfo",
    "AdapterTargetInfo",
    "AsyncClient",
    "Client",
    "FieldViolation",
    "ModelInfo",
    "ModelStats",
    "OrtmuxError",
    "TensorInfo",
]
