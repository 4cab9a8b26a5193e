"""A base model: its ONNX Runtime session, its specs, and running validated inputs through it."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from ortmux.worker.engine.specs import TensorSpec, validate_inputs, validate_output_names
from ortmux.worker.errors import InternalError, InvalidArgument, NotFound

log = logging.getLogger(__name__)

# ORT statuses that mean "the caller's tensors are wrong", as opposed to a fault of the worker.
_CALLER_FAULTS = (ort_state.InvalidArgument, ort_state.InvalidProtobuf)


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are created: providers in priority order and operator threads."""

    providers: tuple[str, ...]
    intra_op_threads: int = 0

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return options


def file_sha256(path: Path) -> str:
    """Lower-case hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class BaseModel:
    """One served base model. ``run`` is safe to call from many threads at once."""

    def __init__(self, name: str, path: Path, runtime: RuntimeOptions) -> None:
        if not path.is_file():
            raise NotFound(f"model '{name}': no file at {path}", field="path")
        started = time.perf_counter()
        self.name = name
        self.path = path
        self.sha256 = file_sha256(path)
        try:
            self._session = ort.InferenceSession(
                str(path), runtime.session_options(), providers=list(runtime.providers)
            )
        except Exception as exc:
            raise InvalidArgument(f"model '{name}' at {path} does not load: {exc}", field="path") from None
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.inputs: tuple[TensorSpec, ...] = tuple(
            TensorSpec.from_ort(a) for a in self._session.get_inputs()
        )
        self.outputs: tuple[TensorSpec, ...] = tuple(
            TensorSpec.from_ort(a) for a in self._session.get_outputs()
        )
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4  # failures are raised to the caller and logged here
        self.load_seconds = time.perf_counter() - started
        self.sessions = 1
        log.info(
            "loaded model '%s' from %s in %.3f s on %s",
            name,
            path,
            self.load_seconds,
            ", ".join(self.providers),
        )

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against the model's specs and run them; outputs by name."""
        validate_inputs(self.name, self.inputs, inputs)
        names = validate_output_names(self.name, self.outputs, output_names)
        try:
            results = self._session.run(names, dict(inputs), self._run_options)
        except _CALLER_FAULTS as exc:
            raise InvalidArgument(f"model '{self.name}' refused the inputs: {_ort_message(exc)}") from None
        except Exception as exc:
            log.exception("model '%s' failed to run", self.name)
            raise InternalError(f"model '{self.name}' failed to run: {_ort_message(exc)}") from None
        return dict(zip(names, results, strict=True))


def _ort_message(exc: BaseException) -> str:
    """ORT's message without its '[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :' prefix."""
    text = str(exc)
    marker = " : "
    if text.startswith("[ONNXRuntimeError]") and text.count(marker) >= 3:
        return text.split(marker, 3)[3].strip()
    return text
