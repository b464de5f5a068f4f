"""AgentSession over an in-memory transport, in virtual time.

Every test takes ``autojump_clock``: the clock jumps whenever all tasks are
blocked, so heartbeats and timeouts of seconds take no real time, and the
times asserted are exact. The host is the real Dispatcher.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from relayd.agents.session import (
    MAX_CONSECUTIVE_PROTOCOL_ERRORS,
    AgentSession,
    SessionLost,
)
from relayd.config import parse_config
from relayd.dispatch import Dispatcher
from relayd.protocol import AgentError, CloseCode, Reply, Request
from tests.memory_transport import (
    AgentEnd,
    Background,
    Connected,
    MemoryAgent,
    RelayEnd,
    connect_agent,
    dispatcher_for,
    echo,
    in_background,
    never,
    open_session,
)

HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 3.0


def make_dispatcher(**agents: object) -> Dispatcher:
    settings: dict[str, object] = {
        "heartbeat_interval": f"{HEARTBEAT_INTERVAL}s",
        "heartbeat_timeout": f"{HEARTBEAT_TIMEOUT}s",
        "handshake_timeout": f"{HANDSHAKE_TIMEOUT}s",
        "max_message": "1KiB",
    }
    settings.update(agents)
    return dispatcher_for(parse_config({"agents": settings}))


def request(n: int) -> Request:
    return Request(f"req-{n}", f"msg-{n}", "", f"parent-{n}", f"question {n}")


def frame(frame_id: str, message: str, data: str = "") -> str:
    return json.dumps({"id": frame_id, "message": message, "data": data})


InFlight = Background[Reply | AgentError]


async def send(nursery: trio.Nursery, dispatcher: Dispatcher, agent: Connected, n: int) -> InFlight:
    """Request ``n`` on a slot of the session (taken from the pool), sent with
    ``session.ask`` and awaited in the background (SessionLost is its error)."""
    dispatcher.pool.take(agent.session)
    req = request(n)
    return await in_background(nursery, Background(lambda: agent.session.ask(req), SessionLost))


async def held_agent(nursery: trio.Nursery, dispatcher: Dispatcher) -> tuple[Connected, InFlight]:
    """An agent that never answers, with request 1 in flight on it."""
    agent = await connect_agent(nursery, dispatcher, never)
    return agent, await send(nursery, dispatcher, agent, 1)


async def settled_open(agent: Connected) -> None:
    """Let everything settle; the session is still open."""
    await trio.testing.wait_all_tasks_blocked()
    assert agent.session.is_open


async def lost_and_closed(agent: Connected, call: InFlight) -> None:
    """The call ends in SessionLost and the relay closes the connection."""
    with pytest.raises(SessionLost):
        await call.result()
    await agent.end.wait_closed()


def unstarted_session(**agents: object) -> tuple[Dispatcher, AgentSession, RelayEnd, AgentEnd]:
    """A dispatcher and a session on it that is not yet running (the handshake tests)."""
    dispatcher = make_dispatcher(**agents)
    return dispatcher, *open_session(dispatcher)


@asynccontextmanager
async def running(session: AgentSession) -> AsyncIterator[None]:
    """Run ``session`` (bounded by 60 s) for the body, and until it ends."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            yield


# -- handshake -------------------------------------------------------------------------


async def test_handshake_timeout_closes_with_1008(autojump_clock: trio.testing.MockClock) -> None:
    dispatcher, session, _relay, end = unstarted_session()
    start = trio.current_time()
    async with running(session):
        greeting = json.loads(await end.receive() or "")
        assert greeting == {"id": session.agent_id, "message": "Connection id", "data": ""}
        await end.wait_closed()
    assert trio.current_time() - start == pytest.approx(HANDSHAKE_TIMEOUT)
    assert end.close_code == CloseCode.POLICY_VIOLATION
    assert end.close_reason == "handshake timeout"
    assert len(dispatcher.pool) == 0
    assert await end.receive() is None


