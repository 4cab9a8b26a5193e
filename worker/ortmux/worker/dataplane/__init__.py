"""What the worker does, free of gRPC: serve base models, run inference requests, manage adapters.

:class:`DataPlane` is the facade every protocol front end and the server use; its parts live in
the modules beside it (models, requests, statistics).
"""

from ortmux.worker.dataplane.generation import GenerationRequest, GenerationStream
from ortmux.worker.dataplane.plane import DataPlane
from ortmux.worker.dataplane.requests import InferenceRequest, InferenceResult, RequestLimits, RequestPath
from ortmux.worker.dataplane.statistics import ServingCounters

__all__ = [
    "DataPlane",
    "GenerationRequest",
    "GenerationStream",
    "InferenceRequest",
    "InferenceResult",
    "RequestLimits",
    "RequestPath",
    "ServingCounters",
]
