"""One load phase: N keep-alive clients sending ``POST /api/ask`` back to back
(or, for v1-chat-32, ``POST /v1/chat/completions``: a unit's :class:`Shape`).

Every client has one connection, opened before the clock starts (a few at a
time, so the server's listen backlog never overflows), and optionally one
warm-up request, so that connection set-up and the server's first-request
costs are not measured. Then each client sends its next request as soon as
the last answer came, until ``--duration`` is over or ``--requests`` have
been sent; the requests under way then are waited for (up to
:data:`DRAIN_TIMEOUT`). See :class:`relayd.bench.stats.LoadRecorder` for how
req/s is counted. Units measured together take turns in windows
(:meth:`LoadPhase.run_in_turns` says why and how).

CPU is read before and after from ``/proc``: the server's (used, and waited
for), the bench's (the clients and the simulated agents: this process and any
child simulating agents) and the whole machine's, so a figure taken on a busy
machine says so.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import resource
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count
from types import TracebackType
from typing import Any

import trio

from relayd.bench.fleet import Tracker, content_for
from relayd.bench.httpclient import HttpClient, HttpError
from relayd.bench.model import ScenarioResult, Settings
from relayd.bench.procs import ServerProcess, read_cpu_seconds, read_system_busy_seconds
from relayd.bench.servers import Target
from relayd.bench.stats import Distribution, LoadRecorder, per_thousand, rate

__all__ = [
    "ASK",
    "STREAM_ASK",
    "TURN",
    "V1_MODEL",
    "CpuSnapshot",
    "CpuTotals",
    "GcWatch",
    "Load",
    "LoadPhase",
    "Shape",
    "bench_cpu_seconds",
    "chat_shape",
    "cpu_seconds_of",
]

log = logging.getLogger("relayd.bench")

# Connections opened at once before a load phase (below Hypercorn's backlog of 100).
CONNECT_CONCURRENCY = 64
# Other processes using more than this share of a CPU during a measurement get a note.
OTHERS_NOTICED = 0.25
# After a load phase ends, how long requests still under way may take.
DRAIN_TIMEOUT = 60.0
PROGRESS_INTERVAL = 0.5
# Units measured together take turns in windows this long (see LoadPhase.run_in_turns).
TURN = 2.0
# Helpers resumed for their unit's turn have caught up once they use less than
# this share of a CPU over a CATCH_UP_STEP (or after CATCH_UP_LIMIT at most).
CAUGHT_UP = 0.3
CATCH_UP_STEP = 0.1
CATCH_UP_LIMIT = 5.0


def bench_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds_of(pids: Sequence[int]) -> float:
    """CPU seconds used so far by processes ``pids`` together (0 for one that is gone)."""
    return sum(read_cpu_seconds(pid) or 0.0 for pid in pids)


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far: the server's (used, waited for), this process's, the machine's."""

    server: float | None
    server_wait: float | None
    bench: float
    machine: float | None
    at: float  # time.monotonic()

    @classmethod
    def take(cls, server: ServerProcess | None, helpers: Sequence[int] = ()) -> CpuSnapshot:
        """``helpers``: pids of the bench's own child processes, counted as the bench."""
        return cls(
            server.cpu_seconds() if server else None,
            server.cpu_wait_seconds() if server else None,
            bench_cpu_seconds() + cpu_seconds_of(helpers),
            read_system_busy_seconds(),
            time.monotonic(),
        )

    def since(self, before: CpuSnapshot, result: ScenarioResult) -> None:
        """Fill in ``result``'s CPU figures for the time from ``before`` to this."""
        totals = CpuTotals()
        totals.add(before, self)
        totals.fill(result)


# The bench's youngest-generation threshold while it measures (see GcWatch).
YOUNG_THRESHOLD = 100_000