async def test_disconnect_during_the_handshake(autojump_clock: trio.testing.MockClock) -> None:
    dispatcher, session, relay, end = unstarted_session()
    start = trio.current_time()
    async with running(session):
        assert await end.receive() is not None
        end.disconnect()
    assert trio.current_time() == start  # no timeout involved
    assert relay.close_calls == 1
    assert end.close_code == CloseCode.NORMAL
    assert end.close_reason == "disconnected during the handshake"
    assert len(dispatcher.pool) == 0


@pytest.mark.parametrize(
    ("first", "says"),
    [
        (frame("x", "pong"), "expected the 'Connection id' answer first"),
        ("not json", "frame is not JSON"),
        (frame("", "Connection id"), "connection id is empty"),
        (b"\x00\x01", "binary frame"),
    ],
    ids=["pong-first", "garbage", "empty-id", "binary"],
)
async def test_bad_handshake_closes_with_1002(
    autojump_clock: trio.testing.MockClock, first: str | bytes, says: str
) -> None:
    dispatcher, session, _relay, end = unstarted_session()
    async with running(session):
        await end.receive()
        await end.send(first)
        await end.wait_closed()
    assert end.close_code == CloseCode.PROTOCOL_ERROR
    assert end.close_reason is not None
    assert end.close_reason.startswith("handshake failed: ")
    assert says in end.close_reason
    assert len(dispatcher.pool) == 0


