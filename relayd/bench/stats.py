"""The arithmetic of ``relayd bench``: percentiles, ratios, per-1,000 costs, and
the recorder one load phase fills.

Pure functions and plain data: no I/O, no clock (callers pass times in), so
every figure the bench prints can be checked on known data in a unit test.

Percentiles use the nearest-rank method: the p-th percentile of n sorted
values is the value at rank ``ceil(p / 100 * n)`` (1-based), so it is always
one of the measured values; p0 is the minimum, p100 the maximum, and there is
no percentile of nothing (``None``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "Distribution",
    "LoadRecorder",
    "per_thousand",
    "percent",
    "percentile",
    "rate",
    "ratio",
]


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 ≤ p ≤ 100) of ascending values.

    None for no values. Raises ValueError for p outside [0, 100].
    """
    if not 0 <= p <= 100:
        raise ValueError(f"a percentile is between 0 and 100, got {p}")
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is unknown or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def percent(value: float | None, reference: float | None) -> float | None:
    """``value`` as a percentage of ``reference`` (None as for :func:`ratio`)."""
    share = ratio(value, reference)
    return None if share is None else share * 100


def per_thousand(cost: float | None, count: int) -> float | None:
    """``cost`` (CPU seconds, say) per 1,000 of ``count`` things; None for none."""
    if cost is None or count <= 0:
        return None
    return cost / count * 1000


def rate(count: int, seconds: float) -> float | None:
    """``count`` per second over ``seconds``; None for an empty interval."""
    if seconds <= 0:
        return None
    return count / seconds


@dataclass(frozen=True)
class Distribution:
    """Summary of a set of durations in seconds (None where there were none)."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        ordered = sorted(values)
        return cls(
            count=len(ordered),
            p50=percentile(ordered, 50),
            p90=percentile(ordered, 90),
            p99=percentile(ordered, 99),
            max=ordered[-1] if ordered else None,
        )

    def as_ms(self) -> dict[str, float | int | None]:
        """The JSON form: milliseconds, rounded to microseconds."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)

        return {
            "count": self.count,
            "p50_ms": ms(self.p50),
            "p90_ms": ms(self.p90),
            "p99_ms": ms(self.p99),
            "max_ms": ms(self.max),
        }


@dataclass
class LoadRecorder:
    """What the clients of one load phase saw.

    ``started`` is when the first request was sent and ``finished`` when the
    last one ended (both on the caller's clock). Successful req/s is
    ``ok / (finished - started)``: clients stop sending when the phase ends and
    the requests still under way then are waited for, so an agent-bound phase
    (answers in waves) is not cut in the middle of a wave.

    A phase may come in several windows (units measured in turns): each
    window's time counts, from its first request to its last answer, and the
    time between windows does not.
    """

    started: float | None = None
    finished: float | None = None
    earlier_windows: float = 0.0  # elapsed time of the windows already ended
    sent: int = 0
    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    queue_waits: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def request_sent(self, now: float) -> None:
        self.sent += 1
        if self.started is None:
            self.started = now

    def request_done(self, now: float, status: int | None, latency: float) -> None:
        """One request ended: ``status`` None means no HTTP answer (a connection error)."""
        self.finished = now if self.finished is None else max(self.finished, now)
        if status == 200:
            self.ok += 1
            self.latencies.append(latency)
        else:
            self.errors["connection" if status is None else str(status)] += 1

    def queue_wait(self, seconds: float) -> None:
        self.queue_waits.append(seconds)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def end_window(self) -> None:
        """The clients paused: what follows is timed as a new window."""
        self.earlier_windows = self.elapsed
        self.started = self.finished = None

    @property
    def elapsed(self) -> float:
        if self.started is None or self.finished is None:
            return self.earlier_windows
        return self.earlier_windows + self.finished - self.started

    def requests_per_second(self) -> float | None:
        """Successful requests per second; None before any request ended."""
        return rate(self.ok, self.elapsed)