class GcWatch:
    """This process's garbage collection during a measurement: kept short, and timed.

    Setting a scenario up leaves the bench with many long-lived objects (10,000
    agents' connections). A full collection over them stops every client and
    agent at once, and the pause would be charged to relayd's latency. So a
    measurement starts with ``gc.collect(); gc.freeze()`` (what exists then is
    alive anyway and is not scanned again), and only the youngest generation is
    collected automatically until it ends: young cyclic garbage (Trio's
    cancellations) is still freed; objects that survive wait for the end.
    The youngest generation is collected every :data:`YOUNG_THRESHOLD` objects
    rather than every 700: thousands of clients and agents keep that many
    objects in flight, and at 700 the pauses added up to 0.7 s of a 30 s
    pool-1000 run, each one stalling every client and agent at once.
    Collections that still happen are timed into ``paused``.
    """

    def __init__(self) -> None:
        self.paused = 0.0
        self._started: float | None = None
        self._thresholds = gc.get_threshold()

    def __enter__(self) -> GcWatch:
        gc.collect()
        gc.freeze()
        self._thresholds = gc.get_threshold()
        gc.set_threshold(YOUNG_THRESHOLD, 1 << 30, 1 << 30)
        gc.callbacks.append(self._callback)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gc.callbacks.remove(self._callback)
        gc.set_threshold(*self._thresholds)
        gc.unfreeze()

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.paused += time.perf_counter() - self._started
            self._started = None


@dataclass
class CpuTotals:
    """CPU seconds summed over the windows of one unit's load (see :class:`CpuSnapshot`)."""

    server: float | None = 0.0
    server_wait: float | None = 0.0
    bench: float = 0.0
    machine: float | None = 0.0
    elapsed: float = 0.0

    def add(self, before: CpuSnapshot, after: CpuSnapshot) -> None:
        def plus(total: float | None, now: float | None, then: float | None) -> float | None:
            return None if total is None or now is None or then is None else total + now - then

        self.server = plus(self.server, after.server, before.server)
        self.server_wait = plus(self.server_wait, after.server_wait, before.server_wait)
        self.machine = plus(self.machine, after.machine, before.machine)
        self.bench += after.bench - before.bench
        self.elapsed += after.at - before.at

    def fill(self, result: ScenarioResult) -> None:
        """Put the totals in ``result``, with a note if the machine was busy meanwhile."""
        result.server_cpu_s = self.server
        result.server_cpu_wait_s = self.server_wait
        result.bench_cpu_s = self.bench
        if self.machine is not None:
            result.other_cpu_s = max(0.0, self.machine - self.bench - (self.server or 0))
        elapsed = self.elapsed
        if elapsed <= 0:
            return
        busy = []
        if result.other_cpu_s is not None and result.other_cpu_s > OTHERS_NOTICED * elapsed:
            busy.append(f"other processes used {result.other_cpu_s:.1f} CPU s in {elapsed:.1f}s")
        if result.server_cpu_wait_s is not None and result.server_cpu_wait_s > 0.05 * elapsed:
            busy.append(f"the server waited {result.server_cpu_wait_s:.1f} s for a CPU")
        if busy:
            result.notes.append(
                "the machine was busy (" + "; ".join(busy) + "): these figures are pessimistic"
            )


@dataclass(frozen=True)
class Shape:
    """What a unit's clients ask: the path, and the body of request number *n*
    (``template % content`` with the content :func:`~relayd.bench.fleet.content_for`
    gives, so that its agents can time it)."""

    path: str
    template: bytes  # one %s: the content, as JSON string text (it needs no escaping)
    warm_up: bytes  # the body of a client's warm-up request

    def body(self, number: int) -> bytes:
        return self.template % content_for(number).encode()


# relay-N, wide-dispatch, pool-1000: relayd's own API.
ASK = Shape("/api/ask", b'{"content": "%s"}', b'{"content": "warm-up"}')
# stream-32: relayd's own API, streamed.
STREAM_ASK = Shape(
    "/api/ask", b'{"content": "%s", "stream": true}', b'{"content": "warm-up", "stream": true}'
)
# The model v1-chat-32's requests name, and its relayd's agents.v1_model.
V1_MODEL = "bench"


