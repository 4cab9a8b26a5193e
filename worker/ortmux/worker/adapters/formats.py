"""Adapter payloads -> tensors. Three formats: PEFT LoRA, ORT .onnx_adapter, weight override.

Every refusal is an InvalidArgument naming the file and field; nothing unsupported is ignored.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import tempfile
import time
import zipfile
from collections.abc import Mapping

import numpy as np
import re2

from ortmux.worker.adapters import archives, safetensors
from ortmux.worker.errors import InvalidArgument

Payload = archives.Payload
unpack = archives.unpack  # archives are opened there

PEFT_LORA = "peft_lora"
ORT_ADAPTER = "ort_adapter"
WEIGHT_OVERRIDE = "weight_override"

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

MAX_PATTERN_KEYS = 4096
MAX_PATTERN_KEY_CHARS = 1024
MAX_MATCHED_MODULE_CHARS = 1024  # the longest module path matched against a pattern map
_PATTERN_MEMORY = 32 << 20  # RE2's budget for one map's compiled keys and their matcher
_PATTERN_CPU_SECONDS = 10.0  # one map's matching, all modules together


class PatternMap:
    """A rank_pattern / alpha_pattern map, checked and compiled once: PEFT's lookup in linear time.

    PEFT takes the first key, in the map's order, for which ``re.match(rf"(.*\\.)?({key})$", module)``
    holds. Here each key is a pattern ``(?:^|\\.)(?:key)$`` of one RE2 set, searched once per module;
    the lowest index found is the first key. Index 0 always matches, unless RE2 gave up.
    """

    def __init__(self, field: str, pattern: object) -> None:
        self.field = field
        self._values: list[float] = []
        self._set: re2.Set | None = None
        self._cpu_seconds = 0.0
        if not isinstance(pattern, dict):
            raise self._refusal(" must be an object")
        if len(pattern) > MAX_PATTERN_KEYS:
            raise self._refusal(f" has {len(pattern)} keys, over the limit of {MAX_PATTERN_KEYS}")
        options = re2.Options()
        options.log_errors = False
        options.max_mem = _PATTERN_MEMORY
        alone, patterns = re2.Set.SearchSet(options), re2.Set.SearchSet(options)
        patterns.Add(r"\A")
        for key, value in pattern.items():
            if not _finite_number(value):
                raise self._refusal(f"[{key!r}] must be a finite number, got {value!r:.100}")
            if not isinstance(key, str) or len(key) > MAX_PATTERN_KEY_CHARS:
                raise self._refusal(f" keys must be strings of at most {MAX_PATTERN_KEY_CHARS} characters")
            try:
                alone.Add(key)  # a key must be a regular expression on its own (not PEFT's "a)|(b")
                patterns.Add(rf"(?:^|\.)(?:{key})$")
            except (re2.error, UnicodeEncodeError):
                raise self._refusal(
                    f" key {key!r} is not a pattern RE2 accepts ({_re2_reason(key, options)}); patterns "
                    "use RE2 syntax (no backreferences or lookaround)"
                ) from None
            self._values.append(float(value))  # type: ignore[arg-type]
        if self._values:
            try:
                patterns.Compile()
            except re2.error:
                raise self._refusal(f" keys need over {_PATTERN_MEMORY >> 20} MiB of RE2 memory") from None
            self._set = patterns

    def _refusal(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"{PEFT_CONFIG}: {self.field}{what}", field=self.field)

    def value(self, module: str, default: float) -> float:
        """The value of the first key matching ``module``, else ``default``."""
        if self._set is None:
            return default
        if len(module) > MAX_MATCHED_MODULE_CHARS:
            raise self._refusal(
                f" cannot be matched to module paths of over {MAX_MATCHED_MODULE_CHARS} characters"
            )
        started = time.thread_time()  # RE2 matches in this thread, without the GIL
        found = self._set.Match(module.encode(errors="surrogatepass")) or []
        self._cpu_seconds += time.thread_time() - started
        if 0 not in found or self._cpu_seconds > _PATTERN_CPU_SECONDS:
            raise self._refusal(f" is too costly for RE2 to match (at module {module!r}); simplify it")
        keys = [index for index in found if index]
        return self._values[min(keys) - 1] if keys else default


def _finite_number(value: object) -> bool:
    """Whether a JSON value is a finite number (an integer too large for a float is not)."""
    try:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        return False


def _re2_reason(key: str, options: re2.Options) -> str:
    """RE2's words for why it refuses ``key`` (alone, else as placed in its set pattern)."""
    for pattern in (key, rf"(?:^|\.)(?:{key})$"):
        try:
            re2.compile(pattern, options)
        except (re2.error, UnicodeEncodeError) as exc:
            return exc.args[0].decode(errors="replace") if isinstance(exc.args[0], bytes) else str(exc)
    return "refused"


def _parse_peft(files: Mapping[str, bytes]) -> ParsedAdapter:
    if PEFT_WEIGHTS not in files:
        raise InvalidArgument(f"PEFT adapter has {PEFT_CONFIG} but no {PEFT_WEIGHTS}", field="files")
    try:
        config = json.loads(bytes(files[PEFT_CONFIG]))
    except ValueError as exc:  # undecodable, not JSON, or an integer of over 4300 digits
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
    if not _finite_number(alpha):
        raise InvalidArgument(
            f"{PEFT_CONFIG}: lora_alpha must be a finite number, got {alpha!r}", field="lora_alpha"
        )
    ranks = PatternMap("rank_pattern", config.get("rank_pattern") or {})
    alphas = PatternMap("alpha_pattern", config.get("alpha_pattern") or {})
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
        expected_rank = int(ranks.value(module, r))
        if rank != expected_rank or b.shape[1] != rank:
            raise InvalidArgument(
                f"{PEFT_WEIGHTS}: module '{module}' has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                f"but the config gives it rank {expected_rank}",
                field="r",
            )
        module_alpha = alphas.value(module, float(alpha))
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
        archives.check_zip_directory(data)
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
