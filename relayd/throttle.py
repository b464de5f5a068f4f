"""Throttling failed authentication per client address and per network prefix.

What it protects: credentials an operator may have chosen by hand (the admin
key, agent keys), which could be weak enough to guess. What it does not
touch: user tokens, which relayd generates with 256 bits of randomness and
nobody guesses, so a request with a valid user token is served even from a
locked address (:class:`relayd.web.Gate` checks it first, for one hash and
one lookup). One broken client behind a household or office NAT then locks
out only the guessable credentials, never its neighbours' requests.

Every failure spends a token from two buckets: its address's (``burst``
failures, refilled one per ``interval``) and its network prefix's (IPv4 /24
and IPv6 /64 by default, ``prefix_burst`` failures, the same refill), so an
attacker who owns a whole /64 (every IPv6 customer does) gets no more guesses
than ``prefix_burst``. A key with no token left is refused (429 with
Retry-After) before its credentials are even checked, so a brute force costs
the attacker time and relayd nothing.

Memory is bounded: at most ``max_entries`` buckets per kind. Eviction cannot
erase a lockout cheaply: only a bucket that is not locked (it would allow an
attempt now) is evicted, least recently failed first. When the table is full
of locked buckets, failures of keys without a bucket of their own share one
overflow bucket, and so do their checks: flooding the table from thousands of
addresses ends with those addresses (and any other newcomer) sharing a single
lockout, not with the earlier lockouts erased. Time is passed in, so tests
control it.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["FailureThrottle", "network_prefix"]

# How far from the least recently failed end eviction looks for a bucket that
# is not locked before it counts the table as full of lockouts.
_EVICTION_LOOKAHEAD = 16


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True, slots=True)
class _Rate:
    burst: int
    interval: float


class _BucketTable:
    """Token buckets by key, bounded in number; see the module docstring."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._overflow: _Bucket | None = None  # shared by untracked keys once full

    def __len__(self) -> int:
        return len(self._buckets)

    def tokens(self, key: str, rate: _Rate, now: float) -> float:
        """Attempts ``key`` may still fail now (fractional while refilling)."""
        bucket = self._buckets.get(key, self._overflow)
        if bucket is None:
            return float(rate.burst)
        _refill(bucket, rate, now)
        return bucket.tokens

    def spend(self, key: str, rate: _Rate, now: float, count: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
        elif len(self._buckets) < self.max_entries or self._evict_one(rate, now):
            bucket = self._buckets[key] = _Bucket(float(rate.burst), now)
        else:
            if self._overflow is None:
                self._overflow = _Bucket(float(rate.burst), now)
            bucket = self._overflow
        _refill(bucket, rate, now)
        bucket.tokens = max(0.0, bucket.tokens - count)

    def _evict_one(self, rate: _Rate, now: float) -> bool:
        for looked, (key, bucket) in enumerate(self._buckets.items()):
            if looked >= _EVICTION_LOOKAHEAD:
                return False
            _refill(bucket, rate, now)
            if bucket.tokens >= 1:
                del self._buckets[key]
                return True
        return False


def _refill(bucket: _Bucket, rate: _Rate, now: float) -> None:
    if rate.interval > 0:
        gained = (now - bucket.updated) / rate.interval
        bucket.tokens = min(float(rate.burst), bucket.tokens + gained)
    else:
        bucket.tokens = float(rate.burst)
    bucket.updated = now


@lru_cache(maxsize=4096)
def network_prefix(address: str, ipv4_bits: int, ipv6_bits: int) -> str | None:
    """The network an address is counted in (``203.0.113.0/24``), or None for
    what is not an IP address (a Unix socket's peer)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ipaddress.IPv4Network((ip, ipv4_bits), strict=False))
    return str(ipaddress.IPv6Network((ip, ipv6_bits), strict=False))


class FailureThrottle:
    """Failed-authentication buckets per address and per prefix. See the module docstring."""

    def __init__(
        self,
        *,
        burst: int,
        interval: float,
        prefix_burst: int | None = None,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 64,
        max_entries: int = 10_000,
    ) -> None:
        self._addresses = _BucketTable(max_entries)
        self._prefixes = _BucketTable(max_entries)
        self.configure(
            burst=burst,
            interval=interval,
            prefix_burst=burst * 4 if prefix_burst is None else prefix_burst,
            ipv4_prefix=ipv4_prefix,
            ipv6_prefix=ipv6_prefix,
        )

    def configure(
        self,
        *,
        burst: int,
        interval: float,
        prefix_burst: int,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 64,
    ) -> None:
        self._address_rate = _Rate(burst, interval)
        self._prefix_rate = _Rate(prefix_burst, interval)
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix

    def __len__(self) -> int:
        """Addresses with a bucket of their own."""
        return len(self._addresses)

    def _prefix(self, address: str) -> str | None:
        return network_prefix(address, self.ipv4_prefix, self.ipv6_prefix)

    def allowance(self, address: str, now: float) -> int:
        """How many more failures ``address`` may have now (0: it is locked)."""
        tokens = self._addresses.tokens(address, self._address_rate, now)
        prefix = self._prefix(address)
        if prefix is not None:
            tokens = min(tokens, self._prefixes.tokens(prefix, self._prefix_rate, now))
        return math.floor(tokens)

    def retry_after(self, address: str, now: float) -> float | None:
        """Seconds until ``address`` may try again, or None if it may try now."""
        wait = 0.0
        for table, key, rate in self._buckets_of(address):
            tokens = table.tokens(key, rate, now)
            if tokens < 1:
                wait = max(wait, (1 - tokens) * rate.interval)
        return wait or None

    def failed(self, address: str, now: float, count: int = 1) -> None:
        """Record ``count`` failed attempts from ``address``."""
        for table, key, rate in self._buckets_of(address):
            table.spend(key, rate, now, count)

    def _buckets_of(self, address: str) -> list[tuple[_BucketTable, str, _Rate]]:
        buckets = [(self._addresses, address, self._address_rate)]
        prefix = self._prefix(address)
        if prefix is not None:
            buckets.append((self._prefixes, prefix, self._prefix_rate))
        return buckets