def chat_shape(model: str | None = V1_MODEL, *, stream: bool = False) -> Shape:
    """v1-chat-32's requests (v1-stream-32's with ``stream``): an OpenAI chat
    completion of one user message (no model named when ``model`` is None)."""
    named = b"" if model is None else b'"model": ' + json.dumps(model).encode() + b", "
    streamed = b', "stream": true' if stream else b""
    return Shape(
        "/v1/chat/completions",
        b"{" + named + b'"messages": [{"role": "user", "content": "%s"}]' + streamed + b"}",
        b"{" + named + b'"messages": [{"role": "user", "content": "warm-up"}]' + streamed + b"}",
    )


@dataclass
class Load:
    """One unit of a load phase: what it loads, its clients, and what they saw."""

    result: ScenarioResult
    target: Target
    tracked: bool  # its agents report to the tracker: queue wait is measured
    clients: list[HttpClient] = field(default_factory=list)
    recorder: LoadRecorder = field(default_factory=LoadRecorder)
    cpu: CpuTotals = field(default_factory=CpuTotals)
    # The unit's own child processes simulating agents (wide-dispatch's busy
    # agents): their CPU is the bench's, and they are stopped while others load.
    helpers: list[int] = field(default_factory=list)
    left: float = 0.0  # load time still to give it
    gc_paused: float = 0.0
    shape: Shape = ASK  # what its clients ask
    opened: int = 0  # connections its clients had opened when the clock started


