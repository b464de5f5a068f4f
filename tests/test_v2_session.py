"""Protocol v2 sessions (AgentSession with ``version=2``) under the real Dispatcher,
over in-memory transports, in virtual time.

Every test takes ``autojump_clock``: the clock jumps whenever all tasks are
blocked, so deadlines of seconds take no real time and the times asserted are
exact. The agent is :class:`V2MemoryAgent`, a scripted v2 agent driven by the
sans-I/O :class:`relayd.protocol.v2.AgentConnectionV2`; v1 agents, for mixed
pools, are tests/memory_transport.py's MemoryAgent.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from relayd.agents.session import (
    MAX_CONSECUTIVE_PROTOCOL_ERRORS,
    AgentSession,
    SessionHost,
)
from relayd.config import parse_config
from relayd.dispatch import Answer, Dispatcher, Question
from relayd.errors import (
    AgentFailed,
    AgentTimeout,
    NoAgent,
    QueueTimeout,
    RelayError,
    StreamBroken,
    UnknownModel,
)
from relayd.protocol import AgentError, CloseCode, Reply, Request
from relayd.protocol.v2 import (
    AgentConnectionV2,
    AgentHello,
    Cancel,
    ChatRequest,
    Delta,
    Drain,
    Goodbye,
    Update,
    Welcome,
)
from relayd.web import status_of
from tests.memory_transport import (
    AgentEnd,
    Background,
    RelayEnd,
    connect_agent,
    dispatcher_for,
    echo,
    in_background,
    start_heartbeat,
    transport_pair,
)

TIMEOUT = 60.0
QUEUE_TIMEOUT = 20.0
HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 3.0


def make_dispatcher(
    *, agents: dict[str, Any] | None = None, requests: dict[str, Any] | None = None
) -> Dispatcher:
    return dispatcher_for(
        parse_config(
            {
                "agents": {
                    "heartbeat_interval": f"{HEARTBEAT_INTERVAL}s",
                    "heartbeat_timeout": f"{HEARTBEAT_TIMEOUT}s",
                    "handshake_timeout": f"{HANDSHAKE_TIMEOUT}s",
                    "reconnect_grace": "10s",
                    **(agents or {}),
                },
                "requests": {
                    "timeout": f"{TIMEOUT}s",
                    "queue_timeout": f"{QUEUE_TIMEOUT}s",
                    **(requests or {}),
                },
            }
        )
    )


# -- a v2 agent in memory ----------------------------------------------------------------


@dataclass
class Work:
    """One request at the agent; the handler answers through it."""

    agent: V2MemoryAgent
    request: Request | ChatRequest
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def content(self) -> str:
        if isinstance(self.request, Request):
            return self.request.content
        last = self.request.messages[-1].get("content", "") if self.request.messages else ""
        return str(last)

    async def _send(self, event: Delta | AgentError, raw: dict[str, Any]) -> None:
        # A request the relay cancelled is no longer pending at the agent's end: a
        # real agent that had not seen the cancel would still send; so does this one.
        if self.id in self.agent.connection.pending:
            await self.agent.end.send(self.agent.connection.send(event))
        else:
            await self.agent.end.send(json.dumps(raw))

    async def delta(self, text: str) -> None:
        await self._send(Delta(self.id, text), {"type": "delta", "id": self.id, "text": text})

    async def done(self, content: str | None = None, *, conversation_id: str = "") -> None:
        conversation = conversation_id or f"conv-{self.id}"
        reply = Reply(self.id, f"resp-{self.id}", conversation, content or "")
        if self.id in self.agent.connection.pending:
            text = self.agent.connection.done(reply, include_content=content is not None)
        else:
            document: dict[str, Any] = {"type": "done", "id": self.id, "conversation_id": ""}
            if content is not None:
                document["content"] = content
            text = json.dumps(document)
        await self.agent.end.send(text)

    async def error(self, message: str = "boom", code: str = "internal", **kw: bool) -> None:
        retryable = kw.get("retryable", False)
        event = AgentError(self.id, message, code=code, retryable=retryable)
        raw = {"type": "error", "id": self.id, "code": code, "message": message}
        await self._send(event, raw | {"retryable": retryable})

    def hang_up(self) -> None:
        self.agent.end.disconnect()


V2Handler = Callable[[Work], Awaitable[None]]


def echo_v2(delay: float = 0.0) -> V2Handler:
    """``echo:<content>`` word by word (``delay`` between words), then done without content."""

    async def handle(work: Work) -> None:
        words = ("echo:" + work.content).split(" ")
        for index, word in enumerate(words):
            if index and delay:
                await trio.sleep(delay)
            await work.delta(word if index == len(words) - 1 else word + " ")
        await work.done()

    return handle


async def never_v2(work: Work) -> None:
    await trio.sleep_forever()


async def slow_never(work: Work) -> None:
    """Never answer "slow"; echo anything else."""
    if work.content == "slow":
        await trio.sleep_forever()
    await echo_v2()(work)


def gated_v2(gate: trio.Event, then: V2Handler | None = None) -> V2Handler:
    answer = then or echo_v2()

    async def handle(work: Work) -> None:
        await gate.wait()
        await answer(work)

    return handle


class V2MemoryAgent:
    """A scripted v2 agent: hello, a task per request (cancelled by the relay's
    cancel unless ``honour_cancel`` is false), recording what it saw."""

    def __init__(
        self,
        end: AgentEnd,
        handler: V2Handler,
        hello: AgentHello,
        *,
        honour_cancel: bool = True,
        close_when_drained: bool = True,
    ) -> None:
        self.end = end
        self.handler = handler
        self.hello = hello
        self.honour_cancel = honour_cancel
        self.close_when_drained = close_when_drained
        self.connection = AgentConnectionV2()
        self.welcome: Welcome | None = None
        self.requests: list[Request | ChatRequest] = []
        self.cancels: list[tuple[float, Cancel]] = []  # (trio time, cancel)
        self.goodbyes: list[Goodbye] = []
        self.works: dict[str, Work] = {}
        self.inflight = 0
        self.max_inflight = 0
        self.draining = False
        self.finished = trio.Event()

    @property
    def cancelled_ids(self) -> list[str]:
        return [cancel.request_id for _, cancel in self.cancels]

    async def run(
        self, *, task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until the relay closes; ``started(agent id)`` at the welcome (None
        if the relay closes first)."""
        started = False
        try:
            async with trio.open_nursery() as nursery:
                await self.end.send(self.connection.hello(self.hello))
                while (text := await self.end.receive()) is not None:
                    event = self.connection.receive_text(text)
                    if isinstance(event, Welcome):
                        self.welcome = event
                        started = True
                        task_status.started(event.agent_id)
                    elif isinstance(event, Request | ChatRequest):
                        self.requests.append(event)
                        work = Work(self, event)
                        self.works[event.request_id] = work
                        nursery.start_soon(self._work, work)
                    elif isinstance(event, Cancel):
                        self.cancels.append((trio.current_time(), event))
                        work = self.works.get(event.request_id)
                        if work is not None and self.honour_cancel:
                            work.scope.cancel()
                    elif isinstance(event, Goodbye):
                        self.goodbyes.append(event)
                nursery.cancel_scope.cancel()
            if not started:
                task_status.started(None)
        finally:
            self.connection.connection_lost()
            self.finished.set()

    async def _work(self, work: Work) -> None:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            with work.scope:
                await self.handler(work)
        finally:
            self.inflight -= 1
            if self.draining and self.close_when_drained and not self.inflight:
                self.end.disconnect()

    async def update(
        self, capacity: int | None = None, models: tuple[str, ...] | None = None
    ) -> None:
        await self.end.send(self.connection.send(Update(capacity, models)))

    async def drain(self) -> None:
        self.draining = True
        await self.end.send(self.connection.send(Drain()))


