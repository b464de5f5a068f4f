"""The bench's data: what the command line asked for, and what one unit measured.

Plain dataclasses, no I/O. :class:`ScenarioResult` is the JSON report's
per-scenario object: every field is always there, None when it was not
measured (a CPU figure against ``--url``, latency in an idle scenario).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relayd.bench.stats import Distribution

__all__ = ["REFERENCE_HEARTBEAT", "ScenarioResult", "Settings"]

REFERENCE_HEARTBEAT = 15.0


@dataclass(frozen=True)
class Settings:
    """The command line, as the scenarios see it. None means the scenario's default."""

    duration: float = 10.0
    duration_given: bool = False  # --duration was on the command line
    requests: int | None = None
    clients: int | None = None
    agents: int | None = None
    idle_agents: int | None = None
    delay: float | None = None
    capacity: int = 1
    scale: float = 1.0
    heartbeat: float = REFERENCE_HEARTBEAT
    url: str | None = None
    key: str | None = None
    agent_key: str | None = None
    baseline_server: str = "hypercorn"  # or "guarded": relayd's patched serve()
    in_turns: bool = True  # units of a group take turns (False: --one-at-a-time)

    def scaled(self, default: int, override: int | None) -> int:
        """A count of agents or clients: the override or default, times ``scale``, ≥ 1."""
        return max(1, round((override if override is not None else default) * self.scale))


@dataclass
class ScenarioResult:
    """Every figure of one unit; the JSON report has all of them (None: not measured)."""

    name: str
    description: str = ""
    server: str | None = None  # "relayd", "baseline" or "external"
    server_pid: int | None = None
    clients: int = 0
    agents: int = 0  # agents that answer
    idle_agents: int = 0  # agents that are connected but idle (or busy, for wide-dispatch)
    capacity: int | None = None
    delay_s: float | None = None
    duration_s: float | None = None
    requests_sent: int = 0
    requests_ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_count: int = 0
    req_per_s: float | None = None
    latency: dict[str, float | int | None] = field(
        default_factory=lambda: Distribution.of([]).as_ms()
    )
    queue_wait: dict[str, float | int | None] = field(
        default_factory=lambda: Distribution.of([]).as_ms()
    )
    server_cpu_s: float | None = None
    server_cpu_wait_s: float | None = None  # runnable but waiting for a CPU
    server_cpu_s_per_1000: float | None = None
    server_rss_bytes: int | None = None
    server_peak_rss_bytes: int | None = None
    bench_cpu_s: float | None = None
    bench_cpu_s_per_1000: float | None = None
    bench_gc_s: float | None = None  # this process's garbage-collection pauses meanwhile
    other_cpu_s: float | None = None  # used by every other process on the machine meanwhile
    agents_connected: int | None = None
    agents_busy: int | None = None
    endpoint: str | None = None  # what its clients ask ("POST /api/ask"), for the load units
    reference: str | None = None
    ratio: float | None = None  # req/s (deltas/s when streamed) as a share of the reference's
    # The server's CPU per request (per delta when streamed) as a share of the
    # reference's: v1-chat-32's target, and relay-32-tls's cost of TLS.
    cpu_ratio: float | None = None
    limit_req_per_s: float | None = None
    percent_of_limit: float | None = None
    rss_before_bytes: int | None = None
    rss_after_bytes: int | None = None
    rss_per_agent_bytes: float | None = None
    window_s: float | None = None
    heartbeat_s: float | None = None
    cpu_percent: float | None = None
    cpu_percent_at_15s: float | None = None
    # Streamed answers (stream-32 and its bare loop): deltas per answer, deltas
    # received by the clients, per second of the windows, their added latency
    # (client's receive time minus the agent's send time), CPU per delta.
    deltas_per_answer: int | None = None
    deltas: int = 0
    deltas_per_s: float | None = None
    delta_latency: dict[str, float | int | None] = field(
        default_factory=lambda: Distribution.of([]).as_ms()
    )
    server_cpu_us_per_delta: float | None = None
    bench_cpu_us_per_delta: float | None = None
    # TLS (relay-32-tls): what made the certificate ("cryptography 50.0.2", "openssl
    # (OpenSSL 3.0.19 ...)") and what a client negotiated ("TLSv1.3 TLS_AES_256_GCM_SHA384").
    tls_certificate_by: str | None = None
    tls_session: str | None = None
    notes: list[str] = field(default_factory=list)