@dataclass
class LoadPhase:
    """What a load phase needs from the run: settings, the tracker, request numbers."""

    settings: Settings
    tracker: Tracker
    numbers: count[int]
    progress: Callable[[str], None]

    async def run(
        self,
        result: ScenarioResult,
        target: Target,
        *,
        tracked: bool,
        warm_up: bool = True,
        duration: float | None = None,
    ) -> None:
        """Run ``result.clients`` clients against ``target`` for ``duration`` (default:
        ``--duration``); fill in the load figures."""
        await self.run_in_turns([Load(result, target, tracked)], warm_up=warm_up, duration=duration)

    async def run_in_turns(
        self, loads: list[Load], *, warm_up: bool = True, duration: float | None = None
    ) -> None:
        """Load each unit of ``loads`` for ``duration`` in all, taking turns.

        One unit gets one window of the whole duration. Several take turns in
        windows of :data:`TURN` seconds, every unit in each round, so that a
        change in the machine's speed (these are shared machines) falls on all
        of them alike and their ratios hold. Each unit has its own clients,
        connected and warmed up before the first window.

        While one unit loads, the others' servers sit idle and their helper
        processes are stopped (SIGSTOP), so the unit loads a machine as quiet
        as if it ran alone (unless the heartbeat is so short that relayd would
        drop agents stopped that long). A unit whose helpers were stopped lets
        them catch up before its window (:func:`_caught_up`): wide-dispatch's
        busy agents answer the pings relayd sent them meanwhile, and relayd
        reads that backlog of pongs then (the window starts once both are
        quiet), so its window holds the pings and pongs of its own time, as
        when it runs alone. (What remains: relayd sends those pings during the
        others' windows, a fraction of a percent of a core.)
        """
        settings = self.settings
        duration = settings.duration if duration is None else duration
        for load in loads:
            load.clients = [self.new_client(load.target) for _ in range(load.result.clients)]
            load.left = duration
        window = duration if len(loads) == 1 else TURN
        # Stopped agents are silent: stop them only for well under relayd's
        # heartbeat timeout (3 intervals, see Servers.relayd), or it drops them.
        stopping = len(loads) > 1 and 2 * (len(loads) - 1) * TURN < 3 * settings.heartbeat
        for load in loads:
            if load.helpers and len(loads) > 1 and not stopping:
                load.result.notes.append(
                    "its busy agents kept running during the other units' turns: the "
                    "heartbeat is too short to stop them that long"
                )
        try:
            for load in loads:
                await self.open_connections(load.clients, load.result)
                if warm_up:
                    # One answered request per client first: connections, caches and
                    # the first-request costs of the server are not measured.
                    async with trio.open_nursery() as nursery:
                        for client in load.clients:
                            nursery.start_soon(self.warm_up, client, load.shape)
                load.opened = sum(client.connections for client in load.clients)
            with GcWatch() as watch:
                while turns := [load for load in loads if not self._finished(load)]:
                    for load in turns:
                        if stopping:
                            for other in loads:
                                if other is not load:
                                    _signal(other.helpers, signal.SIGSTOP)
                            if load.helpers:
                                _signal(load.helpers, signal.SIGCONT)
                                server = load.target.server
                                await _caught_up(load.helpers + ([server.pid] if server else []))
                        await self._window(load, min(window, load.left), duration, watch)
        finally:
            for load in loads:
                _signal(load.helpers, signal.SIGCONT)
            with trio.CancelScope(shield=True):
                for load in loads:
                    for client in load.clients:
                        await client.aclose()
        for load in loads:
            self.fill(load)

    def _finished(self, load: Load) -> bool:
        budget = self.settings.requests
        return load.left <= 0 or (budget is not None and load.recorder.sent >= budget)

    async def _window(self, load: Load, length: float, duration: float, watch: GcWatch) -> None:
        """Run ``load``'s clients for ``length`` seconds, then wait for their answers."""
        result, recorder = load.result, load.recorder
        give_up = length + DRAIN_TIMEOUT + (result.delay_s or 0) * 2
        paused = watch.paused
        before = CpuSnapshot.take(load.target.server, load.helpers)
        with trio.move_on_after(give_up):
            deadline = trio.current_time() + length
            async with trio.open_nursery() as outer:
                outer.start_soon(self.show_load, result, recorder, duration - load.left, duration)
                async with trio.open_nursery() as nursery:
                    for client in load.clients:
                        nursery.start_soon(
                            self.client_loop, client, recorder, deadline, load.tracked, load.shape
                        )
                outer.cancel_scope.cancel()
        load.cpu.add(before, CpuSnapshot.take(load.target.server, load.helpers))
        load.gc_paused += watch.paused - paused
        recorder.end_window()
        load.left -= length

    # -- what a kind of load changes (relayd.bench.stream.StreamPhase) -------------------

    def new_client(self, target: Target) -> HttpClient:
        """One client of a unit, not connected yet."""
        return HttpClient(
            target.host,
            target.port,
            headers=target.client_headers(),
            ssl_context=target.ssl_context,
        )

    async def warm_up(self, client: HttpClient, shape: Shape = ASK) -> None:
        """One answered request before the clock starts."""
        await _warm_up(client, shape)

    def load_line(self, result: ScenarioResult, recorder: LoadRecorder) -> str:
        """The figures of the progress line."""
        per_second = rate(recorder.ok, recorder.elapsed) or 0.0
        return (
            f"{result.clients} clients  {recorder.ok} ok  {recorder.failed} errors  "
            f"{per_second:.0f} req/s"
        )

    def fill(self, load: Load) -> None:
        """Fill in ``load``'s result from everything its windows saw."""
        result, recorder, target = load.result, load.recorder, load.target
        unfinished = recorder.sent - recorder.ok - recorder.failed
        if unfinished:
            recorder.errors["unfinished"] += unfinished
            result.notes.append(f"{unfinished} requests were still unanswered after the drain")
        load.cpu.fill(result)
        result.bench_gc_s = load.gc_paused
        result.duration_s = recorder.elapsed
        result.requests_sent = recorder.sent
        result.requests_ok = recorder.ok
        result.errors = dict(sorted(recorder.errors.items()))
        result.error_count = sum(recorder.errors.values())
        result.req_per_s = recorder.requests_per_second()
        result.latency = Distribution.of(recorder.latencies).as_ms()
        result.queue_wait = Distribution.of(recorder.queue_waits).as_ms()
        result.bench_cpu_s_per_1000 = per_thousand(result.bench_cpu_s, recorder.ok)
        result.server_cpu_s_per_1000 = per_thousand(result.server_cpu_s, recorder.ok)
        reconnected = sum(client.connections for client in load.clients) - load.opened
        if reconnected > 0:
            result.notes.append(
                f"{reconnected} connections were opened again during the load (a server "
                "closed them, or a request failed): their set-up is in the figures"
            )
        if target.server is not None:
            result.server_pid = target.server.pid
            memory = target.server.memory()
            if memory is not None:
                result.server_rss_bytes = memory.rss
                result.server_peak_rss_bytes = memory.peak

    async def open_connections(self, clients: list[HttpClient], result: ScenarioResult) -> None:
        limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
        failures: list[str] = []

        async def open_one(client: HttpClient) -> None:
            async with limiter:
                try:
                    await client.connect()
                except OSError as error:
                    failures.append(str(error))

        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(open_one, client)
        if failures:
            result.notes.append(
                f"{len(failures)} of {len(clients)} clients could not connect at first: "
                f"{failures[0]}"
            )

    async def client_loop(
        self,
        client: HttpClient,
        recorder: LoadRecorder,
        deadline: float,
        tracked: bool,
        shape: Shape = ASK,
    ) -> None:
        budget = self.settings.requests
        tracker = self.tracker
        path = shape.path
        while True:
            now = trio.current_time()
            if now >= deadline or (budget is not None and recorder.sent >= budget):
                return
            number = next(self.numbers)
            body = shape.body(number)
            if tracked:
                tracker.sent(number, now)
            recorder.request_sent(now)
            status: int | None = None
            try:
                status = (await client.request("POST", path, body)).status
            except (OSError, trio.BrokenResourceError, HttpError) as error:
                log.debug("request failed: %s", error)
            end = trio.current_time()
            recorder.request_done(end, status, end - now)
            if tracked:
                wait = tracker.finish(number)
                if wait is not None and status == 200:
                    recorder.queue_wait(wait)
            if status is None:
                await trio.sleep(0.1)  # do not spin on a refused connection

    async def show_load(
        self, result: ScenarioResult, recorder: LoadRecorder, done: float, duration: float
    ) -> None:
        """The progress line of ``result``'s load, ``done`` seconds of it before this window."""
        started = trio.current_time()
        while True:
            so_far = done + trio.current_time() - started
            self.progress(
                f"{result.name}: {min(so_far, duration):.1f}/{duration:g}s "
                + self.load_line(result, recorder)
            )
            await trio.sleep(PROGRESS_INTERVAL)


async def _caught_up(pids: list[int]) -> None:
    """Return once ``pids`` (helpers just resumed, and the server they talk to)
    have worked off what piled up (their CPU use drops to a steady trickle), or
    after :data:`CATCH_UP_LIMIT` seconds."""

    with trio.move_on_after(CATCH_UP_LIMIT):
        before = cpu_seconds_of(pids)
        while True:
            await trio.sleep(CATCH_UP_STEP)
            now = cpu_seconds_of(pids)
            if now - before < CAUGHT_UP * CATCH_UP_STEP:
                return
            before = now


def _signal(pids: list[int], number: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)


async def _warm_up(client: HttpClient, shape: Shape) -> None:
    try:
        await client.request("POST", shape.path, shape.warm_up)
    except (OSError, trio.BrokenResourceError, HttpError) as error:
        log.debug("warm-up request failed: %s", error)
