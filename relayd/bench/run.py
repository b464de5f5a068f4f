"""``relayd bench``: the command line, and one Trio run of the chosen scenarios.

Exit codes: 0 the bench ran (whatever the figures; with ``--check``, only when
every target passed), 1 it could not run (a server did not start, the relay
could not be reached) or, with ``--check``, a target failed; 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import trio

from relayd.bench.httpclient import HttpError
from relayd.bench.model import ScenarioResult, Settings
from relayd.bench.procs import (
    CpuPlan,
    OpenFilesLimit,
    ServerStartError,
    raise_open_files_limit,
)
from relayd.bench.report import Progress, build_report, evaluate, format_table
from relayd.bench.scenarios import OWN_RELAYD_ONLY, SCENARIOS, Bench, units_for
from relayd.bench.sinks import SinkStartError
from relayd.bench.tls import TlsSetupError

__all__ = ["build_parser", "main"]


# Seconds of load per scenario when --duration is not given (pool-1000 runs longer).
DEFAULT_DURATION = 20.0


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd bench",
        description=(
            "Load-test relayd with simulated agents and HTTP clients. Without --url it "
            "starts its own relayd (embedded defaults, a temporary state directory) on a "
            "free loopback port, one per scenario, and stops it afterwards."
        ),
        epilog="Scenarios: " + ", ".join(SCENARIOS) + ". Example: relayd bench --scenario all",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="a scenario to run (repeatable, or comma-separated; default: all)",
    )
    parser.add_argument(
        "--duration",
        type=_positive(float),
        metavar="SECONDS",
        help="load time per scenario (default 20; pool-1000: 15 agent delays, 30 s); "
        "idle-10000 measures for max(this, the heartbeat interval)",
    )
    parser.add_argument(
        "--requests",
        type=_positive(int),
        metavar="N",
        help="stop each load phase after N requests instead",
    )
    parser.add_argument(
        "--clients",
        type=_positive(int),
        metavar="N",
        help="HTTP clients for every load scenario (default 1, 32 or 2000; stream-32: 32 streams)",
    )
    parser.add_argument(
        "--agents",
        type=_positive(int),
        metavar="N",
        help="answering agents (default 8; pool-1000: 1000; stream-32: one per client)",
    )
    parser.add_argument(
        "--idle-agents",
        type=_positive(int),
        metavar="N",
        help="idle agents of idle-10000 and busy agents of wide-dispatch (default 10000)",
    )
    parser.add_argument(
        "--delay",
        type=float,
        metavar="SECONDS",
        help="agents' reply delay (default 0; pool-1000: 2)",
    )
    parser.add_argument(
        "--capacity",
        type=_positive(int),
        default=1,
        metavar="N",
        help="requests an agent takes at once: relayd's agents.max_inflight (default 1)",
    )
    parser.add_argument(
        "--scale",
        type=_positive(float),
        default=1.0,
        metavar="FACTOR",
        help="multiply agent and client counts (0.01 for a smoke run)",
    )
    parser.add_argument(
        "--heartbeat",
        type=_positive(float),
        default=15.0,
        metavar="SECONDS",
        help="relayd's agents.heartbeat_interval (default 15)",
    )
    parser.add_argument(
        "--url",
        help="use this relayd (http://host:port) instead of starting "
        "one: no CPU or memory figures then",
    )
    parser.add_argument(
        "--key",
        help="with --url: the token clients send (the admin key also lets the bench count agents)",
    )
    parser.add_argument("--agent-key", help="with --url: the key agents present")
    parser.add_argument(
        "--baseline-server",
        choices=("hypercorn", "guarded"),
        default="hypercorn",
        help="serve the baseline with hypercorn.trio.serve (default) or relayd's patched "
        "serve() (to see what relayd's Hypercorn fixes cost)",
    )
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="measure each scenario alone, one after the other, instead of letting the "
        "loads of baseline-1/relay-1, of baseline-32/relay-32/v1-chat-32/relay-32-tls/"
        "wide-dispatch and of bare-stream-32/stream-32 take turns in 2 s windows (always "
        "so with --url: those share the one relayd)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the servers and the bench run on any CPU (by default the servers share "
        "the last CPU and the bench keeps the others, when there are two or more)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="keep the servers' logs, configs and state directories in DIR (a new, empty "
        "directory) instead of a temporary one",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="show the progress line even when stderr is not a terminal",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [name.strip() for arg in (args.scenario or ["all"]) for name in arg.split(",")]
    try:
        units = units_for([name for name in names if name])
    except ValueError as error:
        parser.error(str(error))
    if args.delay is not None and args.delay < 0:
        parser.error("--delay must not be negative")
    if args.url and not args.key:
        parser.error("--url needs --key")
    if args.url:
        own = [unit for unit in units if unit in OWN_RELAYD_ONLY]
        named = [unit for unit in own if unit in names]
        if named:
            parser.error(f"{', '.join(named)} starts a relayd of its own: not with --url")
        if own:
            units = [unit for unit in units if unit not in OWN_RELAYD_ONLY]
            print(
                f"relayd bench: {', '.join(own)} left out (it starts a relayd of its own)",
                file=sys.stderr,
            )
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    if args.capacity > 1000:
        parser.error("--capacity is at most 1000 (relayd's agents.max_inflight)")
    settings = Settings(
        duration=DEFAULT_DURATION if args.duration is None else args.duration,
        duration_given=args.duration is not None,
        requests=args.requests,
        clients=args.clients,
        agents=args.agents,
        idle_agents=args.idle_agents,
        delay=args.delay,
        capacity=args.capacity,
        scale=args.scale,
        heartbeat=args.heartbeat,
        url=args.url,
        key=args.key,
        agent_key=args.agent_key,
        baseline_server=args.baseline_server,
        in_turns=not args.one_at_a_time and args.url is None,
    )
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    files = raise_open_files_limit()
    progress = Progress(args.progress or sys.stderr.isatty())
    if files.raised and progress.enabled:
        print(
            f"relayd bench: raised the open-files limit from {files.before} to {files.soft}",
            file=sys.stderr,
        )
    try:
        with CpuPlan.pinned(not args.no_pin) as cpus:
            results = trio.run(_run, settings, units, files, progress, args.workdir, cpus)
    except (ServerStartError, SinkStartError, TlsSetupError, HttpError, OSError) as error:
        progress.clear()
        print(f"relayd bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.clear()
        print("relayd bench: interrupted", file=sys.stderr)
        return 130
    progress.clear()
    report = build_report(settings, results, files, cpus)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    if args.check and any(check.passed is False for check in evaluate(results)):
        return 1
    return 0


async def _run(
    settings: Settings,
    units: list[str],
    files: OpenFilesLimit,
    progress: Progress,
    workdir: Path | None,
    cpus: CpuPlan,
) -> dict[str, ScenarioResult]:
    if workdir is not None:
        return await Bench(settings, workdir, files, progress, cpus=cpus).run(units)
    with tempfile.TemporaryDirectory(prefix="relayd-bench-") as scratch:
        return await Bench(settings, Path(scratch), files, progress, cpus=cpus).run(units)
