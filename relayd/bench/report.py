"""What the bench prints: the live progress line, the table, the JSON, the targets.

Targets (from the issue) are checked here, beside the figures:

=============  ===========================================================
relay-1/-32    ≥ 60 % of the baseline's req/s at the same client count; 0 errors
pool-1000      ≥ 95 % of the agent-bound limit (agents * capacity / delay); 0 errors
idle-10000     ≤ 25 KiB RSS per idle agent; heartbeat CPU ≤ 5 % of a core at 15 s
wide-dispatch  ≥ 90 % of relay-32's req/s
v1-chat-32     relayd's CPU per request ≤ 115 % of relay-32's (the OpenAI
               surface may cost at most 15 % more than /api/ask); 0 errors
relay-32-tls   0 errors (what TLS costs is reported, against relay-32: req/s
               and relayd's CPU per request; no target is set for it)
stream-32      ≥ 50 % of bare-stream-32's deltas/s; ≥ 20,000 deltas/s (relayd is
               on one CPU); added latency per delta p99 ≤ 5 ms; 0 errors
v1-stream-32   stream-32's targets, through /v1/chat/completions
=============  ===========================================================
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from relayd.bench.model import ScenarioResult, Settings
from relayd.bench.procs import UNPINNED, CpuPlan, OpenFilesLimit

__all__ = ["Check", "Progress", "build_report", "evaluate", "format_table"]

RSS_PER_AGENT_TARGET = 25 * 1024
HEARTBEAT_CPU_TARGET = 5.0
STREAM_SHARE_TARGET = 50.0  # % of the bare loop's deltas/s
STREAM_RATE_TARGET = 20_000.0  # deltas/s
STREAM_P99_TARGET_MS = 5.0
CHAT_CPU_TARGET = 115.0  # % of relay-32's relayd CPU per request


class Progress:
    """One line on ``stream`` rewritten in place; silent unless ``enabled``."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._shown = False

    def __call__(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
            self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


@dataclass(frozen=True)
class Check:
    """One target: ``passed`` is None when the figure was not measured."""

    scenario: str
    measure: str
    value: float | None
    unit: str
    target: str
    passed: bool | None


def _check(
    scenario: str, measure: str, value: float | None, unit: str, target: str, ok: bool | None
) -> Check:
    return Check(scenario, measure, value, unit, target, None if value is None else ok)


def evaluate(results: dict[str, ScenarioResult]) -> list[Check]:
    checks: list[Check] = []
    for name in ("relay-1", "relay-32"):
        result = results.get(name)
        if result is None:
            continue
        share = None if result.ratio is None else result.ratio * 100
        checks.append(
            _check(
                name,
                f"req/s vs {result.reference or 'baseline'}",
                share,
                "%",
                "≥ 60 %",
                share is not None and share >= 60,
            )
        )
        checks.append(_check(name, "errors", result.error_count, "", "0", result.error_count == 0))
    pool = results.get("pool-1000")
    if pool is not None:
        value = pool.percent_of_limit
        checks.append(
            _check(
                "pool-1000",
                "req/s vs agent-bound limit",
                value,
                "%",
                "≥ 95 %",
                value is not None and value >= 95,
            )
        )
        checks.append(
            _check("pool-1000", "errors", pool.error_count, "", "0", pool.error_count == 0)
        )
    idle = results.get("idle-10000")
    if idle is not None:
        per_agent = idle.rss_per_agent_bytes
        checks.append(
            _check(
                "idle-10000",
                "RSS per idle agent",
                None if per_agent is None else per_agent / 1024,
                "KiB",
                "≤ 25 KiB",
                per_agent is not None and per_agent <= RSS_PER_AGENT_TARGET,
            )
        )
        cpu = idle.cpu_percent_at_15s
        checks.append(
            _check(
                "idle-10000",
                "heartbeat CPU at 15 s",
                cpu,
                "% core",
                "≤ 5 %",
                cpu is not None and cpu <= HEARTBEAT_CPU_TARGET,
            )
        )
    wide = results.get("wide-dispatch")
    if wide is not None:
        share = None if wide.ratio is None else wide.ratio * 100
        checks.append(
            _check(
                "wide-dispatch",
                "req/s vs relay-32",
                share,
                "%",
                "≥ 90 %",
                share is not None and share >= 90,
            )
        )
    chat = results.get("v1-chat-32")
    if chat is not None:
        share = None if chat.cpu_ratio is None else chat.cpu_ratio * 100
        checks.append(
            _check(
                "v1-chat-32",
                f"relay CPU per request vs {chat.reference or 'relay-32'}",
                share,
                "%",
                "≤ 115 %",
                share is not None and share <= CHAT_CPU_TARGET,
            )
        )
        checks.append(
            _check("v1-chat-32", "errors", chat.error_count, "", "0", chat.error_count == 0)
        )
    tls = results.get("relay-32-tls")
    if tls is not None:
        checks.append(
            _check("relay-32-tls", "errors", tls.error_count, "", "0", tls.error_count == 0)
        )
    for unit in ("stream-32", "v1-stream-32"):  # /v1 is held to /api/ask's targets
        stream = results.get(unit)
        if stream is None:
            continue
        share = None if stream.ratio is None else stream.ratio * 100
        checks.append(
            _check(
                unit,
                f"deltas/s vs {stream.reference or 'bare-stream-32'}",
                share,
                "%",
                "≥ 50 %",
                share is not None and share >= STREAM_SHARE_TARGET,
            )
        )
        rate = stream.deltas_per_s
        checks.append(
            _check(
                unit,
                "deltas/s",
                rate,
                "/s",
                "≥ 20,000/s",
                rate is not None and rate >= STREAM_RATE_TARGET,
            )
        )
        p99 = stream.delta_latency["p99_ms"]
        checks.append(
            _check(
                unit,
                "added latency p99",
                p99,
                "ms",
                "≤ 5 ms",
                p99 is not None and p99 <= STREAM_P99_TARGET_MS,
            )
        )
        checks.append(_check(unit, "errors", stream.error_count, "", "0", stream.error_count == 0))
    return checks


def build_report(
    settings: Settings,
    results: dict[str, ScenarioResult],
    files: OpenFilesLimit,
    cpus: CpuPlan = UNPINNED,
) -> dict[str, Any]:
    """The whole report as JSON-ready data (what ``--json`` prints)."""
    return {
        "environment": {
            "cpus": os.cpu_count(),
            "server_cpus": sorted(cpus.servers),
            "bench_cpus": sorted(cpus.bench),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "open_files": {"before": files.before, "soft": files.soft, "hard": files.hard},
        },
        "settings": asdict(settings)
        | {
            "key": None if settings.key is None else "<set>",
            "agent_key": None if settings.agent_key is None else "<set>",
        },
        "scenarios": {name: asdict(result) for name, result in results.items()},
        "targets": [asdict(check) for check in evaluate(results)],
    }


# -- the table ---------------------------------------------------------------------------


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(str(cpu) for cpu in cpus)


def _ms(value: Any) -> str:
    if value is None:
        return "-"
    number = float(value)
    if number >= 100:
        return f"{number:.0f}"
    if number >= 10:
        return f"{number:.1f}"
    return f"{number:.2f}"


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1024**2:
        return f"{value / 1024**2:.1f} MiB"
    return f"{value / 1024:.1f} KiB"


def _columns(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def _cpu_line(result: dict[str, Any]) -> str:
    """Who used the CPUs during the measurement, and whether the server had to wait."""
    seconds = result["duration_s"] if result["requests_sent"] else result["window_s"]
    parts = []
    if result["server_cpu_s"] is not None:
        server = "relayd" if result["server"] == "relayd" else "the server"
        text = f"{server} used {result['server_cpu_s']:.2f} CPU s"
        if result["server_cpu_wait_s"] is not None:
            text += f" (and waited {result['server_cpu_wait_s']:.2f} s for a CPU)"
        parts.append(text)
    bench = f"the bench {result['bench_cpu_s']:.2f} CPU s"
    if (result["bench_gc_s"] or 0) >= 0.005:
        bench += f" (of which {result['bench_gc_s']:.2f} s in its own GC pauses)"
    parts.append(bench)
    if result["other_cpu_s"] is not None:
        parts.append(f"other processes {result['other_cpu_s']:.2f} CPU s")
    return ", ".join(parts) + (f" in {seconds:.1f}s" if seconds else "")


def _cpu_comparison(
    name: str, result: dict[str, Any], scenarios: dict[str, dict[str, Any]]
) -> str | None:
    """The server's CPU per request (per delta) against its reference's, if both were read."""
    reference = scenarios.get(result["reference"] or "")
    if result["cpu_ratio"] is None or reference is None:
        return None
    if result["deltas_per_answer"]:
        mine, theirs = result["server_cpu_us_per_delta"], reference["server_cpu_us_per_delta"]
        unit = "µs per delta"
    else:
        mine, theirs = result["server_cpu_s_per_1000"], reference["server_cpu_s_per_1000"]
        unit = "CPU s per 1,000 requests"
    return (
        f"{name}: the server's CPU per {'delta' if result['deltas_per_answer'] else 'request'} "
        f"is {result['cpu_ratio'] * 100:.1f} % of {result['reference']}'s "
        f"({mine:.3f} against {theirs:.3f} {unit}); "
        + ("deltas/s " if result["deltas_per_answer"] else "req/s ")
        + ("-" if result["ratio"] is None else f"{result['ratio'] * 100:.1f} %")
        + " of its"
    )


def _stream_table(scenarios: dict[str, dict[str, Any]]) -> list[str]:
    """The table of the units whose answers are streamed (figures per delta)."""
    rows = [
        [
            "scenario",
            "streams",
            "agents",
            "deltas/s",
            "ratio",
            "answers/s",
            "errors",
            "added p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "srv CPU µs/delta",
            "bench CPU µs/delta",
            "srv peak RSS",
        ]
    ]
    for name, result in scenarios.items():
        latency = result["delta_latency"]
        errors = (
            ", ".join(f"{status}:{n}" for status, n in result["errors"].items())
            if result["errors"]
            else "0"
        )
        rows.append(
            [
                name,
                str(result["clients"]),
                str(result["agents"]),
                _number(result["deltas_per_s"]),
                "-" if result["ratio"] is None else f"{result['ratio'] * 100:.0f}%",
                _number(result["req_per_s"]),
                errors,
                _ms(latency["p50_ms"]),
                _ms(latency["p90_ms"]),
                _ms(latency["p99_ms"]),
                _ms(latency["max_ms"]),
                _number(result["server_cpu_us_per_delta"], 1),
                _number(result["bench_cpu_us_per_delta"], 1),
                _size(result["server_peak_rss_bytes"]),
            ]
        )
    return _columns(rows, right=set(range(1, 14)) - {6})


def format_table(report: dict[str, Any]) -> str:
    """The human-readable report."""
    environment = report["environment"]
    settings = report["settings"]
    files = environment["open_files"]
    lines = [
        f"relayd bench: {environment['cpus']} CPUs, Python {environment['python']}, "
        f"duration {settings['duration']:g}s"
        + (f" or {settings['requests']} requests" if settings["requests"] else "")
        + (f", scale {settings['scale']:g}" if settings["scale"] != 1 else "")
        + f", open files {files['soft']}"
        + (f" (raised from {files['before']})" if files["soft"] > files["before"] else "")
        + (f", against {settings['url']}" if settings["url"] else ""),
        (
            f"servers on CPU {_cpu_list(environment['server_cpus'])}, the bench on CPU "
            f"{_cpu_list(environment['bench_cpus'])}"
            if environment["server_cpus"]
            else "servers and bench on any CPU"
        ),
        "",
    ]
    rows = [
        [
            "scenario",
            "clients",
            "agents",
            "req/s",
            "ratio",
            "errors",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "queue p50/p99 ms",
            "srv CPU s/1k",
            "bench CPU s/1k",
            "srv peak RSS",
            "connected",
        ]
    ]
    scenarios: dict[str, dict[str, Any]] = report["scenarios"]
    streaming = [name for name, result in scenarios.items() if result["deltas_per_answer"]]
    for name, result in scenarios.items():
        if name in streaming:
            continue
        latency, queue = result["latency"], result["queue_wait"]
        agents = str(result["agents"]) if result["agents"] else "-"
        if result["idle_agents"]:
            agents = f"{result['agents']}+{result['idle_agents']}"
        errors = (
            ", ".join(f"{status}:{n}" for status, n in result["errors"].items())
            if result["errors"]
            else "0"
        )
        is_load = result["requests_sent"] > 0
        rows.append(
            [
                name,
                str(result["clients"]) if result["clients"] else "-",
                agents,
                _number(result["req_per_s"]),
                "-" if result["ratio"] is None else f"{result['ratio'] * 100:.0f}%",
                errors if is_load else "-",
                _ms(latency["p50_ms"]),
                _ms(latency["p90_ms"]),
                _ms(latency["p99_ms"]),
                _ms(latency["max_ms"]),
                "-" if not queue["count"] else f"{_ms(queue['p50_ms'])}/{_ms(queue['p99_ms'])}",
                _number(result["server_cpu_s_per_1000"], 3) if is_load else "-",
                _number(result["bench_cpu_s_per_1000"], 3) if is_load else "-",
                _size(result["server_peak_rss_bytes"]),
                "-" if result["agents_connected"] is None else str(result["agents_connected"]),
            ]
        )
    if len(rows) > 1:
        lines += _columns(rows, right=set(range(1, 15)) - {5})
    if streaming:
        if len(rows) > 1:
            lines.append("")
        lines += _stream_table({name: scenarios[name] for name in streaming})
    details = []
    for name, result in scenarios.items():
        if result["limit_req_per_s"] is not None:
            details.append(
                f"{name}: {_number(result['req_per_s'])} req/s of an agent-bound limit of "
                f"{_number(result['limit_req_per_s'])} "
                f"({_number(result['percent_of_limit'], 1)} %)"
            )
        if result["window_s"] is not None:
            details.append(
                f"{name}: RSS {_size(result['rss_before_bytes'])} → "
                f"{_size(result['rss_after_bytes'])} with {result['idle_agents']} agents = "
                f"{_size(result['rss_per_agent_bytes'])} per agent; CPU "
                f"{_number(result['cpu_percent'], 2)} % of a core over "
                f"{result['window_s']:g}s with a {result['heartbeat_s']:g}s heartbeat"
            )
        comparison = _cpu_comparison(name, result, scenarios)
        if comparison:
            details.append(comparison)
        if result["bench_cpu_s"] is not None:
            details.append(f"{name}: {_cpu_line(result)}")
        for note in result["notes"]:
            details.append(f"{name}: {note}")
    if details:
        lines += ["", *details]
    checks = report["targets"]
    if checks:
        rows = [["target", "measure", "value", "goal", "result"]]
        for check in checks:
            value = check["value"]
            shown = "-" if value is None else f"{value:,.1f} {check['unit']}".rstrip()
            if check["unit"] == "" and value is not None:
                shown = f"{value:.0f}"
            verdict = {True: "pass", False: "FAIL", None: "n/a"}[check["passed"]]
            rows.append([check["scenario"], check["measure"], shown, check["target"], verdict])
        lines += ["", *_columns(rows, right={2})]
    lines += [
        "",
        "req/s: successful answers per second, from the first request sent to the last answer.",
        "latency: successful requests, client send to last byte. queue: client send to the",
        "request reaching a simulated agent (parsing, auth, dispatch queue, WebSocket hop).",
        "srv: the server process (relayd or the baseline); bench: clients + simulated agents.",
    ]
    if streaming:
        lines += [
            "deltas/s: deltas the clients received per second of the windows. added latency: a",
            "delta's receive time at the client minus its send time at the agent (one clock).",
        ]
    return "\n".join(lines)
