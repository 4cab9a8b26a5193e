"""Per-tenant quotas: requests in flight, requests per second, generated tokens per minute (no
gRPC here)."""

from __future__ import annotations

import collections
import threading
import time

from ortmux.worker.errors import ResourceExhausted


class TokenBuckets:
    """One token bucket per key, refilled at ``rate`` a second up to ``capacity`` (one second's
    worth unless given; call with a lock held)."""

    def __init__(self, rate: float, capacity: float | None = None) -> None:
        self.rate = rate
        self.capacity = rate if capacity is None else capacity
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def take(self, key: str, amount: float = 1.0) -> float:
        """Take ``amount`` tokens; returns 0, or the seconds until they are there (nothing taken)."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < amount:
            self._buckets[key] = (tokens, now)
            return (amount - tokens) / self.rate
        self._buckets[key] = (tokens - amount, now)
        return 0.0

    def give(self, key: str, amount: float) -> None:
        """Put back tokens taken but not used."""
        tokens, last = self._buckets.get(key, (self.capacity, time.monotonic()))
        self._buckets[key] = (min(self.capacity, tokens + amount), last)


class RequestQuotas:
    """Admission of inference requests per tenant. A limit of 0 means no quota."""

    def __init__(self, max_in_flight: int = 0, max_per_second: float = 0.0) -> None:
        self.max_in_flight = max_in_flight
        self.max_per_second = max_per_second
        self._lock = threading.Lock()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._rates = TokenBuckets(max_per_second) if max_per_second else None

    def admit(self, tenant: str) -> None:
        """Count a request in, or raise RESOURCE_EXHAUSTED naming the quota it would pass."""
        with self._lock:
            if self.max_in_flight and self._in_flight[tenant] >= self.max_in_flight:
                raise ResourceExhausted(
                    f"tenant '{tenant}' has {self._in_flight[tenant]} requests in flight, its quota "
                    f"(tenant_max_in_flight = {self.max_in_flight})",
                    reason="QUOTA_IN_FLIGHT",
                    retry_after=0.1,
                )
            wait = self._rates.take(tenant) if self._rates else 0.0
            if wait:
                raise ResourceExhausted(
                    f"tenant '{tenant}' is over its rate quota "
                    f"(tenant_max_requests_per_second = {self.max_per_second:g})",
                    reason="QUOTA_RATE",
                    retry_after=wait,
                )
            self._in_flight[tenant] += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            self._in_flight[tenant] -= 1
            if self._in_flight[tenant] <= 0:
                del self._in_flight[tenant]


class TokenQuota:
    """Generated tokens per tenant and minute (0: no quota): a generation takes its
    ``max_new_tokens`` when it is admitted and gives back what it did not generate."""

    def __init__(self, per_minute: int = 0) -> None:
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._buckets = TokenBuckets(per_minute / 60.0, capacity=per_minute) if per_minute else None

    def take(self, tenant: str, tokens: int) -> None:
        if self._buckets is None:
            return
        if tokens > self.per_minute:
            raise ResourceExhausted(
                f"a generation of {tokens} tokens is more than tenant '{tenant}' may generate in a "
                f"minute (tenant_max_generated_tokens_per_minute = {self.per_minute}); ask for fewer",
                reason="QUOTA_TOKENS",
            )
        with self._lock:
            wait = self._buckets.take(tenant, tokens)
        if wait:
            raise ResourceExhausted(
                f"tenant '{tenant}' is over its generated-token quota "
                f"(tenant_max_generated_tokens_per_minute = {self.per_minute})",
                reason="QUOTA_TOKENS",
                retry_after=wait,
            )

    def give_back(self, tenant: str, tokens: int) -> None:
        if self._buckets is not None and tokens > 0:
            with self._lock:
                self._buckets.give(tenant, tokens)
