"""Channels shared by the sync and asyncio clients: target, retries, balancing, limits."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from ortmux.v1 import adapters_pb2_grpc, inference_pb2_grpc, models_pb2_grpc

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


def resolve_address(entry: str) -> str:
    """``host:port`` with the host resolved to an IP address (``[v6]:port`` for IPv6)."""
    return _resolve(entry)[1]


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


if TYPE_CHECKING:
    from ortmux.client._routing import Route


@dataclasses.dataclass(frozen=True)
class Stubs:
    channel: Any
    models: models_pb2_grpc.ModelServiceStub
    inference: inference_pb2_grpc.InferenceServiceStub
    adapters: adapters_pb2_grpc.AdapterServiceStub


class Connections:
    """The channels of a client: one to a single target, or one per pod of a routed target (see
    ``_routing``), made by ``open_channel(address, options)`` (sync or asyncio)."""

    def __init__(
        self,
        target: str | Sequence[str],
        open_channel: Callable[[str, list], Any],
        *,
        max_message_bytes: int,
        retry_attempts: int,
        keepalive_seconds: float,
        refresh_seconds: float,
    ) -> None:
        from ortmux.client._routing import Pods, is_routed  # _routing imports this module

        self._open_channel = open_channel
        self.retry_attempts = max(retry_attempts, 1)
        self._lock = threading.Lock()
        self._stubs: dict[str | None, Stubs] = {}
        self.pods = Pods(target, refresh_seconds) if is_routed(target) else None
        # A routed client retries on the next pod itself; a single channel retries in gRPC.
        self._options = channel_options(
            max_message_bytes,
            retry_attempts=1 if self.pods else retry_attempts,
            keepalive_seconds=keepalive_seconds,
        )
        if self.pods is None:
            self.target = channel_target(target)
            self._stubs[None] = self._open(self.target)
        else:
            self.target = target if isinstance(target, str) else ",".join(self.pods.addresses)

    def _open(self, address: str) -> Stubs:
        channel = self._open_channel(address, self._options)
        return Stubs(
            channel,
            models_pb2_grpc.ModelServiceStub(channel),
            inference_pb2_grpc.InferenceServiceStub(channel),
            adapters_pb2_grpc.AdapterServiceStub(channel),
        )

    def stubs(self, address: str | None) -> Stubs:
        with self._lock:
            stubs = self._stubs.get(address)
            if stubs is None:
                stubs = self._stubs[address] = self._open(address)  # type: ignore[arg-type]
            return stubs

    def order(self, route: Route | None, idempotent: bool) -> list[str | None]:
        """The addresses a call on ``route`` tries in turn ([None]: the single channel)."""
        if self.pods is None:
            return [None]
        return list(self.pods.order(route, self.retry_attempts if idempotent else 1))

    def refresh_due(self) -> bool:
        return self.pods is not None and self.pods.due()

    def refresh(self) -> list[Any]:
        """Resolve the target again; returns the channels of pods that left, to be closed."""
        assert self.pods is not None
        self.pods.refresh()
        current = set(self.pods.addresses)
        with self._lock:
            gone = [address for address in self._stubs if address is not None and address not in current]
            return [self._stubs.pop(address).channel for address in gone]

    def failed(self, address: str | None, error: Any) -> bool:
        """Note a failed attempt; True when the call may go on to the next address. A pod is set
        aside only for transport failures (a worker's own UNAVAILABLE answers carry a reason)."""
        if address is None or self.pods is None or error.code != grpc.StatusCode.UNAVAILABLE:
            return False
        if not error.reason:
            self.pods.failed(address)
        return True

    def answered(self, address: str | None) -> None:
        if address is not None and self.pods is not None:
            self.pods.answered(address)

    def channels(self) -> list[Any]:
        with self._lock:
            channels = [stubs.channel for stubs in self._stubs.values()]
            self._stubs.clear()
            return channels
