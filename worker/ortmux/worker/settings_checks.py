"""The worker settings' checks: values no code path could serve are refused at start, naming the
setting (:meth:`Settings.validate <ortmux.worker.settings.Settings.validate>`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ortmux.worker.engine.lora.graph import BRANCHES
from ortmux.worker.engine.quantize import QUANTIZE_KINDS
from ortmux.worker.errors import InvalidArgument

if TYPE_CHECKING:
    from ortmux.worker.settings import Settings


def check_settings(self: Settings) -> None:
    """Refuse values that no code path could serve, naming the setting."""
    levels = ("disable", "basic", "extended", "all")
    if self.optimization_level not in levels:
        raise InvalidArgument(
            f"setting 'optimization_level' must be one of {', '.join(levels)}, "
            f"got '{self.optimization_level}'",
            field="optimization_level",
        )
    if self.quantize not in QUANTIZE_KINDS:
        raise InvalidArgument(
            f"setting 'quantize' must be one of {', '.join(QUANTIZE_KINDS)}, got '{self.quantize}'",
            field="quantize",
        )
    if self.base_graph not in ("shared", "separate"):
        raise InvalidArgument(
            f"setting 'base_graph' must be shared or separate, got '{self.base_graph}'",
            field="base_graph",
        )
    if self.lora_branch not in BRANCHES:
        raise InvalidArgument(
            f"setting 'lora_branch' must be kernel or matmul, got '{self.lora_branch}'",
            field="lora_branch",
        )
    if self.intra_op_threads < 0:
        raise InvalidArgument("setting 'intra_op_threads' must be 0 or more", field="intra_op_threads")
    if self.fair_share_rows < 0:
        raise InvalidArgument("setting 'fair_share_rows' must be 0 or more", field="fair_share_rows")
    if self.max_queue_delay_ms < 0:
        raise InvalidArgument("setting 'max_queue_delay_ms' must be 0 or more", field="max_queue_delay_ms")
    for name in (
        "max_concurrent_rpcs",
        "max_adapter_bytes",
        "max_upload_chunks",
        "adapter_memory_bytes",
        "feed_memory_bytes",
        "upload_memory_bytes",
        "max_batch_size",
        "max_batch_tokens",
        "kv_cache_bytes",
        "max_running_sequences",
        "max_prefill_tokens",
        "max_queue_size",
        "stream_window",
        "max_request_elements",
        "http_max_body_bytes",
    ):
        if getattr(self, name) < 1:
            raise InvalidArgument(f"setting '{name}' must be 1 or more", field=name)
    for name in (
        "tenant_max_adapters",
        "tenant_max_adapter_bytes",
        "tenant_max_in_flight",
        "tenant_max_generated_tokens_per_minute",
    ):
        if getattr(self, name) < 0:
            raise InvalidArgument(f"setting '{name}' must be 0 or more", field=name)
    if self.tenant_max_requests_per_second < 0:
        raise InvalidArgument(
            "setting 'tenant_max_requests_per_second' must be 0 or more",
            field="tenant_max_requests_per_second",
        )
    if bool(self.tls_cert_file) != bool(self.tls_key_file):
        raise InvalidArgument(
            "settings 'tls_cert_file' and 'tls_key_file' go together", field="tls_cert_file"
        )
    if self.tls_client_ca_file and not self.tls_cert_file:
        raise InvalidArgument(
            "setting 'tls_client_ca_file' needs tls_cert_file and tls_key_file",
            field="tls_client_ca_file",
        )
    if self.adapter_store:
        from ortmux.worker.adapters.object_store import parse_url

        try:
            parse_url(self.adapter_store)
        except ValueError as exc:
            raise InvalidArgument(f"setting 'adapter_store': {exc}", field="adapter_store") from None
    for name in (
        "adapter_sync_seconds",
        "adapter_store_lookups_per_second",
        "adapter_orphan_grace_seconds",
        "adapter_gc_seconds",
        "http_header_timeout_seconds",
        "http_body_timeout_seconds",
    ):
        if getattr(self, name) <= 0:
            raise InvalidArgument(f"setting '{name}' must be more than 0", field=name)
    if self.max_generation_seconds < 0:
        raise InvalidArgument(
            "setting 'max_generation_seconds' must be 0 (no limit) or more", field="max_generation_seconds"
        )
    if self.adapter_disk_bytes < 0:
        raise InvalidArgument("setting 'adapter_disk_bytes' must be 0 or more", field="adapter_disk_bytes")
    self.sequence_limits()
    if self.memory_limit_bytes < -1:
        raise InvalidArgument(
            "setting 'memory_limit_bytes' must be -1, 0 or a byte count", field="memory_limit_bytes"
        )
    if self.http_port < -1:
        raise InvalidArgument("setting 'http_port' must be -1 (off), 0 or a port", field="http_port")
    if self.grpc_workers < 1:
        raise InvalidArgument("setting 'grpc_workers' must be 1 or more", field="grpc_workers")
