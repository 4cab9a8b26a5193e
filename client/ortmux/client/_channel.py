"""Channel settings shared by the sync and asyncio clients: target, retries, balancing, limits."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Calls that are safe to send again when a worker was unreachable. Uploads and deletes are not
# (a retried upload would re-send its stream; a retried delete could report NOT_FOUND for work
# the first attempt did), and a stream cannot be retried once it has answered anything.
_RETRIED = [
    {"service": "ortmux.v1.InferenceService", "method": "Infer"},
    {"service": "ortmux.v1.ModelService", "method": "ListModels"},
    {"service": "ortmux.v1.ModelService", "method": "GetModel"},
    {"service": "ortmux.v1.AdapterService", "method": "GetAdapter"},
    {"service": "ortmux.v1.AdapterService", "method": "ListAdapters"},
]


def service_config(retry_attempts: int) -> str:
    """Round-robin over every address of the target; retry the idempotent calls on UNAVAILABLE."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retry_attempts > 1:
        config["methodConfig"] = [
            {
                "name": _RETRIED,
                "retryPolicy": {
                    "maxAttempts": min(retry_attempts, 5),
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


def channel_options(
    max_message_bytes: int, *, retry_attempts: int = 3, keepalive_seconds: float = 30.0
) -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.enable_retries", 1 if retry_attempts > 1 else 0),
        ("grpc.service_config", service_config(retry_attempts)),
    ]


def channel_target(target: str | Sequence[str]) -> str:
    """A gRPC target for one address or name (``host:port``, ``dns:///svc:port``, ...) or for a
    list of ``host:port`` addresses, resolved here into one ``ipv4:``/``ipv6:`` target so that
    round-robin spreads calls over them."""
    if isinstance(target, str):
        return target
    if not target:
        raise ValueError("target list is empty")
    addresses = [_resolve(entry) for entry in target]
    families = {family for family, _ in addresses}
    if len(families) != 1:
        raise ValueError(f"targets {list(target)} mix IPv4 and IPv6 addresses; use one family")
    return f"{families.pop()}:{','.join(address for _, address in addresses)}"


def _resolve(entry: str) -> tuple[str, str]:
    host, sep, port = entry.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target '{entry}' is not host:port")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4][0])
    if ip.version == 6:
        return "ipv6", f"[{ip}]:{port}"
    return "ipv4", f"{ip}:{port}"
