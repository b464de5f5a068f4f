"""One run of ``relayd agent``: the root nursery, signals, systemd, the relay link.

Task tree (everything has an owner; nothing outlives :meth:`AgentService.run`)::

    run()
    └─ root nursery
       ├─ the link: ReferenceAgent.run (connect, serve, reconnect with backoff)
       │  └─ one task per request, running the Answerer
       ├─ the model list refresh (idle unless models are discovered from the backend)
       ├─ the reporter: STATUS= and the saved agent id, when they change
       ├─ the watchdog (only when systemd asked for one)
       └─ the signal loop, in run() itself: SIGHUP reload, SIGTERM/SIGINT drain

Starting: the state directory is locked (one agent per directory), the
conversation store opened, the backend client built; with discovered models,
the link waits until the backend has listed some, because an agent that
announces no models is taken to serve any. Then READY=1, and the link starts.

Stopping (SIGTERM): ``drain`` to the relay (no new work), requests under way
finish within ``agent.drain_grace``, then the socket closes and ``run``
returns. A second signal, or a drain that overruns the grace by
:data:`HARD_STOP_MARGIN`, ends the process at once.

Reloading (SIGHUP): the file and the key files are read again. Capacity and
models are announced at once (``update``); a new backend, key or timeout
takes over for new requests (those under way finish on the old client); the
relay URL, name and agent key apply from the next connection; the state
directory only on a restart. A file with an error changes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from relayd import __version__, logs
from relayd.agent.backend import Backend, EchoBackend, ModelListError, OpenAIBackend
from relayd.agent.config import (
    AgentSettings,
    Secret,
    display_url,
    find_agent_key,
    find_backend_key,
    settings_changed,
)
from relayd.agent.handler import Answerer
from relayd.agent.history import ConversationStore, Limits
from relayd.agentkit import AgentProfile, Finish, V2Agent
from relayd.config import ConfigError
from relayd.protocol import LocalProtocolError, Request
from relayd.protocol.v2 import ChatRequest, Goodbye
from relayd.stopping import HARD_STOP_MARGIN, hard_stop_after
from relayd.systemd import Notifier, watchdog_interval, watchdog_loop
from relayd.users import atomic_write

__all__ = ["AgentService", "ReferenceAgent", "StateLock", "build_backend"]

log = logging.getLogger("relayd.agent")

STATUS_INTERVAL = 5.0
AGENT_ID_FILE = "agent_id"
LOCK_FILE = "agent.lock"
# How long an abandoned answer's generator may take to close (its backend stream).
CLOSE_TIMEOUT = 2.0
# Back-off while the backend has not listed its models yet, first and cap (seconds).
MODELS_RETRY_FIRST = 1.0
MODELS_RETRY_CAP = 30.0


def build_backend(settings: AgentSettings, key: Secret | None) -> Backend:
    if settings.echo:
        return EchoBackend(settings.echo_delay)
    assert settings.backend is not None
    return OpenAIBackend(
        settings.backend,
        key,
        timeout=settings.backend_timeout,
        connect_timeout=settings.connect_timeout,
    )


def _headers(key: Secret | None) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + key.value.encode())] if key is not None else []


def _limits(settings: AgentSettings) -> Limits:
    return Limits(
        settings.conversations_max, settings.conversations_max_bytes, settings.conversations_ttl
    )


class StateLock:
    """An exclusive lock on the state directory: two agents sharing one would
    resume the same agent id and take it from each other in turn."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Raises ConfigError naming the directory when another agent holds it."""
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.close()
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(
                    "another relayd agent uses this state directory; give each agent its "
                    "own (--state-dir)",
                    source=str(self.path.parent),
                ) from None
            raise ConfigError(f"cannot lock: {error.strerror}", source=str(self.path)) from None
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Welcomed(trio.TaskStatus[str]):
    """Passed to :meth:`V2Agent.serve` as its ``task_status``: hears every welcome."""

    def __init__(self, agent: ReferenceAgent, then: trio.TaskStatus[str] | None) -> None:
        self.agent = agent
        self.then = then

    def started(self, value: str | None = None) -> None:
        assert value is not None
        self.agent.welcomed(value)
        if self.then is not None:
            self.then.started(value)


