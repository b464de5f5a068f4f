"""Throttling failed authentication per client address.

Each address has a token bucket of ``burst`` failures that refills one token
every ``interval``. A failure spends a token; an address with no token left is
refused (429 with Retry-After) before its credentials are even checked, so a
brute force costs the attacker time and relayd nothing. Successes spend
nothing and are never slowed, and other addresses are not affected.

Memory is bounded: at most ``max_addresses`` buckets, least recently failed
dropped first (a dropped bucket was full again anyway, or belongs to an
address that has moved on). Time is passed in, so tests control it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["FailureThrottle"]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class FailureThrottle:
    def __init__(self, *, burst: int, interval: float, max_addresses: int = 10_000) -> None:
        self.burst = burst
        self.interval = interval
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def configure(self, *, burst: int, interval: float) -> None:
        self.burst = burst
        self.interval = interval

    def __len__(self) -> int:
        return len(self._buckets)

    def _refill(self, bucket: _Bucket, now: float) -> None:
        if self.interval > 0:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) / self.interval)
        else:
            bucket.tokens = self.burst
        bucket.updated = now

    def retry_after(self, address: str, now: float) -> float | None:
        """Seconds until ``address`` may try again, or None if it may try now."""
        bucket = self._buckets.get(address)
        if bucket is None:
            return None
        self._refill(bucket, now)
        if bucket.tokens >= 1:
            return None
        return (1 - bucket.tokens) * self.interval

    def failed(self, address: str, now: float) -> None:
        """Record a failed attempt from ``address``."""
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[address] = bucket
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
        else:
            self._refill(bucket, now)
            self._buckets.move_to_end(address)
        bucket.tokens = max(0.0, bucket.tokens - 1)