@dataclass
class V2Connected:
    session: AgentSession
    agent: V2MemoryAgent
    end: AgentEnd
    relay: RelayEnd

    @property
    def agent_id(self) -> str:
        return self.session.agent_id

    @property
    def contents(self) -> list[str]:
        return [r.content for r in self.agent.requests if isinstance(r, Request)]


async def connect_v2(
    nursery: trio.Nursery,
    host: SessionHost,
    handler: V2Handler | None = None,
    *,
    capacity: int = 1,
    models: tuple[str, ...] = (),
    name: str = "mem-agent",
    version: str = "mem 1.0",
    resume: str | None = None,
    credential: str = "loopback",
    answer_pings: bool = True,
    honour_cancel: bool = True,
) -> V2Connected:
    """A v2 session for a new V2MemoryAgent on ``host``; returns once welcomed
    (or refused) and everything has settled."""
    start_heartbeat(nursery, host)
    relay, end = transport_pair()
    relay.answer_pings = answer_pings
    session = AgentSession(relay, host, credential=credential, remote="memory", version=2)
    hello = AgentHello(name, version, capacity, models, resume)
    agent = V2MemoryAgent(end, handler or echo_v2(), hello, honour_cancel=honour_cancel)
    nursery.start_soon(session.run)
    await nursery.start(agent.run)
    await trio.testing.wait_all_tasks_blocked()
    return V2Connected(session, agent, end, relay)


# -- asking -------------------------------------------------------------------------------


def question(content: str, **fields: Any) -> Question:
    return Question(content=content, user_id=fields.pop("user_id", "user-1"), **fields)