async def test_admission_refused_closes_with_the_hosts_code(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(max_agents=1)
    with trio.fail_after(60):
        first = await connect_agent(nursery, dispatcher)
        second = await connect_agent(nursery, dispatcher)
        await second.end.wait_closed()
    assert second.end.close_code == CloseCode.TRY_AGAIN_LATER
    assert second.end.close_reason == "too many agents connected"
    assert [s.agent_id for s in dispatcher.pool] == [first.agent_id]
    assert first.session.is_open


# -- heartbeat ---------------------------------------------------------------------------


async def test_pings_are_sent_every_heartbeat_interval(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        start = trio.current_time()
        agent = await connect_agent(nursery, dispatcher)
        await trio.sleep(10 * HEARTBEAT_INTERVAL + 0.5)
    times = [at - start for at, _ in agent.agent.pings]
    assert times == pytest.approx([HEARTBEAT_INTERVAL * n for n in range(1, 11)])
    ping_ids = [ping_id for _, ping_id in agent.agent.pings]
    assert len(set(ping_ids)) == len(ping_ids)
    assert agent.session.last_pong_at is not None


async def test_an_agent_that_pongs_stays_connected(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher)
        await trio.sleep(20 * HEARTBEAT_TIMEOUT)
    assert agent.session.is_open
    assert agent.relay.close_code is None
    assert dispatcher.pool.get(agent.agent_id) is agent.session
    assert len(agent.agent.pings) == pytest.approx(
        20 * HEARTBEAT_TIMEOUT / HEARTBEAT_INTERVAL, abs=1
    )


async def test_a_silent_agent_is_dropped_after_the_heartbeat_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        start = trio.current_time()
        agent = await connect_agent(nursery, dispatcher, answer_pings=False)
        assert dispatcher.pool.get(agent.agent_id) is agent.session
        await agent.end.wait_closed()
    assert trio.current_time() - start == pytest.approx(HEARTBEAT_TIMEOUT)
    assert agent.end.close_code == CloseCode.GOING_AWAY
    assert agent.end.close_reason == "heartbeat timeout"
    assert len(agent.agent.pings) == 2  # at 2s and 4s, unanswered
    assert len(dispatcher.pool) == 0
    assert agent.relay.close_calls == 1


async def test_any_frame_from_the_agent_moves_the_heartbeat_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        start = trio.current_time()
        agent = await connect_agent(nursery, dispatcher, answer_pings=False)
        # An answered pong every 4s (not every ping): still inside the 5s timeout.
        for n in range(1, 6):
            await trio.sleep_until(start + 4 * n)
            await agent.end.send(frame(f"ping-{n}", "pong"))
        await agent.end.wait_closed()
    assert trio.current_time() - start == pytest.approx(20 + HEARTBEAT_TIMEOUT)
    assert agent.end.close_reason == "heartbeat timeout"


# -- calls and the end of a session --------------------------------------------------


async def test_in_flight_calls_get_session_lost_when_the_agent_goes(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(max_inflight=3)
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, never)
        calls = [await send(nursery, dispatcher, agent, n) for n in range(3)]
        assert [r.request_id for r in agent.agent.requests] == ["req-0", "req-1", "req-2"]
        assert dispatcher.pool.statistics().inflight == 3
        agent.hang_up()
        for call in calls:
            with pytest.raises(SessionLost, match="disconnected before replying"):
                await call.result()
    assert len(dispatcher.pool) == 0
    assert dispatcher.pool.statistics().inflight == 0
    assert agent.session.protocol.outstanding == set()


async def test_in_flight_calls_get_session_lost_on_heartbeat_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        start = trio.current_time()
        agent = await connect_agent(nursery, dispatcher, never, answer_pings=False)
        call = await send(nursery, dispatcher, agent, 1)
        with pytest.raises(SessionLost):
            await call.result()
    assert trio.current_time() - start == pytest.approx(HEARTBEAT_TIMEOUT)
    assert agent.end.close_code == CloseCode.GOING_AWAY


async def test_replies_resolve_their_own_calls_in_any_order(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher(max_inflight=3)

    async def slow_first(req: Request) -> Reply:
        await trio.sleep({"req-0": 3, "req-1": 2, "req-2": 1}[req.request_id])
        return req.reply("r-" + req.request_id, "c", "A:" + req.content)

    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, slow_first)
        calls = [await send(nursery, dispatcher, agent, n) for n in range(3)]
        results = [await call.result() for call in calls]
    assert [(r.request_id, r.content) for r in results if isinstance(r, Reply)] == [
        ("req-0", "A:question 0"),
        ("req-1", "A:question 1"),
        ("req-2", "A:question 2"),
    ]
    assert dispatcher.pool.statistics().inflight == 0


async def test_request_close_closes_with_the_given_code(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent, call = await held_agent(nursery, dispatcher)
        agent.session.request_close(4321, "agent key revoked")
        agent.session.request_close(1000, "second call is ignored")
        await lost_and_closed(agent, call)
        await agent.agent.finished.wait()
    assert agent.end.close_code == 4321
    assert agent.end.close_reason == "agent key revoked"
    assert len(dispatcher.pool) == 0
    assert dispatcher.pool.statistics().inflight == 0


async def test_request_close_during_the_handshake(autojump_clock: trio.testing.MockClock) -> None:
    dispatcher, session, _relay, end = unstarted_session()
    async with running(session):
        await end.receive()
        session.request_close(CloseCode.GOING_AWAY, "relayd is shutting down")
    assert end.close_code == CloseCode.GOING_AWAY
    assert end.close_reason == "relayd is shutting down"
    assert len(dispatcher.pool) == 0


# -- what the agent may send -----------------------------------------------------------


async def test_oversized_message_closes_with_1009(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent, call = await held_agent(nursery, dispatcher)
        # Exactly the limit is fine (a pong padded with spaces to 1024 characters).
        padded = frame("p", "pong")
        await agent.end.send(padded + " " * (1024 - len(padded)))
        await settled_open(agent)
        await agent.end.send(frame("p", "pong", "x" * 1024))
        await lost_and_closed(agent, call)
    assert agent.end.close_code == CloseCode.MESSAGE_TOO_BIG
    assert agent.end.close_reason == "message over 1024 bytes"
    assert len(dispatcher.pool) == 0


async def test_oversized_binary_message_closes_with_1009(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher)
        await agent.end.send(b"\x00" * 1025)
        await agent.end.wait_closed()
    assert agent.end.close_code == CloseCode.MESSAGE_TOO_BIG


async def test_max_message_counts_utf8_bytes_not_characters(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """agents.max_message is a size in bytes ("1KiB"), and the close reason says
    "bytes": a frame of 1,000 characters that is 2,000 bytes on the wire is over
    a 1 KiB limit."""
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher)
        text = json.dumps({"id": "p", "message": "pong", "data": "é" * 960}, ensure_ascii=False)
        assert len(text) <= 1024 < len(text.encode("utf-8"))
        await agent.end.send(text)
        await trio.testing.wait_all_tasks_blocked()
    assert agent.end.close_code == CloseCode.MESSAGE_TOO_BIG


async def test_garbage_frames_are_dropped_and_the_session_carries_on(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    gate = trio.Event()

    async def gated(req: Request) -> Reply:
        await gate.wait()
        return req.reply("resp", "conv", "done")

    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher, gated)
        call = await send(nursery, dispatcher, agent, 1)
        garbage: list[str | bytes] = [
            "not json",
            "[]",
            b"binary",
            frame("x", "launch"),
            frame("nobody", "ChatGptResponse", "{}"),
            json.dumps({"id": 1, "message": "pong"}),
        ]
        for _ in range(3):  # 18 bad frames in a row: fewer than the limit
            for text in garbage:
                await agent.end.send(text)
        await settled_open(agent)
        gate.set()
        outcome = await call.result()
    assert outcome == Reply("req-1", "resp", "conv", "done")
    assert agent.session.is_open
    assert dispatcher.pool.statistics().inflight == 0


async def test_a_good_frame_resets_the_protocol_error_count(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher)
        for _ in range(5):
            for _ in range(MAX_CONSECUTIVE_PROTOCOL_ERRORS - 1):
                await agent.end.send("garbage")
            await agent.end.send(frame("p", "pong"))
        await trio.testing.wait_all_tasks_blocked()
    assert agent.session.is_open


async def test_twenty_bad_frames_in_a_row_close_the_session(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    assert MAX_CONSECUTIVE_PROTOCOL_ERRORS == 20
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent, call = await held_agent(nursery, dispatcher)
        for n in range(19):
            await agent.end.send(f"garbage {n}")
        await settled_open(agent)
        await agent.end.send(frame("x", "launch"))
        await lost_and_closed(agent, call)
    assert agent.end.close_code == CloseCode.POLICY_VIOLATION
    assert agent.end.close_reason == "protocol error: unknown message kind 'launch'"
    assert len(dispatcher.pool) == 0


async def test_malformed_reply_resolves_the_call_with_an_agent_error(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent, call = await held_agent(nursery, dispatcher)
        await agent.end.send(frame("req-1", "ChatGptResponse", "not json"))
        outcome = await call.result()
    assert isinstance(outcome, AgentError)
    assert outcome.malformed
    assert agent.session.is_open
    assert dispatcher.pool.statistics().inflight == 0


async def test_the_session_closes_its_transport_exactly_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(600):
        agent = await connect_agent(nursery, dispatcher)
        agent.hang_up()
        await agent.end.wait_closed()
        await trio.testing.wait_all_tasks_blocked()
    assert agent.relay.close_calls == 1
    assert agent.end.close_code == CloseCode.NORMAL
    assert not agent.session.is_open


async def test_memory_agent_handshake_reports_ids(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The harness itself: the agent sees the relay's offered id and keeps it."""
    dispatcher = make_dispatcher()
    with trio.fail_after(60):
        connected = await connect_agent(nursery, dispatcher, echo(), connection_id="fixed-id")
    assert isinstance(connected.agent, MemoryAgent)
    assert connected.agent.offered_id == "fixed-id"
    assert connected.agent.connection_id == "fixed-id"
    assert connected.agent_id == "fixed-id"
    assert str(connected.session) == "agent-fixed-id"
