"""Which pod a call goes to: adapter affinity over every pod of a target.

A target with several pods (a list of ``host:port``, or a ``dns:///`` name, resolved here again
every ``refresh_seconds``) gets one channel per pod. A call on an adapter goes to the pod that
rendezvous hashing on (model, adapter) ranks first, so each adapter stays resident on one pod
and a pod that leaves moves only its own share; base-only calls take the pods in turn. A pod that
answered UNAVAILABLE is tried last for a few seconds, and an idempotent call that finds a pod
unavailable goes to the next in its order (any pod can serve any adapter from the shared store).

Calls also carry the adapter in headers, so a proxy (Envoy, Istio) with a ring-hash route on
``x-ortmux-adapter`` gives clients in other languages the same affinity.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import socket
import threading
import time
from collections.abc import Sequence

import grpc

from ortmux.client._channel import resolve_address
from ortmux.client._errors import FieldViolation, OrtmuxError

MODEL_HEADER = "x-ortmux-model"
ADAPTER_HEADER = "x-ortmux-adapter"
DOWN_SECONDS = 3.0
DEFAULT_REFRESH_SECONDS = 30.0


Route = tuple[str, str | None]  # (model, adapter); a call without an adapter has no affinity


def route_headers(route: Route | None) -> tuple[tuple[str, str], ...]:
    """The headers a proxy hashes on: a call's model and adapter (none without an adapter).

    A name gRPC metadata cannot carry (non-ASCII, control characters) is refused here with
    INVALID_ARGUMENT, as the worker would refuse it: its names and ids are ASCII."""
    if route is None or not route[1]:
        return ()
    for field, value in (("model", route[0]), ("adapter", route[1])):
        if not _SENDABLE.fullmatch(value):
            raise OrtmuxError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field} {value!r} is not a valid name: use printable ASCII (adapter ids: letters, "
                "digits, '.', '_' or '-')",
                reason="INVALID_ARGUMENT",
                field_violations=(FieldViolation(field, "not printable ASCII"),),
            )
    return ((MODEL_HEADER, route[0]), (ADAPTER_HEADER, route[1]))


_SENDABLE = re.compile(r"[\x20-\x7e]*")


def route_key(route: Route | None) -> str | None:
    """What rendezvous hashing ranks pods by: ``model/adapter``; None without an adapter."""
    if route is None or not route[1]:
        return None
    return f"{route[0]}/{route[1]}"


def is_routed(target: str | Sequence[str]) -> bool:
    """Several pods (a list of two or more, or a DNS name that may resolve to many)."""
    if isinstance(target, str):
        return target.startswith("dns:")
    return len(target) > 1


def rank(addresses: Sequence[str], key: str) -> list[str]:
    """Rendezvous (highest random weight) order of ``addresses`` for ``key``."""

    def weight(address: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{address}".encode(), digest_size=8).digest()

    return sorted(addresses, key=weight, reverse=True)


class Pods:
    """The pod addresses behind a target, and the order a call tries them in. Thread-safe."""

    def __init__(self, target: str | Sequence[str], refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> None:
        self._lock = threading.Lock()
        self._down: dict[str, float] = {}
        self._turn = itertools.count()
        self.refresh_seconds = refresh_seconds
        self._name: tuple[str, int] | None = None
        self._resolved_at = 0.0
        if isinstance(target, str):
            host, _, port = target.split("///", 1)[-1].rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"target '{target}' is not dns:///host:port")
            self._name = (host.strip("[]"), int(port))
            self._addresses: list[str] = []
            self.refresh()
        else:
            self._addresses = sorted({resolve_address(entry) for entry in target})

    @property
    def addresses(self) -> list[str]:
        with self._lock:
            return list(self._addresses)

    def due(self) -> bool:
        """Whether a DNS target should be resolved again."""
        return self._name is not None and time.monotonic() - self._resolved_at > self.refresh_seconds

    def refresh(self) -> None:
        """Resolve a DNS target again (blocking); keeps the old addresses if it fails."""
        if self._name is None:
            return
        host, port = self._name
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            if not self._addresses:
                raise
            return
        addresses = sorted({_format(info[4][0], port) for info in found})
        with self._lock:
            self._addresses = addresses
            self._resolved_at = time.monotonic()

    def order(self, route: Route | None, count: int) -> list[str]:
        """The ``count`` addresses a call on ``route`` tries, in turn (repeating when there are
        fewer pods): by rendezvous rank for a call on an adapter, else starting at the next pod in
        turn; pods that were unavailable in the last seconds go last."""
        key = route_key(route)
        with self._lock:
            addresses = list(self._addresses)
            now = time.monotonic()
            down = {address for address, until in self._down.items() if until > now}
        if not addresses:
            raise ValueError("the target resolves to no address")
        if key is None:
            start = next(self._turn) % len(addresses)
            ordered = addresses[start:] + addresses[:start]
        else:
            ordered = rank(addresses, key)
        ordered = [a for a in ordered if a not in down] + [a for a in ordered if a in down]
        return [ordered[index % len(ordered)] for index in range(max(count, 1))]

    def failed(self, address: str) -> None:
        with self._lock:
            self._down[address] = time.monotonic() + DOWN_SECONDS

    def answered(self, address: str) -> None:
        if address in self._down:
            with self._lock:
                self._down.pop(address, None)


def _format(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
