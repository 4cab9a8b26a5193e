"""An adapter's payload turned into the form runs use, checked against its base model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from onnx import helper

from ortmux.worker.adapters import formats
from ortmux.worker.adapters.formats import Payload
from ortmux.worker.adapters.store import AdapterMeta
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.lora.feeds import LoraWeights, rank_bucket
from ortmux.worker.engine.lora.mapping import map_modules
from ortmux.worker.engine.quantized import replaced_by
from ortmux.worker.errors import FailedPrecondition, InvalidArgument


@dataclasses.dataclass
class Resident:
    """An adapter in memory, in the form a run uses."""

    lora: dict[str, LoraWeights] = dataclasses.field(default_factory=dict)
    feeds: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    nbytes: int = 0


def load(
    model: BaseModel, meta: AdapterMeta, payload: Payload, max_adapter_bytes: int
) -> tuple[Resident, str, int, list[str]]:
    """Payload -> resident form on ``model``, with the detected format, rank and targets."""
    named = None
    if meta.files:
        named, offset, view = {}, 0, memoryview(payload)
        for name, size in meta.files:
            named[name] = view[offset : offset + size]
            offset += size
    files = formats.unpack(payload, named, max_adapter_bytes)
    fmt = meta.format or formats.detect(files)
    parsed = formats.parse(fmt, files, _parse_mapping(meta.module_mapping_json))
    resident, rank, targets = _materialize(model, parsed)
    return resident, fmt, rank, targets


def _materialize(model: BaseModel, parsed: formats.ParsedAdapter) -> tuple[Resident, int, list[str]]:
    """The resident form of a parsed adapter on ``model``, with its rank and target weights."""
    if parsed.format == formats.PEFT_LORA:
        if not model.lora_inputs and not model.unadaptable and not model.fused:
            raise FailedPrecondition(
                f"model '{model.name}' takes no LoRA adapters: it has no MatMul or Gemm on a "
                "weight, or its inputs share no dynamic batch dimension"
            )
        sites = map_modules(
            model.lora_sites,
            [m.module for m in parsed.peft_modules],
            parsed.module_mapping,
            model.unadaptable,
            model.fused,
        )
        weights_of = {}
        for module in parsed.peft_modules:
            site = sites[module.module]
            if module.a.shape[1] != site.in_features or module.b.shape[0] != site.out_features:
                raise InvalidArgument(
                    f"module '{module.module}' has lora_A {list(module.a.shape)} and lora_B "
                    f"{list(module.b.shape)}, but weight '{site.weight}' is {site.in_features} -> "
                    f"{site.out_features}",
                    field="adapter_model.safetensors",
                )
            if site.weight in weights_of:
                raise InvalidArgument(f"two modules map to weight '{site.weight}'", field="target_modules")
            weights_of[site.weight] = module
        dtypes = {lora.site.weight: lora.dtype for lora in model.lora_inputs}
        lora = _lora_factors(weights_of, {weight: dtypes[weight] for weight in weights_of})
        nbytes = sum(weights.nbytes for weights in lora.values())
        rank = max(module.rank for module in weights_of.values())
        return Resident(lora=lora, nbytes=nbytes), rank, sorted(lora)
    if parsed.format == formats.ORT_ADAPTER:
        specs = model.feedable_specs()
        for name, array in parsed.tensors.items():
            _check_tensor(model, name, array, specs)
        nbytes = sum(array.nbytes for array in parsed.tensors.values())
        return Resident(feeds=dict(parsed.tensors), nbytes=nbytes), 0, sorted(parsed.tensors)
    specs = model.feedable_specs()
    for name, array in parsed.tensors.items():
        if name not in model.overridable:
            quantized = replaced_by(name, model.quantized)
            if quantized is not None:
                raise FailedPrecondition(
                    f"weight '{name}' is quantized on model '{model.name}' (as '{quantized}', read by "
                    f"{model.quantized[quantized]}): an override cannot replace a quantized weight; use a "
                    "LoRA adapter, or serve the float model (without --quantize) with --overridable",
                    field="tensors",
                )
            known = name in model.initializer_names
            raise (FailedPrecondition if known else InvalidArgument)(
                f"weight '{name}' is not overridable on model '{model.name}'"
                + (
                    "; start the worker with --overridable to keep it replaceable"
                    if known
                    else ": no such weight"
                ),
                field="tensors",
            )
        _check_tensor(model, name, array, specs)
    # Fed with each run as overridable initializers: ONNX Runtime reads them in place, and the
    # base session with its shared arena serves the rest. (A session per override adapter
    # cost 150+ ms to create on the bench base; feeding costs nothing measurable.)
    tensors = {name: np.ascontiguousarray(array) for name, array in parsed.tensors.items()}
    return Resident(feeds=tensors, nbytes=sum(a.nbytes for a in tensors.values())), 0, sorted(tensors)


def _lora_factors(modules: dict[str, formats.PeftModule], dtypes: dict[str, int]) -> dict[str, LoraWeights]:
    """Each module's factors as a run feeds them, A [in, R] and B * scale [R, out], carved out of
    one float32 block: one allocation per adapter, each factor written in a single pass (a site
    of another float type, a float16 base's, gets its own copy in that type).

    R is the rank rounded up to the power of two runs use, the extra columns of A and rows of B
    zero (exact): a run whose rows all use this adapter is then fed views of these arrays, with
    no copy, whatever the rank."""
    sizes = {weight: (rank_bucket(m.rank), m.a.shape[1], m.b.shape[0]) for weight, m in modules.items()}
    block = np.zeros(sum(r * (i + o) for r, i, o in sizes.values()), dtype=np.float32)
    lora, offset = {}, 0
    for weight, module in modules.items():
        rank, (bucket, fan_in, fan_out) = module.rank, sizes[weight]
        a = block[offset : offset + fan_in * bucket].reshape(fan_in, bucket)
        offset += a.size
        b = block[offset : offset + bucket * fan_out].reshape(bucket, fan_out)
        offset += b.size
        np.copyto(a[:, :rank], module.a.T, casting="same_kind")
        np.multiply(module.b.T, module.scale, out=b[:rank], casting="same_kind")
        dtype = helper.tensor_dtype_to_np_dtype(dtypes[weight])
        if dtype != block.dtype:  # a float16 (or bfloat16) base: its branches take its type
            a, b = a.astype(dtype), b.astype(dtype)
        lora[weight] = LoraWeights(a=a, b=b)
    return lora


def _parse_mapping(text: str) -> dict[str, str] | None:
    if not text:
        return None
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"module mapping is not valid JSON: {exc}", field="module_mapping_json"
        ) from None
    if not isinstance(mapping, dict):
        raise InvalidArgument("module mapping must be a JSON object", field="module_mapping_json")
    return mapping


def _check_tensor(
    model: BaseModel, name: str, array: np.ndarray, specs: dict[str, tuple[str, tuple[int, ...]]]
) -> None:
    spec = specs.get(name)
    if spec is None:
        raise InvalidArgument(
            f"adapter tensor '{name}' is neither an input nor an overridable weight of model '{model.name}'",
            field="tensors",
        )
    dtype, shape = spec
    if (
        array.dtype.name != dtype
        or len(array.shape) != len(shape)
        or any(want >= 0 and got != want for got, want in zip(array.shape, shape, strict=True))
    ):
        raise InvalidArgument(
            f"adapter tensor '{name}' is {array.dtype.name}{list(array.shape)}, model '{model.name}' expects "
            f"{dtype}{list(shape)}",
            field="tensors",
        )
