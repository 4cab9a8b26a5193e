"""One typed settings object for the worker.

Every field has a default, a flag (``--data-dir``), an environment variable (``ORTMUX_DATA_DIR``)
and a key in the optional TOML config file (``data_dir = "..."``). Later sources win:
defaults < config file < environment < flags. List fields take a comma-separated environment
value and a repeatable flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ortmux.worker.errors import InvalidArgument
from ortmux.worker.files import read_toml
from ortmux.worker.settings_checks import check_settings

ENV_PREFIX = "ORTMUX_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclasses.dataclass
class Settings:
    host: str = _field("0.0.0.0", "Address the gRPC server binds.")
    port: int = _field(50051, "gRPC port; 0 picks a free port (logged at start).")
    http_port: int = _field(
        -1,
        "Port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
        "/health); 0 picks a free port (logged at start), -1 turns it off.",
    )
    http_max_body_bytes: int = _field(
        8 * 1024 * 1024,
        "Largest HTTP request body in bytes; a larger one is answered 413 before more of it is read.",
    )
    http_header_timeout_seconds: float = _field(
        10.0,
        "Seconds an HTTP client has to send a request's headers (from connecting, or from the end of "
        "its previous response on a kept-alive connection); then the connection is closed.",
    )
    http_body_timeout_seconds: float = _field(
        30.0, "Seconds an HTTP client has to send a request's whole body; then it is answered 408."
    )
    metrics_port: int = _field(9095, "Prometheus /metrics port; 0 picks a free port, -1 turns metrics off.")
    data_dir: Path = _field(Path("ortmux-data"), "Directory for the demo model, caches and adapters.")
    models: list[str] = _field(
        [], "Base model to serve, as NAME=PATH to an .onnx file; repeatable. None: the demo model."
    )
    providers: list[str] = _field(
        [], "ONNX Runtime execution providers in priority order; empty: CUDA when it works, else CPU."
    )
    cache_dir: str = _field(
        "",
        "Directory of optimized, prepacked models, shared by the workers of a node; empty: <data-dir>/cache.",
    )
    optimization_level: str = _field(
        "all",
        "ONNX Runtime graph optimization applied once when a model enters the cache: disable, basic, "
        "extended or all.",
    )
    base_graph: str = _field(
        "shared",
        "Graph of base-only runs: shared (the LoRA graph without its branches, one copy of the weights) "
        "or separate (the original graph optimized on its own: keeps the fusions LoRA branches block, "
        "costs a second weight file).",
    )
    lora_branch: str = _field(
        "kernel",
        "How LoRA branches compute: kernel (the worker's own operator reads each row's factors where "
        "the adapter keeps them; CPU, compiled on first use with the system's C compiler) or matmul "
        "(ONNX Runtime's MatMul on per-run copies of the factors). kernel falls back to matmul, with "
        "a warning, where it cannot serve (no compiler, CUDA first, float16 bases).",
    )
    quantize: str = _field(
        "none",
        "Quantize float base models once when they enter the cache, before the LoRA rewrite (adapters "
        "stay float): none, int8 (dynamic, MatMul weights) or int4 (MatMulNBits, weight-only); models "
        "already quantized are served as they are.",
    )
    overridable: list[str] = _field(
        [],
        "Glob over initializer names kept overridable (not folded or prepacked), for override adapters.",
    )
    intra_op_threads: int = _field(
        0, "Threads of the process-wide ONNX Runtime pool that every session shares; 0: one per core."
    )
    max_adapter_bytes: int = _field(1 << 30, "Largest adapter upload (or archive, unpacked) in bytes.")
    max_upload_chunks: int = _field(1 << 20, "Most chunk messages one adapter upload may send.")
    adapter_memory_bytes: int = _field(
        2 << 30, "Memory budget of resident adapters; least recently used unpinned ones are evicted past it."
    )
    feed_memory_bytes: int = _field(
        1 << 30,
        "Memory of the LoRA factor arrays fed to runs, all models together; past it a run uses arrays "
        "of its own, freed when it ends.",
    )
    upload_memory_bytes: int = _field(
        512 << 20,
        "Memory all adapter uploads in progress may hold together; past it an upload is received "
        "into its staging file instead of memory.",
    )
    adapter_store: str = _field(
        "",
        "Shared adapter store of every pod, s3://BUCKET/PREFIX (endpoint and credentials the AWS way: "
        "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, web identity, ...); empty: adapters live on this pod's disk.",
    )
    adapter_sync_seconds: float = _field(
        2.0, "With a shared store: registrations, replacements and deletes reach this pod within this bound."
    )
    adapter_disk_bytes: int = _field(
        0,
        "With a shared store: bytes of adapters the local disk caches; least recently used ones leave "
        "first (resident and pinned stay). 0: no bound.",
    )
    adapter_store_lookups_per_second: float = _field(
        20.0, "With a shared store: lookups of adapter ids this pod does not know, per tenant per second."
    )
    adapter_orphan_grace_seconds: float = _field(
        3600.0,
        "With a shared store: age after which a payload no record names (an upload that died) is "
        "deleted; longer than any upload takes.",
    )
    adapter_gc_seconds: float = _field(
        600.0, "With a shared store: how often (jittered) this pod collects orphaned payloads."
    )
    max_batch_size: int = _field(32, "Most rows one batched run takes; 1 turns batching off.")
    max_batch_tokens: int = _field(
        16384,
        "Most tokens one batched run takes (rows x the sizes of the model's dynamic dimensions: "
        "batch x sequence for text); a request over it alone is refused with INVALID_ARGUMENT.",
    )
    max_sequence_length: list[str] = _field(
        [],
        "Longest sequence (dimension 1 of integer [batch, sequence] inputs) a model takes, as N for "
        "every model or NAME=N for one; repeatable. Unset: the model's own limit (config.json's "
        "max_position_embeddings beside it, or its position-embedding rows), if it has one.",
    )
    kv_cache_bytes: int = _field(
        1 << 30,
        "KV cache of all generations together. On the paged cache a sequence holds 16-token blocks "
        "as its length grows (the newest is preempted and recomputed when none are free); on the "
        "dense cache a generation reserves (prompt + max_new_tokens) x the model's KV bytes per "
        "token when admitted. Either way a generation waits while there is no room.",
    )
    paged_kv_cache: bool = _field(
        True,
        "Rewrite a decoder's attention at load to read and append to the KV cache's blocks in place, "
        "each row over its own length (no padding to the longest row, no per-step copy); decoders "
        "whose attention is not recognised keep the dense cache (GetModel says which and why).",
    )
    prefix_cache: bool = _field(
        True,
        "Keep the KV of prompts' full 16-token blocks, so a later prompt with the same start in the "
        "same scope (its adapter's content and its tenant) prefills only the rest; cached blocks "
        "take at most half of kv_cache_bytes and give way to generations that need the room.",
    )
    prefix_cache_shared_base: bool = _field(
        False,
        "Let prompts on the base model (no adapter) share cached prefixes across tenants; off, each "
        "tenant's prefixes are its own.",
    )
    max_running_sequences: int = _field(
        32, "Sequences one model's decode steps run at once; more wait to be admitted."
    )
    max_prefill_tokens: int = _field(
        2048,
        "Prompt tokens prefilled between two decode steps (a longer prompt is prefilled alone), so a "
        "long prompt does not stall every running generation for long.",
    )
    max_generation_seconds: float = _field(
        600.0,
        "Longest one generation may take from its arrival, whichever front end sent it (a client's "
        "shorter deadline wins); then it ends with DEADLINE_EXCEEDED. 0: no limit of the worker's.",
    )
    memory_limit_bytes: int = _field(
        0,
        "Worker memory (resident bytes) past which new requests are refused with RESOURCE_EXHAUSTED "
        "and a retry delay, before the kernel's OOM killer would take the pod. 0: 90% of the "
        "container's cgroup memory limit when one is set, else no guard; -1: no guard.",
    )
    max_queue_delay_ms: float = _field(
        0.0,
        "How long a batch waits for more requests after its first, in ms; 0: a batch takes what queued "
        "while the previous run was busy.",
    )
    max_queue_size: int = _field(
        1024, "Requests a model's queue holds; more are refused at once with RESOURCE_EXHAUSTED."
    )
    fair_share_rows: int = _field(
        0,
        "Rows one tenant (or adapter) may put in a batch while others are active; 0: no cap. A small "
        "cap keeps light tenants fast under a flood, at a cost in throughput.",
    )
    mix_adapters: bool = _field(
        True, "Let rows of different LoRA adapters (and base rows) share one run; off: one adapter per run."
    )
    grpc_workers: int = _field(
        32,
        "Threads admitting gRPC requests and generations (a quarter as many each for model and "
        "adapter management, and for uploads); open calls and streams hold none while they wait.",
    )
    stream_window: int = _field(
        128, "Requests of one InferStream unanswered at once; the worker reads no more until one is answered."
    )
    max_concurrent_rpcs: int = _field(
        2048, "Calls the server holds at once (running or waiting for a thread); more are refused."
    )
    max_message_bytes: int = _field(64 * 1024 * 1024, "Largest gRPC message accepted or sent, in bytes.")
    drain_grace_seconds: float = _field(
        20.0, "On SIGTERM, seconds in-flight work may take to finish before the server stops."
    )
    api_keys: list[str] = _field(
        [],
        "API keys as SHA256:TENANT:ROLE (hex sha256 of the key; role tenant or admin); repeatable. "
        "None here or in api_keys_file: single-tenant, no keys.",
    )
    api_keys_file: str = _field(
        "", "TOML file of API keys ([[key]] sha256, tenant, role), read again whenever it changes."
    )
    tenant_max_adapters: int = _field(0, "Adapters one tenant may register on one model; 0: no quota.")
    tenant_max_adapter_bytes: int = _field(
        0, "Adapter bytes one tenant may store over all models; 0: no quota."
    )
    tenant_max_in_flight: int = _field(
        0, "Inference requests one tenant may have queued or running; 0: no quota."
    )
    tenant_max_generated_tokens_per_minute: int = _field(
        0,
        "Tokens one tenant may generate per minute (a generation takes its max_new_tokens when "
        "admitted and gives back what it did not generate); 0: no quota.",
    )
    tenant_max_requests_per_second: float = _field(
        0.0, "Inference requests per second one tenant may send (a token bucket); 0: no quota."
    )
    max_request_elements: int = _field(
        1 << 26, "Most tensor elements one inference request may carry over all its inputs."
    )
    worker_paths: list[str] = _field(
        [],
        "Directories LoadModel and RegisterAdapterFromPath may read from (admins only either way); "
        "repeatable. Empty: any path the worker can read.",
    )
    tls_cert_file: str = _field("", "PEM server certificate (chain); with tls_key_file, serve TLS only.")
    tls_key_file: str = _field("", "PEM private key of tls_cert_file.")
    tls_client_ca_file: str = _field(
        "", "PEM CA bundle; set, clients must present a certificate it signed (mutual TLS)."
    )
    log_level: str = _field("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.data_dir / "cache"

    def sequence_limits(self) -> dict[str, int]:
        """``max_sequence_length`` parsed into model name -> limit ("" for every other model)."""
        limits: dict[str, int] = {}
        for entry in self.max_sequence_length:
            name, sep, value = entry.rpartition("=")
            try:
                limit = int(value)
            except ValueError:
                limit = 0
            if limit < 1 or (sep and not name.strip()):
                raise InvalidArgument(
                    f"setting 'max_sequence_length' entry {entry!r} is not N or NAME=N with N >= 1",
                    field="max_sequence_length",
                )
            limits[name.strip()] = limit
        return limits

    def model_paths(self) -> dict[str, Path]:
        """``models`` parsed into name -> path, checked for form and duplicates."""
        parsed: dict[str, Path] = {}
        for entry in self.models:
            name, sep, path = entry.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path:
                raise InvalidArgument(f"model '{entry}' is not NAME=PATH", field="models")
            if name in parsed:
                raise InvalidArgument(f"model name '{name}' is given twice", field="models")
            parsed[name] = Path(path)
        return parsed

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def load(
        cls,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        config_file: Path | None = None,
    ) -> Settings:
        """Settings from a config file, the environment and command-line flags, in that order."""
        environ = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(add_help=False)
        add_arguments(parser)
        flags = vars(parser.parse_args(list(argv or [])))
        config_path = flags.pop("config", None) or config_file or environ.get(CONFIG_ENV)
        values: dict[str, Any] = {}
        if config_path:
            values.update(_read_config(Path(config_path)))
        values.update(_read_environ(environ))
        values.update({name: value for name, value in flags.items() if value is not None})
        settings = cls(**{name: _coerce(name, value) for name, value in values.items()})
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse values that no code path could serve, naming the setting."""
        check_settings(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per settings field (all defaulting to None, so unset flags do not override)."""
    parser.add_argument("--config", type=Path, help=f"TOML config file (env {CONFIG_ENV}).")
    for field in Settings.fields():
        flag = "--" + field.name.replace("_", "-")
        env = ENV_PREFIX + field.name.upper()
        help_text = f"{field.metadata['help']} (env {env})"
        if _is_list(field.name):
            option = flag[:-1] if flag.endswith("s") else flag
            parser.add_argument(option, flag, dest=field.name, action="append", help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, help=help_text)


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def _is_list(name: str) -> bool:
    return typing.get_origin(_hints()[name]) is list


def _coerce(name: str, value: Any) -> Any:
    hint = _hints().get(name)
    if hint is None:
        raise InvalidArgument(f"unknown setting '{name}'", field=name)
    try:
        if typing.get_origin(hint) is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(item).strip() for item in items if str(item).strip()]
        if hint is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(value)
            return lowered in {"1", "true", "yes", "on"}
        if hint is int and isinstance(value, float):
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"setting '{name}' must be {getattr(hint, '__name__', hint)}, got {value!r}", field=name
        ) from None


def _read_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    return {
        field.name: environ[ENV_PREFIX + field.name.upper()]
        for field in Settings.fields()
        if ENV_PREFIX + field.name.upper() in environ
    }


def _read_config(path: Path) -> dict[str, Any]:
    values = read_toml(path, "config file", "config")
    known = {field.name for field in Settings.fields()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidArgument(f"config file {path}: unknown settings {', '.join(unknown)}", field="config")
    return values
