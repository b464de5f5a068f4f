"""The Dispatcher with real AgentSessions over in-memory transports, in virtual time.

Every test takes ``autojump_clock``, so timeouts of seconds cost nothing and the
times asserted are exact. Agents are scripted MemoryAgents (tests/memory_transport.py);
``wait_all_tasks_blocked()`` is how a test knows the system has settled.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from relayd.agents.auth import AgentKeys
from relayd.agents.session import AgentSession
from relayd.config import parse_config
from relayd.dispatch import Answer, Dispatcher, Question
from relayd.errors import (
    AgentFailed,
    AgentTimeout,
    ConversationAgentGone,
    NoAgent,
    QueueFull,
    QueueTimeout,
    RelayError,
    ShuttingDown,
    UnknownConversation,
)
from relayd.protocol import AgentError, CloseCode, Reply, Request
from relayd.users import secret_digest
from tests.memory_transport import (
    HANG_UP,
    Background,
    Connected,
    HangUp,
    connect_agent,
    dispatcher_for,
    echo,
    in_background,
    never,
)

TIMEOUT = 60.0
QUEUE_TIMEOUT = 20.0
GRACE = 10.0


def make_dispatcher(
    *,
    agents: dict[str, Any] | None = None,
    requests: dict[str, Any] | None = None,
    cls: type[Dispatcher] = Dispatcher,
) -> Dispatcher:
    sections = {
        "agents": {
            "heartbeat_interval": "5s",
            "heartbeat_timeout": "15s",
            "reconnect_grace": f"{GRACE}s",
            **(agents or {}),
        },
        "requests": {
            "timeout": f"{TIMEOUT}s",
            "queue_timeout": f"{QUEUE_TIMEOUT}s",
            **(requests or {}),
        },
    }
    return dispatcher_for(parse_config(sections), cls=cls)


def question(content: str, **fields: Any) -> Question:
    return Question(content=content, user_id=fields.pop("user_id", "user-1"), **fields)


def follow_up(first: Answer, content: str, **fields: Any) -> Question:
    """A question that continues ``first``'s conversation."""
    return question(content, conversation_id=first.conversation_id, **fields)


class Pending(Background[Answer]):
    """An ask() running in the background (a RelayError is its error)."""

    def __init__(self, dispatcher: Dispatcher, q: Question) -> None:
        super().__init__(lambda: dispatcher.ask(q), RelayError)

    @property
    def answer(self) -> Answer | None:
        return self.value


async def spawn(nursery: trio.Nursery, dispatcher: Dispatcher, q: Question) -> Pending:
    """Start an ask and let everything settle (so it is queued or at an agent)."""
    return await in_background(nursery, Pending(dispatcher, q))


def gated(gate: trio.Event, contents: tuple[str, ...] = ("busy",)) -> Callable[..., Any]:
    """Echo, but hold the requests whose content is in ``contents`` until ``gate``."""
    answer = echo()

    async def handle(request: Request) -> Reply | AgentError | HangUp | None:
        if request.content in contents:
            await gate.wait()
        return await answer(request)

    return handle


async def fail(request: Request) -> AgentError:
    return request.fail("Unknown error")


async def held_busy(
    nursery: trio.Nursery, dispatcher: Dispatcher
) -> tuple[Connected, Pending, trio.Event]:
    """An agent that holds the question "busy" (asked here) until the returned gate is set."""
    gate = trio.Event()
    agent = await connect_agent(nursery, dispatcher, gated(gate))
    return agent, await spawn(nursery, dispatcher, question("busy")), gate


def contents(agent: Connected) -> list[str]:
    return [request.content for request in agent.agent.requests]


def assert_idle(dispatcher: Dispatcher) -> None:
    """No slot leaked, nobody left in the queue."""
    assert dispatcher.pool.statistics().inflight == 0
    assert all(session.inflight == 0 for session in dispatcher.pool)
    assert dispatcher.queued == 0


# -- the simple path --------------------------------------------------------------------


async def test_a_question_is_answered(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, echo(1.5))
        start = trio.current_time()
        answer = await dispatcher.ask(question("hello", parent_id="p-given"))
    assert trio.current_time() - start == pytest.approx(1.5)
    assert answer.content == "echo:hello"
    assert answer.agent_id == agent.agent_id
    assert answer.attempts == 1
    assert answer.queue_wait == 0
    (request,) = agent.agent.requests
    assert answer.id == request.request_id
    assert request.conversation_id == ""
    assert request.parent_id == "p-given"
    assert answer.conversation_id == f"conv-{request.request_id}"
    entry = dispatcher.conversations.get(answer.conversation_id, trio.current_time())
    assert entry is not None
    assert (entry.agent_id, entry.user_id, entry.last_response_id) == (
        agent.agent_id,
        "user-1",
        answer.response_id,
    )
    assert_idle(dispatcher)