class Pending(Background[Answer]):
    """An ask() in the background, with the pieces it streamed (``streaming``)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        q: Question,
        *,
        streaming: bool = False,
        piece_delay: float = 0.0,
    ) -> None:
        self.pieces: list[tuple[float, str]] = []
        self.piece_delay = piece_delay
        on_piece = self._piece if streaming else None
        super().__init__(lambda: dispatcher.ask(q, on_piece), RelayError)

    async def _piece(self, text: str) -> None:
        self.pieces.append((trio.current_time(), text))
        if self.piece_delay:
            await trio.sleep(self.piece_delay)

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.pieces)


async def spawn(
    nursery: trio.Nursery, dispatcher: Dispatcher, q: Question, **kwargs: Any
) -> Pending:
    return await in_background(nursery, Pending(dispatcher, q, **kwargs))


def assert_idle(dispatcher: Dispatcher) -> None:
    assert dispatcher.pool.statistics().inflight == 0
    assert all(session.inflight == 0 for session in dispatcher.pool)
    assert dispatcher.queued == 0


def cancels_sent(relay: RelayEnd) -> list[dict[str, Any]]:
    frames = [json.loads(text) for text in relay.sent]
    return [frame for frame in frames if frame["type"] == "cancel"]


# -- hello, welcome, capacity ---------------------------------------------------------------


async def test_hello_sets_capacity_models_and_name(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(agents={"max_inflight": 1})
    with trio.fail_after(60):
        agent = await connect_v2(
            nursery, dispatcher, capacity=3, models=("a", "b"), name="gpu-1", version="bridge 2"
        )
    session = agent.session
    assert session.version == 2
    assert session.is_open
    assert (session.capacity, session.models) == (3, ("a", "b"))
    assert (session.name, session.software) == ("gpu-1", "bridge 2")
    assert not session.draining
    assert agent.agent.welcome == Welcome(session.agent_id, HEARTBEAT_INTERVAL)
    assert dispatcher.pool.get(session.agent_id) is session
    stats = dispatcher.pool.statistics()
    assert (stats.connected, stats.capacity, stats.inflight, stats.busy) == (1, 3, 0, 0)
    assert agent.relay.on_pong is not None  # the heartbeat's pongs reach the session
    (welcome,) = [json.loads(text) for text in agent.relay.sent]
    assert welcome == {
        "type": "welcome",
        "agent_id": session.agent_id,
        "heartbeat": int(HEARTBEAT_INTERVAL),
    }


async def test_a_reload_of_max_inflight_leaves_a_v2_capacity_alone(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(agents={"max_inflight": 1})
    with trio.fail_after(60):
        v2 = await connect_v2(nursery, dispatcher, capacity=3)
        v1 = await connect_agent(nursery, dispatcher)
        config = make_dispatcher(agents={"max_inflight": 5}).config
        dispatcher.apply(config, dispatcher.agent_keys)
    assert v2.session.capacity == 3
    assert v1.session.capacity == 5
    assert dispatcher.pool.statistics().capacity == 8


async def test_never_more_in_flight_than_the_hello_capacity(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(agents={"max_inflight": 1})

    async def one_second(work: Work) -> None:
        await trio.sleep(1)
        await echo_v2()(work)

    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, one_second, capacity=2)
        start = trio.current_time()
        pending = [await spawn(nursery, dispatcher, question(f"q{n}")) for n in range(6)]
        assert agent.agent.inflight == 2
        assert agent.session.inflight == 2
        assert dispatcher.queued == 4
        answers = [await p.result() for p in pending]
    assert [a.content for a in answers] == [f"echo:q{n}" for n in range(6)]
    assert [p.at - start for p in pending] == pytest.approx([1, 1, 2, 2, 3, 3])
    assert agent.agent.max_inflight == 2
    assert_idle(dispatcher)


async def test_update_of_capacity_serves_waiting_requests_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    gate = trio.Event()
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, gated_v2(gate), capacity=1)
        pending = [await spawn(nursery, dispatcher, question(f"q{n}")) for n in range(4)]
        assert (agent.agent.inflight, dispatcher.queued) == (1, 3)
        start = trio.current_time()
        await agent.agent.update(capacity=3)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == start
        assert (agent.agent.inflight, dispatcher.queued) == (3, 1)
        assert agent.session.capacity == 3
        assert dispatcher.pool.statistics().capacity == 3
        # Shrinking below what is in flight takes nothing back, and sends nothing new.
        await agent.agent.update(capacity=1)
        await trio.testing.wait_all_tasks_blocked()
        assert (agent.session.capacity, agent.session.inflight, dispatcher.queued) == (1, 3, 1)
        gate.set()
        answers = [await p.result() for p in pending]
    assert [a.content for a in answers] == [f"echo:q{n}" for n in range(4)]
    assert agent.agent.max_inflight == 3
    assert_idle(dispatcher)


async def test_update_of_models_serves_waiting_requests_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    gate = trio.Event()
    with trio.fail_after(600):
        b_agent = await connect_v2(nursery, dispatcher, gated_v2(gate), models=("b",))
        a_agent = await connect_v2(nursery, dispatcher, models=("a",))
        first = await spawn(nursery, dispatcher, question("first", model="b"))
        second = await spawn(nursery, dispatcher, question("second", model="b"))
        assert b_agent.contents == ["first"]
        assert a_agent.contents == []
        assert dispatcher.queued == 1
        await a_agent.agent.update(models=("a", "b"))
        await trio.testing.wait_all_tasks_blocked()
        assert a_agent.session.models == ("a", "b")
        assert a_agent.contents == ["second"]
        assert (await second.result()).agent_id == a_agent.agent_id
        assert dispatcher.pool.models() == (["a", "b"], False)
        # Models taken away: a request for one nobody serves any more is a 404.
        await a_agent.agent.update(models=("a",))
        await b_agent.agent.update(models=("c",))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(UnknownModel):
            await dispatcher.ask(question("third", model="b"))
        gate.set()
        assert (await first.result()).agent_id == b_agent.agent_id
    assert_idle(dispatcher)


async def test_an_invalid_update_is_dropped_and_changes_nothing(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(60):
        agent = await connect_v2(nursery, dispatcher, capacity=2, models=("a",))
        for frame in ({"capacity": 0}, {"capacity": 1001}, {"models": [""]}, {"models": "a"}):
            await agent.end.send(json.dumps({"type": "update", **frame}))
        await trio.testing.wait_all_tasks_blocked()
    assert agent.session.is_open
    assert (agent.session.capacity, agent.session.models) == (2, ("a",))


# -- model routing ------------------------------------------------------------------------------


async def test_model_routing(autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        a_agent = await connect_v2(nursery, dispatcher, models=("a",), capacity=4)
        b_agent = await connect_v2(nursery, dispatcher, models=("b",), capacity=4)
        for _ in range(3):
            assert (await dispatcher.ask(question("x", model="a"))).agent_id == a_agent.agent_id
            assert (await dispatcher.ask(question("y", model="b"))).agent_id == b_agent.agent_id
        start = trio.current_time()
        with pytest.raises(UnknownModel) as info:
            await dispatcher.ask(question("z", model="c"))
        assert trio.current_time() == start  # at once, not after a queue timeout
        anyone = {(await dispatcher.ask(question(f"any {n}"))).agent_id for n in range(4)}
    assert status_of(info.value) == 404
    assert info.value.message == "no connected agent serves model 'c'; models served: a, b"
    assert anyone == {a_agent.agent_id, b_agent.agent_id}
    assert {r.model for r in a_agent.agent.requests if isinstance(r, Request)} == {"a", None}
    assert {r.model for r in b_agent.agent.requests if isinstance(r, Request)} == {"b", None}
    assert_idle(dispatcher)


async def test_a_model_whose_agent_is_busy_waits_for_it(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    gate = trio.Event()
    with trio.fail_after(600):
        a_agent = await connect_v2(nursery, dispatcher, gated_v2(gate), models=("a",))
        b_agent = await connect_v2(nursery, dispatcher, models=("b",))
        first = await spawn(nursery, dispatcher, question("first", model="a"))
        second = await spawn(nursery, dispatcher, question("second", model="a"))
        assert dispatcher.queued == 1
        assert b_agent.agent.requests == []  # free, but it does not serve "a"
        assert (await dispatcher.ask(question("b meanwhile", model="b"))).content == (
            "echo:b meanwhile"
        )
        gate.set()
        answers = [await first.result(), await second.result()]
    assert [a.agent_id for a in answers] == [a_agent.agent_id] * 2
    assert a_agent.contents == ["first", "second"]
    assert b_agent.contents == ["b meanwhile"]
    assert_idle(dispatcher)


async def test_a_model_with_no_agent_serving_it_queued_past_its_queue_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A model that only a busy agent serves waits in the queue like any other request."""
    dispatcher = make_dispatcher(requests={"queue_timeout": "3s"})
    with trio.fail_after(600):
        await connect_v2(nursery, dispatcher, never_v2, models=("a",))
        await connect_v2(nursery, dispatcher, models=("b",))
        await spawn(nursery, dispatcher, question("held", model="a"))
        start = trio.current_time()
        with pytest.raises(QueueTimeout):
            await dispatcher.ask(question("waits", model="a"))
    assert trio.current_time() - start == pytest.approx(3)


