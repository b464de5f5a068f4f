"""The bench's scenarios: what each starts, what load it puts on, what it measures.

A *scenario* (what ``--scenario`` names) is a list of *units*, each one
measurement with a fresh server: ``relay-32`` is ``baseline-32`` then
``relay-32``, because relay-32 reports its ratio to the baseline measured in
the same run. A unit needed by several scenarios runs once.

Every unit gets its own server process (see :mod:`relayd.bench.servers`), so
its CPU time and peak RSS are the unit's alone. Simulated agents
(:mod:`relayd.bench.fleet`) and HTTP clients (:mod:`relayd.bench.load`) run in
this process, except wide-dispatch's busy agents; relayd and the baseline run
in their own.

The units:

* ``baseline-N``: N clients against the bare ASGI baseline.
* ``relay-N``: N clients, 8 agents that answer at once.
* ``v1-chat-32``: relay-32 through the OpenAI surface, ``POST
  /v1/chat/completions`` (not streamed), compared with relay-32 (relayd's CPU
  per request; :meth:`Bench.relay` says how it is kept fair).
* ``relay-32-tls``: relay-32 with relayd serving TLS (https and wss),
  compared with relay-32: what TLS costs (:mod:`relayd.bench.tls`).
* ``pool-1000``: 2,000 clients, 1,000 agents that answer after 2 s; the
  result is compared with the agent-bound limit, agents * capacity / delay.
* ``idle-10000``: 10,000 agents that only answer pings: relayd's RSS per agent
  and its CPU over a window of at least one heartbeat interval.
* ``wide-dispatch``: relay-32 with 10,000 more agents connected whose every
  slot is taken (see :meth:`Bench.occupy`). Those agents run in a child
  process (:mod:`relayd.bench.sinks` says why).
* ``stream-32``: 32 clients asking for streamed answers (server-sent events)
  of 256 deltas from 32 lean v2 agents that send as fast as they can
  (:mod:`relayd.bench.stream`); figures per delta.
* ``bare-stream-32``: the same against a bare forwarding loop
  (:mod:`relayd.bench.bareloop`), stream-32's ceiling.
* ``v1-stream-32``: stream-32 through the OpenAI surface,
  ``POST /v1/chat/completions`` with ``"stream": true``, held to stream-32's
  targets against the same bare loop.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import trio

from relayd.bench.fleet import Fleet, Tracker, bench_handler, content_for
from relayd.bench.httpclient import HttpClient, HttpError
from relayd.bench.load import (
    ASK,
    STREAM_ASK,
    TURN,
    V1_MODEL,
    CpuSnapshot,
    GcWatch,
    Load,
    LoadPhase,
    chat_shape,
)
from relayd.bench.model import REFERENCE_HEARTBEAT, ScenarioResult, Settings
from relayd.bench.procs import UNPINNED, CpuPlan, OpenFilesLimit
from relayd.bench.servers import Servers, Target, count_agents
from relayd.bench.sinks import BusyAgents, busy_agents
from relayd.bench.stats import ratio
from relayd.bench.stream import StreamFleet, StreamPhase, StreamRecorder

__all__ = [
    "OWN_RELAYD_ONLY",
    "REFERENCES",
    "SCENARIOS",
    "TOGETHER",
    "UNITS",
    "Bench",
    "ScenarioResult",
    "Settings",
    "batches",
    "compare",
    "units_for",
]

UNITS = (
    "baseline-1",
    "baseline-32",
    "relay-1",
    "relay-32",
    "v1-chat-32",
    "relay-32-tls",
    "bare-stream-32",
    "stream-32",
    "v1-stream-32",
    "pool-1000",
    "idle-10000",
    "wide-dispatch",
)
SCENARIOS: dict[str, tuple[str, ...]] = {
    "baseline": ("baseline-1", "baseline-32"),
    "relay-1": ("baseline-1", "relay-1"),
    "relay-32": ("baseline-32", "relay-32"),
    "pool-1000": ("pool-1000",),
    "idle-10000": ("idle-10000",),
    "wide-dispatch": ("baseline-32", "relay-32", "wide-dispatch"),
    "v1-chat-32": ("relay-32", "v1-chat-32"),
    "relay-32-tls": ("relay-32", "relay-32-tls"),
    "stream-32": ("bare-stream-32", "stream-32"),
    "v1-stream-32": ("bare-stream-32", "stream-32", "v1-stream-32"),
    "all": UNITS,
}
# Units measured together (their loads take turns), so that their ratios hold
# on a machine whose speed changes under them. The busiest unit goes last: its
# servers start while the others sit idle.
TOGETHER = (
    ("baseline-1", "relay-1"),
    ("baseline-32", "relay-32", "v1-chat-32", "relay-32-tls", "wide-dispatch"),
    ("bare-stream-32", "stream-32", "v1-stream-32"),
)
# A unit's reference: what its ratios are measured against (req/s and the
# server's CPU per request; streamed answers: per delta).
REFERENCES = {
    "relay-1": "baseline-1",
    "relay-32": "baseline-32",
    "v1-chat-32": "relay-32",
    "relay-32-tls": "relay-32",
    "wide-dispatch": "relay-32",
    "stream-32": "bare-stream-32",
    "v1-stream-32": "bare-stream-32",
}
# Units that need a relayd of their own (they cannot run against --url).
OWN_RELAYD_ONLY = frozenset({"relay-32-tls"})
# Units whose clients ask for streamed answers (loaded by StreamPhase).
STREAMING = frozenset({"bare-stream-32", "stream-32", "v1-stream-32"})

# Open connections at once while handing out hold requests (wide-dispatch).
HOLD_CONCURRENCY = 64
# File descriptors a process needs besides its connections.
FD_MARGIN = 200
# Time for relayd to finish admitting agents and settle before memory is read.
SETTLE = 2.0
# pool-1000 runs for this many agent delays unless --duration says otherwise: its
# agents answer in waves (all clients start at once), and over the default 10 s
# (five delays) the first and the last wave weigh a third of the result.
POOL_DELAYS = 15
PROGRESS_INTERVAL = 0.5


def units_for(names: list[str]) -> list[str]:
    """The units to run for scenario (or unit) ``names``, in run order, each once."""
    wanted: set[str] = set()
    for name in names:
        if name in SCENARIOS:
            wanted.update(SCENARIOS[name])
        elif name in UNITS:
            wanted.add(name)
        else:
            choices = ", ".join([*SCENARIOS, "baseline-1", "baseline-32"])
            raise ValueError(f"unknown scenario {name!r}; choose from {choices}")
    return [unit for unit in UNITS if unit in wanted]


ProgressCallback = Callable[[str], None]


@dataclass
class Bench:
    """One run of the bench: settings, a scratch directory, and the results so far."""

    settings: Settings
    workdir: Path
    files: OpenFilesLimit
    progress: ProgressCallback = lambda text: None
    results: dict[str, ScenarioResult] = field(default_factory=dict)
    tracker: Tracker = field(default_factory=Tracker)
    numbers: count[int] = field(default_factory=count)  # request numbers, unique in the run
    cpus: CpuPlan = UNPINNED

    def __post_init__(self) -> None:
        self.servers = Servers(self.settings, self.workdir, self.cpus)
        self.loader = LoadPhase(self.settings, self.tracker, self.numbers, self.progress)
        self.stream_loader = StreamPhase(self.settings, self.tracker, self.numbers, self.progress)

    async def run(self, units: list[str]) -> dict[str, ScenarioResult]:
        """Run ``units``, each batch together (see :func:`batches`); fill in the ratios."""
        loaded: dict[str, Callable[[], AbstractAsyncContextManager[Load]]] = {
            "baseline-1": lambda: self.baseline("baseline-1", 1),
            "baseline-32": lambda: self.baseline("baseline-32", 32),
            "relay-1": lambda: self.relay("relay-1", 1),
            "relay-32": lambda: self.relay("relay-32", 32),
            "v1-chat-32": lambda: self.relay("v1-chat-32", 32, chat=True),
            "relay-32-tls": lambda: self.relay("relay-32-tls", 32, tls=True),
            "wide-dispatch": lambda: self.relay("wide-dispatch", 32, busy=True),
            "bare-stream-32": lambda: self.stream("bare-stream-32", 32, bare=True),
            "stream-32": lambda: self.stream("stream-32", 32),
            "v1-stream-32": lambda: self.stream("v1-stream-32", 32, chat=True),
        }
        alone: dict[str, Callable[[], Awaitable[ScenarioResult]]] = {
            "pool-1000": self.pool,
            "idle-10000": self.idle,
        }
        results: dict[str, ScenarioResult] = {}
        for batch in batches(units, in_turns=self.settings.in_turns):
            if batch[0] in alone:
                results[batch[0]] = await alone[batch[0]]()
                continue
            async with contextlib.AsyncExitStack() as stack:
                loads = [await stack.enter_async_context(loaded[unit]()) for unit in batch]
                loader = self.stream_loader if batch[0] in STREAMING else self.loader
                await loader.run_in_turns(loads)
            for load in loads:
                result = results[load.result.name] = load.result
                others = [unit for unit in batch if unit != result.name]
                if others:
                    result.notes.append(
                        f"loaded in {TURN:g}s turns with {', '.join(others)} (their servers "
                        "running side by side; --one-at-a-time measures each alone)"
                    )
        compare(results)
        for unit in units:
            self.results[unit] = results[unit]
        return self.results

    # -- counts and the open-files limit ---------------------------------------------

    def fit(self, result: ScenarioResult, counts: dict[str, int], extra: int = 0) -> dict[str, int]:
        """``counts`` (agents, clients...) cut down to fit the open-files limit, with a note.

        Each process (this one and relayd, which inherits the limit) holds one
        descriptor per agent and per client, plus ``extra`` and a margin.
        """
        needed = sum(counts.values()) + extra + FD_MARGIN
        limit = self.files.soft
        if needed <= limit:
            return counts
        factor = (limit - extra - FD_MARGIN) / sum(counts.values())
        fitted = {name: max(1, math.floor(value * factor)) for name, value in counts.items()}
        described = ", ".join(f"{name} {counts[name]}→{fitted[name]}" for name in counts)
        result.notes.append(
            f"capped by the open-files limit ({limit}, hard {self.files.hard}): {described}"
        )
        return fitted

    # -- units -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def baseline(self, name: str, default_clients: int) -> AsyncIterator[Load]:
        """The baseline server, ready for ``name``'s load."""
        settings = self.settings
        result = ScenarioResult(
            name,
            "bare ASGI app on Hypercorn's trio worker (the ceiling of a route through Hypercorn)",
            server="baseline",
        )
        counts = self.fit(result, {"clients": settings.scaled(default_clients, settings.clients)})
        result.clients = counts["clients"]
        result.endpoint = f"POST {ASK.path}"
        async with self.servers.baseline(name) as target:
            yield Load(result, target, tracked=False)

    @contextlib.asynccontextmanager
    async def relay(
        self,
        name: str,
        default_clients: int,
        *,
        busy: bool = False,
        chat: bool = False,
        tls: bool = False,
    ) -> AsyncIterator[Load]:
        """relay-1, relay-32 and their variants: a relayd with its agents connected,
        ready for the load.

        * ``busy`` (wide-dispatch): many more agents beside them, every slot taken.
        * ``chat`` (v1-chat-32): the clients ask ``POST /v1/chat/completions``
          (one user message, not streamed) instead of ``POST /api/ask``. Its
          figure is a comparison with relay-32 (relayd's CPU per request), so
          everything but the endpoint is relay-32's: the same 8 instant agents
          (v1, trio-websocket), the same clients and content, and a relayd
          whose ``agents.v1_model`` is the model the requests name, so that
          those v1 agents serve the chats (each gets the chat as one
          ``content``: one user message is its text). Lean v2 agents answering
          with one ``done`` frame would serve chats as chats, but they are
          other agents on another protocol path in relayd (v2 frames, their
          own parsing), and the difference would not be the endpoint's alone.
          What is left is what the OpenAI surface costs: its body (messages)
          parsed and checked, the completion object built and encoded.
        * ``tls`` (relay-32-tls): relayd serves https and wss with a certificate
          made for the run (:mod:`relayd.bench.tls`); the clients and agents
          speak TLS, over connections made before the clock starts.
        """
        settings = self.settings
        if busy:
            description = (
                "relay-32 with every slot of many more agents taken (dispatch among full agents)"
            )
        elif chat:
            description = "instant agents behind relayd, asked through /v1/chat/completions"
        elif tls:
            description = "instant agents behind relayd serving TLS (https and wss)"
        else:
            description = "instant agents behind relayd"
        result = ScenarioResult(name, description, server="external" if settings.url else "relayd")
        wanted = {
            "clients": settings.scaled(default_clients, settings.clients),
            "agents": settings.scaled(8, settings.agents),
        }
        if busy:
            wanted["idle_agents"] = settings.scaled(10_000, settings.idle_agents)
        counts = self.fit(result, wanted, HOLD_CONCURRENCY if busy else 0)
        result.clients, result.agents = counts["clients"], counts["agents"]
        result.idle_agents = counts.get("idle_agents", 0)
        result.capacity = settings.capacity
        result.delay_s = settings.delay or 0.0
        shape = ASK
        if chat:
            # Against --url the relay's agents.v1_model is not known: a chat that
            # names no model may go to a v1 agent whatever it is.
            shape = chat_shape(None if settings.url else V1_MODEL)
            if settings.url:
                result.notes.append(
                    "the chats name no model (a relay's v1 agents serve those whatever "
                    "its agents.v1_model)"
                )
        result.endpoint = f"POST {shape.path}"
        async with contextlib.AsyncExitStack() as stack:
            target = await stack.enter_async_context(
                self.servers.relayd(
                    name,
                    clients=result.clients,
                    v1_model=V1_MODEL if chat else None,
                    tls=tls,
                )
            )
            helpers = []
            if busy:
                sinks = await stack.enter_async_context(self.busy_agents(target, result))
                await self.occupy(target, sinks.connected, result)
                helpers.append(sinks.pid)
            agents = await stack.enter_async_context(trio.open_nursery())
            fleet = Fleet(
                target.agent_url,
                bench_handler(self.tracker, delay=result.delay_s),
                inline=inline_agents(result.delay_s),
                ssl_context=target.ssl_context,
            )
            fleet.headers = self.agent_headers()
            await self.connect(agents, fleet, result.agents, result, "agents")
            if target.certificate is not None:
                result.tls_certificate_by = target.certificate.made_with
                result.tls_session = await tls_session(target)
                result.notes.append(
                    f"TLS: {result.tls_session or 'not negotiated'}; certificate (ECDSA P-256, "
                    f"from a CA made for the run) made with {result.tls_certificate_by}"
                )
            yield Load(result, target, tracked=True, helpers=helpers, shape=shape)
            await self.census(result, target)
            agents.cancel_scope.cancel()

    @contextlib.asynccontextmanager
    async def stream(
        self, name: str, default_clients: int, *, bare: bool = False, chat: bool = False
    ) -> AsyncIterator[Load]:
        """stream-32 (relayd), v1-stream-32 (relayd's /v1, with ``chat``) or
        bare-stream-32 (the bare loop): the server with its lean v2 agents
        connected, one per client, ready for the load."""
        settings = self.settings
        result = ScenarioResult(
            name,
            (
                "streamed answers through a bare forwarding loop (the ceiling of stream-32)"
                if bare
                else "streamed OpenAI chat completions from v2 agents behind relayd"
                if chat
                else "streamed answers (server-sent events) from v2 agents behind relayd"
            ),
            server="bareloop" if bare else ("external" if settings.url else "relayd"),
        )
        clients = settings.scaled(default_clients, settings.clients)
        # One agent per client unless --agents says otherwise.
        agents = clients if settings.agents is None else settings.scaled(0, settings.agents)
        wanted = {"clients": clients, "agents": agents}
        counts = self.fit(result, wanted)
        result.clients, result.agents = counts["clients"], counts["agents"]
        # The lean agents announce no models, so they serve the one named (against
        # --url: none named, as v1-chat-32 does, whatever that relay's agents serve).
        model = None if settings.url else V1_MODEL
        shape = chat_shape(model, stream=True) if chat else STREAM_ASK
        result.endpoint = f"POST {shape.path} (streamed)"
        result.capacity = 1
        async with contextlib.AsyncExitStack() as stack:
            target = await stack.enter_async_context(
                self.servers.bare_loop(name)
                if bare
                else self.servers.relayd(name, clients=result.clients)
            )
            running = await stack.enter_async_context(trio.open_nursery())
            fleet = StreamFleet(target.host, target.port, self.agent_headers())
            await fleet.start(running, result.agents, on_progress=self.connecting(result, "agents"))
            self.note_failures(result, fleet.failed, result.agents, fleet.failures, "agents")
            yield Load(result, target, tracked=False, recorder=StreamRecorder(), shape=shape)
            if bare:
                result.agents_connected = fleet.connected
            else:
                await self.census(result, target)
            running.cancel_scope.cancel()

    async def pool(self) -> ScenarioResult:
        settings = self.settings
        result = ScenarioResult(
            "pool-1000",
            "many slow agents, twice as many clients: is the agent-bound limit reached?",
            server="external" if settings.url else "relayd",
        )
        counts = self.fit(
            result,
            {
                "clients": settings.scaled(2000, settings.clients),
                "agents": settings.scaled(1000, settings.agents),
            },
        )
        result.clients, result.agents = counts["clients"], counts["agents"]
        result.endpoint = f"POST {ASK.path}"
        result.capacity = settings.capacity
        result.delay_s = 2.0 if settings.delay is None else settings.delay
        async with (
            self.servers.relayd("pool-1000", clients=result.clients) as target,
            trio.open_nursery() as agents,
        ):
            fleet = Fleet(
                target.agent_url,
                bench_handler(self.tracker, delay=result.delay_s),
                inline=inline_agents(result.delay_s),
            )
            fleet.headers = self.agent_headers()
            await self.connect(agents, fleet, result.agents, result, "agents")
            duration = settings.duration
            if not settings.duration_given and POOL_DELAYS * result.delay_s > duration:
                duration = POOL_DELAYS * result.delay_s
                result.notes.append(
                    f"load for {duration:g}s, {POOL_DELAYS} agent delays (--duration overrides)"
                )
            await self.loader.run(result, target, tracked=True, warm_up=False, duration=duration)
            await self.census(result, target)
            agents.cancel_scope.cancel()
        if result.delay_s > 0:
            result.limit_req_per_s = len(fleet.stats) * settings.capacity / result.delay_s
            if result.req_per_s is not None:
                result.percent_of_limit = result.req_per_s / result.limit_req_per_s * 100
            if result.clients < result.agents * settings.capacity:
                result.notes.append(
                    "fewer clients than agent slots: the client-bound limit is "
                    f"{result.clients / result.delay_s:.0f} req/s"
                )
        else:
            result.notes.append("no limit: the agents answer at once (--delay 0)")
        return result

    async def idle(self) -> ScenarioResult:
        settings = self.settings
        result = ScenarioResult(
            "idle-10000",
            "connected idle agents: memory per agent, CPU of the heartbeats",
            server="external" if settings.url else "relayd",
        )
        counts = self.fit(result, {"idle_agents": settings.scaled(10_000, settings.idle_agents)})
        result.idle_agents = counts["idle_agents"]
        result.capacity = settings.capacity
        result.heartbeat_s = settings.heartbeat
        result.window_s = max(settings.duration, settings.heartbeat)
        async with (
            self.servers.relayd("idle-10000", clients=0) as target,
            trio.open_nursery() as agents,
        ):
            server = target.server
            settle = min(SETTLE, settings.duration)
            await self.settle(settle)
            before = server.memory() if server else None
            fleet = Fleet(target.agent_url, bench_handler(self.tracker))
            fleet.headers = self.agent_headers()
            await self.connect(agents, fleet, result.idle_agents, result, "idle agents")
            await self.settle(settle)
            with GcWatch() as watch:
                cpu_before = CpuSnapshot.take(server)
                await self.settle(result.window_s, "measuring heartbeat CPU")
                CpuSnapshot.take(server).since(cpu_before, result)
            result.bench_gc_s = watch.paused
            after = server.memory() if server else None
            await self.census(result, target)
            agents.cancel_scope.cancel()
        if result.server_cpu_s is not None:
            result.cpu_percent = result.server_cpu_s / result.window_s * 100
            result.cpu_percent_at_15s = (
                result.cpu_percent * settings.heartbeat / REFERENCE_HEARTBEAT
            )
            if settings.heartbeat != REFERENCE_HEARTBEAT:
                result.notes.append(
                    f"heartbeat every {settings.heartbeat:g}s: CPU scaled to a 15s interval "
                    "for the target (ping work is proportional to the ping rate)"
                )
        if before is not None and after is not None:
            result.rss_before_bytes = before.rss
            result.rss_after_bytes = after.rss
            result.server_rss_bytes = after.rss
            result.server_peak_rss_bytes = after.peak
            agents_counted = result.agents_connected or fleet.connected
            if agents_counted:
                result.rss_per_agent_bytes = (after.rss - before.rss) / agents_counted
        return result

    # -- pieces ----------------------------------------------------------------------

    def agent_headers(self) -> list[tuple[bytes, bytes]]:
        key = self.settings.agent_key
        return [(b"authorization", b"Bearer " + key.encode())] if key else []

    async def settle(self, seconds: float, what: str = "settling") -> None:
        """Wait ``seconds``, showing a countdown."""
        end = trio.current_time() + seconds
        while (left := end - trio.current_time()) > 0:
            self.progress(f"{what}: {left:.0f}s")
            await trio.sleep(min(PROGRESS_INTERVAL, left))

    async def connect(
        self, nursery: trio.Nursery, fleet: Fleet, number: int, result: ScenarioResult, what: str
    ) -> None:
        await fleet.start(nursery, number, on_progress=self.connecting(result, what))
        self.note_failures(result, fleet.failed, number, fleet.failures, what)

    def connecting(self, result: ScenarioResult, what: str) -> Callable[[int, int], None]:
        """A progress callback for connecting ``what`` (every 50th, and the last)."""

        def shown(done: int, total: int) -> None:
            if done == total or done % 50 == 0:
                self.progress(f"{result.name}: connecting {what} {done}/{total}")

        return shown

    @staticmethod
    def note_failures(
        result: ScenarioResult, failed: int, number: int, failures: list[str], what: str
    ) -> None:
        if failed:
            result.notes.append(
                f"{failed} of {number} {what} could not connect: {'; '.join(failures)}"
            )

    @contextlib.asynccontextmanager
    async def busy_agents(
        self, target: Target, result: ScenarioResult
    ) -> AsyncIterator[BusyAgents]:
        """wide-dispatch's agents that never answer, connected from a child process."""
        what = "busy agents"
        number = result.idle_agents
        log_path = self.workdir / f"{result.name}-busy-agents.log"
        async with busy_agents(
            target.agent_url,
            self.agent_headers(),
            number,
            self.tracker,
            log_path,
            on_progress=self.connecting(result, what),
        ) as sinks:
            self.note_failures(result, sinks.failed, number, sinks.failures, what)
            yield sinks

    async def occupy(self, target: Target, agents: int, result: ScenarioResult) -> None:
        """Take every slot of ``agents`` busy agents (that never answer) through relayd.

        Each slot gets a request from a client that hangs up once the request
        has reached an agent: the seed protocol has no cancel, so relayd keeps
        the slot taken until the agent answers, which these agents never do.
        """
        slots = agents * self.settings.capacity
        limiter = trio.CapacityLimiter(HOLD_CONCURRENCY)
        outcomes: dict[str, int] = {}
        done = 0

        async def hold() -> None:
            nonlocal done
            number = next(self.numbers)
            reached = self.tracker.expect(number)
            body = json.dumps({"content": content_for(number)}).encode()
            outcome = "not reached in 30s"
            async with (
                limiter,
                HttpClient(
                    target.host,
                    target.port,
                    headers=target.client_headers(),
                    ssl_context=target.ssl_context,
                ) as client,
                trio.open_nursery() as nursery,
            ):

                async def ask() -> None:
                    nonlocal outcome
                    try:
                        response = await client.request("POST", "/api/ask", body)
                        outcome = f"answered {response.status}"
                    except (OSError, trio.BrokenResourceError, HttpError) as error:
                        outcome = f"connection error: {error}"
                    nursery.cancel_scope.cancel()

                nursery.start_soon(ask)
                with trio.move_on_after(30):
                    await reached.wait()
                    outcome = "held"
                nursery.cancel_scope.cancel()
            self.tracker.forget(number)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            done += 1
            if done % 50 == 0 or done == slots:
                self.progress(f"{result.name}: taking busy agents' slots {done}/{slots}")

        async with trio.open_nursery() as nursery:
            for _ in range(slots):
                nursery.start_soon(hold)
        held = outcomes.pop("held", 0)
        if outcomes:
            result.notes.append(
                f"{held} of {slots} busy-agent slots taken; the others: "
                + ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items()))
            )
        result.notes.append(
            f"{held} slots of {agents} agents held by requests that are never answered"
        )

    async def census(self, result: ScenarioResult, target: Target) -> None:
        """Agents connected (and busy) as relayd counts them; memory at the end."""
        if target.server is not None:
            memory = target.server.memory()
            if memory is not None:
                result.server_rss_bytes = memory.rss
                result.server_peak_rss_bytes = memory.peak
        connected, busy = await count_agents(target)
        result.agents_connected, result.agents_busy = connected, busy
        expected = result.agents + result.idle_agents
        if connected is not None and connected < expected and self.settings.url is None:
            result.notes.append(
                f"relayd counts {connected} agents connected at the end, {expected} expected: "
                "it dropped some (see its log, --workdir keeps it)"
            )


