"""Adapter payloads -> tensors. Three formats: PEFT LoRA, ORT .onnx_adapter, weight override.

Every refusal is an InvalidArgument naming the file and field; nothing unsupported is ignored.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import mmap
import re
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ortmux.worker.adapters import safetensors
from ortmux.worker.errors import InvalidArgument

PEFT_LORA = "peft_lora"
ORT_ADAPTER = "ort_adapter"
WEIGHT_OVERRIDE = "weight_override"

# An upload as received: bytes, or the memory it was gathered in (see store.PendingAdapter).
Payload = bytes | mmap.mmap

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
ORT_ADAPTER_FILE = "adapter.onnx_adapter"
OVERRIDE_FILE = "override.safetensors"

_PEFT_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
# A fully trained module (PEFT's modules_to_save) as PEFT saves it: the module's own parameter
# names (older releases kept the wrapper's ``modules_to_save.<adapter>`` in the path).
_FULL_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+?)(?:\.modules_to_save(?:\.[A-Za-z0-9_-]+)?)?\.(?P<part>weight|bias)$"
)
_ORT_MAGIC = b"TORT"


@dataclasses.dataclass
class PeftModule:
    """One adapted module: A [r, in] and B [out, r] as PEFT stores them, and its scale."""

    module: str
    a: np.ndarray
    b: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclasses.dataclass
class FullModule:
    """A module the adapter trained in full (``modules_to_save``): its weight as torch stores it
    ([out, in] for a Linear) and its bias."""

    module: str
    weight: np.ndarray
    bias: np.ndarray | None


@dataclasses.dataclass
class ParsedAdapter:
    """What a payload holds, before it is mapped onto a base model."""

    format: str
    peft_modules: list[PeftModule] = dataclasses.field(default_factory=list)
    full_modules: list[FullModule] = dataclasses.field(default_factory=list)
    tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # ORT params or overrides
    module_mapping: dict[str, str] = dataclasses.field(default_factory=dict)


def unpack(
    payload: Payload, files: Mapping[str, bytes | memoryview] | None, max_bytes: int
) -> dict[str, Payload]:
    """The files of an upload: named files as given, or a single file/archive opened here."""
    if files:
        return {Path(name).name: data for name, data in files.items()}  # type: ignore[misc]
    if payload[:4] == b"PK\x03\x04":
        return _unzip(payload, max_bytes)
    if payload[:2] == b"\x1f\x8b" or _looks_like_tar(payload):
        return _untar(payload, max_bytes)
    return {"": payload}


def _looks_like_tar(payload: Payload) -> bool:
    return len(payload) > 262 and payload[257:262] == b"ustar"


MAX_ARCHIVE_MEMBERS = 256


def _too_many_members() -> InvalidArgument:
    return InvalidArgument(f"archive has more than {MAX_ARCHIVE_MEMBERS} members")


def _unzip(payload: Payload, max_bytes: int) -> dict[str, bytes]:
    # A member never expands past the size its header declares (zipfile stops there), so the
    # declared total bounds what unpacking can produce.
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
            if len(members) > MAX_ARCHIVE_MEMBERS:
                raise _too_many_members()
            total = sum(info.file_size for info in members)
            if total > max_bytes:
                raise InvalidArgument(f"archive expands to {total} bytes, over the {max_bytes}-byte limit")
            names = [info.filename for info in members]
            if names and all(name.endswith(".npy") for name in names):
                return {"": payload}  # an .npz of named tensors, not an archive of files
            return {Path(info.filename).name: _read_member(archive.open(info), max_bytes) for info in members}
    except zipfile.BadZipFile as exc:
        raise InvalidArgument(f"upload is not a valid zip archive: {exc}") from None


def _untar(payload: Payload, max_bytes: int) -> dict[str, bytes]:
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as archive:
            out: dict[str, bytes] = {}
            total = 0
            for count, member in enumerate(archive, start=1):
                if count > MAX_ARCHIVE_MEMBERS:
                    raise _too_many_members()
                if not member.isfile():
                    continue
                total += member.size
                if total > max_bytes:
                    raise InvalidArgument(f"archive expands past the {max_bytes}-byte limit")
                handle = archive.extractfile(member)
                if handle is not None:
                    out[Path(member.name).name] = _read_member(handle, max_bytes)
            return out
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidArgument(f"upload is not a valid tar archive: {exc}") from None


def _read_member(handle: io.BufferedIOBase, max_bytes: int) -> bytes:
    data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidArgument(f"an archive member expands past the {max_bytes}-byte limit")
    return data


def detect(files: Mapping[str, bytes]) -> str:
    """The format of unpacked files; InvalidArgument when none fits."""
    if PEFT_CONFIG in files:
        return PEFT_LORA
    if "adapter_model.bin" in files:
        raise InvalidArgument("adapter_model.bin (pickle) is not accepted; save with safe_serialization=True")
    if len(files) == 1:
        (data,) = files.values()
        if data[4:8] == _ORT_MAGIC:
            return ORT_ADAPTER
        if data[:4] == b"PK\x03\x04" or _is_safetensors(data):
            return WEIGHT_OVERRIDE
    names = sorted(name or "<single file>" for name in files)
    raise InvalidArgument(
        f"cannot tell the adapter format of files {names}; expected {PEFT_CONFIG} + {PEFT_WEIGHTS}, "
        "an .onnx_adapter, or a .safetensors/.npz of tensors"
    )


def _is_safetensors(data: bytes) -> bool:
    return len(data) > 9 and int.from_bytes(data[:8], "little") < len(data) and data[8:9] == b"{"


def parse(
    fmt: str, files: Mapping[str, bytes], module_mapping: Mapping[str, str] | None = None
) -> ParsedAdapter:
    if fmt == PEFT_LORA:
        parsed = _parse_peft(files)
    elif fmt == ORT_ADAPTER:
        parsed = _parse_ort_adapter(files)
    elif fmt == WEIGHT_OVERRIDE:
        parsed = _parse_override(files)
    else:
        raise InvalidArgument(f"unknown adapter format '{fmt}'", field="format")
    if module_mapping:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in module_mapping.items()):
            raise InvalidArgument(
                "module mapping must map module names to weight names", field="module_mapping"
            )
        parsed.module_mapping = dict(module_mapping)
    return parsed


def _single(files: Mapping[str, bytes], wanted: str) -> bytes:
    if wanted in files:
        return files[wanted]
    if len(files) == 1:
        return next(iter(files.values()))
    raise InvalidArgument(f"expected one file, got {sorted(files)}")


# -- PEFT ------------------------------------------------------------------------------------------

_REJECTED_WHEN_SET = {
    "use_dora": "DoRA adapters are not supported",
    "lora_bias": "LoRA bias is not supported",
    "use_qalora": "QA-LoRA is not supported",
    "megatron_config": "Megatron layers are not supported",
    "trainable_token_indices": "trainable tokens are not supported",
}


def _pattern_value(module: str, pattern: Mapping[str, object], default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the module path's end."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)  # type: ignore[arg-type]
    return default


def _parse_peft(files: Mapping[str, bytes]) -> ParsedAdapter:
    if PEFT_WEIGHTS not in files:
        raise InvalidArgument(f"PEFT adapter has {PEFT_CONFIG} but no {PEFT_WEIGHTS}", field="files")
    try:
        config = json.loads(bytes(files[PEFT_CONFIG]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{PEFT_CONFIG} is not valid JSON: {exc}", field=PEFT_CONFIG) from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{PEFT_CONFIG} is not a JSON object", field=PEFT_CONFIG)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InvalidArgument(
            f"{PEFT_CONFIG}: peft_type {peft_type!r} is not supported, only LORA", field="peft_type"
        )
    for field, message in _REJECTED_WHEN_SET.items():
        if config.get(field):
            raise InvalidArgument(f"{PEFT_CONFIG}: {message} ({field}={config[field]!r})", field=field)
    if config.get("bias", "none") != "none":
        raise InvalidArgument(
            f"{PEFT_CONFIG}: bias={config['bias']!r} is not supported, only 'none'", field="bias"
        )
    r = config.get("r")
    alpha = config.get("lora_alpha", r)
    if not isinstance(r, int) or r <= 0:
        raise InvalidArgument(f"{PEFT_CONFIG}: r must be a positive integer, got {r!r}", field="r")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidArgument(
            f"{PEFT_CONFIG}: lora_alpha must be a finite number, got {alpha!r}", field="lora_alpha"
        )
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for field, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict):
            raise InvalidArgument(f"{PEFT_CONFIG}: {field} must be an object", field=field)
        for key, value in pattern.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise InvalidArgument(
                    f"{PEFT_CONFIG}: {field}[{key!r}] must be a finite number, got {value!r}", field=field
                )
    use_rslora = bool(config.get("use_rslora", False))
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(name, str) for name in saved):
        raise InvalidArgument(
            f"{PEFT_CONFIG}: modules_to_save must be a list of module names", field="modules_to_save"
        )
    tensors = safetensors.load(files[PEFT_WEIGHTS], PEFT_WEIGHTS)
    check_finite(tensors, PEFT_WEIGHTS)
    parts: dict[str, dict[str, np.ndarray]] = {}
    full: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        if "lora_embedding_" in key:
            raise InvalidArgument(
                f"{PEFT_WEIGHTS}: embedding targets are not supported ({key})", field="target_modules"
            )
        match = _PEFT_KEY.match(key)
        if match is None:
            whole = _FULL_KEY.match(key)
            if whole is None or not any(_within(whole["module"], name) for name in saved):
                raise InvalidArgument(f"{PEFT_WEIGHTS}: unexpected tensor '{key}'", field=PEFT_WEIGHTS)
            full.setdefault(whole["module"], {})[whole["part"]] = array
            continue
        if array.ndim != 2:
            raise InvalidArgument(
                f"{PEFT_WEIGHTS}: '{key}' has {array.ndim} dims; only Linear targets (2-D) are supported "
                "(conv targets are not)",
                field="target_modules",
            )
        parts.setdefault(match["module"], {})[match["part"]] = array
    if not parts and not full:
        raise InvalidArgument(f"{PEFT_WEIGHTS} holds no LoRA tensors", field=PEFT_WEIGHTS)
    modules = []
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise InvalidArgument(
                f"{PEFT_WEIGHTS}: module '{module}' lacks lora_{'A' if 'A' not in pair else 'B'}"
            )
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        expected_rank = int(_pattern_value(module, rank_pattern, r))
        if rank != expected_rank or b.shape[1] != rank:
            raise InvalidArgument(
                f"{PEFT_WEIGHTS}: module '{module}' has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                f"but the config gives it rank {expected_rank}",
                field="r",
            )
        module_alpha = _pattern_value(module, alpha_pattern, float(alpha))
        scale = module_alpha / math.sqrt(rank) if use_rslora else module_alpha / rank
        modules.append(
            PeftModule(module, a.astype(np.float32, copy=False), b.astype(np.float32, copy=False), scale)
        )
    return ParsedAdapter(PEFT_LORA, peft_modules=modules, full_modules=_full_modules(full))


def _within(module: str, saved: str) -> bool:
    """Whether ``module`` is the saved module ``saved`` (a path's whole trailing components) or
    one of its submodules (RoBERTa's saved ``classifier`` holds ``classifier.dense``)."""
    wrapped = f".{module}."
    return f".{saved}." in wrapped


def _full_modules(full: Mapping[str, Mapping[str, np.ndarray]]) -> list[FullModule]:
    """The fully trained modules; only Linear layers (a 2-D weight, a 1-D bias) can be served."""
    modules = []
    for module, params in sorted(full.items()):
        weight, bias = params.get("weight"), params.get("bias")
        if weight is None or weight.ndim != 2 or (bias is not None and bias.shape != weight.shape[:1]):
            shapes = ", ".join(f"{name} {list(array.shape)}" for name, array in sorted(params.items()))
            raise InvalidArgument(
                f"{PEFT_WEIGHTS}: modules_to_save '{module}' ({shapes}) is not a Linear layer; only "
                "trained Linear layers (classifier heads) are served per request, not trained "
                "LayerNorms, embeddings or convolutions",
                field="modules_to_save",
            )
        modules.append(
            FullModule(
                module,
                weight.astype(np.float32, copy=False),
                None if bias is None else bias.astype(np.float32, copy=False),
            )
        )
    return modules


def check_finite(tensors: Mapping[str, np.ndarray], source: str) -> None:
    """InvalidArgument naming the first float tensor holding NaN or an infinity: such an adapter
    would answer non-finite outputs for every request."""
    for name, array in tensors.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = np.argwhere(~np.isfinite(array))[0]
            raise InvalidArgument(
                f"{source}: tensor '{name}' holds {array[tuple(bad)]} at {bad.tolist()}; adapter "
                "tensors must be finite",
                field="tensors",
            )


# -- ORT adapter -----------------------------------------------------------------------------------


def _parse_ort_adapter(files: Mapping[str, bytes]) -> ParsedAdapter:
    import onnxruntime as ort

    data = _single(files, ORT_ADAPTER_FILE)
    if data[4:8] != _ORT_MAGIC:
        raise InvalidArgument("not an ONNX Runtime adapter file (no 'TORT' identifier)", field="format")
    with tempfile.NamedTemporaryFile(suffix=".onnx_adapter") as handle:
        handle.write(data)
        handle.flush()
        try:
            adapter = ort.AdapterFormat.read_adapter(handle.name)
            tensors = {name: np.array(value.numpy()) for name, value in adapter.get_parameters().items()}
        except Exception as exc:
            raise InvalidArgument(f"the .onnx_adapter file does not load: {exc}", field="format") from None
    if not tensors:
        raise InvalidArgument("the .onnx_adapter file holds no parameters", field="format")
    check_finite(tensors, "the .onnx_adapter file")
    return ParsedAdapter(ORT_ADAPTER, tensors=tensors)


# -- weight override -------------------------------------------------------------------------------


def _parse_override(files: Mapping[str, bytes]) -> ParsedAdapter:
    data = _single(files, OVERRIDE_FILE)
    if data[:4] == b"PK\x03\x04":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                tensors = {name: np.array(npz[name]) for name in npz.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise InvalidArgument(f"override .npz does not load: {exc}", field="format") from None
    else:
        tensors = safetensors.load(data, "override")
    if not tensors:
        raise InvalidArgument("override holds no tensors", field="format")
    check_finite(tensors, "override")
    return ParsedAdapter(WEIGHT_OVERRIDE, tensors=tensors)
