"""Open Inference Protocol messages <-> the worker's core types (tensors, names, requests).

Model names address adapters as ``<base>:<adapter>`` (as KServe's and NIM's LoRA models are
named), or the base's name with the string parameter ``lora_name`` (as Triton's vLLM backend
takes it). Tensors arrive raw (``raw_input_contents``, little-endian, BYTES as 4-byte length
prefixes) or typed (``contents``; FP16 and BF16 have no typed field), never mixed; outputs go
raw.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np

from ortmux.common import tensors
from ortmux.worker.api.inference_v2 import grpc_service_pb2 as oip
from ortmux.worker.dataplane import InferenceRequest, InferenceResult
from ortmux.worker.engine.specs import TensorSpec
from ortmux.worker.errors import InvalidArgument
from ortmux.worker.request_bounds import MAX_NAME_CHARS

LORA_PARAMETER = "lora_name"

DTYPE_BY_DATATYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(object),
}
DATATYPE_BY_NUMPY_NAME = {dtype.name: name for name, dtype in DTYPE_BY_DATATYPE.items()}
CONFIG_TYPE_BY_DATATYPE = {
    "BOOL": oip.TYPE_BOOL,
    "UINT8": oip.TYPE_UINT8,
    "UINT16": oip.TYPE_UINT16,
    "UINT32": oip.TYPE_UINT32,
    "UINT64": oip.TYPE_UINT64,
    "INT8": oip.TYPE_INT8,
    "INT16": oip.TYPE_INT16,
    "INT32": oip.TYPE_INT32,
    "INT64": oip.TYPE_INT64,
    "FP16": oip.TYPE_FP16,
    "FP32": oip.TYPE_FP32,
    "FP64": oip.TYPE_FP64,
    "BF16": oip.TYPE_BF16,
    "BYTES": oip.TYPE_STRING,
}
TYPED_FIELD = {  # FP16 and BF16 have none: raw only
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def datatype_of(numpy_name: str) -> str:
    return DATATYPE_BY_NUMPY_NAME[numpy_name]


def split_name(name: str, parameters: Mapping[str, oip.InferParameter] | None = None) -> tuple[str, str]:
    """(base, adapter) of a model name ``<base>[:<adapter>]`` and the ``lora_name`` parameter."""
    if not name or len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"model name must be 1-{MAX_NAME_CHARS} characters", field="model_name")
    base, _, adapter = name.partition(":")
    if parameters is not None and LORA_PARAMETER in parameters:
        value = parameters[LORA_PARAMETER]
        if value.WhichOneof("parameter_choice") != "string_param":
            raise InvalidArgument(f"parameter '{LORA_PARAMETER}' must be a string", field=LORA_PARAMETER)
        named = value.string_param
        if adapter and named and named != adapter:
            raise InvalidArgument(
                f"model name '{name}' names adapter '{adapter}' but parameter '{LORA_PARAMETER}' is "
                f"'{named}'; give one of them",
                field=LORA_PARAMETER,
            )
        adapter = adapter or named
    if not base:
        raise InvalidArgument(f"model name '{name}' has no base model before ':'", field="model_name")
    return base, adapter


def decode_inputs(request: oip.ModelInferRequest) -> dict[str, np.ndarray]:
    raw = request.raw_input_contents
    typed = [tensor.name for tensor in request.inputs if tensor.HasField("contents")]
    if raw and typed:
        raise InvalidArgument(
            f"inputs {typed} carry typed contents while raw_input_contents is set; send every input one way",
            field="raw_input_contents",
        )
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs",
            field="raw_input_contents",
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidArgument(f"input '{tensor.name}' is given twice", field="inputs")
        arrays[tensor.name] = _decode(tensor, raw[index] if raw else None)
    return arrays


def _decode(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    field = f"inputs[{name}]"
    dtype = DTYPE_BY_DATATYPE.get(datatype)
    if dtype is None:
        raise InvalidArgument(
            f"input '{name}': datatype '{datatype}' is not one of {', '.join(DTYPE_BY_DATATYPE)}", field=field
        )
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"input '{name}': shape {list(shape)} has a negative dimension", field=field)
    count = tensors.element_count(shape)
    if raw is None:
        return _decode_typed(tensor, dtype, shape, count, field)
    if datatype == "BYTES":
        return _decode_bytes(raw, shape, count, name, field)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input '{name}': {len(raw)} raw bytes, but {datatype} {list(shape)} needs {expected}",
            field=field,
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def _decode_typed(
    tensor: oip.ModelInferRequest.InferInputTensor,
    dtype: np.dtype,
    shape: tuple[int, ...],
    count: int,
    field: str,
) -> np.ndarray:
    typed = TYPED_FIELD.get(tensor.datatype)
    if typed is None:
        raise InvalidArgument(
            f"input '{tensor.name}': {tensor.datatype} has no typed contents; send it in raw_input_contents",
            field=field,
        )
    values = getattr(tensor.contents, typed)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{tensor.name}': {len(values)} values in contents.{typed}, "
            f"shape {list(shape)} needs {count}",
            field=field,
        )
    if tensor.datatype == "BYTES":
        return np.array(list(values), dtype=object).reshape(shape)
    array = np.array(values, dtype=dtype)
    if tensor.datatype in ("INT8", "INT16", "UINT8", "UINT16") and not np.array_equal(
        array, np.array(values)
    ):
        raise InvalidArgument(
            f"input '{tensor.name}': a value is out of {tensor.datatype}'s range", field=field
        )
    return array.reshape(shape)


def _decode_bytes(raw: bytes, shape: tuple[int, ...], count: int, name: str, field: str) -> np.ndarray:
    items, offset, view = [], 0, memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"input '{name}': BYTES data ends inside a length prefix", field=field)
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(f"input '{name}': a BYTES element runs past the data", field=field)
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidArgument(
            f"input '{name}': {len(items)} BYTES elements, shape {list(shape)} needs {count}", field=field
        )
    return np.array(items, dtype=object).reshape(shape)


def request_from_proto(
    request: oip.ModelInferRequest,
    deadline: float | None,
    is_active: Callable[[], bool],
    tenant: str,
) -> InferenceRequest:
    base, adapter = split_name(request.model_name, request.parameters)
    return InferenceRequest(
        model=base,
        inputs=decode_inputs(request),
        adapter=adapter,
        output_names=tuple(output.name for output in request.outputs),
        request_id=request.id,
        tenant=tenant,
        deadline=deadline,
        is_active=is_active,
    )


def encode_tensor(array: np.ndarray) -> bytes:
    if array.dtype == object:
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts += [struct.pack("<I", len(data)), data]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def response_to_proto(result: InferenceResult, model_name: str, request_id: str) -> oip.ModelInferResponse:
    response = oip.ModelInferResponse(model_name=model_name, model_version="1", id=request_id)
    for name, array in result.outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(array.dtype.name), shape=array.shape)
        response.raw_output_contents.append(encode_tensor(array))
    return response


def tensor_metadata(spec: TensorSpec) -> oip.ModelMetadataResponse.TensorMetadata:
    return oip.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=datatype_of(spec.dtype), shape=list(spec.shape)
    )


def load_path(parameters: Mapping[str, oip.ModelRepositoryParameter]) -> str:
    """The .onnx file a RepositoryModelLoad names: the string parameter ``path``, or ``path`` in
    the JSON of ``config`` (what tritonclient's ``load_model(config=...)`` sends)."""
    given = parameters.get("path")
    if given is not None and given.WhichOneof("parameter_choice") == "string_param" and given.string_param:
        return given.string_param
    config = parameters.get("config")
    if config is not None and config.WhichOneof("parameter_choice") == "string_param":
        try:
            value = json.loads(config.string_param)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"parameter 'config' is not JSON: {exc}", field="config") from None
        if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
            return value["path"]
    raise InvalidArgument(
        "RepositoryModelLoad needs the .onnx file on the worker: the string parameter 'path', "
        'or config=\'{"path": "..."}\'',
        field="parameters",
    )