class ReferenceAgent(V2Agent):
    """:class:`V2Agent` with what a service needs around it: it hears each
    welcome and disconnection (``on_change``), says why the relay refused it,
    and closes each request's answer the moment the request ends, so that a
    request cancelled between two pieces closes its backend stream at once
    rather than when the garbage collector finds its generator."""

    def __init__(
        self,
        url: str,
        answerer: Answerer,
        profile: AgentProfile,
        *,
        headers: list[tuple[bytes, bytes]],
        on_change: Callable[[], None],
    ) -> None:
        super().__init__(url, self._answer, profile, headers=headers)
        self.answerer = answerer
        self.on_change = on_change
        self.connected = False
        self._answers: dict[str, AsyncGenerator[str | Finish, None]] = {}
        self._refusal: int | None = None  # the status of the last refusal logged
        self.problem: str | None = None  # why it is not connected, for STATUS=
        self.welcomes = 0  # welcomes heard, one per connection
        self._welcome = trio.Event()

    def _answer(self, request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
        answer = self.answerer(request)
        self._answers[request.request_id] = answer
        return answer

    async def _work(self, request: Request | ChatRequest, scope: trio.CancelScope) -> None:
        try:
            await super()._work(request, scope)
        finally:
            answer = self._answers.pop(request.request_id, None)
            if answer is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await answer.aclose()

    def welcomed(self, agent_id: str) -> None:
        if not self.connected:
            log.info("connected to %s as agent %s", display_url(self.url), agent_id)
        self.connected = True
        self._refusal = self.problem = None
        self.welcomes += 1
        self._welcome.set()
        self._welcome = trio.Event()
        self.on_change()

    async def wait_welcomed(self, count: int = 1) -> None:
        """Until the relay has welcomed the agent ``count`` times in all."""
        while self.welcomes < count:
            await self._welcome.wait()

    async def serve(
        self,
        ws: WebSocketConnection,
        *,
        task_status: trio.TaskStatus[str] | None = None,
    ) -> Goodbye | None:
        self.stats.close_code = self.stats.close_reason = None
        try:
            goodbye = await super().serve(ws, task_status=_Welcomed(self, task_status))
        finally:
            if self.connected:
                self.connected = False
                self.on_change()
        stats = self.stats
        if goodbye is not None:
            log.info(
                "the relay said goodbye (%s); reconnecting in %gs",
                goodbye.reason,
                goodbye.reconnect_after,
            )
        elif not self._draining:
            log.warning(
                "lost the relay connection (%s%s); reconnecting",
                stats.close_code if stats.close_code is not None else "no close code",
                f": {stats.close_reason}" if stats.close_reason else "",
            )
        return goodbye

    async def _connect_once(self, task_status: trio.TaskStatus[str] | None) -> Goodbye | None:
        try:
            return await super()._connect_once(task_status)
        except ConnectionRejected as rejected:
            if rejected.status_code != self._refusal:
                self._refusal = rejected.status_code
                why = {
                    401: "it wants an agent key (agent.key_file, credential agent_key or "
                    "$RELAYD_AGENT_KEY)",
                    403: "it does not accept this agent key",
                    429: "too many failed attempts from this address",
                }.get(rejected.status_code, "")
                log.error(
                    "the relay %s refused the agent (%d%s); retrying with back-off",
                    display_url(self.url),
                    rejected.status_code,
                    f": {why}" if why else "",
                )
                self.problem = (
                    f"refused by the relay ({rejected.status_code}{': ' + why if why else ''})"
                )
                self.on_change()
            raise
        except (OSError, HandshakeError, ConnectionClosed) as error:
            if self._refusal != 0:
                self._refusal = 0
                log.warning(
                    "cannot reach the relay %s (%s); retrying with back-off",
                    display_url(self.url),
                    error,
                )
                self.problem = f"cannot reach the relay ({error})"
                self.on_change()
            raise


@dataclass
class AgentService:
    """One run of the agent, from the locked state directory to exit.

    ``reload_settings`` reads the configuration again (file and command line);
    it raises ConfigError.
    """

    settings: AgentSettings
    state_dir: Path
    reload_settings: Callable[[], AgentSettings]
    notifier: Notifier
    environ: Mapping[str, str]
    agent: ReferenceAgent | None = None
    store: ConversationStore | None = None
    answerer: Answerer | None = None
    _changed: trio.Event = field(default_factory=trio.Event)
    _refresh: trio.Event = field(default_factory=trio.Event)
    _link_done: trio.Event = field(default_factory=trio.Event)
    handle_signals: bool = True  # False: only send_signal() stops or reloads it
    _saved_id: str | None = None
    _waiting_for_models: bool = False

    def __post_init__(self) -> None:
        self._commands_send, self._commands_receive = trio.open_memory_channel[int](16)

    # -- running ---------------------------------------------------------------------------

    def send_signal(self, signum: int) -> None:
        """Act as on a signal (SIGHUP: reload; SIGTERM, SIGINT: drain and stop),
        without one: for embedding the agent, and for tests."""
        self._commands_send.send_nowait(signum)

    async def _forward_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # The receiver stays open for the whole run: were it closed during the
        # drain, a second SIGTERM would kill the process mid-write.
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                self._commands_send.send_nowait(signum)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM/SIGINT (or cancelled). Raises ConfigError or
        StoreError when it cannot start (a key file, the state directory)."""
        settings = self.settings
        agent_key = find_agent_key(settings, self.environ)
        backend_key = find_backend_key(settings, self.environ)
        lock = StateLock(self.state_dir)
        await trio.to_thread.run_sync(lock.acquire)
        try:
            store = await ConversationStore.open(self.state_dir, _limits(settings))
            self.store = store
            try:
                await self._run(agent_key, backend_key, task_status)
            finally:
                with trio.CancelScope(shield=True):
                    await store.aclose()
        finally:
            lock.release()

    async def _run(
        self,
        agent_key: Secret | None,
        backend_key: Secret | None,
        task_status: trio.TaskStatus[None],
    ) -> None:
        settings = self.settings
        assert self.store is not None
        backend = build_backend(settings, backend_key)
        self.answerer = Answerer(backend, self.store, self._default_model)
        self._saved_id = await trio.to_thread.run_sync(self._read_agent_id)
        profile = AgentProfile(
            name=settings.name,
            version=f"relayd-agent {__version__}",
            capacity=settings.capacity,
            models=settings.models,
        )
        agent = ReferenceAgent(
            settings.register_url,
            self.answerer,
            profile,
            headers=_headers(agent_key),
            on_change=self._note_change,
        )
        agent.agent_id = self._saved_id
        self.agent = agent
        log.info(
            "relayd agent %s starting: %s; agent key: %s; backend key: %s; state %s",
            __version__,
            settings.summary(),
            agent_key.source if agent_key else "none",
            backend_key.source if backend_key else "none",
            self.state_dir,
        )
        try:
            async with trio.open_nursery() as root:
                if self.handle_signals:
                    await root.start(self._forward_signals)
                link_scope = trio.CancelScope()
                root.start_soon(self._link, link_scope)
                root.start_soon(self._reporter)
                root.start_soon(self._models_loop)  # idle while models are given or echoed
                interval = watchdog_interval(self.environ, os.getpid())
                if interval is not None:
                    log.info("systemd watchdog: pinging every %.1fs", interval)
                    root.start_soon(watchdog_loop, self.notifier, interval)
                self.notifier.ready(self.status())
                task_status.started()
                commands = self._commands_receive
                async for signum in commands:
                    if signum == signal.SIGHUP:
                        await self.reload()
                        continue
                    log.info("received %s, draining", signal.Signals(signum).name)
                    self.notifier.stopping()
                    if self.handle_signals:  # a process of its own: it may exit at once
                        root.start_soon(self._hard_stop_timer, commands)
                    await self._drain(link_scope)
                    break
                root.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.answerer.backend.retire()
        log.info("relayd agent stopped")

    async def _link(self, scope: trio.CancelScope) -> None:
        """The relay connection, once the models are known."""
        agent = self.agent
        assert agent is not None
        try:
            with scope:
                answerer = self.answerer
                if (
                    answerer is not None
                    and answerer.backend.discovers_models
                    and not (self.settings.models)
                ):
                    await self._first_models()
                await agent.run()
        finally:
            self._link_done.set()

    async def _first_models(self) -> None:
        """Wait until the backend lists its models, with back-off; announce them."""
        agent = self.agent
        assert agent is not None and self.answerer is not None
        self._waiting_for_models = True
        self._changed.set()
        failures = 0
        logged: str | None = None
        while True:
            backend = self.answerer.backend
            try:
                models = await backend.list_models()
            except ModelListError as error:
                if not error.retryable:
                    raise ConfigError(str(error), source="agent.models") from None
                if str(error) != logged:
                    logged = str(error)
                    log.warning(
                        "waiting for the backend's model list: %s; retrying with back-off", error
                    )
                models = ()
            else:
                if not models and logged != "empty":
                    logged = "empty"
                    log.warning(
                        "the backend %s lists no models; waiting until it has one "
                        "(or name them with --model)",
                        backend.name,
                    )
            if models or self.settings.models:
                break
            failures += 1
            ceiling = min(MODELS_RETRY_CAP, MODELS_RETRY_FIRST * 2 ** (failures - 1))
            with trio.move_on_after(random.uniform(ceiling / 2, ceiling)):
                await self._refresh.wait()  # a reload may bring models or a new backend
            self._refresh = trio.Event()
        if not self.settings.models:
            agent.profile.models = models
            log.info("the backend serves %s", ", ".join(models))
        self._waiting_for_models = False
        self._changed.set()

    async def _models_loop(self) -> None:
        """Read the backend's model list every ``models_refresh``; announce changes."""
        agent = self.agent
        assert agent is not None and self.answerer is not None
        failed = False
        while True:
            with trio.move_on_after(self.settings.models_refresh):
                await self._refresh.wait()
            self._refresh = trio.Event()
            backend = self.answerer.backend
            if self.settings.models or not backend.discovers_models or self._waiting_for_models:
                continue
            try:
                models = await backend.list_models()
            except ModelListError as error:
                if not failed:
                    log.warning("cannot refresh the model list (%s); keeping the last one", error)
                failed = True
                continue
            if failed:
                log.info("the backend lists its models again")
                failed = False
            if models and models != agent.profile.models:
                log.info("the backend's models changed: now %s", ", ".join(models))
                await agent.update(models=models)
                self._changed.set()

    def _note_change(self) -> None:
        self._changed.set()  # the event of the moment: the reporter replaces it

    def _default_model(self) -> str | None:
        models = self.agent.profile.models if self.agent is not None else self.settings.models
        return models[0] if models else None

    # -- reporting -------------------------------------------------------------------------

    def status(self) -> str:
        agent = self.agent
        relay = display_url(self.settings.relay)
        if agent is None:
            return "starting"
        if self._waiting_for_models:
            return f"waiting for the backend to list its models; relay {relay}"
        stats = agent.stats
        if agent.connected:
            return (
                f"connected to {relay} as {agent.agent_id}; {stats.inflight} in flight; "
                f"{stats.replies} answered, {stats.errors} failed"
            )
        if agent.problem:
            return f"not connected to {relay}: {agent.problem}; retrying"
        return f"connecting to {relay}; {stats.inflight} in flight"

    async def _reporter(self) -> None:
        """STATUS= when it changes (at once on a (dis)connection, else every
        few seconds), and the agent id saved when the relay gives a new one."""
        last = ""
        while True:
            with trio.move_on_after(STATUS_INTERVAL):
                await self._changed.wait()
            self._changed = trio.Event()
            agent = self.agent
            if agent is not None and agent.agent_id and agent.agent_id != self._saved_id:
                self._saved_id = agent.agent_id
                await trio.to_thread.run_sync(self._write_agent_id, agent.agent_id)
            text = self.status()
            if text != last:
                self.notifier.status(text)
                last = text

    def _read_agent_id(self) -> str | None:
        try:
            text = (self.state_dir / AGENT_ID_FILE).read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text or None

    def _write_agent_id(self, agent_id: str) -> None:
        try:
            atomic_write(self.state_dir / AGENT_ID_FILE, (agent_id + "\n").encode())
        except OSError as error:
            log.warning("cannot save the agent id in %s: %s", self.state_dir, error.strerror)

    # -- reload and drain ------------------------------------------------------------------

    async def reload(self) -> bool:
        """SIGHUP: read the settings and keys again and apply them, or keep the old."""
        self.notifier.reloading()
        old = self.settings
        agent = self.agent
        assert agent is not None and self.answerer is not None and self.store is not None
        try:
            new = self.reload_settings()
            agent_key = find_agent_key(new, self.environ)
            backend_key = find_backend_key(new, self.environ)
        except ConfigError as error:
            log.error("reload failed, still running the previous settings: %s", error)
            self.notifier.ready(f"reload failed: {error}; {self.status()}")
            return False
        changed = settings_changed(old, new)
        self.settings = new
        logs.set_level(new.log_level)
        if "state_dir" in changed:
            log.warning("agent.state_dir changed; restart the agent to apply it")
        agent.url = new.register_url
        agent.profile.name = new.name
        agent.headers = _headers(agent_key)
        if {"relay", "name"} & set(changed):
            log.info("the relay URL or name changed; they apply from the next connection")
        self.store.limits = _limits(new)
        # The backend is rebuilt on every reload: a key file may have changed.
        old_backend = self.answerer.backend
        backend = build_backend(new, backend_key)
        backend.health.problem = old_backend.health.problem
        self.answerer.backend = backend
        await old_backend.retire()
        if new.capacity != agent.profile.capacity:
            await agent.update(capacity=new.capacity)
        if new.models and new.models != agent.profile.models:
            await agent.update(models=new.models)
        self._refresh.set()  # discover models now (and wake a start-up still waiting)
        log.info(
            "reloaded %s: %s",
            new.source,
            ", ".join(changed) + " changed" if changed else "nothing changed",
        )
        self._changed.set()
        self.notifier.ready(self.status())
        return True

    async def _drain(self, link_scope: trio.CancelScope) -> None:
        """Take no new work; let requests under way finish within the grace."""
        agent = self.agent
        assert agent is not None
        try:
            await agent.drain()
        except LocalProtocolError:  # between the hello and the welcome: nothing to finish
            link_scope.cancel()
        if not agent.connected:
            link_scope.cancel()  # nothing under way (it may be in back-off)
        with trio.move_on_after(self.settings.drain_grace) as grace:
            await self._link_done.wait()
        if grace.cancelled_caught:
            log.warning(
                "drain grace (%gs) over: abandoning %d requests",
                self.settings.drain_grace,
                agent.stats.inflight,
            )
        link_scope.cancel()

    async def _hard_stop_timer(self, signals: AsyncIterator[int]) -> None:
        await hard_stop_after(self.settings.drain_grace + HARD_STOP_MARGIN, signals, log)
