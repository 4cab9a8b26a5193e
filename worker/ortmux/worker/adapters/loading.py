"""An adapter's payload turned into the form runs use, checked against its base model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from onnx import helper

from ortmux.worker.adapters import formats
from ortmux.worker.adapters.formats import Payload
from ortmux.worker.adapters.local_store import AdapterMeta
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.lora.feeds import Factors, LoraWeights, rank_bucket
from ortmux.worker.engine.lora.mapping import map_modules
from ortmux.worker.engine.lora.sites import LoraSite
from ortmux.worker.engine.quantized_ops import replaced_by
from ortmux.worker.errors import FailedPrecondition, InvalidArgument


@dataclasses.dataclass
class Resident:
    """An adapter in memory, in the form a run uses."""

    lora: dict[str, LoraWeights] = dataclasses.field(default_factory=dict)  # by call group
    feeds: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    nbytes: int = 0
    # It adapts a projection whose activation every row shares: its requests run without other
    # adapters' or base rows.
    exclusive: bool = False
    sha256: str = ""  # of its payload: what its generations' cached prefixes are keyed by


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
        return _peft(model, parsed)
    if parsed.format == formats.ORT_ADAPTER:
        specs = model.weight_specs()
        for name, array in parsed.tensors.items():
            if name in model.feedable_specs() and name not in specs:
                raise InvalidArgument(
                    f"adapter tensor '{name}' is an input of model '{model.name}', which requests "
                    "give; an adapter replaces only overridable weights",
                    field="tensors",
                )
            _check_tensor(model, name, array, specs)
        nbytes = sum(array.nbytes for array in parsed.tensors.values())
        return Resident(feeds=dict(parsed.tensors), nbytes=nbytes), 0, sorted(parsed.tensors)
    specs = model.weight_specs()
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


def _peft(model: BaseModel, parsed: formats.ParsedAdapter) -> tuple[Resident, int, list[str]]:
    """A PEFT adapter's factors by call group: its LoRA modules, and its fully trained Linear
    layers (``modules_to_save``) as the exact delta from the base's weight and bias."""
    if not model.lora_inputs and not model.unadaptable and not model.fused:
        raise FailedPrecondition(
            f"model '{model.name}' takes no LoRA adapters: it has no MatMul or Gemm on a "
            "weight, or its inputs share no dynamic batch dimension"
        )
    both = {m.module for m in parsed.peft_modules} & {m.module for m in parsed.full_modules}
    if both:
        raise InvalidArgument(
            f"modules {sorted(both)} are both LoRA targets and in modules_to_save", field="modules_to_save"
        )
    sites = map_modules(
        model.lora_sites,
        [m.module for m in parsed.peft_modules],
        parsed.module_mapping,
        model.unadaptable,
        model.fused,
    )
    heads = _map_full_modules(model, parsed)
    modules: dict[str, tuple[formats.PeftModule, np.ndarray | None]] = {}
    for module in parsed.peft_modules:
        site = sites[module.module]
        if module.a.shape[1] != site.in_features or module.b.shape[0] != site.out_features:
            raise InvalidArgument(
                f"module '{module.module}' has lora_A {list(module.a.shape)} and lora_B "
                f"{list(module.b.shape)}, but weight '{site.weight}' is {site.in_features} -> "
                f"{site.out_features}",
                field="adapter_model.safetensors",
            )
        modules[module.module] = (module, None)
    for full in parsed.full_modules:
        modules[full.module] = _full_delta(model, full, heads[full.module])
    sites.update(heads)
    groups: dict[str, tuple[formats.PeftModule, np.ndarray | None]] = {}
    for name, factors in modules.items():
        group = sites[name].call_group
        if group in groups:
            raise InvalidArgument(f"two modules map to weight '{sites[name].weight}'", field="target_modules")
        groups[group] = factors
    dtypes = {lora.site.call_group: lora.dtype for lora in model.lora_inputs}
    lora = _lora_factors(groups, dtypes)
    exclusive = any(not site.per_row for site in model.lora_sites if site.call_group in groups)
    resident = Resident(
        lora=lora, nbytes=sum(weights.nbytes for weights in lora.values()), exclusive=exclusive
    )
    rank = max(module.rank for module, _bias in groups.values())
    return resident, rank, sorted(lora)