async def test_a_new_conversation_without_parent_gets_fresh_ids(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher)
        await dispatcher.ask(question("one"))
        await dispatcher.ask(question("two"))
    first, second = agent.agent.requests
    assert first.parent_id and second.parent_id and first.parent_id != second.parent_id
    assert first.message_id != second.message_id
    assert first.request_id != second.request_id


# -- deadlines and the queue ------------------------------------------------------------


async def test_deadline_raises_agent_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(requests={"timeout": "5s"})
    with trio.fail_after(600):
        await connect_agent(nursery, dispatcher, never)
        start = trio.current_time()
        with pytest.raises(AgentTimeout, match=r"requests.timeout \(5s\)"):
            await dispatcher.ask(question("hello"))
    assert trio.current_time() - start == pytest.approx(5)
    # The seed protocol has no cancel: the agent is still working on it.
    assert dispatcher.pool.statistics().inflight == 1


async def test_late_reply_after_timeout_is_dropped_and_frees_the_slot(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(requests={"timeout": "5s"})

    async def slow_first(request: Request) -> Reply:
        if request.content == "slow":
            await trio.sleep(8)
        return request.reply(
            "r-" + request.content, "c-" + request.content, "echo:" + request.content
        )

    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, slow_first)
        start = trio.current_time()
        with pytest.raises(AgentTimeout):
            await dispatcher.ask(question("slow"))
        assert dispatcher.pool.statistics().inflight == 1
        second = await dispatcher.ask(question("fast"))
    # It waited for the slow reply to free the slot, and got its own answer.
    assert trio.current_time() - start == pytest.approx(8)
    assert second.content == "echo:fast"
    assert second.queue_wait == pytest.approx(3)
    assert contents(agent) == ["slow", "fast"]
    # The late reply did not make a conversation.
    assert dispatcher.conversations.get("c-slow", trio.current_time()) is None
    assert agent.session.is_open
    assert_idle(dispatcher)


