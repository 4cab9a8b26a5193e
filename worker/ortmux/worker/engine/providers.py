"""Choosing ONNX Runtime execution providers by what really initializes on this machine."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import helper

from ortmux.worker.errors import InvalidArgument

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_NVIDIA_MARKERS = (Path("/dev/nvidiactl"), Path("/proc/driver/nvidia/version"))


@functools.cache
def cuda_works() -> bool:
    """True when a CUDA session really starts here (the GPU wheel lists CUDA even without a GPU)."""
    if CUDA not in ort.get_available_providers():
        return False
    if not any(marker.exists() for marker in _NVIDIA_MARKERS):
        return False
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "cuda_probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    options = ort.SessionOptions()
    options.use_per_session_threads = False  # the process uses the global pool (runtime.configure_process)
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[CUDA, CPU])
    except Exception as exc:  # any failure means "no usable CUDA", which is an answer, not an error
        log.info("CUDA execution provider does not start here: %s", exc)
        return False
    return CUDA in session.get_providers()


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """The providers to run on: the requested ones (checked), or CUDA when it works, then CPU."""
    if not requested:
        return [CUDA, CPU] if cuda_works() else [CPU]
    available = ort.get_available_providers()
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise InvalidArgument(
            f"execution providers {', '.join(unknown)} are not in this onnxruntime build; "
            f"available: {', '.join(available)}",
            field="providers",
        )
    if CUDA in requested and not cuda_works():
        raise InvalidArgument(
            "CUDAExecutionProvider was requested but does not start here", field="providers"
        )
    return list(requested) if CPU in requested else [*requested, CPU]
