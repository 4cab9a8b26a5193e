"""What the adapter manager keeps per adapter (the records its residency and store mirror share),
its limits, and the errors it answers with."""

from __future__ import annotations

import dataclasses
import logging
import re
import threading

from ortmux.worker.adapters.loading import Resident
from ortmux.worker.adapters.local_store import AdapterMeta, Key
from ortmux.worker.adapters.object_store import StoreUnavailable
from ortmux.worker.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

STORE_RETRY_SECONDS = 5.0
ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_adapter_id(adapter_id: str, field: str = "adapter_id") -> None:
    """InvalidArgument unless ``adapter_id`` is 1-128 letters, digits, '.', '_' or '-' starting
    with a letter or digit: checked when an adapter is registered and on every lookup, so no
    id reaches a path, a store key or the log that no registration could have made."""
    if not ADAPTER_ID.match(adapter_id or ""):
        raise InvalidArgument(
            f"adapter id {adapter_id[:300]!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field=field,
        )


@dataclasses.dataclass(frozen=True)
class AdapterLimits:
    max_adapter_bytes: int = 1 << 30
    max_upload_chunks: int = 1 << 20
    memory_budget_bytes: int = 2 << 30
    tenant_max_adapters: int = 0  # per tenant and model; 0: no quota
    tenant_max_adapter_bytes: int = 0  # stored bytes per tenant over all models; 0: no quota
    disk_bytes: int = 0  # the local cache of a shared store; 0: no bound
    store_lookups_per_second: float = 20.0  # per tenant, of ids this pod does not know


@dataclasses.dataclass
class Record:
    meta: AdapterMeta
    resident: Resident | None = None
    last_used_at: float = 0.0
    in_use: int = 0
    deleting: bool = False
    evicted: bool = False
    cached: bool = True  # its payload is on the local disk
    verified: bool = False  # that payload is known whole (written or checked by this process)
    loading: threading.Lock = dataclasses.field(default_factory=threading.Lock)


@dataclasses.dataclass
class AdapterCounters:
    registrations: int = 0
    evictions: int = 0
    reloads: int = 0
    load_seconds_total: float = 0.0
    disk_hits: int = 0
    disk_misses: int = 0  # loads that fetched the payload from the shared store
    disk_evictions: int = 0
    store_lookups: int = 0  # ids this pod did not know, looked up in the store
    sync_errors: int = 0
    collected_payloads: int = 0


class Records:
    """Every adapter the manager knows, by key, and the lock (a condition: deletes wait on it for
    requests to finish) over them; the manager, its :class:`~.residency.Residency` and its
    :class:`~.store_mirror.StoreMirror` share one."""

    def __init__(self) -> None:
        self.entries: dict[Key, Record] = {}
        self.pending: set[Key] = set()  # being registered or deleted right now
        self.counters = AdapterCounters()
        self.lock = threading.Condition()


def not_found(key: Key, field: str) -> NotFound:
    """Another tenant's adapter is answered exactly like a missing one."""
    model, _tenant, adapter_id = key
    return NotFound(f"adapter '{adapter_id}' is not registered on model '{model}'", field=field)


def exists_error(adapter_id: str, model: str) -> AlreadyExists:
    return AlreadyExists(
        f"adapter '{adapter_id}' already exists on model '{model}'; set replace to overwrite it",
        field="adapter_id",
    )


def store_down(exc: StoreUnavailable, consequence: str) -> Unavailable:
    """What a caller is told of a store failure: the store's address and keys stay in the log."""
    log.warning("%s; %s", exc, consequence)
    return Unavailable(
        f"{exc.public}; {consequence}", reason="ADAPTER_STORE_UNAVAILABLE", retry_after=STORE_RETRY_SECONDS
    )
