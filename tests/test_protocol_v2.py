"""Agent protocol v2 (``relayd.protocol.v2``), sans-I/O, tested as a pair.

Synchronous, no mocks, no I/O (after h11's ConnectionPair and tests/test_protocol.py):
events go in one end, text comes out, and that text goes into the other end. The
relay's end has a state table (the module docstring); every row of it is a test
here, and so is every move the table does not list, which must raise
LocalProtocolError (ours) or RemoteProtocolError (the agent's) and leave the state
and the requests in flight as they were.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.protocol import (
    AgentError,
    CloseCode,
    Closed,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    Request,
    UnsendableText,
)
from relayd.protocol.v2 import (
    CANCELLED_REMEMBERED,
    ERROR_CODES,
    MAX_CAPACITY,
    SUBPROTOCOL,
    AgentConnectionV2,
    AgentHello,
    Cancel,
    ChatRequest,
    Delta,
    Drain,
    Goodbye,
    RelayConnectionV2,
    Update,
    V2State,
    Welcome,
)

LONE = "\ud800"  # a lone surrogate: a str in Python, not Unicode
LONE_ESCAPE = "\\ud800"  # the same, as JSON text spells it
NESTED = "[" * 100_000 + "]" * 100_000


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document)


class ConnectionPair:
    """A RelayConnectionV2 and an AgentConnectionV2 back to back."""

    def __init__(self, connection_id: str = "offered-1") -> None:
        self.relay = RelayConnectionV2(connection_id)
        self.agent = AgentConnectionV2()

    def relay_sends(self, event: Any) -> Any:
        """What the agent receives when the relay sends ``event``."""
        return self.agent.receive_text(self.relay.send(event))

    def agent_sends(self, event: Any) -> Any:
        """What the relay receives when the agent sends ``event``."""
        return self.relay.receive_text(self.agent.send(event))

    def hello(
        self,
        *,
        name: str = "gpu-box",
        version: str = "bridge 1.0",
        capacity: int = 4,
        models: tuple[str, ...] = (),
        resume: str | None = None,
    ) -> AgentHello:
        received = self.relay.receive_text(
            self.agent.hello(AgentHello(name, version, capacity, models, resume))
        )
        assert isinstance(received, AgentHello)
        return received

    def welcome(self, agent_id: str = "agent-1", heartbeat: float = 15.0) -> Welcome:
        received = self.relay_sends(Welcome(agent_id, heartbeat))
        assert received == Welcome(agent_id, heartbeat)
        return received

    def ask(self, request_id: str, content: str = "hi", model: str | None = None) -> Request:
        event = Request(
            request_id, f"msg-{request_id}", "", f"parent-{request_id}", content, model=model
        )
        received = self.relay_sends(event)
        assert received == event
        return received

    def delta(self, request_id: str, text: str) -> Any:
        return self.agent_sends(Delta(request_id, text))

    def done(self, request_id: str, content: str | None = None, **fields: Any) -> Any:
        reply = Reply(
            request_id,
            fields.pop("response_id", f"resp-{request_id}"),
            fields.pop("conversation_id", f"conv-{request_id}"),
            content or "",
            **fields,
        )
        return self.relay.receive_text(self.agent.done(reply, include_content=content is not None))


def open_pair(*requests: str) -> ConnectionPair:
    pair = ConnectionPair()
    pair.hello()
    pair.welcome()
    for request_id in requests:
        pair.ask(request_id)
    return pair


# -- the state table ---------------------------------------------------------------------


def pair_in(state: V2State) -> ConnectionPair:
    """A pair whose relay end is in ``state``; in OPEN and after, request r-1 is in flight."""
    pair = ConnectionPair()
    if state is V2State.AWAIT_HELLO:
        return pair
    pair.hello()
    if state is V2State.HELLO:
        return pair
    pair.welcome()
    pair.ask("r-1")
    if state is V2State.DRAINING:
        assert pair.agent_sends(Drain()) == Drain()
    elif state is V2State.GOING:
        assert pair.relay_sends(Goodbye("restart", 1)) == Goodbye("restart", 1.0)
    elif state is V2State.CLOSED:
        assert pair.relay.connection_lost() == Closed(("r-1",))
    assert pair.relay.state is state
    return pair


# The moves: what each does to the relay's end. "send ..." is ours, "receive ..." the agent's.
MOVES: dict[str, Callable[[RelayConnectionV2], Any]] = {
    "send welcome": lambda relay: relay.send(Welcome("agent-1", 15)),
    "send request": lambda relay: relay.send(Request("r-2", "m", "", "p", "more")),
    "send cancel": lambda relay: relay.send(Cancel("r-1", "the client went away")),
    "send goodbye": lambda relay: relay.send(Goodbye("relayd is shutting down", 1)),
    "receive hello": lambda relay: relay.receive_text(dumps({"type": "hello", "capacity": 2})),
    "receive update": lambda relay: relay.receive_text(dumps({"type": "update", "capacity": 3})),
    "receive delta": lambda relay: relay.receive_text(
        dumps({"type": "delta", "id": "r-1", "text": "Hel"})
    ),
    "receive done": lambda relay: relay.receive_text(
        dumps({"type": "done", "id": "r-1", "content": "Hello"})
    ),
    "receive error": lambda relay: relay.receive_text(
        dumps({"type": "error", "id": "r-1", "code": "timeout", "message": "slow"})
    ),
    "receive drain": lambda relay: relay.receive_text(dumps({"type": "drain"})),
}

S = V2State
# Every row of the table: (state, move) -> next state.
TABLE: dict[tuple[V2State, str], V2State] = {
    (S.AWAIT_HELLO, "receive hello"): S.HELLO,
    (S.HELLO, "send welcome"): S.OPEN,
    (S.OPEN, "send request"): S.OPEN,
    (S.OPEN, "send cancel"): S.OPEN,
    (S.OPEN, "receive update"): S.OPEN,
    (S.OPEN, "receive delta"): S.OPEN,
    (S.OPEN, "receive done"): S.OPEN,
    (S.OPEN, "receive error"): S.OPEN,
    (S.OPEN, "receive drain"): S.DRAINING,
    (S.DRAINING, "send cancel"): S.DRAINING,
    (S.DRAINING, "receive update"): S.DRAINING,
    (S.DRAINING, "receive delta"): S.DRAINING,
    (S.DRAINING, "receive done"): S.DRAINING,
    (S.DRAINING, "receive error"): S.DRAINING,
    (S.OPEN, "send goodbye"): S.GOING,
    (S.DRAINING, "send goodbye"): S.GOING,
    (S.GOING, "send cancel"): S.GOING,
    (S.GOING, "receive delta"): S.GOING,
    (S.GOING, "receive done"): S.GOING,
    (S.GOING, "receive error"): S.GOING,
}

# What each legal move returns, by type.
RESULT: dict[str, type | tuple[type, ...]] = {
    "send welcome": str,
    "send request": str,
    "send cancel": str,
    "send goodbye": str,
    "receive hello": AgentHello,
    "receive update": Update,
    "receive delta": Delta,
    "receive done": Reply,
    "receive error": AgentError,
    "receive drain": Drain,
}


@pytest.mark.parametrize(("state", "move"), list(TABLE), ids=[f"{s.name}-{m}" for s, m in TABLE])
def test_every_row_of_the_state_table(state: V2State, move: str) -> None:
    pair = pair_in(state)
    result = MOVES[move](pair.relay)
    assert isinstance(result, RESULT[move])
    assert pair.relay.state is TABLE[state, move]


@pytest.mark.parametrize("state", list(V2State), ids=[s.name for s in V2State])
def test_connection_lost_from_any_state_is_closed(state: V2State) -> None:
    pair = pair_in(state)
    in_flight = tuple(pair.relay.outstanding)
    assert pair.relay.connection_lost() == Closed(in_flight)
    assert pair.relay.state is V2State.CLOSED
    assert pair.relay.outstanding == set()
    assert not pair.relay.accepts_requests
    assert pair.relay.connection_lost() == Closed(())  # idempotent


ILLEGAL = [(state, move) for state in V2State for move in MOVES if (state, move) not in TABLE]


@pytest.mark.parametrize(("state", "move"), ILLEGAL, ids=[f"{s.name}-{m}" for s, m in ILLEGAL])
def test_every_move_the_table_does_not_list_raises_and_changes_nothing(
    state: V2State, move: str
) -> None:
    pair = pair_in(state)
    outstanding = set(pair.relay.outstanding)
    ours = move.startswith("send") or state is V2State.CLOSED  # feeding a closed end is ours
    with pytest.raises(LocalProtocolError if ours else RemoteProtocolError) as info:
        MOVES[move](pair.relay)
    assert str(info.value)
    if not ours:
        assert not isinstance(info.value, LocalProtocolError)
    assert pair.relay.state is state
    assert pair.relay.outstanding == outstanding


def test_first_frame_must_be_hello_and_the_hint_is_to_close_with_1002() -> None:
    relay = RelayConnectionV2("c")
    with pytest.raises(RemoteProtocolError, match="expected 'hello' first, got 'delta'") as info:
        relay.receive_text(dumps({"type": "delta", "id": "r", "text": "x"}))
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR
    assert relay.state is V2State.AWAIT_HELLO
    assert isinstance(relay.receive_text(dumps({"type": "hello", "capacity": 1})), AgentHello)


def test_nothing_but_welcome_is_sent_before_welcome_and_a_second_hello_is_refused() -> None:
    pair = ConnectionPair()
    pair.hello()
    with pytest.raises(RemoteProtocolError, match="before the relay's welcome"):
        pair.relay.receive_text(dumps({"type": "update", "capacity": 2}))
    with pytest.raises(RemoteProtocolError, match="before the relay's welcome"):
        pair.relay.receive_text(dumps({"type": "hello", "capacity": 2}))
    assert pair.relay.state is V2State.HELLO
    pair.welcome()
    with pytest.raises(RemoteProtocolError, match="a second 'hello'") as info:
        pair.relay.receive_text(dumps({"type": "hello", "capacity": 2}))
    assert info.value.close_code is None
    assert pair.relay.state is V2State.OPEN


# -- hello -------------------------------------------------------------------------------


def hello_frame(**fields: Any) -> str:
    return dumps({"type": "hello", "capacity": 1, **fields})


@pytest.mark.parametrize("capacity", [1, 2, 999, MAX_CAPACITY])
def test_hello_capacity_from_1_to_1000(capacity: int) -> None:
    hello = RelayConnectionV2("c").receive_text(hello_frame(capacity=capacity))
    assert isinstance(hello, AgentHello)
    assert hello.capacity == capacity


@pytest.mark.parametrize(
    "capacity",
    [0, -1, MAX_CAPACITY + 1, 10**30, True, False, 1.0, 2.5, "4", None, [4], {"n": 4}],
    ids=repr,
)
def test_hello_capacity_outside_1_to_1000_or_not_an_integer_is_refused(capacity: Any) -> None:
    relay = RelayConnectionV2("c")
    with pytest.raises(RemoteProtocolError, match="'capacity' from 1 to 1000") as info:
        relay.receive_text(hello_frame(capacity=capacity))
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR
    assert relay.state is V2State.AWAIT_HELLO


def test_hello_without_capacity_is_refused() -> None:
    relay = RelayConnectionV2("c")
    with pytest.raises(RemoteProtocolError, match="capacity"):
        relay.receive_text(dumps({"type": "hello", "name": "x"}))
    assert relay.state is V2State.AWAIT_HELLO


def test_hello_fields_and_defaults() -> None:
    relay = RelayConnectionV2("c")
    assert relay.receive_text(hello_frame(capacity=3, future_field={"a": 1})) == AgentHello(
        name="", version="", capacity=3, models=(), resume=None
    )
    relay = RelayConnectionV2("c")
    received = relay.receive_text(
        hello_frame(name="gpu-1 ✓", version="bridge 2", models=["m1", "m2"], resume="old-id")
    )
    assert received == AgentHello("gpu-1 ✓", "bridge 2", 1, ("m1", "m2"), "old-id")


def test_hello_round_trips_through_the_agent_end() -> None:
    pair = ConnectionPair()
    hello = pair.hello(name="n", version="v", capacity=7, models=("a", "b"), resume="prev")
    assert hello == AgentHello("n", "v", 7, ("a", "b"), "prev")
    assert pair.agent.state is V2State.HELLO
    with pytest.raises(LocalProtocolError, match="hello is sent once"):
        pair.agent.hello(hello)


def test_hello_without_resume_sends_no_resume_and_empty_resume_is_none() -> None:
    agent = AgentConnectionV2()
    frame = json.loads(agent.hello(AgentHello("n", "v", 1, ())))
    assert frame == {"type": "hello", "name": "n", "version": "v", "capacity": 1, "models": []}
    relay = RelayConnectionV2("c")
    assert relay.receive_text(hello_frame(resume="")).resume is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "models",
    [["a", "b"], [], ["x" * 256], [f"m{n}" for n in range(1000)], ["llama3.1:8b", "é/✓"]],
    ids=["two", "empty", "256-chars", "1000-models", "unicode"],
)
def test_hello_models_that_are_allowed(models: list[str]) -> None:
    hello = RelayConnectionV2("c").receive_text(hello_frame(models=models))
    assert hello.models == tuple(models)  # type: ignore[union-attr]


def test_hello_models_duplicates_are_dropped_in_order() -> None:
    hello = RelayConnectionV2("c").receive_text(hello_frame(models=["b", "a", "b", "a", "c"]))
    assert hello.models == ("b", "a", "c")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("models", "says"),
    [
        ("a", "must be a list"),
        ({"a": 1}, "must be a list"),
        (None, "must be a list"),
        ([f"m{n}" for n in range(1001)], "must be a list of at most 1000"),
        ([""], "non-empty strings"),
        ([5], "non-empty strings"),
        ([None], "non-empty strings"),
        (["ok", ["nested"]], "non-empty strings"),
        (["x" * 257], "at most 256 characters"),
        ([LONE], "non-empty strings"),
    ],
    ids=[
        "string",
        "object",
        "null",
        "1001-models",
        "empty-id",
        "number",
        "null-id",
        "list-id",
        "257-chars",
        "lone-surrogate",
    ],
)
def test_hello_models_that_are_refused(models: Any, says: str) -> None:
    relay = RelayConnectionV2("c")
    with pytest.raises(RemoteProtocolError, match=says) as info:
        relay.receive_text(hello_frame(models=models))
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR
    assert relay.state is V2State.AWAIT_HELLO


@pytest.mark.parametrize("field", ["name", "version", "resume"])
@pytest.mark.parametrize("value", [5, True, ["x"], {"x": 1}], ids=repr)
def test_hello_text_fields_must_be_strings(field: str, value: Any) -> None:
    relay = RelayConnectionV2("c")
    with pytest.raises(RemoteProtocolError, match=f"string '{field}'") as info:
        relay.receive_text(hello_frame(**{field: value}))
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR
    assert relay.state is V2State.AWAIT_HELLO


# -- welcome -----------------------------------------------------------------------------


def test_welcome_gives_the_agent_its_id_and_the_heartbeat() -> None:
    pair = ConnectionPair("offered")
    pair.hello(resume="earlier")
    frame = pair.relay.send(Welcome("earlier", 15.0))
    assert json.loads(frame) == {"type": "welcome", "agent_id": "earlier", "heartbeat": 15}
    assert '"heartbeat":15}' in frame  # whole seconds as an integer
    assert pair.relay.connection_id == "earlier"
    assert pair.relay.state is V2State.OPEN
    assert pair.relay.accepts_requests
    assert pair.agent.receive_text(frame) == Welcome("earlier", 15.0)
    assert pair.agent.agent_id == "earlier"
    assert pair.agent.state is V2State.OPEN


def test_welcome_with_a_fractional_heartbeat_and_the_hello_helper() -> None:
    pair = ConnectionPair()
    hello = pair.hello()
    welcome = hello.welcome("a-1", 2.5)
    assert welcome == Welcome("a-1", 2.5)
    assert json.loads(pair.relay.send(welcome))["heartbeat"] == 2.5


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        ({"type": "welcome", "heartbeat": 15}, "string 'agent_id'"),
        ({"type": "welcome", "agent_id": 5}, "string 'agent_id'"),
        ({"type": "welcome", "agent_id": "a", "heartbeat": "15"}, "must be a number"),
        ({"type": "welcome", "agent_id": "a", "heartbeat": True}, "must be a number"),
        ({"type": "request", "id": "r", "content": "x"}, "before 'welcome'"),
        ({"type": "cancel", "id": "r"}, "before 'welcome'"),
    ],
    ids=["no-id", "numeric-id", "string-heartbeat", "bool-heartbeat", "request", "cancel"],
)
def test_agent_end_refuses_a_bad_welcome_or_anything_before_it(
    frame: dict[str, Any], says: str
) -> None:
    agent = AgentConnectionV2()
    agent.hello(AgentHello("n", "v", 1, ()))
    with pytest.raises(RemoteProtocolError, match=says):
        agent.receive_text(dumps(frame))
    assert agent.state is V2State.HELLO
    assert agent.agent_id is None


def test_agent_end_refuses_a_second_welcome_and_sends_nothing_before_the_first() -> None:
    agent = AgentConnectionV2()
    with pytest.raises(LocalProtocolError, match="before 'welcome'"):
        agent.send(Update(capacity=2))
    agent.hello(AgentHello("n", "v", 1, ()))
    with pytest.raises(LocalProtocolError, match="before 'welcome'"):
        agent.send(Drain())
    agent.receive_text(dumps({"type": "welcome", "agent_id": "a", "heartbeat": 1}))
    with pytest.raises(RemoteProtocolError, match="unexpected 'welcome'"):
        agent.receive_text(dumps({"type": "welcome", "agent_id": "b", "heartbeat": 1}))
    assert agent.agent_id == "a"


# -- requests ----------------------------------------------------------------------------


def test_ask_request_on_the_wire_and_at_the_agent() -> None:
    pair = open_pair()
    event = Request("r-1", "m-1", "conv-9", "p-1", 'say "hi" \\ ünïcødé 🎉\n', model="llama3")
    frame = pair.relay.send(event)
    assert json.loads(frame) == {
        "type": "request",
        "id": "r-1",
        "kind": "ask",
        "content": 'say "hi" \\ ünïcødé 🎉\n',
        "conversation_id": "conv-9",
        "parent_id": "p-1",
        "message_id": "m-1",
        "model": "llama3",
    }
    assert pair.agent.receive_text(frame) == event
    assert pair.relay.outstanding == {"r-1"}
    assert pair.agent.pending == {"r-1"}


def test_ask_request_without_a_model_has_no_model_field() -> None:
    pair = open_pair()
    frame = pair.relay.send(Request("r-1", "m", "", "p", "x"))
    assert "model" not in json.loads(frame)
    assert pair.agent.receive_text(frame) == Request("r-1", "m", "", "p", "x", model=None)


def test_chat_request_passes_messages_and_params_through_untouched() -> None:
    pair = open_pair()
    messages = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi ✓"}], "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "t", "args": {"n": 1.5}}]},
    )
    params = {
        "max_tokens": 256,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n\n", "END"],
        "seed": None,
        "logit_bias": {"50256": -100},
        "vendor_extension": {"deep": [1, [2, [3]]]},
    }
    event = ChatRequest("r-1", "llama3.1:8b", messages, params)
    frame = pair.relay.send(event)
    document = json.loads(frame)
    assert document == {
        "type": "request",
        "id": "r-1",
        "kind": "chat",
        "model": "llama3.1:8b",
        "messages": list(messages),
        "params": params,
    }
    received = pair.agent.receive_text(frame)
    assert received == event
    assert isinstance(received, ChatRequest)
    assert received.params == params
    assert pair.relay.outstanding == {"r-1"}
    assert pair.agent.pending == {"r-1"}
    fail = received.fail("unsupported", "no tools here", retryable=True)
    assert pair.agent_sends(fail) == AgentError(
        "r-1", "no tools here", code="unsupported", retryable=True
    )


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        ({"kind": "chat", "model": "m", "messages": "hi"}, "'messages' must be a list of objects"),
        ({"kind": "chat", "model": "m", "messages": ["hi"]}, "must be a list of objects"),
        (
            {"kind": "chat", "model": "m", "messages": [], "params": []},
            "'params' must be an object",
        ),
        ({"kind": "chat", "messages": []}, "string 'model'"),
        ({"kind": "ask"}, "string 'content'"),
        ({"kind": "ask", "content": "x", "model": 5}, "string 'model'"),
    ],
    ids=[
        "messages-string",
        "messages-of-strings",
        "params-list",
        "no-model",
        "no-content",
        "model",
    ],
)
def test_agent_end_refuses_a_malformed_request(frame: dict[str, Any], says: str) -> None:
    pair = open_pair()
    with pytest.raises(RemoteProtocolError, match=says):
        pair.agent.receive_text(dumps({"type": "request", "id": "r-9", **frame}))
    assert pair.agent.pending == set()


def test_duplicate_request_id_is_local_misuse_and_changes_nothing() -> None:
    pair = open_pair("r-1")
    pair.delta("r-1", "partial")
    with pytest.raises(LocalProtocolError, match="already in flight"):
        pair.relay.send(Request("r-1", "m", "", "p", "again"))
    with pytest.raises(LocalProtocolError, match="already in flight"):
        pair.relay.send(ChatRequest("r-1", "m", ({"role": "user", "content": "x"},)))
    assert pair.relay.outstanding == {"r-1"}
    assert pair.relay.received_text("r-1") == "partial"


def test_withdraw_takes_back_an_unsent_request() -> None:
    pair = open_pair()
    pair.relay.send(Request("r-1", "m", "", "p", "x"))
    pair.relay.withdraw("r-1")
    pair.relay.withdraw("never-sent")  # harmless
    assert pair.relay.outstanding == set()
    with pytest.raises(RemoteProtocolError, match="not in flight"):
        pair.relay.receive_text(dumps({"type": "done", "id": "r-1", "content": "x"}))


# -- answers -----------------------------------------------------------------------------


def test_deltas_accumulate_and_done_without_content_is_their_text_joined() -> None:
    pair = open_pair("r-1", "r-2")
    assert pair.delta("r-1", "Hel") == Delta("r-1", "Hel")
    assert pair.delta("r-2", "Other ") == Delta("r-2", "Other ")  # interleaved
    assert pair.delta("r-1", "lo, ") == Delta("r-1", "lo, ")
    assert pair.delta("r-1", "") == Delta("r-1", "")
    assert pair.delta("r-1", "wörld ✓") == Delta("r-1", "wörld ✓")
    assert pair.relay.received_text("r-1") == "Hello, wörld ✓"
    assert pair.relay.received_text("r-2") == "Other "
    assert pair.relay.received_text("unknown") == ""
    reply = pair.done(
        "r-1",
        finish_reason="stop",
        usage={"prompt_tokens": 3, "completion_tokens": 4},
    )
    assert reply == Reply(
        "r-1",
        "resp-r-1",
        "conv-r-1",
        "Hello, wörld ✓",
        finish_reason="stop",
        usage={"prompt_tokens": 3, "completion_tokens": 4},
    )
    assert pair.relay.outstanding == {"r-2"}
    assert pair.agent.pending == {"r-2"}
    assert pair.relay.received_text("r-1") == ""


def test_done_without_deltas_or_content_is_an_empty_answer() -> None:
    pair = open_pair("r-1")
    reply = pair.relay.receive_text(dumps({"type": "done", "id": "r-1"}))
    assert reply == Reply("r-1", "", "", "", finish_reason=None, usage=None)


def test_done_with_null_content_is_the_deltas() -> None:
    pair = open_pair("r-1")
    pair.delta("r-1", "ab")
    reply = pair.relay.receive_text(dumps({"type": "done", "id": "r-1", "content": None}))
    assert isinstance(reply, Reply)
    assert reply.content == "ab"


def test_done_with_content_is_that_content() -> None:
    pair = open_pair("r-1")
    pair.delta("r-1", "draft")
    reply = pair.agent_sends(Reply("r-1", "resp", "conv", "final answer", finish_reason="length"))
    assert reply == Reply("r-1", "resp", "conv", "final answer", finish_reason="length")
    assert pair.relay.outstanding == set()
    assert pair.agent.pending == set()


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"content": 5}, "string 'content'"),
        ({"response_id": 5}, "string 'response_id'"),
        ({"conversation_id": ["c"]}, "string 'conversation_id'"),
        ({"finish_reason": 1}, "string 'finish_reason'"),
        ({"usage": "lots"}, "'usage' must be an object"),
        ({"usage": {"prompt_tokens": -1}}, "whole number"),
        ({"usage": {"completion_tokens": True}}, "whole number"),
        ({"usage": {"completion_tokens": 1.5}}, "whole number"),
        ({"content": LONE}, "not valid Unicode"),
        ({"response_id": LONE}, "not valid Unicode"),
    ],
    ids=[
        "numeric-content",
        "numeric-response-id",
        "list-conversation",
        "numeric-finish-reason",
        "string-usage",
        "negative-usage",
        "bool-usage",
        "float-usage",
        "surrogate-content",
        "surrogate-response-id",
    ],
)
def test_malformed_done_fails_that_request_only(fields: dict[str, Any], says: str) -> None:
    pair = open_pair("r-1", "r-2")
    pair.delta("r-1", "partial")
    event = pair.relay.receive_text(dumps({"type": "done", "id": "r-1", **fields}))
    assert isinstance(event, AgentError)
    assert event.request_id == "r-1"
    assert event.malformed is True
    assert event.text.startswith("malformed 'done'")
    assert says in event.text
    assert pair.relay.outstanding == {"r-2"}
    assert pair.relay.state is V2State.OPEN


def test_usage_keeps_only_the_known_counts() -> None:
    pair = open_pair("r-1")
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "extra": "x"}
    reply = pair.relay.receive_text(dumps({"type": "done", "id": "r-1", "usage": usage}))
    assert isinstance(reply, Reply)
    assert reply.usage == {"prompt_tokens": 1, "completion_tokens": 2}


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
@pytest.mark.parametrize("retryable", [True, False])
def test_error_carries_its_code_and_retryable_flag(code: str, retryable: bool) -> None:
    pair = open_pair("r-1")
    pair.delta("r-1", "some")
    error = pair.agent_sends(AgentError("r-1", f"failed: {code}", code=code, retryable=retryable))
    assert error == AgentError("r-1", f"failed: {code}", code=code, retryable=retryable)
    assert pair.relay.outstanding == set()
    assert pair.agent.pending == set()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"code": "made_up"}, AgentError("r-1", "m", code="agent_error", retryable=False)),
        ({"code": ""}, AgentError("r-1", "m", code="agent_error", retryable=False)),
        ({}, AgentError("r-1", "m", code="agent_error", retryable=False)),
        ({"retryable": "yes"}, AgentError("r-1", "m", code="agent_error", retryable=False)),
        ({"retryable": 1}, AgentError("r-1", "m", code="agent_error", retryable=False)),
        ({"retryable": True}, AgentError("r-1", "m", code="agent_error", retryable=True)),
    ],
    ids=["unknown-code", "empty-code", "no-code", "string-retryable", "one-retryable", "true"],
)
def test_error_unknown_code_is_agent_error_and_retryable_only_when_true(
    fields: dict[str, Any], expected: AgentError
) -> None:
    pair = open_pair("r-1")
    frame = {"type": "error", "id": "r-1", "message": "m", **fields}
    assert pair.relay.receive_text(dumps(frame)) == expected


def test_error_without_a_message_gets_a_default_text() -> None:
    pair = open_pair("r-1")
    error = pair.relay.receive_text(dumps({"type": "error", "id": "r-1", "code": "timeout"}))
    assert error == AgentError(
        "r-1", "the agent reported an error", code="timeout", retryable=False
    )


@pytest.mark.parametrize(
    "fields",
    [{"code": 5}, {"message": 5}, {"message": LONE}],
    ids=["numeric-code", "numeric-message", "surrogate-message"],
)
def test_error_with_a_bad_field_is_a_remote_error_and_the_request_stays(
    fields: dict[str, Any],
) -> None:
    pair = open_pair("r-1")
    with pytest.raises(RemoteProtocolError) as info:
        pair.relay.receive_text(dumps({"type": "error", "id": "r-1", **fields}))
    assert info.value.close_code is None
    assert pair.relay.outstanding == {"r-1"}


def test_answers_for_an_id_never_sent_are_remote_errors() -> None:
    pair = open_pair("r-1")
    for kind, extra in (("delta", {"text": "x"}), ("done", {}), ("error", {"code": "internal"})):
        with pytest.raises(RemoteProtocolError, match=f"'{kind}' for request 'nope'") as info:
            pair.relay.receive_text(dumps({"type": kind, "id": "nope", **extra}))
        assert info.value.close_code is None
    assert pair.relay.outstanding == {"r-1"}


def test_a_second_done_for_the_same_request_is_a_remote_error() -> None:
    pair = open_pair("r-1")
    pair.relay.receive_text(dumps({"type": "done", "id": "r-1", "content": "x"}))
    with pytest.raises(RemoteProtocolError, match="not in flight"):
        pair.relay.receive_text(dumps({"type": "done", "id": "r-1", "content": "x"}))
    with pytest.raises(RemoteProtocolError, match="not in flight"):
        pair.relay.receive_text(dumps({"type": "delta", "id": "r-1", "text": "x"}))


def test_agent_end_answers_only_requests_it_has() -> None:
    pair = open_pair("r-1")
    for event in (
        Delta("r-9", "x"),
        Reply("r-9", "a", "c", "x"),
        AgentError("r-9", "x", code="internal"),
    ):
        with pytest.raises(LocalProtocolError, match="no request 'r-9' to answer"):
            pair.agent.send(event)
    assert pair.agent.pending == {"r-1"}


def test_request_id_can_be_reused_once_answered() -> None:
    pair = open_pair("r-1")
    pair.done("r-1", "first")
    pair.ask("r-1", content="second")
    pair.delta("r-1", "new")
    assert pair.done("r-1").content == "new"


# -- update, drain, goodbye ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "frame"),
    [
        (Update(capacity=8), {"type": "update", "capacity": 8}),
        (Update(models=("a", "b")), {"type": "update", "models": ["a", "b"]}),
        (Update(3, ()), {"type": "update", "capacity": 3, "models": []}),
        (Update(), {"type": "update"}),
    ],
    ids=["capacity", "models", "both", "neither"],
)
def test_update(event: Update, frame: dict[str, Any]) -> None:
    pair = open_pair("r-1")
    text = pair.agent.send(event)
    assert json.loads(text) == frame
    assert pair.relay.receive_text(text) == event
    assert pair.relay.state is V2State.OPEN
    assert pair.relay.outstanding == {"r-1"}


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": 1001}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"capacity": None}, "capacity"),
        ({"models": "a"}, "models"),
        ({"models": [""]}, "model ids"),
        ({"capacity": 2, "models": [1]}, "model ids"),
    ],
    ids=["zero", "1001", "bool", "null", "string-models", "empty-model", "numeric-model"],
)
def test_bad_update_is_dropped_and_the_connection_carries_on(
    frame: dict[str, Any], says: str
) -> None:
    pair = open_pair("r-1")
    with pytest.raises(RemoteProtocolError, match=says) as info:
        pair.relay.receive_text(dumps({"type": "update", **frame}))
    assert info.value.close_code is None  # not the hello: drop it and carry on
    assert pair.relay.state is V2State.OPEN


def test_drain_stops_requests_but_not_cancel_answers_or_goodbye() -> None:
    pair = open_pair("r-1", "r-2", "r-3")
    assert pair.agent_sends(Drain()) == Drain()
    assert pair.relay.state is V2State.DRAINING
    assert not pair.relay.accepts_requests
    with pytest.raises(LocalProtocolError, match="cannot send a request in state draining"):
        pair.relay.send(Request("r-4", "m", "", "p", "x"))
    with pytest.raises(LocalProtocolError, match="draining"):
        pair.relay.send(ChatRequest("r-4", "m", ()))
    assert pair.relay.outstanding == {"r-1", "r-2", "r-3"}
    assert pair.relay_sends(Cancel("r-2", "the client went away")) == Cancel(
        "r-2", "the client went away"
    )
    assert pair.delta("r-1", "still ") == Delta("r-1", "still ")
    assert pair.agent_sends(Update(capacity=1)) == Update(capacity=1)
    assert pair.done("r-1", "still working").content == "still working"
    assert pair.relay.outstanding == {"r-3"}
    assert pair.relay_sends(Goodbye("bye", 0.5)) == Goodbye("bye", 0.5)
    assert pair.relay.state is V2State.GOING
    assert pair.done("r-3", "last").content == "last"


def test_goodbye_on_the_wire_and_at_the_agent() -> None:
    pair = open_pair("r-1")
    frame = pair.relay.send(Goodbye("relayd is shutting down", 1.0))
    assert json.loads(frame) == {
        "type": "goodbye",
        "reason": "relayd is shutting down",
        "reconnect_after": 1,
    }
    assert pair.relay.state is V2State.GOING
    assert not pair.relay.accepts_requests
    assert pair.agent.receive_text(frame) == Goodbye("relayd is shutting down", 1.0)
    assert pair.agent.state is V2State.GOING
    # In GOING: no request, no second goodbye; a cancel and the answers still pass.
    with pytest.raises(LocalProtocolError):
        pair.relay.send(Request("r-2", "m", "", "p", "x"))
    with pytest.raises(LocalProtocolError, match="cannot say goodbye"):
        pair.relay.send(Goodbye("again", 1))
    pair.delta("r-1", "late but fine")
    assert pair.relay_sends(Cancel("r-1", "relayd is shutting down")) == Cancel(
        "r-1", "relayd is shutting down"
    )
    assert pair.relay.outstanding == set()


@pytest.mark.parametrize("after", [-1, "soon", True, None], ids=repr)
def test_agent_end_reads_a_bad_reconnect_after_as_zero(after: Any) -> None:
    pair = open_pair()
    goodbye = pair.agent.receive_text(dumps({"type": "goodbye", "reconnect_after": after}))
    assert goodbye == Goodbye("", 0.0)


# -- cancel ------------------------------------------------------------------------------


def test_cancel_on_the_wire_and_at_the_agent() -> None:
    pair = open_pair("r-1", "r-2")
    frame = pair.relay.send(Cancel("r-1", "requests.timeout passed"))
    assert json.loads(frame) == {"type": "cancel", "id": "r-1", "reason": "requests.timeout passed"}
    assert pair.relay.outstanding == {"r-2"}
    assert pair.agent.receive_text(frame) == Cancel("r-1", "requests.timeout passed")
    assert pair.agent.pending == {"r-2"}
    with pytest.raises(LocalProtocolError, match="no request 'r-1'"):
        pair.agent.send(Delta("r-1", "x"))


def test_late_frames_of_a_cancelled_request_are_ignored() -> None:
    pair = open_pair("r-1", "r-2", "r-3")
    pair.delta("r-1", "before")
    # The agent has not seen the cancels yet: it goes on answering.
    late = [pair.agent.send(Delta("r-1", "after")), pair.agent.send(Delta("r-1", "more"))]
    late.append(pair.agent.done(Reply("r-1", "a", "c", "x"), include_content=False))
    late_error = pair.agent.send(AgentError("r-2", "boom", code="internal"))
    pair.relay.send(Cancel("r-1", "the client went away"))
    pair.relay.send(Cancel("r-2", "the client went away"))
    assert pair.relay.outstanding == {"r-3"}
    assert [pair.relay.receive_text(text) for text in late] == [None, None, None]
    assert pair.relay.receive_text(late_error) is None
    assert pair.relay.received_text("r-1") == ""
    assert pair.relay.outstanding == {"r-3"}
    assert pair.relay.state is V2State.OPEN
    # done and error were their last word: anything after is a protocol error again.
    for text in (late[0], late[2], late_error):
        with pytest.raises(RemoteProtocolError, match="not in flight"):
            pair.relay.receive_text(text)


def test_a_cancelled_requests_deltas_are_ignored_until_its_end() -> None:
    pair = open_pair("r-1")
    pair.relay.send(Cancel("r-1", "gone"))
    for n in range(5):
        assert (
            pair.relay.receive_text(dumps({"type": "delta", "id": "r-1", "text": str(n)})) is None
        )
    assert pair.relay.receive_text(dumps({"type": "error", "id": "r-1"})) is None


def test_cancel_of_a_request_not_in_flight_is_local_misuse() -> None:
    pair = open_pair("r-1")
    pair.relay.send(Cancel("r-1", "x"))
    with pytest.raises(LocalProtocolError, match="not in flight"):
        pair.relay.send(Cancel("r-1", "twice"))
    with pytest.raises(LocalProtocolError, match="not in flight"):
        pair.relay.send(Cancel("never", "x"))
    assert pair.relay.state is V2State.OPEN


def test_cancel_before_welcome_is_local_misuse() -> None:
    pair = ConnectionPair()
    pair.hello()
    with pytest.raises(LocalProtocolError, match="cannot cancel in state"):
        pair.relay.send(Cancel("r-1", "x"))


def test_cancelled_ids_are_remembered_up_to_the_bound() -> None:
    assert CANCELLED_REMEMBERED == 1024
    pair = open_pair()
    ids = [f"r-{n}" for n in range(CANCELLED_REMEMBERED + 1)]
    for request_id in ids:
        pair.relay.send(Request(request_id, "m", "", "p", "x"))
        pair.relay.send(Cancel(request_id, "gone"))
    assert pair.relay.outstanding == set()
    # The oldest cancel is forgotten: its late frame is a protocol error again.
    with pytest.raises(RemoteProtocolError, match="'r-0'"):
        pair.relay.receive_text(dumps({"type": "done", "id": "r-0"}))
    # The 1024 most recent are remembered.
    for request_id in (ids[1], ids[len(ids) // 2], ids[-1]):
        assert (
            pair.relay.receive_text(dumps({"type": "delta", "id": request_id, "text": "x"})) is None
        )
        assert pair.relay.receive_text(dumps({"type": "done", "id": request_id})) is None


# -- lone surrogates ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        Request("r-1", "m", "", "p", "bad " + LONE),
        Request("r-1", "m", LONE, "p", "x"),
        Request("r-1", "m", "", LONE, "x"),
        Request("r-1", LONE, "", "p", "x"),
        Request("r-1", "m", "", "p", "x", model=LONE),
        ChatRequest("r-1", "m", ({"role": "user", "content": LONE},)),
        ChatRequest("r-1", "m", ({LONE: "key"},)),
        ChatRequest("r-1", "m", ({"role": "user", "content": "x"},), {"stop": [LONE]}),
        ChatRequest("r-1", LONE, ()),
    ],
    ids=[
        "content",
        "conversation",
        "parent",
        "message-id",
        "model",
        "chat-content",
        "chat-key",
        "chat-params",
        "chat-model",
    ],
)
def test_a_request_with_a_lone_surrogate_is_unsendable_and_changes_nothing(event: Any) -> None:
    pair = open_pair()
    with pytest.raises(UnsendableText, match="not valid Unicode"):
        pair.relay.send(event)
    assert pair.relay.outstanding == set()
    assert pair.relay.state is V2State.OPEN
    pair.ask("r-1")  # the id is free and the connection usable


def test_our_other_frames_with_a_lone_surrogate_are_unsendable_and_change_nothing() -> None:
    pair = ConnectionPair()
    pair.hello()
    with pytest.raises(UnsendableText):
        pair.relay.send(Welcome("id-" + LONE, 15))
    assert pair.relay.state is V2State.HELLO
    pair.welcome()
    pair.ask("r-1")
    with pytest.raises(UnsendableText):
        pair.relay.send(Cancel("r-1", "reason " + LONE))
    assert pair.relay.outstanding == {"r-1"}
    with pytest.raises(UnsendableText):
        pair.relay.send(Goodbye(LONE, 1))
    assert pair.relay.state is V2State.OPEN
    assert isinstance(pair.relay.send(Cancel("r-1", "fine")), str)


def test_the_agents_frames_with_a_lone_surrogate_are_unsendable_delta_and_update() -> None:
    pair = open_pair("r-1")
    with pytest.raises(UnsendableText):
        pair.agent.send(Delta("r-1", LONE))
    with pytest.raises(UnsendableText):
        pair.agent.send(Update(models=(LONE,)))
    assert pair.agent.pending == {"r-1"}
    assert pair.done("r-1", "fine").content == "fine"


@pytest.mark.parametrize(
    "attempt",
    [
        lambda agent: agent.send(AgentError("r-1", "bad " + LONE, code="internal")),
        lambda agent: agent.send(Reply("r-1", "a", "c", "bad " + LONE)),
        lambda agent: agent.done(Reply("r-1", "a", "c", "bad " + LONE)),
        lambda agent: agent.done(Reply("r-1", LONE, "c", ""), include_content=False),
    ],
    ids=["error-message", "send-done-content", "done-content", "done-response-id"],
)
def test_agent_end_unsendable_error_or_done_changes_nothing(
    attempt: Callable[[AgentConnectionV2], str],
) -> None:
    pair = open_pair("r-1")
    with pytest.raises(UnsendableText):
        attempt(pair.agent)
    assert pair.agent.pending == {"r-1"}


def test_agent_end_unsendable_hello_changes_nothing() -> None:
    agent = AgentConnectionV2()
    with pytest.raises(UnsendableText):
        agent.hello(AgentHello("name " + LONE, "v", 1, ()))
    assert agent.state is V2State.AWAIT_HELLO
    agent.hello(AgentHello("name", "v", 1, ()))


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": "hello", "capacity": 1, "name": "' + LONE_ESCAPE + '"}',
        '{"type": "hello", "capacity": 1, "version": "v' + LONE_ESCAPE + '"}',
        '{"type": "hello", "capacity": 1, "resume": "' + LONE_ESCAPE + '"}',
        '{"type": "hello", "capacity": 1, "models": ["' + LONE_ESCAPE + '"]}',
        # Not an escape: a lone surrogate in the decoded str itself.
        json.dumps({"type": "hello", "capacity": 1, "name": LONE}, ensure_ascii=False),
    ],
    ids=["name", "version", "resume", "model", "raw-name"],
)
def test_their_hello_with_a_lone_surrogate_is_refused_with_1002(frame: str) -> None:
    relay = RelayConnectionV2("c")
    with pytest.raises(RemoteProtocolError) as info:
        relay.receive_text(frame)
    assert "Unicode" in str(info.value) or "model ids" in str(info.value)
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR
    assert relay.state is V2State.AWAIT_HELLO


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": "delta", "id": "r-1", "text": "a' + LONE_ESCAPE + '"}',
        '{"type": "error", "id": "r-1", "message": "' + LONE_ESCAPE + '"}',
        '{"type": "upd' + LONE_ESCAPE + 'ate"}',
        '{"type": "update", "models": ["' + LONE_ESCAPE + '"]}',
        '{"type": "delta", "id": "r-' + LONE_ESCAPE + '", "text": "x"}',
        json.dumps({"type": "delta", "id": "r-1", "text": LONE}, ensure_ascii=False),
    ],
    ids=["delta-text", "error-message", "type", "update-models", "id", "raw-delta-text"],
)
def test_their_frames_with_a_lone_surrogate_are_remote_errors(frame: str) -> None:
    pair = open_pair("r-1")
    pair.delta("r-1", "kept")
    with pytest.raises(RemoteProtocolError) as info:
        pair.relay.receive_text(frame)
    assert info.value.close_code is None
    assert pair.relay.outstanding == {"r-1"}
    assert pair.relay.received_text("r-1") == "kept"
    assert pair.done("r-1").content == "kept"


def test_their_done_with_a_lone_surrogate_is_malformed() -> None:
    pair = open_pair("r-1")
    event = pair.relay.receive_text(
        '{"type": "done", "id": "r-1", "content": "' + LONE_ESCAPE + '"}'
    )
    assert isinstance(event, AgentError)
    assert event.malformed
    assert "not valid Unicode" in event.text
    assert pair.relay.outstanding == set()


def test_agent_end_refuses_a_request_with_a_lone_surrogate() -> None:
    pair = open_pair()
    with pytest.raises(RemoteProtocolError):
        pair.agent.receive_text(
            '{"type": "request", "id": "r-1", "kind": "ask", "content": "' + LONE_ESCAPE + '"}'
        )


# -- malformed frames --------------------------------------------------------------------

MALFORMED = [
    pytest.param("", "frame is not JSON", id="empty"),
    pytest.param("hello, relay", "frame is not JSON", id="not-json"),
    pytest.param('{"type": "delta", "id": "r-1"', "frame is not JSON", id="truncated"),
    pytest.param("NaN]", "frame is not JSON", id="garbage-after"),
    pytest.param('[{"type": "drain"}]', "not a JSON object", id="array"),
    pytest.param("42", "not a JSON object", id="number"),
    pytest.param('"drain"', "not a JSON object", id="string"),
    pytest.param("null", "not a JSON object", id="null"),
    pytest.param("true", "not a JSON object", id="boolean"),
    pytest.param("{}", "no string 'type'", id="no-type"),
    pytest.param('{"type": null}', "no string 'type'", id="null-type"),
    pytest.param('{"type": 5}', "no string 'type'", id="numeric-type"),
    pytest.param('{"type": ["delta"]}', "no string 'type'", id="array-type"),
    pytest.param('{"type": "launch"}', "unknown frame type 'launch'", id="unknown-type"),
    pytest.param('{"type": "Delta", "id": "r-1"}', "unknown frame type 'Delta'", id="wrong-case"),
    pytest.param('{"type": "welcome"}', "unknown frame type 'welcome'", id="relay-frame"),
    pytest.param('{"type": "request"}', "unknown frame type 'request'", id="request-frame"),
    pytest.param('{"type": "delta", "text": "x"}', "string 'id'", id="delta-no-id"),
    pytest.param('{"type": "delta", "id": 1, "text": "x"}', "string 'id'", id="delta-numeric-id"),
    pytest.param('{"type": "delta", "id": "r-1"}', "string 'text'", id="delta-no-text"),
    pytest.param(
        '{"type": "delta", "id": "r-1", "text": ["x"]}', "string 'text'", id="delta-array-text"
    ),
    pytest.param('{"type": "done", "id": null}', "string 'id'", id="done-null-id"),
    pytest.param('{"type": "error", "id": {}}', "string 'id'", id="error-object-id"),
    pytest.param('{"type": "update", "capacity": "2"}', "capacity", id="update-string-capacity"),
    pytest.param(NESTED, "nested too deeply", id="deep-array"),
    pytest.param(
        '{"type": "drain", "extra": ' + NESTED + "}", "nested too deeply", id="deep-field"
    ),
]


@pytest.mark.parametrize(("text", "says"), MALFORMED)
def test_malformed_frame_is_a_remote_error_and_the_connection_carries_on(
    text: str, says: str
) -> None:
    pair = open_pair("r-1")
    pair.delta("r-1", "so far")
    with pytest.raises(RemoteProtocolError) as info:
        pair.relay.receive_text(text)
    assert says in str(info.value)
    assert info.value.close_code is None
    assert pair.relay.state is V2State.OPEN
    assert pair.relay.outstanding == {"r-1"}
    assert pair.relay.received_text("r-1") == "so far"
    assert pair.done("r-1").content == "so far"


@pytest.mark.parametrize(("text", "says"), MALFORMED[:13] + MALFORMED[-2:])
def test_malformed_frame_before_hello(text: str, says: str) -> None:
    relay = RelayConnectionV2("c")
    with pytest.raises(RemoteProtocolError, match=says):
        relay.receive_text(text)
    assert relay.state is V2State.AWAIT_HELLO


@pytest.mark.parametrize(("text", "says"), MALFORMED[:13] + MALFORMED[-2:])
def test_malformed_frame_at_the_agent_end(text: str, says: str) -> None:
    pair = open_pair("r-1")
    with pytest.raises(RemoteProtocolError, match=says):
        pair.agent.receive_text(text)
    assert pair.agent.pending == {"r-1"}
    assert pair.agent.state is V2State.OPEN


def test_a_type_with_a_lone_surrogate_before_hello_is_a_remote_error() -> None:
    relay = RelayConnectionV2("c")
    with pytest.raises(RemoteProtocolError, match="lone surrogate"):
        relay.receive_text('{"type": "hel' + LONE_ESCAPE + 'lo", "capacity": 1}')
    assert relay.state is V2State.AWAIT_HELLO


def test_an_unknown_type_is_cut_short_in_the_message() -> None:
    pair = open_pair()
    with pytest.raises(RemoteProtocolError) as info:
        pair.relay.receive_text(dumps({"type": "k" * 10_000}))
    assert len(str(info.value)) < 200
    with pytest.raises(RemoteProtocolError) as info:
        pair.relay.receive_text(dumps({"type": "delta", "id": "i" * 10_000, "text": "x"}))
    assert len(str(info.value)) < 200


def test_unknown_fields_are_ignored_both_ways() -> None:
    pair = ConnectionPair()
    pair.agent.hello(AgentHello("n", "v", 2, ()))
    hello = pair.relay.receive_text(dumps({"type": "hello", "capacity": 2, "gpu": {"n": 8}}))
    assert isinstance(hello, AgentHello)
    welcome = pair.relay.send(Welcome("a", 15))
    document = json.loads(welcome)
    document["future"] = [1, 2]
    assert pair.agent.receive_text(dumps(document)) == Welcome("a", 15.0)
    pair.ask("r-1")
    frame = {"type": "delta", "id": "r-1", "text": "x", "index": 0, "logprobs": None}
    assert pair.relay.receive_text(dumps(frame)) == Delta("r-1", "x")


def test_events_are_frozen_and_the_subprotocol_name() -> None:
    assert SUBPROTOCOL == "relayd.v2"
    for event in (
        AgentHello("n", "v", 1, ()),
        Welcome("a", 1),
        Update(),
        Delta("r", "x"),
        ChatRequest("r", "m", ()),
        Cancel("r", "x"),
        Goodbye("x", 1),
    ):
        first = dataclasses.fields(event)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, first, "changed")
    assert Drain() == Drain()


# -- properties ------------------------------------------------------------------------------

OPERATIONS = st.sampled_from(
    [
        "request",
        "to_agent",
        "to_agent",
        "to_relay",
        "to_relay",
        "delta",
        "delta",
        "done",
        "done_with_content",
        "error",
        "cancel",
    ]
)
PIECES = st.text(max_size=6)


@settings(max_examples=400, deadline=None)
@given(steps=st.lists(st.tuples(OPERATIONS, st.integers(0, 50), PIECES), max_size=80))
def test_random_interleavings_keep_outstanding_equal_to_the_model(
    steps: list[tuple[str, int, str]],
) -> None:
    """Requests, deltas, done, error and cancel, with frames in flight both ways
    (so an agent may answer a request the relay has already cancelled): no legal
    move raises, the relay's ``outstanding`` is always the model's, a done
    without content is the deltas received joined, and late frames are None."""
    pair = open_pair()
    relay, agent = pair.relay, pair.agent
    to_agent: list[str] = []  # frames on their way, in order
    to_relay: list[str] = []
    model: dict[str, list[str]] = {}  # in flight at the relay: the deltas received
    sent_content: dict[str, str | None] = {}  # what the agent's done said, per id
    cancelled: set[str] = set()
    numbers = iter(range(10_000))

    def pick(ids: set[str] | dict[str, Any], index: int) -> str | None:
        ordered = sorted(ids)
        return ordered[index % len(ordered)] if ordered else None

    for operation, index, text in steps:
        if operation == "request":
            request_id = f"r-{next(numbers)}"
            to_agent.append(relay.send(Request(request_id, "m", "", "p", "q")))
            model[request_id] = []
        elif operation == "cancel":
            request_id = pick(model, index)
            if request_id is not None:
                to_agent.append(relay.send(Cancel(request_id, "gone")))
                del model[request_id]
                cancelled.add(request_id)
        elif operation == "to_agent" and to_agent:
            event = agent.receive_text(to_agent.pop(0))
            assert isinstance(event, Request | Cancel)
        elif operation in ("delta", "done", "done_with_content", "error"):
            request_id = pick(agent.pending, index)
            if request_id is None:
                continue
            if operation == "delta":
                to_relay.append(agent.send(Delta(request_id, text)))
            elif operation == "error":
                to_relay.append(agent.send(AgentError(request_id, text, code="internal")))
            else:
                with_content = operation == "done_with_content"
                reply = Reply(request_id, "resp", "conv", text)
                to_relay.append(agent.done(reply, include_content=with_content))
                sent_content[request_id] = text if with_content else None
        elif operation == "to_relay" and to_relay:
            frame = to_relay.pop(0)
            request_id = json.loads(frame)["id"]
            event = relay.receive_text(frame)
            if request_id in cancelled:
                assert event is None
            elif isinstance(event, Delta):
                model[request_id].append(event.text)
            elif isinstance(event, Reply):
                given_content = sent_content[request_id]
                joined = "".join(model.pop(request_id))
                assert event.content == (joined if given_content is None else given_content)
            else:
                assert isinstance(event, AgentError)
                assert event.code == "internal"
                del model[request_id]
        assert relay.outstanding == set(model)
        for request_id, pieces in model.items():
            assert relay.received_text(request_id) == "".join(pieces)
        assert relay.state is V2State.OPEN


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
frame_types = st.sampled_from(
    ["hello", "update", "delta", "done", "error", "drain", "welcome", "request", "", "x"]
)
frames_like = st.builds(
    lambda kind, request_id, extra: json.dumps({"type": kind, "id": request_id, **extra}),
    frame_types | json_values,
    st.sampled_from(["r-1", "r-2", "gone", ""]) | json_values,
    st.dictionaries(
        st.sampled_from(
            ["text", "content", "code", "message", "retryable", "capacity", "models", "usage"]
        ),
        json_values,
        max_size=3,
    ),
)
peer_text = st.text(max_size=30) | json_values.map(json.dumps) | frames_like


@settings(max_examples=400, deadline=None)
@given(texts=st.lists(peer_text, min_size=1, max_size=6), hello_first=st.booleans())
def test_any_agent_text_gives_an_event_or_a_remote_error(
    texts: list[str], hello_first: bool
) -> None:
    pair = ConnectionPair()
    if hello_first:
        pair.hello()
        pair.welcome()
        pair.ask("r-1")
        pair.ask("r-2")
        pair.relay.send(Cancel("r-2", "gone"))
    for text in texts:
        state = pair.relay.state
        outstanding = set(pair.relay.outstanding)
        try:
            event = pair.relay.receive_text(text)
        except RemoteProtocolError as error:
            assert str(error)
            assert pair.relay.state is state
            assert pair.relay.outstanding == outstanding
        else:
            assert event is None or isinstance(
                event, AgentHello | Update | Delta | Reply | AgentError | Drain
            )
            if isinstance(event, Reply | AgentError):
                assert event.request_id in outstanding
                assert event.request_id not in pair.relay.outstanding