async def test_agents_without_models_and_v1_agents_serve_any_model(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        v1 = await connect_agent(nursery, dispatcher, echo())
        answer = await dispatcher.ask(question("to v1", model="whatever"))
        assert answer.agent_id == v1.agent_id
        await v1.hang_up_and_wait()
        any_model = await connect_v2(nursery, dispatcher)
        answer = await dispatcher.ask(question("to v2", model="whatever"))
    assert answer.agent_id == any_model.agent_id
    (request,) = any_model.agent.requests
    assert isinstance(request, Request)
    assert request.model == "whatever"


# -- chat requests --------------------------------------------------------------------------


async def test_a_chat_request_reaches_a_v2_agent_untouched(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    messages = (
        {"role": "system", "content": "brief"},
        {"role": "user", "content": "Hi there", "name": "ann"},
    )
    params = {"max_tokens": 16, "temperature": 0.5, "stop": ["\n"], "x-vendor": {"k": [1]}}
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, models=("m",))
        q = Question(content="", user_id="u", model="m", messages=messages, params=dict(params))
        answer = await dispatcher.ask(q)
    (request,) = agent.agent.requests
    assert isinstance(request, ChatRequest)
    assert (request.model, request.messages, request.params) == ("m", messages, params)
    assert answer.content == "echo:Hi there"
    assert answer.agent_id == agent.agent_id
    # A chat is not one of the seed's conversations: nothing is recorded.
    assert dispatcher.conversations.get(answer.conversation_id, trio.current_time()) is None


async def test_chat_requests_go_to_v2_agents_only(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    chat = Question(content="", user_id="u", messages=({"role": "user", "content": "x"},))
    gate = trio.Event()
    with trio.fail_after(600):
        v1 = await connect_agent(nursery, dispatcher, echo())
        with pytest.raises(NoAgent, match="agent protocol v2"):
            await dispatcher.ask(chat)
        v2 = await connect_v2(nursery, dispatcher, gated_v2(gate))
        first = await spawn(nursery, dispatcher, chat)
        second = await spawn(nursery, dispatcher, chat)
        assert dispatcher.queued == 1  # v1 is free, but takes no chat requests
        assert v1.agent.requests == []
        gate.set()
        assert (await first.result()).agent_id == v2.agent_id
        assert (await second.result()).agent_id == v2.agent_id
    assert_idle(dispatcher)


# -- drain ---------------------------------------------------------------------------------


async def test_drain_dispatches_nothing_new_and_lets_in_flight_work_finish(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    gate = trio.Event()
    with trio.fail_after(600):
        draining = await connect_v2(nursery, dispatcher, gated_v2(gate), capacity=2)
        held = await spawn(nursery, dispatcher, question("held"))
        other = await connect_v2(nursery, dispatcher, capacity=1)
        await draining.agent.drain()
        await trio.testing.wait_all_tasks_blocked()
        assert draining.session.draining
        assert draining.session.is_open
        stats = dispatcher.pool.statistics()
        assert (stats.connected, stats.inflight, stats.capacity) == (2, 1, 3)
        assert dispatcher.pool.models() == ([], True)
        # It has a free slot, but new work goes to the other agent.
        for n in range(3):
            assert (await dispatcher.ask(question(f"new {n}"))).agent_id == other.agent_id
        assert draining.contents == ["held"]
        gate.set()
        answer = await held.result()
        assert answer.agent_id == draining.agent_id
        assert answer.content == "echo:held"
        # The agent closes once its last answer is sent; the relay forgets it.
        await draining.end.wait_closed()
        await trio.testing.wait_all_tasks_blocked()
    assert [s.agent_id for s in dispatcher.pool] == [other.agent_id]
    stats = dispatcher.pool.statistics()
    assert (stats.connected, stats.inflight, stats.capacity) == (1, 0, 1)
    assert_idle(dispatcher)


async def test_a_queued_request_is_not_given_to_a_draining_agent(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    gate = trio.Event()
    with trio.fail_after(600):
        draining = await connect_v2(nursery, dispatcher, gated_v2(gate), capacity=1)
        draining.agent.close_when_drained = False
        held = await spawn(nursery, dispatcher, question("held"))
        queued = await spawn(nursery, dispatcher, question("queued"))
        assert dispatcher.queued == 1
        await draining.agent.drain()
        gate.set()
        await held.result()
        await trio.testing.wait_all_tasks_blocked()
        assert not queued.done.is_set()  # the draining agent's free slot is not offered
        assert draining.contents == ["held"]
        other = await connect_v2(nursery, dispatcher)
        answer = await queued.result()
    assert answer.agent_id == other.agent_id
    assert_idle(dispatcher)


async def test_a_draining_agent_with_free_slots_is_not_counted_busy(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, never_v2, capacity=2)
        agent.agent.close_when_drained = False
        await spawn(nursery, dispatcher, question("held"))
        await agent.agent.drain()
        await trio.testing.wait_all_tasks_blocked()
        stats = dispatcher.pool.statistics()
    assert (stats.connected, stats.inflight, stats.capacity) == (1, 1, 2)
    assert stats.busy == 0


async def test_the_only_agent_draining_is_no_agent(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher)
        agent.agent.close_when_drained = False
        await agent.agent.drain()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(NoAgent) as info:
            await dispatcher.ask(question("anyone?"))
    assert status_of(info.value) == 503
    assert agent.agent.requests == []


# -- cancel when the asker stops waiting ------------------------------------------------------


async def test_deadline_cancels_the_request_at_the_agent_and_frees_the_slot_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(requests={"timeout": "5s"})
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, slow_never, honour_cancel=False)
        start = trio.current_time()
        pending = Pending(dispatcher, question("slow"))
        nursery.start_soon(pending.run)
        await pending.done.wait()
        # At the moment the asker has its answer, the slot is already free.
        assert agent.session.inflight == 0
        assert dispatcher.pool.statistics().inflight == 0
        await trio.testing.wait_all_tasks_blocked()
        (work,) = agent.agent.works.values()
        assert agent.agent.cancels == [(start + 5, Cancel(work.id, "requests.timeout passed"))]
        assert agent.agent.inflight == 1  # this agent ignores cancels
        # The agent had not seen the cancel: its late answer is ignored, quietly.
        await work.delta("late")
        await work.done("late")
        await trio.testing.wait_all_tasks_blocked()
        assert agent.session.is_open
        assert agent.session.inflight == 0
        again = await dispatcher.ask(question("again"))
    assert isinstance(pending.error, AgentTimeout)
    assert pending.at == start + 5
    assert cancels_sent(agent.relay) == [
        {"type": "cancel", "id": work.id, "reason": "requests.timeout passed"}
    ]
    assert again.agent_id == agent.agent_id
    assert_idle(dispatcher)


async def test_a_caller_that_goes_away_cancels_the_request_at_the_agent(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, slow_never)
        pending = await spawn(nursery, dispatcher, question("slow"), streaming=True)
        assert agent.session.inflight == 1
        await trio.sleep(3)
        pending.scope.cancel()  # the client went away
        gone_at = trio.current_time()
        await pending.done.wait()
        assert agent.session.inflight == 0
        assert dispatcher.pool.statistics().inflight == 0
        await trio.testing.wait_all_tasks_blocked()
        (work,) = agent.agent.works.values()
        assert agent.agent.cancels == [(gone_at, Cancel(work.id, "the client went away"))]
        assert agent.agent.inflight == 0  # the handler was cancelled
        answer = await dispatcher.ask(question("next"))  # the slot is free
    assert pending.at == gone_at
    assert answer.agent_id == agent.agent_id
    assert_idle(dispatcher)


async def test_a_caller_that_goes_away_mid_stream_cancels_too(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()

    async def endless(work: Work) -> None:
        while True:
            await work.delta("tick ")
            await trio.sleep(1)

    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, endless)
        pending = await spawn(nursery, dispatcher, question("stream"), streaming=True)
        await trio.sleep(4.5)
        assert pending.text == "tick " * 5
        pending.scope.cancel()
        await pending.done.wait()
        assert agent.session.inflight == 0
        await trio.testing.wait_all_tasks_blocked()
    assert [cancel.reason for _, cancel in agent.agent.cancels] == ["the client went away"]
    assert agent.agent.inflight == 0
    assert_idle(dispatcher)


async def test_a_v1_agent_keeps_its_slot_when_the_caller_goes_away(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The contrast: v1 has no cancel, so the slot stays taken until the agent answers."""
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        v1 = await connect_agent(nursery, dispatcher, echo(10))
        pending = await spawn(nursery, dispatcher, question("abandoned"))
        pending.scope.cancel()
        await pending.done.wait()
        assert v1.session.inflight == 1
        await trio.sleep(11)
        assert v1.session.inflight == 0
    assert not any(json.loads(t).get("type") == "cancel" for t in v1.relay.sent)


# -- streaming: pieces, slow readers, too-long answers --------------------------------------


async def test_pieces_reach_the_asker_as_they_come(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, echo_v2(delay=1))
        start = trio.current_time()
        pending = await spawn(nursery, dispatcher, question("one two three"), streaming=True)
        answer = await pending.result()
    assert [(at - start, text) for at, text in pending.pieces] == [
        (0, "echo:one "),
        (1, "two "),
        (2, "three"),
    ]
    assert answer.content == "echo:one two three"
    assert answer.streamed
    assert answer.agent_id == agent.agent_id
    assert_idle(dispatcher)


async def test_done_with_content_and_no_deltas_is_not_streamed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()

    async def whole(work: Work) -> None:
        await work.done("all at once")

    with trio.fail_after(600):
        await connect_v2(nursery, dispatcher, whole)
        pending = await spawn(nursery, dispatcher, question("q"), streaming=True)
        answer = await pending.result()
    assert pending.pieces == []
    assert (answer.content, answer.streamed) == ("all at once", False)


def many_deltas(count: int, size: int) -> V2Handler:
    """``count`` deltas of ``size`` characters at once, then nothing (never done)."""

    async def handle(work: Work) -> None:
        for n in range(count):
            await work.delta(str(n % 10) * size)
        await trio.sleep_forever()

    return handle


async def test_a_slow_reader_gets_stream_broken_and_the_agent_a_cancel(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(requests={"max_response": "1KiB"})
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, many_deltas(20, 100))
        pending = await spawn(nursery, dispatcher, question("flood"), streaming=True, piece_delay=1)
        with pytest.raises(StreamBroken, match=r"requests\.max_response"):
            await pending.result()
        assert agent.session.inflight == 0
        await trio.testing.wait_all_tasks_blocked()
    assert len(agent.agent.cancels) == 1
    assert agent.agent.inflight == 0
    assert len(pending.pieces) < 20  # it was cut short
    assert agent.session.is_open
    assert_idle(dispatcher)


async def test_a_slow_reader_is_cancelled_as_soon_as_it_falls_behind(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(requests={"max_response": "1KiB"})
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, many_deltas(20, 100))
        start = trio.current_time()
        pending = await spawn(nursery, dispatcher, question("flood"), streaming=True, piece_delay=1)
        with pytest.raises(StreamBroken):
            await pending.result()
    # All 20 deltas came at once; only the piece being written may finish first.
    ((at, cancel),) = agent.agent.cancels
    assert at - start <= 1
    assert cancel.reason == "the client read the answer more slowly than it came"


async def test_a_slow_reader_is_logged_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make_dispatcher(requests={"max_response": "1KiB"})
    with trio.fail_after(600):
        await connect_v2(nursery, dispatcher, many_deltas(20, 100))
        pending = await spawn(nursery, dispatcher, question("flood"), streaming=True, piece_delay=1)
        with pytest.raises(StreamBroken):
            await pending.result()
    warnings = [r for r in caplog.records if "client reads too slowly" in r.getMessage()]
    assert len(warnings) == 1


async def test_a_reader_exactly_at_max_response_is_not_cut(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(requests={"max_response": "1KiB"})

    async def handle(work: Work) -> None:
        await work.delta("first ")
        for _ in range(4):  # 1024 characters wait while the first piece is written
            await work.delta("x" * 256)
        await work.done()

    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, handle)
        pending = await spawn(nursery, dispatcher, question("q"), streaming=True, piece_delay=1)
        answer = await pending.result()
    assert answer.content == "first " + "x" * 1024
    assert agent.agent.cancels == []


async def test_an_answer_over_max_message_fails(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(agents={"max_message": "1KiB"})
    with trio.fail_after(600):
        first = await connect_v2(nursery, dispatcher, many_deltas(3, 500))
        second = await connect_v2(nursery, dispatcher, many_deltas(3, 500))
        with pytest.raises(AgentFailed, match=r"agents.max_message \(1024 characters\)") as info:
            await dispatcher.ask(question("too long"))
        streamed = await spawn(nursery, dispatcher, question("too long"), streaming=True)
        with pytest.raises(StreamBroken, match="max_message"):
            await streamed.result()
    assert status_of(info.value) == 502
    # Not retryable: one agent each, no second try.
    assert (len(first.agent.requests), len(second.agent.requests)) == (1, 1)
    assert streamed.text.startswith("0" * 500 + "1" * 500)


async def test_a_streamed_answer_never_passes_max_message(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(agents={"max_message": "1KiB"})
    with trio.fail_after(600):
        await connect_v2(nursery, dispatcher, many_deltas(3, 500))
        streamed = await spawn(nursery, dispatcher, question("too long"), streaming=True)
        with pytest.raises(StreamBroken):
            await streamed.result()
    assert len(streamed.text) <= 1024


async def test_an_answer_over_max_message_fails_but_keeps_the_agent(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The request fails (and is cancelled); the agent stays: one long answer is
    not a broken connection (docs/agents.md)."""
    dispatcher = make_dispatcher(agents={"max_message": "1KiB"})
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, many_deltas(3, 500))
        with pytest.raises(AgentFailed):
            await dispatcher.ask(question("too long"))
        await trio.testing.wait_all_tasks_blocked()
    assert agent.end.close_code is None
    assert agent.session.is_open


async def test_an_answer_over_max_message_is_cancelled_and_frees_its_slot(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(agents={"max_message": "1KiB"})
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, many_deltas(3, 500))
        start = trio.current_time()
        with pytest.raises(AgentFailed):
            await dispatcher.ask(question("too long"))
        assert agent.session.inflight == 0
        await trio.testing.wait_all_tasks_blocked()
    ((at, cancel),) = agent.agent.cancels
    assert at == start
    assert cancel.reason == "the answer grew past agents.max_message"
    assert agent.agent.inflight == 0
    assert_idle(dispatcher)


async def test_a_frame_over_max_message_closes_with_1009(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(agents={"max_message": "1KiB"})

    async def one_big_delta(work: Work) -> None:
        await work.delta("x" * 1100)

    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, one_big_delta)
        other = await connect_v2(nursery, dispatcher)
        answer = await dispatcher.ask(question("q"))  # first agent is lost: retried
        await agent.end.wait_closed()
    assert agent.end.close_code == CloseCode.MESSAGE_TOO_BIG
    assert answer.agent_id == other.agent_id
    assert answer.attempts == 2


# -- failover ----------------------------------------------------------------------------


def failing(
    *, delta_first: bool = False, hang_up: bool = False, retryable: bool = True
) -> V2Handler:
    async def handle(work: Work) -> None:
        if delta_first:
            await work.delta("from the first agent ")
        if hang_up:
            work.hang_up()
            return
        await work.error("backend down", code="backend_unavailable", retryable=retryable)

    return handle


async def test_an_agent_failing_before_any_delta_is_retried_on_another(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        bad = await connect_v2(nursery, dispatcher, failing(retryable=True))
        good = await connect_v2(nursery, dispatcher)
        pending = await spawn(nursery, dispatcher, question("q"), streaming=True)
        answer = await pending.result()
    assert (answer.agent_id, answer.attempts) == (good.agent_id, 2)
    assert pending.text == "echo:q"
    assert bad.contents == ["q"]
    assert_idle(dispatcher)


async def test_an_agent_hanging_up_before_any_delta_is_retried_on_another(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        await connect_v2(nursery, dispatcher, failing(hang_up=True))
        good = await connect_v2(nursery, dispatcher)
        pending = await spawn(nursery, dispatcher, question("q"), streaming=True)
        answer = await pending.result()
    assert (answer.agent_id, answer.attempts) == (good.agent_id, 2)
    assert pending.text == "echo:q"


async def test_a_non_retryable_error_is_502_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        await connect_v2(nursery, dispatcher, failing(retryable=False))
        other = await connect_v2(nursery, dispatcher)
        with pytest.raises(AgentFailed, match=r"\(backend_unavailable\): backend down") as info:
            await dispatcher.ask(question("q"))
    assert status_of(info.value) == 502
    assert other.agent.requests == []


@pytest.mark.parametrize("hang_up", [False, True], ids=["error", "hang-up"])
async def test_after_a_delta_a_failure_breaks_the_stream_and_nothing_is_spliced_on(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, hang_up: bool
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        first = await connect_v2(nursery, dispatcher, failing(delta_first=True, hang_up=hang_up))
        second = await connect_v2(nursery, dispatcher)
        pending = await spawn(nursery, dispatcher, question("q"), streaming=True)
        with pytest.raises(StreamBroken) as info:
            await pending.result()
    assert status_of(info.value) == 502
    assert pending.text == "from the first agent "
    assert first.contents == ["q"]
    assert second.agent.requests == []
    if hang_up:
        assert "disconnected in the middle of its answer" in info.value.message
    else:
        assert "failed mid-answer: backend down" in info.value.message


async def test_without_streaming_a_failure_after_deltas_is_retried_whole(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Nothing reached the asker, so another agent may answer; its answer alone."""
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        await connect_v2(nursery, dispatcher, failing(delta_first=True, hang_up=True))
        second = await connect_v2(nursery, dispatcher)
        answer = await dispatcher.ask(question("q"))
    assert (answer.agent_id, answer.content, answer.attempts) == (second.agent_id, "echo:q", 2)
    assert not answer.streamed


# -- mixed pools ---------------------------------------------------------------------------------


async def test_mixed_pool_a_v1_answer_to_a_streaming_ask_is_whole(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    gate = trio.Event()
    with trio.fail_after(600):
        v2 = await connect_v2(nursery, dispatcher, gated_v2(gate))
        held = await spawn(nursery, dispatcher, question("held by v2"), streaming=True)
        v1 = await connect_agent(nursery, dispatcher, echo(1))
        pending = await spawn(nursery, dispatcher, question("to v1"), streaming=True)
        answer = await pending.result()
        assert answer.agent_id == v1.agent_id
        assert (answer.content, answer.streamed) == ("echo:to v1", False)
        assert pending.pieces == []  # the asker sends it as one piece itself
        gate.set()
        other = await held.result()
    assert other.agent_id == v2.agent_id
    assert other.streamed
    assert held.text == "echo:held by v2"
    assert_idle(dispatcher)


async def test_mixed_pool_shares_the_work_and_the_statistics(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(agents={"max_inflight": 2})
    with trio.fail_after(600):
        v1 = await connect_agent(nursery, dispatcher, echo(1))
        v2 = await connect_v2(nursery, dispatcher, echo_v2(delay=1), capacity=3)
        assert dispatcher.pool.statistics().capacity == 5
        pending = [await spawn(nursery, dispatcher, question(f"q {n}")) for n in range(5)]
        assert (v1.session.inflight, v2.session.inflight) == (2, 3)
        assert dispatcher.pool.statistics().busy == 2
        answers = [await p.result() for p in pending]
    assert [a.content for a in answers] == [f"echo:q {n}" for n in range(5)]
    assert {a.agent_id for a in answers} == {v1.agent_id, v2.agent_id}
    assert_idle(dispatcher)


# -- the session's life: handshake, heartbeat, goodbye, resume -----------------------------------


async def test_no_hello_within_the_handshake_timeout_is_1008(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dispatcher = make_dispatcher()
    relay, end = transport_pair()
    session = AgentSession(relay, dispatcher, credential="loopback", remote="memory", version=2)
    start = trio.current_time()
    with trio.fail_after(60):
        await session.run()
    assert trio.current_time() - start == pytest.approx(HANDSHAKE_TIMEOUT)
    assert relay.sent == []  # v2: the relay does not speak first
    assert end.close_code == CloseCode.POLICY_VIOLATION
    assert len(dispatcher.pool) == 0


@pytest.mark.parametrize(
    ("first", "says"),
    [
        (json.dumps({"type": "hello", "capacity": 0}), "'capacity' from 1 to 1000"),
        (json.dumps({"type": "hello", "capacity": True}), "'capacity' from 1 to 1000"),
        (json.dumps({"type": "hello", "capacity": 1, "models": [""]}), "model ids"),
        (json.dumps({"type": "delta", "id": "r", "text": "x"}), "expected 'hello' first"),
        ("not json", "frame is not JSON"),
        (b"\x00", "binary frame"),
    ],
    ids=["capacity-0", "capacity-bool", "empty-model", "delta-first", "garbage", "binary"],
)
async def test_a_bad_hello_closes_with_1002(
    autojump_clock: trio.testing.MockClock, first: str | bytes, says: str
) -> None:
    dispatcher = make_dispatcher()
    relay, end = transport_pair()
    session = AgentSession(relay, dispatcher, credential="loopback", remote="memory", version=2)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await end.send(first)
    assert end.close_code == CloseCode.PROTOCOL_ERROR
    assert end.close_reason is not None and says in end.close_reason
    assert relay.sent == []
    assert len(dispatcher.pool) == 0


async def test_websocket_pings_keep_a_v2_agent_alive(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        start = trio.current_time()
        agent = await connect_v2(nursery, dispatcher)
        await trio.sleep(10 * HEARTBEAT_INTERVAL + 0.5)
    assert [at - start for at in agent.relay.pings] == pytest.approx(
        [HEARTBEAT_INTERVAL * n for n in range(1, 11)]
    )
    assert agent.session.is_open
    assert agent.session.last_pong_at is not None
    # No JSON ping frames for v2: only the welcome was sent.
    assert [json.loads(t)["type"] for t in agent.relay.sent] == ["welcome"]


async def test_a_v2_agent_that_does_not_pong_is_dropped_with_1001(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        start = trio.current_time()
        agent = await connect_v2(nursery, dispatcher, answer_pings=False)
        await agent.end.wait_closed()
    assert trio.current_time() - start == pytest.approx(HEARTBEAT_TIMEOUT)
    assert agent.end.close_code == CloseCode.GOING_AWAY
    assert agent.end.close_reason == "heartbeat timeout"
    assert len(agent.relay.pings) == 2
    assert len(dispatcher.pool) == 0


async def test_goodbye_before_a_going_away_close(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, never_v2)
        pending = await spawn(nursery, dispatcher, question("in flight"))
        agent.session.request_close(CloseCode.GOING_AWAY, "relayd is shutting down")
        await agent.agent.finished.wait()
        with pytest.raises(RelayError):
            await pending.result()
    assert agent.agent.goodbyes == [Goodbye("relayd is shutting down", 1.0)]
    last = json.loads(agent.relay.sent[-1])
    assert last == {"type": "goodbye", "reason": "relayd is shutting down", "reconnect_after": 1}
    assert agent.end.close_code == CloseCode.GOING_AWAY
    assert len(dispatcher.pool) == 0


async def test_a_normal_close_sends_no_goodbye(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher)
        agent.session.request_close(CloseCode.NORMAL, "bye")
        await agent.agent.finished.wait()
    assert agent.agent.goodbyes == []
    assert agent.end.close_code == CloseCode.NORMAL


async def test_resume_keeps_the_id_and_its_conversations(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        first = await connect_v2(nursery, dispatcher, credential="key-a")
        answer = await dispatcher.ask(question("turn 1"))
        first.end.disconnect()
        await first.end.wait_closed()
        await trio.testing.wait_all_tasks_blocked()
        assert len(dispatcher.pool) == 0
        again = await connect_v2(nursery, dispatcher, credential="key-a", resume=first.agent_id)
        assert again.agent_id == first.agent_id
        assert again.agent.welcome == Welcome(first.agent_id, HEARTBEAT_INTERVAL)
        follow = await dispatcher.ask(question("turn 2", conversation_id=answer.conversation_id))
        stranger = await connect_v2(nursery, dispatcher, credential="key-b", resume=first.agent_id)
    assert follow.agent_id == first.agent_id
    (request,) = again.agent.requests
    assert isinstance(request, Request)
    assert request.conversation_id == answer.conversation_id
    assert stranger.agent_id != first.agent_id  # an id cannot be hijacked
    assert stranger.agent.welcome is not None
    assert stranger.agent.welcome.agent_id == stranger.agent_id


async def test_resume_while_the_old_connection_is_still_open_replaces_it(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        old = await connect_v2(nursery, dispatcher)
        new = await connect_v2(nursery, dispatcher, resume=old.agent_id)
        await old.end.wait_closed()
    assert new.agent_id == old.agent_id
    assert old.end.close_reason == "replaced by a newer connection with this id"
    assert [s for s in dispatcher.pool] == [new.session]


# -- what the agent may send -------------------------------------------------------------


async def test_frames_for_unknown_requests_are_dropped_and_twenty_close_with_1008(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher)
        for n in range(MAX_CONSECUTIVE_PROTOCOL_ERRORS - 1):
            await agent.end.send(json.dumps({"type": "delta", "id": f"nope-{n}", "text": "x"}))
        await trio.testing.wait_all_tasks_blocked()
        assert agent.session.is_open
        assert (await dispatcher.ask(question("still fine"))).content == "echo:still fine"
        for n in range(MAX_CONSECUTIVE_PROTOCOL_ERRORS):
            await agent.end.send(json.dumps({"type": "done", "id": f"nope-{n}"}))
        await agent.end.wait_closed()
    assert agent.end.close_code == CloseCode.POLICY_VIOLATION
    assert agent.end.close_reason is not None
    assert "not in flight" in agent.end.close_reason


async def test_a_second_hello_is_dropped(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_v2(nursery, dispatcher, capacity=2)
        await agent.end.send(json.dumps({"type": "hello", "capacity": 9, "models": ["z"]}))
        await trio.testing.wait_all_tasks_blocked()
    assert agent.session.is_open
    assert (agent.session.capacity, agent.session.models) == (2, ())
