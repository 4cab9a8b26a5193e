"""Per-tenant request quotas: requests in flight and requests per second (no gRPC here)."""

from __future__ import annotations

import collections
import threading
import time

from ortmux.worker.errors import ResourceExhausted


class RequestQuotas:
    """Admission of inference requests per tenant. A limit of 0 means no quota."""

    def __init__(self, max_in_flight: int = 0, max_per_second: float = 0.0) -> None:
        self.max_in_flight = max_in_flight
        self.max_per_second = max_per_second
        self._lock = threading.Lock()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill)

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
            if self.max_per_second:
                now = time.monotonic()
                tokens, last = self._buckets.get(tenant, (self.max_per_second, now))
                tokens = min(self.max_per_second, tokens + (now - last) * self.max_per_second)
                if tokens < 1.0:
                    self._buckets[tenant] = (tokens, now)
                    raise ResourceExhausted(
                        f"tenant '{tenant}' is over its rate quota "
                        f"(tenant_max_requests_per_second = {self.max_per_second:g})",
                        reason="QUOTA_RATE",
                        retry_after=(1.0 - tokens) / self.max_per_second,
                    )
                self._buckets[tenant] = (tokens - 1.0, now)
            self._in_flight[tenant] += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            self._in_flight[tenant] -= 1
            if self._in_flight[tenant] <= 0:
                del self._in_flight[tenant]
