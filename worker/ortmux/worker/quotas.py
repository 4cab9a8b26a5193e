"""Per-tenant request quotas: requests in flight and requests per second (no gRPC here)."""

from __future__ import annotations

import collections
import threading
import time

from ortmux.worker.errors import ResourceExhausted


class TokenBuckets:
    """One token bucket per key, refilled at ``rate`` a second up to one second's worth (call
    with a lock held)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def take(self, key: str) -> float:
        """Take a token; returns 0, or the seconds until one is there (nothing taken)."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.rate, now))
        tokens = min(self.rate, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0


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