def _map_full_modules(model: BaseModel, parsed: formats.ParsedAdapter) -> dict[str, LoraSite]:
    """The projection each fully trained module replaces; only Linear layers the graph computes
    as a MatMul or Gemm can be served."""
    if not parsed.full_modules:
        return {}
    try:
        return map_modules(
            model.lora_sites,
            [m.module for m in parsed.full_modules],
            parsed.module_mapping,
            model.unadaptable,
            model.fused,
        )
    except InvalidArgument as exc:
        raise InvalidArgument(
            f"modules_to_save: {exc.message}; only trained Linear layers (classifier heads) are "
            "served per request, not trained embeddings, LayerNorms or convolutions",
            field="modules_to_save",
        ) from None


def _full_delta(
    model: BaseModel, full: formats.FullModule, site: LoraSite
) -> tuple[formats.PeftModule, np.ndarray | None]:
    """A trained Linear as factors of its exact change from the base, ``x @ (W' - W)``, of rank
    min(in, out) (``W' - W`` and an identity), and its bias change ``b' - b``."""
    out_features, in_features = full.weight.shape
    if (in_features, out_features) != (site.in_features, site.out_features):
        raise InvalidArgument(
            f"modules_to_save '{full.module}' has weight {list(full.weight.shape)} ({in_features} -> "
            f"{out_features}), but the base model's '{site.weight}' is {site.in_features} -> "
            f"{site.out_features}: a head trained with another number of outputs (labels) is served "
            f"by a base model exported with that head size ({out_features} outputs)",
            field="modules_to_save",
        )
    if site.quantized:
        raise FailedPrecondition(
            f"modules_to_save '{full.module}' replaces a projection quantized as {site.quantized} "
            "(its exact delta needs the float weight); serve the float model",
            field="modules_to_save",
        )
    base, base_bias = model.projection_values(site)
    delta = full.weight.T - base  # [in, out]
    if full.bias is not None and not site.bias:
        raise FailedPrecondition(
            f"modules_to_save '{full.module}' trained a bias, but no bias initializer of the base "
            f"model's '{site.weight}' projection was found to take its change",
            field="modules_to_save",
        )
    bias = None
    if site.bias:
        trained = full.bias if full.bias is not None else np.zeros(out_features, np.float32)
        bias = (trained - base_bias).astype(np.float32)
    if out_features <= in_features:
        a, b = delta, np.eye(out_features, dtype=np.float32)
    else:
        a, b = np.eye(in_features, dtype=np.float32), delta
    # As PEFT stores factors: A [r, in], B [out, r]; scale 1.
    return formats.PeftModule(full.module, np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), 1.0), bias


def _lora_factors(
    groups: dict[str, tuple[formats.PeftModule, np.ndarray | None]], dtypes: dict[str, int]
) -> dict[str, LoraWeights]:
    """Each call group's factors as a run feeds them, A [in, R] and B * scale [R, out], carved out
    of one float32 block: one allocation per adapter, each factor written in a single pass (a
    site of another float type, a float16 base's, gets its own copy in that type).

    R is the rank rounded up to the power of two runs use, the extra columns of A and rows of B
    zero (exact): a run whose rows all use this adapter is then fed views of these arrays, with
    no copy, whatever the rank."""
    sizes = {group: (rank_bucket(m.rank), m.a.shape[1], m.b.shape[0]) for group, (m, _bias) in groups.items()}
    block = np.zeros(sum(r * (i + o) for r, i, o in sizes.values()), dtype=np.float32)
    lora, offset = Factors(), 0
    for group, (module, bias) in groups.items():
        rank, (bucket, fan_in, fan_out) = module.rank, sizes[group]
        a = block[offset : offset + fan_in * bucket].reshape(fan_in, bucket)
        offset += a.size
        b = block[offset : offset + bucket * fan_out].reshape(bucket, fan_out)
        offset += b.size
        np.copyto(a[:, :rank], module.a.T, casting="same_kind")
        np.multiply(module.b.T, module.scale, out=b[:rank], casting="same_kind")
        dtype = helper.tensor_dtype_to_np_dtype(dtypes[group])
        if dtype != block.dtype:  # a float16 (or bfloat16) base: its branches take its type
            a, b = a.astype(dtype), b.astype(dtype)
            bias = bias.astype(dtype) if bias is not None else None
        elif bias is not None:
            bias = np.ascontiguousarray(bias, dtype)
        lora[group] = LoraWeights(a=a, b=b, bias=bias)
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
            f"adapter tensor '{name}' is not an overridable weight of model '{model.name}'",
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