def compare(results: dict[str, ScenarioResult]) -> None:
    """Each result's ratios to its reference (:data:`REFERENCES`) when that ran too:
    req/s and the server's CPU per request (per delta, deltas/s, when streamed)."""
    for unit, result in results.items():
        reference = REFERENCES.get(unit)
        if reference is None or reference not in results:
            continue
        result.reference = reference
        base = results[reference]
        if unit in STREAMING:
            result.ratio = ratio(result.deltas_per_s, base.deltas_per_s)
            result.cpu_ratio = ratio(result.server_cpu_us_per_delta, base.server_cpu_us_per_delta)
        else:
            result.ratio = ratio(result.req_per_s, base.req_per_s)
            result.cpu_ratio = ratio(result.server_cpu_s_per_1000, base.server_cpu_s_per_1000)


async def tls_session(target: Target) -> str | None:
    """The TLS version and cipher a client of ``target`` negotiates (None: no TLS)."""
    if target.ssl_context is None:
        return None
    async with HttpClient(target.host, target.port, ssl_context=target.ssl_context) as probe:
        await probe.connect()
        return probe.tls_session


def batches(units: list[str], *, in_turns: bool) -> list[list[str]]:
    """``units`` in the batches they run in, in order.

    With ``in_turns``, the units of each group in :data:`TOGETHER` that are in
    ``units`` form one batch: their servers run side by side and their loads
    take turns (:meth:`relayd.bench.load.LoadPhase.run_in_turns`). Every other
    unit is a batch of its own.
    """
    result: list[list[str]] = []
    placed: set[str] = set()
    for unit in units:
        if unit in placed:
            continue
        group = next((group for group in TOGETHER if unit in group), (unit,)) if in_turns else ()
        batch = [member for member in group if member in units] or [unit]
        result.append(batch)
        placed.update(batch)
    return result


def inline_agents(delay: float) -> bool:
    """Whether simulated agents may answer in the task that reads their requests.

    Only when that changes nothing an agent does: its answers are instant. (An
    agent that waited in that task would not answer pings meanwhile.) It saves
    the bench a task per request, which is load-generator overhead, not the
    relay's.
    """
    return not delay
