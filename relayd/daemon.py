"""The daemon's root nursery: Hypercorn, signals, the watchdog, systemd status.

Task tree (everything has an owner; nothing outlives ``run``)::

    run()
    └─ root nursery
       ├─ the state file's writer (relayd.persist)
       ├─ front.server.serve_guarded (started with nursery.start → READY=1)
       │  └─ per-connection tasks; agent sessions run inside their handlers
       ├─ the heartbeat (one task for every agent)
       ├─ watchdog loop (only when systemd asked for one)
       ├─ status loop (STATUS= when the numbers change)
       └─ the signal loop, in run() itself: SIGHUP reload, SIGTERM/SIGINT stop

The signal receiver stays open for the whole life of the process: were it
closed during the drain, the default handler would be back and a second
SIGTERM would kill the process in the middle of a write.

Stopping: refuse new requests (503), answer queued ones with 503, let requests
already at an agent finish for up to ``server.shutdown_grace``, then close the
agent sockets with 1001, stop Hypercorn and return. A second signal, or a drain
that overruns the grace by ``HARD_STOP_MARGIN`` (a peer that stops reading
can block Hypercorn's shielded writes forever), ends the process at once.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIFramework

from relayd import logs
from relayd.agents.auth import AgentKeys
from relayd.agents.heartbeat import Heartbeat
from relayd.api import AsgiApp, agent_endpoint, create_asgi_app
from relayd.ask import AskEndpoint
from relayd.config import Config, ConfigError, plural
from relayd.dispatch import Dispatcher
from relayd.front.ask_wire import AskWire
from relayd.front.server import serve_guarded
from relayd.front.sockets import Takeover
from relayd.idempotency import Recorded
from relayd.locate import AdminKey
from relayd.openai_api import ChatCompletionsEndpoint
from relayd.persist import Change, StateFile, StoredAnswer, answer_row, conversation_row
from relayd.protocol import CloseCode
from relayd.proxies import TrustedProxies
from relayd.state import RelayState, Snapshot, load_agent_keys
from relayd.stopping import HARD_STOP_MARGIN, hard_stop_after
from relayd.systemd import Notifier, listen_fds, watchdog_interval, watchdog_loop
from relayd.tls import TlsTerms, find_tls_files, tls_context
from relayd.users import UserStore, UserStoreError, UserTable

__all__ = ["Daemon", "assemble", "hypercorn_config", "tune_gc"]

log = logging.getLogger("relayd")

STATUS_INTERVAL = 5.0
# After the drain, what is left of a connection gets this long to finish.
HYPERCORN_GRACE = 2.0


# The youngest generation's collection threshold (CPython's default: 700).
GC_YOUNG_THRESHOLD = 100_000


def tune_gc() -> None:
    """Make the cyclic garbage collector fit a server holding many connections.

    Every connection keeps a few hundred gc-tracked objects alive, and each
    heartbeat period or queued request leaves objects that survive a young
    collection; with CPython's default threshold they pile up in the oldest
    generation and trigger full collections of every object (seconds each with
    10,000 agents). A larger young generation lets short-lived objects die
    young instead.

    Why 100,000: an idle agent's wait on its socket is a dozen small objects
    (coroutines, Trio's wait records) made anew at every pong, so 10,000
    agents renew about 120,000 of them per heartbeat interval; with a young
    generation that size most of them die before a collection sees them,
    rather than being moved to older generations whose collections are long.
    ``relayd bench`` (idle-10000, pool-1000, wide-dispatch) measures the
    effect; docs/performance.md has the figures.

    Cyclic garbage is still collected, only in larger batches. What exists at
    start-up (modules, the app) lives as long as the process, so it is frozen
    out of every collection.
    """
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    gc.collect()
    gc.freeze()


def hypercorn_config(config: Config, binds: list[str]) -> HypercornConfig:
    hypercorn_settings = HypercornConfig()
    hypercorn_settings.bind = binds
    error_logger, _ = logs.hypercorn_loggers()
    hypercorn_settings.errorlog = error_logger
    hypercorn_settings.accesslog = None
    hypercorn_settings.graceful_timeout = HYPERCORN_GRACE
    hypercorn_settings.websocket_max_message_size = config.agents.max_message
    hypercorn_settings.include_server_header = False
    hypercorn_settings.h2_max_inbound_frame_size = 2**14
    hypercorn_settings.keep_alive_timeout = config.server.idle_timeout
    # Messages Hypercorn buffers for the app per connection (agent frames
    # included) before it stops reading from the socket.
    hypercorn_settings.max_app_queue_size = 16
    return hypercorn_settings


def assemble(
    snapshot: Snapshot,
    *,
    admin: AdminKey,
    store: UserStore,
    state_dir: Path,
    config_path: Path | None = None,
) -> tuple[RelayState, Heartbeat]:
    """The daemon's long-lived objects, each built once, here: the heartbeat
    (its task is :meth:`Daemon.run`'s), the dispatcher it is handed to (which
    also holds the agent keys it admits with), and the state the routes share.
    """
    heartbeat = Heartbeat(snapshot.config.agents)
    dispatcher = Dispatcher(snapshot.config, agent_keys=snapshot.agent_keys, heartbeat=heartbeat)
    state = RelayState(
        config=snapshot.config,
        users=snapshot.users,
        admin=admin,
        store=store,
        state_dir=state_dir,
        dispatcher=dispatcher,
        config_path=config_path,
    )
    return state, heartbeat


@dataclass
class Daemon:
    """One run of the daemon, from binding to exit.

    ``reload_config`` re-reads the configuration file with the command-line
    overrides applied again; it raises ConfigError.
    """

    state: RelayState
    heartbeat: Heartbeat  # the dispatcher's, run here (see assemble)
    reload_config: Callable[[], Config]
    notifier: Notifier
    environ: dict[str, str]
    tls: TlsTerms | None = None  # serve https and wss with it
    listening: str = ""  # what Hypercorn bound, for STATUS= and the log

    async def run(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as root:
                stop_serving = trio.Event()
                stop_accepting = trio.Event()
                served = trio.Event()
                state_file, agents_before = await self._restore()
                root.start_soon(state_file.run)
                binds = self._binds()
                agents = agent_endpoint(self.state)
                ask = AskEndpoint(self.state)
                chat = ChatCompletionsEndpoint(self.state)
                app = create_asgi_app(self.state, agents, ask, chat)
                hypercorn_settings = hypercorn_config(self.state.config, binds)
                # Agents' WebSockets, /api/ask and /v1/chat/completions go on the wire path.
                takeovers = (agents, AskWire({ask.path: ask, chat.path: chat}))
                bound: list[str] = await root.start(
                    self._serve,
                    app,
                    takeovers,
                    hypercorn_settings,
                    stop_serving,
                    stop_accepting,
                    served,
                )
                self.listening = ", ".join(bound)
                if agents_before:  # a restart: give them time to come back
                    self.state.dispatcher.begin_startup_grace()
                tune_gc()
                log.info("relayd ready: listening on %s", self.listening)
                self.notifier.ready(self._status())
                interval = watchdog_interval(self.environ, os.getpid())
                if interval is not None:
                    log.info("systemd watchdog: pinging every %.1fs", interval)
                    root.start_soon(watchdog_loop, self.notifier, interval)
                root.start_soon(self._status_loop)
                root.start_soon(self.heartbeat.run)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await self.reload()
                        continue
                    log.info("received %s, stopping", signal.Signals(signum).name)
                    self.notifier.stopping()
                    root.start_soon(self._hard_stop_timer, signals)
                    await self._drain(stop_accepting)
                    stop_serving.set()
                    break
                await served.wait()
                root.cancel_scope.cancel()
        log.info("relayd stopped")

    async def _serve(
        self,
        app: AsgiApp,
        takeovers: Sequence[Takeover],
        hypercorn_settings: HypercornConfig,
        stop: trio.Event,
        stop_accepting: trio.Event,
        served: trio.Event,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            # Our callable is a plain ASGI 3 app; Hypercorn's type is a union of its TypedDicts.
            framework = cast("ASGIFramework", app)
            await serve_guarded(
                framework,
                hypercorn_settings,
                shutdown_trigger=stop.wait,
                stop_accepting=stop_accepting.wait,
                takeovers=takeovers,
                tls=self.tls,
                proxy_protocol=self._proxy_protocol,
                task_status=task_status,
            )
        finally:
            served.set()

    async def _restore(self) -> tuple[StateFile, bool]:
        """Read what the last run kept (conversations, agent ids, idempotent
        answers) and keep journals from now on, for the state file's writer.
        Also whether agents were known before (then a startup grace applies)."""
        dispatcher = self.state.dispatcher
        conversations = dispatcher.conversations
        state_file = StateFile.in_directory(self.state.state_dir)
        loaded = await trio.to_thread.run_sync(state_file.open_and_load)
        offset = time.time() - trio.current_time()  # wall clock minus Trio's
        now = trio.current_time()
        for stored in loaded.conversations:
            conversations.restore(
                stored.conversation_id,
                agent_id=stored.agent_id,
                user_id=stored.user_id,
                last_response_id=stored.last_response_id,
                turns=stored.turns,
                last_used=stored.last_used - offset,
                now=now,
            )
        conversations.keep_journal()
        dispatcher.keep_identities(loaded.identities)
        answers = self.state.idempotency
        for answer in loaded.answers:
            recorded = Recorded(
                abs(answer.status), answer.headers, answer.body, streamed=answer.status < 0
            )
            answers.restore(
                answer.user_id,
                answer.key,
                answer.body_hash,
                recorded,
                answer.created - offset,
                now,
            )
        answers.keep_journal()
        if loaded.conversations or loaded.identities:
            log.info(
                "state file %s: %s, %s kept from the last run",
                state_file.path,
                plural(len(conversations), "conversation"),
                plural(len(loaded.identities), "agent id"),
            )

        def conversation_changes() -> list[Change]:
            wall = time.time() - trio.current_time()
            return [
                ("conversations", (cid,), True)
                if entry is None
                else ("conversations", conversation_row(entry, wall), False)
                for cid, entry in conversations.journal().items()
            ]

        def identity_changes() -> list[Change]:
            seen = time.time()
            return [
                ("identities", (agent_id,), True)
                if credential is None
                else ("identities", (agent_id, credential, seen), False)
                for agent_id, credential in dispatcher.identity_journal().items()
            ]

        def answer_changes() -> list[Change]:
            wall = time.time() - trio.current_time()
            changes: list[Change] = []
            for (user_id, key), entry in answers.journal().items():
                if entry is None or entry.recorded is None:
                    changes.append(("idempotency", (user_id, key), True))
                    continue
                recorded = entry.recorded
                stored = StoredAnswer(
                    user_id,
                    key,
                    entry.body_hash,
                    # A streamed answer is kept with its status negated.
                    -recorded.status if recorded.streamed else recorded.status,
                    recorded.body,
                    recorded.headers,
                    entry.created + wall,
                )
                changes.append(("idempotency", answer_row(stored), False))
            return changes

        state_file.sources += [conversation_changes, identity_changes, answer_changes]
        return state_file, bool(loaded.identities)

    def _proxy_protocol(self) -> TrustedProxies | None:
        """The proxies whose PROXY header names the client, if the protocol is on."""
        return self.state.proxies if self.state.config.server.proxy_protocol else None

    def _binds(self) -> list[str]:
        inherited = listen_fds(self.environ, os.getpid(), unset_environment=True)
        if inherited:
            names = ", ".join(f"{fd.bind} ({fd.name})" for fd in inherited)
            log.info("socket activation: serving on %s; server.listen is ignored", names)
            return [fd.bind for fd in inherited]
        return list(self.state.config.server.listen)

    def _status(self) -> str:
        stats = self.state.dispatcher.pool.statistics()
        return (
            f"listening on {self.listening or '?'}; {stats.connected} agents, "
            f"{stats.inflight} requests in flight, {self.state.dispatcher.queued} queued"
        )

    async def _status_loop(self) -> None:
        last = ""
        while True:
            await trio.sleep(STATUS_INTERVAL)
            text = self._status()
            if text != last:
                self.notifier.status(text)
                last = text

    async def reload(self) -> bool:
        """SIGHUP: re-read config, users and agent keys; swap them in, or keep the old.

        The files are read in a worker thread: a users file locked by a slow
        ``relayd users add`` in another process must not stall every agent's
        heartbeat and every request. The swap itself is one step on the loop.
        """
        self.notifier.reloading()
        old = self.state.config
        try:
            config, users, keys = await trio.to_thread.run_sync(self._read_reloadable)
        except (ConfigError, UserStoreError) as error:
            log.error("reload failed, still running the previous configuration: %s", error)
            self.notifier.ready(f"reload failed: {error}; {self._status()}")
            return False
        if self.tls is not None:
            files = find_tls_files(config, self.environ)
            if files is None:
                log.warning("TLS was turned off in the config; restart relayd to serve plain HTTP")
            else:
                try:
                    context = await trio.to_thread.run_sync(tls_context, files)
                except ConfigError as error:
                    log.error("TLS: %s; still serving the previous certificate", error)
                else:
                    self.tls.use(files, context)
        if config.server.listen != old.server.listen:
            log.warning("server.listen changed; restart relayd to apply it")
        if config.server.state_dir != old.server.state_dir:
            log.warning("server.state_dir changed; restart relayd to apply it")
        if config.agents.max_message > old.agents.max_message:
            log.warning("agents.max_message was raised; frames above the old limit need a restart")
        self.state.apply(Snapshot(config, users, keys))
        logs.set_level(config.server.log_level)
        log.info(
            "reloaded %s: %s, %s",
            config.source,
            plural(len(users), "user"),
            plural(len(keys), "agent key"),
        )
        self.notifier.ready(self._status())
        return True

    def _read_reloadable(self) -> tuple[Config, UserTable, AgentKeys]:
        config = self.reload_config()
        return config, self.state.store.load(), load_agent_keys(config)

    async def _drain(self, stop_accepting: trio.Event) -> None:
        """SIGTERM: stop accepting connections (under socket activation they wait
        in the kernel for the next relayd), answer what is under way and queued
        within ``server.shutdown_grace``, then say goodbye to the agents."""
        dispatcher = self.state.dispatcher
        grace = self.state.config.server.shutdown_grace
        stop_accepting.set()
        dispatcher.drain()
        with trio.move_on_after(grace):
            await dispatcher.wait_idle()
        dispatcher.close()
        left = dispatcher.abort_all()
        if left:
            log.warning("shutdown grace over: %d requests answered with 503", left)
        for session in self.state.dispatcher.pool:
            session.request_close(CloseCode.GOING_AWAY, "relayd is shutting down")

    async def _hard_stop_timer(self, signals: AsyncIterator[int]) -> None:
        await hard_stop_after(
            self.state.config.server.shutdown_grace + HYPERCORN_GRACE + HARD_STOP_MARGIN,
            signals,
            log,
        )
