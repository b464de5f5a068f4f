"""A slot taken for a request always comes back, whatever fails on the way.

Between the dispatcher taking one of an agent's slots and the request's frame
leaving for the agent, every step can fail: building the frame, registering
the call, the write (an error, a write cut short by the deadline). The
security review found one such failure (a lone surrogate that could not be
encoded) that kept an agent's only slot taken for good. These tests inject a
failure at each step and check the class: the slot is released, the call is
forgotten (a late reply to it is dropped, not counted), and the agent either
stays usable or, when a frame may have been half-written, is closed.

Real sessions over in-memory transports, in virtual time (tests/memory_transport.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio
import trio.testing

from relayd.agents import session as session_module
from relayd.dispatch import Dispatcher, Question
from relayd.errors import AgentTimeout, BadRequest, RelayError
from relayd.protocol import AgentError, Reply, Request
from relayd.protocol import connection as connection_module
from tests.memory_transport import Connected, HangUp, connect_agent, echo
from tests.test_dispatch import TIMEOUT, assert_idle, make_dispatcher, question


class Injected(Exception):
    """The failure a test plants in relayd's path."""


def assert_forgotten(agent: Connected) -> None:
    """Nothing of the failed request is left on the session."""
    assert agent.session._calls == {}
    assert agent.session.protocol.outstanding == set()
    assert agent.session.inflight == 0


@contextmanager
def failing(target: Any, name: str, fault: Callable[..., Any]) -> Iterator[list[int]]:
    """Replace ``target.name`` with ``fault`` while the block runs; yields a call counter."""
    original = getattr(target, name)
    calls: list[int] = []

    def replacement(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fault(original, *args, **kwargs)

    setattr(target, name, replacement)
    try:
        yield calls
    finally:
        setattr(target, name, original)


def raise_injected(original: Any, *args: Any, **kwargs: Any) -> Any:
    raise Injected("planted")


async def ask_failing(dispatcher: Dispatcher, q: Question) -> BaseException:
    """Ask, expecting a failure; the failure."""
    try:
        await dispatcher.ask(q)
    except (RelayError, Injected) as error:
        return error
    raise AssertionError("the question was answered")


async def still_answers(dispatcher: Dispatcher, agent: Connected) -> None:
    answer = await dispatcher.ask(question("after the failure"))
    assert answer.agent_id == agent.agent_id
    assert answer.content == "echo:after the failure"


# -- steps that fail before anything is written: the agent stays usable ---------------


@pytest.mark.parametrize(
    ("where", "target", "name"),
    [
        ("building the frame", connection_module.RelayConnection, "send"),
        ("encoding the frame", connection_module._encoder, "encode"),
        ("registering the call", session_module, "Call"),
    ],
)
async def test_a_failure_before_the_write_releases_the_slot_and_keeps_the_agent(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    where: str,
    target: Any,
    name: str,
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(TIMEOUT * 2):
        agent = await connect_agent(nursery, dispatcher, echo())
        with failing(target, name, raise_injected) as calls:
            error = await ask_failing(dispatcher, question("doomed"))
        assert calls, f"the fault at {where} was never reached"
        assert isinstance(error, Injected), error
        assert_forgotten(agent)
        assert_idle(dispatcher)
        assert agent.session.is_open
        assert agent.agent.requests == []  # nothing reached the agent
        await still_answers(dispatcher, agent)
        assert_idle(dispatcher)


async def test_unsendable_text_is_a_bad_request_and_keeps_the_agent(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The front door refuses lone surrogates; a question that reaches the
    dispatcher with one anyway is refused there, with nothing retried."""
    dispatcher = make_dispatcher()
    with trio.fail_after(TIMEOUT * 2):
        first = await connect_agent(nursery, dispatcher, echo())
        second = await connect_agent(nursery, dispatcher, echo())
        for field in ("content", "parent_id"):
            fields: dict[str, Any] = {field: "bad \ud800 text"}
            q = Question(**{"content": "fine", "user_id": "user-1", **fields})
            error = await ask_failing(dispatcher, q)
            assert isinstance(error, BadRequest), error
            assert field in str(error)
            for agent in (first, second):
                assert_forgotten(agent)
                assert agent.session.is_open
                assert agent.agent.requests == []
            assert_idle(dispatcher)
        await still_answers(dispatcher, first)


# -- steps that fail during the write: the agent may hold half a frame ---------------


async def test_a_write_that_raises_releases_the_slot_and_closes_the_agent(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(TIMEOUT * 2):
        agent = await connect_agent(nursery, dispatcher, echo())
        transport = agent.session._transport
        with failing(transport, "send", raise_injected) as calls:
            error = await ask_failing(dispatcher, question("doomed"))
        assert calls
        assert isinstance(error, Injected), error
        assert_forgotten(agent)
        await agent.end.wait_closed()
        assert agent.end.close_code == 1011
        assert len(dispatcher.pool) == 0
        assert_idle(dispatcher)


async def test_a_write_cut_short_by_the_deadline_releases_the_slot_and_closes_the_agent(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    dispatcher = make_dispatcher()
    with trio.fail_after(TIMEOUT * 2):
        agent = await connect_agent(nursery, dispatcher, echo())

        async def stuck(original: Any, text: str) -> None:
            await trio.sleep_forever()

        with failing(agent.session._transport, "send", stuck):
            start = trio.current_time()
            error = await ask_failing(dispatcher, question("doomed"))
        assert isinstance(error, AgentTimeout), error
        assert trio.current_time() - start == pytest.approx(TIMEOUT)
        assert_forgotten(agent)
        await agent.end.wait_closed()
        assert len(dispatcher.pool) == 0
        assert_idle(dispatcher)


async def test_a_failure_after_the_frame_left_is_the_sessions_to_settle(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The boundary: once the frame has left, a caller that stops waiting
    leaves the slot to the agent's reply, which then frees it."""
    dispatcher = make_dispatcher()
    with trio.fail_after(TIMEOUT * 4):
        slow, quick = echo(delay=TIMEOUT * 1.5), echo()

        async def handle(request: Request) -> Reply | AgentError | HangUp | None:
            return await (slow if request.content == "slow" else quick)(request)

        agent = await connect_agent(nursery, dispatcher, handle)
        error = await ask_failing(dispatcher, question("slow"))
        assert isinstance(error, AgentTimeout)
        assert agent.session.inflight == 1  # the agent is still working on it
        await trio.sleep(TIMEOUT)
        assert_forgotten(agent)
        assert_idle(dispatcher)
        await still_answers(dispatcher, agent)