async def test_queue_timeout(autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    dispatcher = make_dispatcher(requests={"queue_timeout": "3s"})
    with trio.fail_after(600):
        await connect_agent(nursery, dispatcher, never)
        busy = await spawn(nursery, dispatcher, question("busy"))
        start = trio.current_time()
        with pytest.raises(QueueTimeout) as info:
            await dispatcher.ask(question("waiting"))
    assert trio.current_time() - start == pytest.approx(3)
    assert info.value.retry_after is not None
    assert dispatcher.queued == 0
    assert not busy.done.is_set()


async def test_queue_full(autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    dispatcher = make_dispatcher(requests={"max_queue": 1})
    with trio.fail_after(600):
        agent, busy, gate = await held_busy(nursery, dispatcher)
        queued = await spawn(nursery, dispatcher, question("queued"))
        assert dispatcher.queued == 1
        start = trio.current_time()
        with pytest.raises(QueueFull) as info:
            await dispatcher.ask(question("one too many"))
        assert trio.current_time() == start
        assert info.value.retry_after is not None
        gate.set()
        assert (await busy.result()).content == "echo:busy"
        assert (await queued.result()).content == "echo:queued"
    assert contents(agent) == ["busy", "queued"]
    assert_idle(dispatcher)


async def test_no_agent_fails_at_once(autojump_clock: trio.testing.MockClock) -> None:
    dispatcher = make_dispatcher()
    start = trio.current_time()
    with trio.fail_after(60), pytest.raises(NoAgent) as info:
        await dispatcher.ask(question("anyone?"))
    assert trio.current_time() == start
    assert info.value.retry_after is not None
    assert dispatcher.queued == 0


async def test_wait_for_agent_waits_for_one_to_connect(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(requests={"wait_for_agent": "5s"})
    with trio.fail_after(600):
        start = trio.current_time()
        pending = await spawn(nursery, dispatcher, question("anyone?"))
        await trio.sleep(2)
        assert not pending.done.is_set()
        agent = await connect_agent(nursery, dispatcher)
        answer = await pending.result()
    assert pending.at is not None and pending.at - start == pytest.approx(2)
    assert answer.content == "echo:anyone?"
    assert answer.agent_id == agent.agent_id
    assert_idle(dispatcher)


async def test_wait_for_agent_gives_up_with_no_agent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dispatcher = make_dispatcher(requests={"wait_for_agent": "5s"})
    start = trio.current_time()
    with trio.fail_after(60), pytest.raises(NoAgent):
        await dispatcher.ask(question("anyone?"))
    assert trio.current_time() - start == pytest.approx(5)
    assert dispatcher.queued == 0


async def test_waiters_are_served_in_fifo_order(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent, busy, gate = await held_busy(nursery, dispatcher)
        waiters = [await spawn(nursery, dispatcher, question(f"w{n}")) for n in range(6)]
        assert dispatcher.queued == 6
        gate.set()
        for waiter in waiters:
            await waiter.result()
        await busy.result()
    assert contents(agent) == ["busy", "w0", "w1", "w2", "w3", "w4", "w5"]
    finished = [waiter.at for waiter in waiters]
    assert finished == sorted(finished)
    assert_idle(dispatcher)


async def test_fifo_across_conversation_and_new_requests(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    gate = trio.Event()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, gated(gate))
        first = await dispatcher.ask(question("first"))
        busy = await spawn(nursery, dispatcher, question("busy"))
        order = [
            await spawn(nursery, dispatcher, question("new-1")),
            await spawn(nursery, dispatcher, follow_up(first, "turn-2")),
            await spawn(nursery, dispatcher, question("new-2")),
            await spawn(nursery, dispatcher, follow_up(first, "turn-3")),
        ]
        gate.set()
        for pending in order:
            await pending.result()
        await busy.result()
    assert contents(agent) == ["first", "busy", "new-1", "turn-2", "new-2", "turn-3"]
    assert_idle(dispatcher)


class Hooked(Dispatcher):
    """A Dispatcher that runs test code right before or after a slot frees, in the
    same step (no checkpoint): how a client disconnect can land at that moment."""

    before: Callable[[AgentSession], None] | None = None
    after: Callable[[AgentSession], None] | None = None

    def slot_freed(self, session: AgentSession) -> None:
        before, self.before = self.before, None
        after, self.after = self.after, None
        if before is not None:
            before(session)
        super().slot_freed(session)
        if after is not None:
            after(session)


async def test_a_waiter_cancelled_before_it_runs_passes_its_slot_on(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The waiter is cancelled (client gone) and, before it gets to run, a slot
    frees and is handed to it: it must hand the slot to the next waiter."""
    dispatcher = make_dispatcher(cls=Hooked)
    assert isinstance(dispatcher, Hooked)
    handed: list[tuple[int, int]] = []
    with trio.fail_after(600):
        agent, busy, gate = await held_busy(nursery, dispatcher)
        first = await spawn(nursery, dispatcher, question("cancelled"))
        second = await spawn(nursery, dispatcher, question("second"))
        dispatcher.before = lambda session: first.scope.cancel()
        dispatcher.after = lambda session: handed.append((session.inflight, dispatcher.queued))
        gate.set()
        answer = await second.result()
        await first.done.wait()
        await busy.result()
    # The slot was taken for the first waiter (the second was still queued) ...
    assert handed == [(1, 1)]
    # ... which, cancelled, passed it on.
    assert first.scope.cancelled_caught
    assert first.answer is None and first.error is None
    assert answer.content == "echo:second"
    assert contents(agent) == ["busy", "second"]
    assert_idle(dispatcher)


async def test_a_waiter_cancelled_after_being_handed_a_slot_passes_it_on(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """dispatch.py: "a waiter cancelled after [being handed a slot] hands the slot
    on". Here the cancel lands right after the hand-over, before the waiter runs:
    its question must not be sent to the agent, and the slot must go to the next
    waiter at once."""
    dispatcher = make_dispatcher(cls=Hooked)
    assert isinstance(dispatcher, Hooked)
    gate = trio.Event()
    handed: list[int] = []
    with trio.fail_after(600):
        answer = gated(gate)

        async def handle(request: Request) -> Reply | AgentError | HangUp | None:
            if request.content == "cancelled":
                await trio.sleep_forever()  # a question sent for nobody holds the slot
            return await answer(request)

        agent = await connect_agent(nursery, dispatcher, handle)
        busy = await spawn(nursery, dispatcher, question("busy"))
        first = await spawn(nursery, dispatcher, question("cancelled"))
        second = await spawn(nursery, dispatcher, question("second"))

        def cancel_first(session: AgentSession) -> None:
            handed.append(session.inflight)
            first.scope.cancel()

        dispatcher.after = cancel_first
        gate.set()
        await busy.result()
        await first.done.wait()
        with trio.move_on_after(10):
            await second.result()
    assert handed == [1]  # the slot had been taken for the first waiter
    assert first.scope.cancelled_caught
    assert contents(agent) == ["busy", "second"], "the cancelled question was sent to the agent"
    assert second.answer is not None and second.answer.content == "echo:second"
    assert_idle(dispatcher)


async def test_a_waiter_cancelled_in_the_queue_leaves_it(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent, busy, gate = await held_busy(nursery, dispatcher)
        leaving = await spawn(nursery, dispatcher, question("leaving"))
        staying = await spawn(nursery, dispatcher, question("staying"))
        leaving.scope.cancel()
        await leaving.done.wait()
        assert dispatcher.queued == 1
        gate.set()
        await staying.result()
        await busy.result()
    assert contents(agent) == ["busy", "staying"]
    assert_idle(dispatcher)


# -- retries -------------------------------------------------------------------------------


def fail_first(count: int) -> Callable[..., Any]:
    """A handler shared by several agents: the first ``count`` requests fail."""
    calls = 0
    answer = echo()

    async def handle(request: Request) -> Reply | AgentError | HangUp | None:
        nonlocal calls
        calls += 1
        if calls <= count:
            return request.fail(f"failure {calls}")
        return await answer(request)

    return handle


async def test_retried_on_another_agent_after_an_agent_error(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    handler = fail_first(2)
    with trio.fail_after(600):
        agents = [await connect_agent(nursery, dispatcher, handler) for _ in range(3)]
        answer = await dispatcher.ask(question("hello"))
    assert answer.attempts == 3
    assert answer.content == "echo:hello"
    # Never the same agent twice: each of the three saw the question once.
    assert [contents(agent) for agent in agents] == [["hello"]] * 3
    assert_idle(dispatcher)


async def test_retries_stop_at_max_attempts(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(requests={"max_attempts": 3})
    with trio.fail_after(600):
        agents = [await connect_agent(nursery, dispatcher, fail) for _ in range(5)]
        with pytest.raises(AgentFailed, match="the agent failed: Unknown error"):
            await dispatcher.ask(question("hello"))
    seen = [len(agent.agent.requests) for agent in agents]
    assert sorted(seen) == [0, 0, 1, 1, 1]
    assert_idle(dispatcher)


async def test_the_only_agent_failing_is_not_retried_on_itself(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, fail)
        start = trio.current_time()
        with pytest.raises(AgentFailed):
            await dispatcher.ask(question("hello"))
    assert trio.current_time() == start
    assert contents(agent) == ["hello"]
    assert_idle(dispatcher)


async def test_malformed_reply_is_retried_like_an_error(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()

    async def garbled(request: Request) -> Reply:
        return request.reply("r", "c", "x")

    with trio.fail_after(600):
        bad = await connect_agent(nursery, dispatcher, never)
        good = await connect_agent(nursery, dispatcher)
        pending = await spawn(nursery, dispatcher, question("hello"))
        # The first agent (idle longest) got it; it answers with unreadable data.
        assert contents(bad) == ["hello"]
        (request,) = bad.agent.requests
        await bad.end.send(
            json.dumps({"id": request.request_id, "message": "ChatGptResponse", "data": "oops"})
        )
        answer = await pending.result()
    assert answer.agent_id == good.agent_id
    assert answer.attempts == 2


async def test_retried_on_another_agent_after_a_session_lost(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    calls = 0

    async def hang_up_first(request: Request) -> Reply | HangUp:
        nonlocal calls
        calls += 1
        if calls == 1:
            return HANG_UP
        return request.reply("r", "c", "echo:" + request.content)

    with trio.fail_after(600):
        agents = [await connect_agent(nursery, dispatcher, hang_up_first) for _ in range(2)]
        answer = await dispatcher.ask(question("hello"))
    assert answer.attempts == 2
    assert [contents(agent) for agent in agents] == [["hello"], ["hello"]]
    lost = [agent for agent in agents if agent.end.close_code is not None]
    assert len(lost) == 1
    assert answer.agent_id != lost[0].agent_id
    assert len(dispatcher.pool) == 1
    assert_idle(dispatcher)


async def test_session_lost_with_no_other_agent_is_no_agent(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()

    async def hang_up(request: Request) -> HangUp:
        return HANG_UP

    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, hang_up)
        with pytest.raises(NoAgent, match="disconnected before replying"):
            await dispatcher.ask(question("hello"))
    assert contents(agent) == ["hello"]
    assert len(dispatcher.pool) == 0


async def test_errors_and_losses_mixed_end_in_agent_failed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    calls = 0

    async def fail_then_vanish(request: Request) -> AgentError | HangUp:
        nonlocal calls
        calls += 1
        return request.fail("quota exceeded") if calls == 1 else HANG_UP

    with trio.fail_after(600):
        for _ in range(2):
            await connect_agent(nursery, dispatcher, fail_then_vanish)
        with pytest.raises(AgentFailed, match="quota exceeded"):
            await dispatcher.ask(question("hello"))
    assert calls == 2


async def test_a_retry_waits_for_an_agent_it_has_not_tried(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        steady, busy, gate = await held_busy(nursery, dispatcher)
        flaky = await connect_agent(nursery, dispatcher, fail)
        pending = await spawn(nursery, dispatcher, question("hello"))
        # The flaky agent failed it and is free again, but the retry must not go back to it.
        assert contents(flaky) == ["hello"]
        assert not pending.done.is_set()
        assert dispatcher.queued == 1
        await trio.sleep(5)
        assert contents(flaky) == ["hello"]
        gate.set()
        answer = await pending.result()
        await busy.result()
    assert answer.agent_id == steady.agent_id
    assert answer.attempts == 2
    assert contents(steady) == ["busy", "hello"]
    assert_idle(dispatcher)


async def test_a_new_request_may_use_an_agent_a_queued_retry_excludes(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        _, _, gate = await held_busy(nursery, dispatcher)
        calls = 0

        async def fail_once(request: Request) -> Reply | AgentError:
            nonlocal calls
            calls += 1
            if calls == 1:
                return request.fail()
            return request.reply("r", "c", "echo:" + request.content)

        flaky = await connect_agent(nursery, dispatcher, fail_once)
        retrying = await spawn(nursery, dispatcher, question("retrying"))
        assert dispatcher.queued == 1
        # The flaky agent is free and only excluded for the retry: a newcomer gets it.
        newcomer = await dispatcher.ask(question("newcomer"))
        assert newcomer.agent_id == flaky.agent_id
        assert not retrying.done.is_set()
        gate.set()
        await retrying.result()
    assert_idle(dispatcher)


# -- conversations --------------------------------------------------------------------


async def test_turns_of_a_conversation_go_to_its_agent_with_the_last_response_as_parent(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agents = [await connect_agent(nursery, dispatcher) for _ in range(3)]
        first = await dispatcher.ask(question("turn-1"))
        owner = next(agent for agent in agents if agent.agent_id == first.agent_id)
        second = await dispatcher.ask(follow_up(first, "turn-2", parent_id=first.response_id))
        third = await dispatcher.ask(follow_up(first, "turn-3"))
        explicit = await dispatcher.ask(follow_up(first, "turn-4", parent_id="chosen-parent"))
    assert {second.agent_id, third.agent_id, explicit.agent_id} == {owner.agent_id}
    assert contents(owner) == ["turn-1", "turn-2", "turn-3", "turn-4"]
    requests = owner.agent.requests
    assert [r.conversation_id for r in requests[1:]] == [first.conversation_id] * 3
    assert requests[1].parent_id == first.response_id
    assert requests[2].parent_id == second.response_id  # omitted: the last response
    assert requests[3].parent_id == "chosen-parent"
    assert sum(len(agent.agent.requests) for agent in agents) == 4


async def test_a_conversation_turn_is_never_retried(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    answer = echo()

    async def fail_turns(request: Request) -> Reply | AgentError | HangUp | None:
        if request.conversation_id:
            return request.fail("turn failed")
        return await answer(request)

    with trio.fail_after(600):
        agents = [await connect_agent(nursery, dispatcher, fail_turns) for _ in range(3)]
        first = await dispatcher.ask(question("turn-1"))
        with pytest.raises(AgentFailed, match="turn failed"):
            await dispatcher.ask(follow_up(first, "turn-2"))
    turns = [r for agent in agents for r in agent.agent.requests if r.conversation_id]
    assert len(turns) == 1
    assert_idle(dispatcher)


async def test_a_conversation_turn_lost_with_its_agent_fails(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    answer = echo()

    async def vanish_on_turns(request: Request) -> Reply | AgentError | HangUp | None:
        return HANG_UP if request.conversation_id else await answer(request)

    with trio.fail_after(600):
        agents = [await connect_agent(nursery, dispatcher, vanish_on_turns) for _ in range(2)]
        first = await dispatcher.ask(question("turn-1"))
        with pytest.raises(AgentFailed, match="disconnected"):
            await dispatcher.ask(follow_up(first, "turn-2"))
    assert sum(len(agent.agent.requests) for agent in agents) == 2


async def test_a_conversation_turn_waits_for_its_agents_capacity(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    gate = trio.Event()
    with trio.fail_after(600):
        owner = await connect_agent(nursery, dispatcher, gated(gate))
        first = await dispatcher.ask(question("turn-1"))
        busy = await spawn(nursery, dispatcher, question("busy"))
        other = await connect_agent(nursery, dispatcher)
        turn = await spawn(nursery, dispatcher, follow_up(first, "turn-2"))
        await trio.sleep(5)
        assert not turn.done.is_set()
        assert other.agent.requests == []
        # The other agent still serves new conversations meanwhile.
        assert (await dispatcher.ask(question("elsewhere"))).agent_id == other.agent_id
        gate.set()
        answer = await turn.result()
        await busy.result()
    assert answer.agent_id == owner.agent_id
    assert answer.queue_wait == pytest.approx(5)
    assert contents(owner) == ["turn-1", "busy", "turn-2"]
    assert contents(other) == ["elsewhere"]
    assert_idle(dispatcher)


async def test_unknown_or_foreign_conversation(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher)
        first = await dispatcher.ask(question("turn-1", user_id="alice"))
        with pytest.raises(UnknownConversation):
            await dispatcher.ask(question("x", conversation_id="no-such-conversation"))
        with pytest.raises(UnknownConversation):
            await dispatcher.ask(follow_up(first, "x", user_id="bob"))
        admin = await dispatcher.ask(follow_up(first, "as admin", user_id="admin", is_admin=True))
    assert admin.agent_id == agent.agent_id
    assert contents(agent) == ["turn-1", "as admin"]


# -- reconnects and reclaimed ids ------------------------------------------------------


async def test_a_turn_waits_for_its_agent_to_reconnect_and_reclaim_its_id(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, credential="key:aaaa")
        old_id = agent.agent_id
        first = await dispatcher.ask(question("turn-1"))
        await agent.hang_up_and_wait()
        assert old_id not in dispatcher.pool
        start = trio.current_time()
        turn = await spawn(nursery, dispatcher, follow_up(first, "turn-2"))
        await trio.sleep(GRACE - 1)
        assert not turn.done.is_set()
        back = await connect_agent(nursery, dispatcher, credential="key:aaaa", reclaim_id=old_id)
        answer = await turn.result()
    assert back.agent_id == old_id
    assert back.agent.offered_id != old_id
    assert dispatcher.pool.get(old_id) is back.session
    assert turn.at is not None and turn.at - start == pytest.approx(GRACE - 1)
    assert answer.agent_id == old_id
    assert contents(back) == ["turn-2"]
    assert dispatcher.conversations.count_for(old_id) == 1
    assert_idle(dispatcher)


async def test_a_turn_whose_agent_does_not_come_back_fails_after_the_grace(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher)
        await connect_agent(nursery, dispatcher)  # another agent: must not be used
        first = await dispatcher.ask(question("turn-1"))
        owner_id = first.agent_id
        owner = agent if agent.agent_id == owner_id else None
        assert owner is not None
        await owner.hang_up_and_wait()
        start = trio.current_time()
        with pytest.raises(ConversationAgentGone) as info:
            await dispatcher.ask(follow_up(first, "turn-2"))
    assert trio.current_time() - start == pytest.approx(GRACE)
    assert info.value.retry_after is not None
    assert dispatcher.queued == 0


async def test_reclaim_with_a_different_credential_gets_a_fresh_id(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, credential="key:aaaa")
        old_id = agent.agent_id
        first = await dispatcher.ask(question("turn-1"))
        await agent.hang_up_and_wait()
        turn = await spawn(nursery, dispatcher, follow_up(first, "turn-2"))
        impostor = await connect_agent(
            nursery, dispatcher, credential="key:bbbb", reclaim_id=old_id
        )
        with pytest.raises(ConversationAgentGone):
            await turn.result()
    assert impostor.agent_id != old_id
    assert impostor.agent_id == impostor.agent.offered_id
    assert impostor.session.is_open  # it may stay, under its own id
    assert impostor.agent.requests == []


async def test_reclaim_cannot_take_a_live_agents_id_with_another_credential(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, credential="key:aaaa")
        impostor = await connect_agent(
            nursery, dispatcher, credential="loopback", reclaim_id=agent.agent_id
        )
    assert agent.session.is_open
    assert agent.end.close_code is None
    assert dispatcher.pool.get(agent.agent_id) is agent.session
    assert impostor.agent_id != agent.agent_id
    assert len(dispatcher.pool) == 2


async def test_reclaim_closes_the_older_socket_with_a_clear_reason(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        older = await connect_agent(nursery, dispatcher)
        agent_id = older.agent_id
        first = await dispatcher.ask(question("turn-1"))
        newer = await connect_agent(nursery, dispatcher, reclaim_id=agent_id)
        await older.end.wait_closed()
        answer = await dispatcher.ask(follow_up(first, "turn-2"))
    assert older.end.close_code == CloseCode.NORMAL
    assert older.end.close_reason == "replaced by a newer connection with this id"
    assert newer.agent_id == agent_id
    assert dispatcher.pool.get(agent_id) is newer.session
    assert len(dispatcher.pool) == 1
    assert answer.agent_id == agent_id
    assert contents(newer) == ["turn-2"]
    assert_idle(dispatcher)


async def test_a_reclaim_is_admitted_when_max_agents_is_reached(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A reconnect that reclaims its id replaces the older connection: it does
    not add an agent, so agents.max_agents must not refuse it (the older socket
    may be half-open after a network blip and linger until the heartbeat)."""
    dispatcher = make_dispatcher(agents={"max_agents": 1})
    with trio.fail_after(600):
        older = await connect_agent(nursery, dispatcher, credential="key:aaaa")
        newer = await connect_agent(
            nursery, dispatcher, credential="key:aaaa", reclaim_id=older.agent_id
        )
        stranger = await connect_agent(nursery, dispatcher, credential="key:bbbb")
        await stranger.end.wait_closed()
    assert stranger.end.close_code == CloseCode.TRY_AGAIN_LATER
    assert newer.end.close_code is None, f"refused: {newer.end.close_reason}"
    assert older.end.close_reason == "replaced by a newer connection with this id"
    assert dispatcher.pool.get(older.agent_id) is newer.session


async def test_work_in_flight_on_a_replaced_connection_is_not_leaked(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        older = await connect_agent(nursery, dispatcher, never)
        helper = await connect_agent(nursery, dispatcher)
        pending = await spawn(nursery, dispatcher, question("in flight"))
        assert contents(older) == ["in flight"]
        await connect_agent(nursery, dispatcher, reclaim_id=older.agent_id)
        answer = await pending.result()
    # Lost with the old socket, retried on an agent it had not tried.
    assert answer.agent_id == helper.agent_id
    assert_idle(dispatcher)


# -- shutdown and configuration ----------------------------------------------------------


async def test_close_answers_waiters_with_shutting_down(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(requests={"wait_for_agent": "30s"})
    with trio.fail_after(600):
        agent, busy, gate = await held_busy(nursery, dispatcher)
        waiters = [await spawn(nursery, dispatcher, question(f"w{n}")) for n in range(3)]
        start = trio.current_time()
        dispatcher.close()
        assert dispatcher.closing
        for waiter in waiters:
            with pytest.raises(ShuttingDown):
                await waiter.result()
            assert waiter.at == start
        with pytest.raises(ShuttingDown):
            await dispatcher.ask(question("late"))
        # No new agents while closing.
        refused = await connect_agent(nursery, dispatcher)
        await refused.end.wait_closed()
        assert refused.end.close_code == CloseCode.GOING_AWAY
        # Work already at an agent finishes.
        assert not busy.done.is_set()
        gate.set()
        assert (await busy.result()).content == "echo:busy"
        await dispatcher.wait_idle()
    assert contents(agent) == ["busy"]
    assert_idle(dispatcher)


async def test_abort_all_answers_asks_under_way(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        assert dispatcher.abort_all() == 0
        await connect_agent(nursery, dispatcher, never)
        at_agent = await spawn(nursery, dispatcher, question("at the agent"))
        queued = await spawn(nursery, dispatcher, question("queued"))
        dispatcher.close()
        with pytest.raises(ShuttingDown):
            await queued.result()
        assert not at_agent.done.is_set()
        with trio.move_on_after(5):
            await dispatcher.wait_idle()
        assert not at_agent.done.is_set()
        assert dispatcher.abort_all() == 1
        with pytest.raises(ShuttingDown):
            await at_agent.result()
        await dispatcher.wait_idle()
    assert dispatcher.queued == 0


async def test_raising_capacity_serves_waiters(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, never)
        await spawn(nursery, dispatcher, question("busy"))
        waiting = [await spawn(nursery, dispatcher, question(f"w{n}")) for n in range(2)]
        config = parse_config(
            {
                "agents": {
                    "heartbeat_interval": "5s",
                    "heartbeat_timeout": "15s",
                    "max_inflight": 3,
                },
                "requests": {"timeout": f"{TIMEOUT}s"},
            }
        )
        dispatcher.apply(config, dispatcher.agent_keys)
        await trio.testing.wait_all_tasks_blocked()
    assert agent.session.capacity == 3
    # Both waiters were handed a slot at once (their frames may go in either order).
    assert sorted(contents(agent)) == ["busy", "w0", "w1"]
    assert dispatcher.queued == 0
    assert all(not waiter.done.is_set() for waiter in waiting)
    assert dispatcher.pool.statistics().inflight == 3


# -- many at once ------------------------------------------------------------------------


async def test_many_concurrent_asks_respect_capacity_and_leak_nothing(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A seeded storm: agents that answer slowly, fail, vanish and come back;
    clients that give up. Every ask ends with an answer to its own question or
    a domain error, no agent ever has more than its capacity, and nothing leaks."""
    rng = random.Random(1234)
    dispatcher = make_dispatcher(
        agents={"max_inflight": 2},
        requests={"timeout": "30s", "queue_timeout": "20s", "max_attempts": 3},
    )

    async def moody(request: Request) -> Reply | AgentError | HangUp | None:
        await trio.sleep(rng.uniform(0.1, 3))
        roll = rng.random()
        if roll < 0.1:
            return request.fail("moody")
        if roll < 0.13:
            return HANG_UP
        if roll < 0.15:
            return None  # never answers
        return request.reply(
            "r-" + request.request_id, "c-" + request.request_id, "echo:" + request.content
        )

    results: dict[str, Answer | RelayError] = {}
    agents: list[Connected] = []

    async def client(n: int) -> None:
        await trio.sleep(rng.uniform(0, 20))
        pending = Pending(dispatcher, question(f"q{n}"))
        with trio.move_on_after(rng.uniform(1, 40)) if n % 7 == 0 else trio.CancelScope():
            await pending.run()
        if pending.answer is not None:
            results[f"q{n}"] = pending.answer
        elif pending.error is not None:
            results[f"q{n}"] = pending.error

    with trio.fail_after(600):
        for _ in range(6):
            agents.append(await connect_agent(nursery, dispatcher, moody))
        async with trio.open_nursery() as clients:
            for n in range(200):
                clients.start_soon(client, n)
            for _ in range(4):
                await trio.sleep(5)
                agents.append(await connect_agent(nursery, dispatcher, moody))
        await trio.sleep(60)  # let abandoned requests' agents finish or be dropped
    for content, outcome in results.items():
        if isinstance(outcome, Answer):
            assert outcome.content == "echo:" + content
    assert sum(isinstance(o, Answer) for o in results.values()) > 100
    assert all(agent.agent.max_inflight <= 2 for agent in agents)
    live = list(dispatcher.pool)
    assert live
    for session in live:
        # What is still in flight is exactly what the agent never answered.
        assert session.inflight == len(session.protocol.outstanding)
    assert dispatcher.pool.statistics().inflight == sum(s.inflight for s in live)
    assert dispatcher.queued == 0


def test_new_uuid_makes_valid_distinct_version_4_uuids() -> None:
    """The seed sent fresh UUIDs as message and parent ids; agents may parse them."""
    import uuid

    from relayd.dispatch import new_uuid

    made = [new_uuid() for _ in range(20_000)]
    assert len(set(made)) == len(made)
    for text in made:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


# -- what the daemon hands in: agent keys and the heartbeat ------------------------------


def key_credential(key: str) -> str:
    """The credential an agent that presented ``key`` is admitted with."""
    return "key:" + secret_digest(key).hex()


async def test_a_key_revoked_before_admission_is_refused(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The agent endpoint checked the key at the upgrade; a reload that drops it
    while the agent is mid-handshake must not let it in."""
    keys = AgentKeys.of(("key-one",), allow_loopback_without_key=False)
    dispatcher = dispatcher_for(make_dispatcher().config, agent_keys=keys)
    with trio.fail_after(60):
        kept = await connect_agent(nursery, dispatcher, credential=key_credential("key-one"))
        refused = await connect_agent(nursery, dispatcher, credential=key_credential("key-two"))
        loopback = await connect_agent(nursery, dispatcher, credential="loopback")
        await refused.end.wait_closed()
        await loopback.end.wait_closed()
    assert list(dispatcher.pool) == [kept.session]
    assert refused.end.close_code == CloseCode.POLICY_VIOLATION
    assert refused.end.close_reason == "agent key revoked"
    assert loopback.end.close_code == CloseCode.POLICY_VIOLATION


async def test_a_reload_without_an_agents_key_disconnects_only_that_agent(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    both = AgentKeys.of(("key-one", "key-two"), allow_loopback_without_key=False)
    dispatcher = dispatcher_for(make_dispatcher().config, agent_keys=both)
    with trio.fail_after(60):
        one = await connect_agent(nursery, dispatcher, credential=key_credential("key-one"))
        two = await connect_agent(nursery, dispatcher, credential=key_credential("key-two"))
        only_two = AgentKeys.of(("key-two",), allow_loopback_without_key=False)
        dispatcher.apply(dispatcher.config, only_two)
        await one.end.wait_closed()
        await trio.testing.wait_all_tasks_blocked()
    assert one.end.close_code == CloseCode.POLICY_VIOLATION
    assert one.end.close_reason == "agent key revoked"
    assert two.session.is_open and list(dispatcher.pool) == [two.session]
    assert dispatcher.agent_keys is only_two
    with trio.fail_after(60):
        answer = await dispatcher.ask(question("still served"))
    assert answer.content == "echo:still served"


async def test_a_reload_hands_the_heartbeat_its_new_interval(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Pings every 5 s; a reload to 1 s at 7 s takes effect from the session's next
    ping (10 s), then every second."""
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        start = trio.current_time()
        agent = await connect_agent(nursery, dispatcher)
        await trio.sleep(7)
        faster = parse_config({"agents": {"heartbeat_interval": "1s", "heartbeat_timeout": "15s"}})
        dispatcher.apply(faster, dispatcher.agent_keys)
        await trio.sleep(13.5 - 7)
    times = [at - start for at, _ in agent.agent.pings]
    assert times == pytest.approx([5, 10, 11, 12, 13])
