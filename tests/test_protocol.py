"""The sans-I/O agent protocol, tested as a pair (after h11's ConnectionPair).

Synchronous, no mocks, no I/O: events go in one end, text comes out, and that
text goes into the other end. Every peer misbehaviour must raise
RemoteProtocolError with a message saying what was wrong and the hint
``close_code`` (None: drop the frame and carry on), and leave the state as it
was; every misuse of ours must raise LocalProtocolError and change nothing.

The real frames of the seed's Firefox agent (``tests/fixtures/firefox-agent-frames.json``,
kept in the repository) are the test vectors for what the relay must understand
and what it must send.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.protocol import (
    AgentConnection,
    AgentError,
    CloseCode,
    Closed,
    Greeting,
    Hello,
    LocalProtocolError,
    Ping,
    Pong,
    ProtocolError,
    RelayConnection,
    RemoteProtocolError,
    Reply,
    Request,
    State,
    decode_frame,
    encode_frame,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "firefox-agent-frames.json"


def fixture_frames() -> list[tuple[str, str]]:
    document = json.loads(FIXTURE.read_text())
    return [(frame["dir"], frame["frame"]) for frame in document["frames"]]


class Pair:
    """A relay and an agent connected back to back."""

    def __init__(self, connection_id: str = "conn-1") -> None:
        self.relay = RelayConnection(connection_id)
        self.agent = AgentConnection()

    def relay_sends(self, event: Greeting | Ping | Request) -> Any:
        """What the agent receives when the relay sends ``event``."""
        return self.agent.receive_text(self.relay.send(event))

    def agent_sends(self, event: Hello | Pong | Reply | AgentError) -> Any:
        """What the relay receives when the agent sends ``event``."""
        return self.relay.receive_text(self.agent.send(event))

    def handshake(self, reclaim: str | None = None) -> Hello:
        greeting = self.relay_sends(Greeting(self.relay.connection_id))
        assert isinstance(greeting, Greeting)
        hello = greeting.reclaim(reclaim) if reclaim else greeting.accept()
        received = self.agent_sends(hello)
        assert isinstance(received, Hello)
        return received

    def request(self, request_id: str, content: str = "hi", conversation: str = "") -> Request:
        event = Request(
            request_id, f"msg-{request_id}", conversation, f"parent-{request_id}", content
        )
        received = self.relay_sends(event)
        assert received == event
        return received


def open_pair() -> Pair:
    pair = Pair()
    pair.handshake()
    return pair


def frame(frame_id: str, message: str, data: str = "") -> str:
    return json.dumps({"id": frame_id, "message": message, "data": data})


# -- handshake ---------------------------------------------------------------------


def test_handshake_accept() -> None:
    pair = Pair("c-123")
    assert pair.relay.state is State.NEW
    greeting = pair.relay_sends(Greeting("c-123"))
    assert greeting == Greeting("c-123")
    assert pair.relay.state is State.AWAIT_HELLO
    hello = pair.agent_sends(greeting.accept())
    assert hello == Hello("c-123", "c-123")
    assert not hello.is_reclaim
    assert pair.relay.state is State.OPEN
    assert pair.agent.state is State.OPEN
    assert pair.agent.connection_id == "c-123"


def test_handshake_reclaim_keeps_the_offered_id_apart() -> None:
    pair = Pair("fresh")
    hello = pair.handshake(reclaim="old-id")
    assert hello == Hello("old-id", "fresh")
    assert hello.is_reclaim
    assert pair.relay.state is State.OPEN
    # The protocol only reports the wish; adopting the id is the dispatcher's call.
    assert pair.relay.connection_id == "fresh"
    assert pair.agent.connection_id == "old-id"


def test_first_agent_frame_must_be_the_connection_id() -> None:
    relay = RelayConnection("c")
    relay.send(Greeting("c"))
    with pytest.raises(
        RemoteProtocolError, match="expected the 'Connection id' answer first, got 'pong'"
    ) as info:
        relay.receive_text(frame("c", "pong"))
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR
    assert relay.state is State.AWAIT_HELLO
    # The state is unchanged: a correct answer still completes the handshake.
    assert relay.receive_text(frame("c", "Connection id")) == Hello("c", "c")


def test_empty_connection_id_is_refused() -> None:
    relay = RelayConnection("c")
    relay.send(Greeting("c"))
    with pytest.raises(RemoteProtocolError, match="connection id is empty") as info:
        relay.receive_text(frame("", "Connection id"))
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR
    assert relay.state is State.AWAIT_HELLO


def test_second_connection_id_after_the_handshake_is_dropped() -> None:
    pair = open_pair()
    with pytest.raises(RemoteProtocolError, match="second connection id") as info:
        pair.relay.receive_text(frame("other", "Connection id"))
    assert info.value.close_code is None
    assert pair.relay.state is State.OPEN


def test_relay_cannot_receive_before_greeting() -> None:
    relay = RelayConnection("c")
    with pytest.raises(LocalProtocolError, match="cannot receive in state new"):
        relay.receive_text(frame("c", "Connection id"))
    assert relay.state is State.NEW


def test_relay_greets_only_once() -> None:
    relay = RelayConnection("c")
    relay.send(Greeting("c"))
    with pytest.raises(LocalProtocolError, match="cannot greet"):
        relay.send(Greeting("c"))
    assert relay.state is State.AWAIT_HELLO


# -- liveness ------------------------------------------------------------------------


def test_ping_pong() -> None:
    pair = open_pair()
    ping = pair.relay_sends(Ping("p-1"))
    assert ping == Ping("p-1")
    assert pair.agent_sends(ping.reply()) == Pong("p-1")
    assert pair.relay.state is State.OPEN


# -- work ----------------------------------------------------------------------------


def test_request_and_reply() -> None:
    pair = open_pair()
    request = pair.request("r-1", content='say "hi" \\ ünïcødé 🎉\n', conversation="conv-9")
    assert request.content == 'say "hi" \\ ünïcødé 🎉\n'
    assert pair.relay.outstanding == {"r-1"}
    assert pair.agent.pending == {"r-1"}
    reply = pair.agent_sends(request.reply("resp-1", "conv-9", "answer ✓"))
    assert reply == Reply("r-1", "resp-1", "conv-9", "answer ✓")
    assert pair.relay.outstanding == set()
    assert pair.agent.pending == set()


def test_error_reply() -> None:
    pair = open_pair()
    request = pair.request("r-1")
    error = pair.agent_sends(request.fail("Unknown error"))
    assert error == AgentError("r-1", "Unknown error", malformed=False)
    assert pair.relay.outstanding == set()


def test_error_reply_without_text_gets_a_default_text() -> None:
    pair = open_pair()
    pair.request("r-1")
    error = pair.relay.receive_text(frame("r-1", "error", ""))
    assert error == AgentError("r-1", "agent reported an error")


def test_replies_out_of_order_are_matched_by_id() -> None:
    pair = open_pair()
    requests = [pair.request(f"r-{n}", content=f"q{n}") for n in range(4)]
    assert pair.relay.outstanding == {"r-0", "r-1", "r-2", "r-3"}
    for request in (requests[2], requests[0], requests[3], requests[1]):
        reply = pair.agent_sends(
            request.reply(f"a-{request.request_id}", "c", "A:" + request.content)
        )
        assert reply.request_id == request.request_id
        assert reply.content == "A:" + request.content
        assert request.request_id not in pair.relay.outstanding
    assert pair.relay.outstanding == set()


def test_reply_to_unknown_id_is_dropped_and_the_connection_carries_on() -> None:
    pair = open_pair()
    request = pair.request("r-1")
    data = json.dumps({"response_id": "x", "conversation_id": "c", "content": "late"})
    with pytest.raises(RemoteProtocolError, match="'ChatGptResponse' for request 'nope'") as info:
        pair.relay.receive_text(frame("nope", "ChatGptResponse", data))
    assert info.value.close_code is None
    with pytest.raises(RemoteProtocolError, match="'error' for request 'nope2'") as info:
        pair.relay.receive_text(frame("nope2", "error", "boom"))
    assert info.value.close_code is None
    assert pair.relay.outstanding == {"r-1"}
    assert pair.agent_sends(request.reply("resp", "c", "ok")) == Reply("r-1", "resp", "c", "ok")


def test_second_reply_to_the_same_id_is_dropped() -> None:
    pair = open_pair()
    pair.request("r-1")
    data = json.dumps({"response_id": "x", "conversation_id": "c", "content": "first"})
    assert isinstance(pair.relay.receive_text(frame("r-1", "ChatGptResponse", data)), Reply)
    with pytest.raises(RemoteProtocolError, match="not in flight") as info:
        pair.relay.receive_text(frame("r-1", "ChatGptResponse", data))
    assert info.value.close_code is None
    with pytest.raises(RemoteProtocolError, match="not in flight"):
        pair.relay.receive_text(frame("r-1", "error", "Unknown error"))
    assert pair.relay.state is State.OPEN


def test_unknown_fields_are_ignored() -> None:
    pair = open_pair()
    pair.request("r-1")
    data = json.dumps(
        {"response_id": "x", "conversation_id": "c", "content": "ok", "model": "gpt", "n": 3}
    )
    text = json.dumps(
        {"id": "r-1", "message": "ChatGptResponse", "data": data, "error": {}, "v": 2}
    )
    assert pair.relay.receive_text(text) == Reply("r-1", "x", "c", "ok")


def test_missing_data_counts_as_empty() -> None:
    pair = open_pair()
    assert pair.relay.receive_text('{"id":"p","message":"pong"}') == Pong("p")


# -- malformed frames ----------------------------------------------------------------

NESTED = "[" * 100_000 + "]" * 100_000

MALFORMED = [
    pytest.param("", "frame is not JSON", id="empty"),
    pytest.param("hello, relay", "frame is not JSON", id="not-json"),
    pytest.param('{"id": "x", "message": "pong", "data": ""', "frame is not JSON", id="truncated"),
    pytest.param('["x", "pong", ""]', "not a JSON object but an array", id="array"),
    pytest.param("42", "not a JSON object but a number", id="number"),
    pytest.param('"pong"', "not a JSON object but a string", id="string"),
    pytest.param("null", "not a JSON object but null", id="null"),
    pytest.param("true", "not a JSON object but a boolean", id="boolean"),
    pytest.param('{"message": "pong", "data": ""}', "no 'id' field", id="missing-id"),
    pytest.param('{"id": "x", "data": ""}', "no 'message' field", id="missing-message"),
    pytest.param('{"id": null, "message": "pong"}', "no 'id' field", id="null-id"),
    pytest.param(
        '{"id": 7, "message": "pong", "data": ""}',
        "'id' is a number, not a string",
        id="numeric-id",
    ),
    pytest.param(
        '{"id": "x", "message": ["pong"], "data": ""}', "'message' is an array", id="array-message"
    ),
    pytest.param(
        '{"id": "x", "message": "pong", "data": {}}', "'data' is an object", id="object-data"
    ),
    pytest.param(
        '{"id": "x", "message": "pong", "data": false}', "'data' is a boolean", id="bool-data"
    ),
    pytest.param(
        '{"id": "x", "message": "launch", "data": ""}',
        "unknown message kind 'launch'",
        id="unknown-kind",
    ),
    pytest.param(
        '{"id": "x", "message": "Ping", "data": ""}', "unknown message kind 'Ping'", id="wrong-case"
    ),
    pytest.param(NESTED, "nested too deeply", id="deep-array"),
    pytest.param(
        '{"id": "x", "message": "pong", "extra": ' + NESTED + "}",
        "nested too deeply",
        id="deep-field",
    ),
]


@pytest.mark.parametrize(("text", "says"), MALFORMED)
def test_malformed_frame_is_a_remote_error_and_the_connection_carries_on(
    text: str, says: str
) -> None:
    pair = open_pair()
    request = pair.request("r-1")
    with pytest.raises(RemoteProtocolError) as info:
        pair.relay.receive_text(text)
    assert says in str(info.value)
    assert info.value.close_code is None
    assert pair.relay.state is State.OPEN
    assert pair.relay.outstanding == {"r-1"}
    # Nothing was lost: the connection still works.
    assert pair.agent_sends(request.fail("x")) == AgentError("r-1", "x")


def test_unknown_kind_in_message_is_cut_short() -> None:
    pair = open_pair()
    with pytest.raises(RemoteProtocolError) as info:
        pair.relay.receive_text(frame("x", "k" * 10_000))
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(("text", "says"), MALFORMED[:6])
def test_malformed_frame_during_the_handshake(text: str, says: str) -> None:
    relay = RelayConnection("c")
    relay.send(Greeting("c"))
    with pytest.raises(RemoteProtocolError, match=says):
        relay.receive_text(text)
    assert relay.state is State.AWAIT_HELLO


def test_binary_frame_is_a_remote_error() -> None:
    pair = open_pair()
    with pytest.raises(RemoteProtocolError, match="binary frame of 5 bytes") as info:
        pair.relay.receive_bytes(b"hello")
    assert info.value.close_code is None
    assert pair.relay.state is State.OPEN


@pytest.mark.parametrize(
    ("data", "says"),
    [
        pytest.param("", "data is not JSON", id="empty"),
        pytest.param("Unknown error", "data is not JSON", id="text"),
        pytest.param("[1, 2]", "data is an array, not a JSON object", id="array"),
        pytest.param('"{}"', "data is a string, not a JSON object", id="triple-encoded"),
        pytest.param(
            json.dumps({"response_id": "r", "conversation_id": "c"}),
            "data field 'content' is missing",
            id="missing-content",
        ),
        pytest.param(
            json.dumps({"response_id": 5, "conversation_id": "c", "content": "x"}),
            "data field 'response_id' is a number",
            id="numeric-response-id",
        ),
        pytest.param(
            json.dumps({"response_id": "r", "conversation_id": None, "content": "x"}),
            "data field 'conversation_id' is missing",
            id="null-conversation",
        ),
        pytest.param("[" * 50_000 + "]" * 50_000, "data is not JSON", id="deep"),
    ],
)
def test_reply_with_malformed_data_fails_that_request(data: str, says: str) -> None:
    pair = open_pair()
    pair.request("r-1")
    pair.request("r-2")
    event = pair.relay.receive_text(frame("r-1", "ChatGptResponse", data))
    assert isinstance(event, AgentError)
    assert event.request_id == "r-1"
    assert event.malformed is True
    assert says in event.text
    assert event.text.startswith("malformed reply")
    # That request is over; the other one is untouched.
    assert pair.relay.outstanding == {"r-2"}
    assert pair.relay.state is State.OPEN


# -- our own misuse --------------------------------------------------------------------


@pytest.mark.parametrize("greet", [False, True], ids=["new", "awaiting-hello"])
def test_request_before_the_handshake_is_local_misuse(greet: bool) -> None:
    relay = RelayConnection("c")
    if greet:
        relay.send(Greeting("c"))
    before = relay.state
    with pytest.raises(LocalProtocolError, match="cannot send Request in state"):
        relay.send(Request("r", "m", "", "p", "x"))
    with pytest.raises(LocalProtocolError, match="cannot send Ping in state"):
        relay.send(Ping("p"))
    assert relay.state is before
    assert relay.outstanding == set()


def test_duplicate_request_id_is_local_misuse() -> None:
    pair = open_pair()
    pair.request("r-1", content="first")
    with pytest.raises(LocalProtocolError, match="r-1 is already in flight"):
        pair.relay.send(Request("r-1", "m2", "", "p", "second"))
    assert pair.relay.outstanding == {"r-1"}
    assert pair.relay.state is State.OPEN


def test_request_id_can_be_reused_once_answered() -> None:
    pair = open_pair()
    request = pair.request("r-1")
    pair.agent_sends(request.reply("a", "c", "ok"))
    assert pair.request("r-1") == Request("r-1", "msg-r-1", "", "parent-r-1", "hi")


def test_agent_side_misuse() -> None:
    agent = AgentConnection()
    with pytest.raises(LocalProtocolError, match="before the handshake"):
        agent.send(Pong("p"))
    assert agent.state is State.AWAIT_HELLO
    agent.receive_text(frame("c", "Connection id"))
    agent.send(Hello("c", "c"))
    with pytest.raises(LocalProtocolError, match="handshake is over"):
        agent.send(Hello("c", "c"))
    with pytest.raises(LocalProtocolError, match="no request 'r-9' to answer"):
        agent.send(Reply("r-9", "a", "c", "x"))
    assert agent.state is State.OPEN


def test_agent_side_rejects_frames_before_the_greeting() -> None:
    agent = AgentConnection()
    with pytest.raises(RemoteProtocolError, match="expected the greeting first, got 'ping'"):
        agent.receive_text(frame("p", "ping"))
    agent.receive_text(frame("c", "Connection id"))
    agent.send(Hello("c", "c"))
    with pytest.raises(RemoteProtocolError, match="a second greeting"):
        agent.receive_text(frame("c", "Connection id"))
    with pytest.raises(RemoteProtocolError, match="malformed request: data is not JSON"):
        agent.receive_text(frame("r", "ChatGptRequest", "nope"))
    assert agent.pending == set()


def test_protocol_error_base_cannot_be_raised() -> None:
    with pytest.raises(TypeError):
        ProtocolError("which side?")
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert RemoteProtocolError("x").close_code is None


# -- the end ---------------------------------------------------------------------------


def test_connection_lost_returns_the_outstanding_ids() -> None:
    pair = open_pair()
    for n in range(3):
        pair.request(f"r-{n}")
    pair.agent_sends(Reply("r-1", "a", "c", "done"))
    closed = pair.relay.connection_lost()
    assert isinstance(closed, Closed)
    assert sorted(closed.outstanding) == ["r-0", "r-2"]
    assert pair.relay.state is State.CLOSED
    assert pair.relay.outstanding == set()
    with pytest.raises(LocalProtocolError):
        pair.relay.send(Ping("p"))
    with pytest.raises(LocalProtocolError, match="cannot receive in state closed"):
        pair.relay.receive_text(frame("p", "pong"))
    assert pair.relay.connection_lost() == Closed(())
    agent_closed = pair.agent.connection_lost()
    assert sorted(agent_closed.outstanding) == ["r-0", "r-2"]
    assert pair.agent.state is State.CLOSED


def test_connection_lost_during_the_handshake() -> None:
    relay = RelayConnection("c")
    relay.send(Greeting("c"))
    assert relay.connection_lost() == Closed(())
    assert relay.state is State.CLOSED


def test_events_are_frozen_and_build_correct_replies() -> None:
    request = Request("r", "m", "c", "p", "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.content = "y"  # type: ignore[misc]
    assert request.reply("a", "c2", "y") == Reply("r", "a", "c2", "y")
    assert request.fail() == AgentError("r", "Unknown error")
    assert Ping("p").reply() == Pong("p")
    assert Greeting("g").accept() == Hello("g", "g")
    assert Greeting("g").reclaim("old") == Hello("old", "g")


# -- the Firefox agent's real frames -----------------------------------------------------


def test_fixture_is_present() -> None:
    frames = fixture_frames()
    assert len(frames) == 10
    assert {direction for direction, _ in frames} == {"relay->agent", "agent->relay"}


def test_firefox_agent_frames_decode_to_the_right_events() -> None:
    frames = fixture_frames()
    agent_frames = [text for direction, text in frames if direction == "agent->relay"]
    relay_frames = [json.loads(text) for direction, text in frames if direction == "relay->agent"]
    connection_id = relay_frames[0]["id"]
    relay = RelayConnection(connection_id)
    relay.send(Greeting(connection_id))

    events = [relay.receive_text(agent_frames[0])]
    assert events[0] == Hello(connection_id, connection_id)
    relay.send(Ping(relay_frames[1]["id"]))
    events.append(relay.receive_text(agent_frames[1]))
    assert events[1] == Pong(relay_frames[1]["id"])

    for sent in relay_frames[2:]:
        fields = json.loads(sent["data"])
        relay.send(
            Request(
                sent["id"],
                fields["message_id"],
                fields["conversation_id"],
                fields["parent_id"],
                fields["content"],
            )
        )
    first, second, failure = (relay.receive_text(text) for text in agent_frames[2:])
    conversation = "0cdcb410-2244-435a-8661-78bc564b35ae"
    assert first == Reply(
        "e0f20e34-627a-4b46-968d-ca9af2a1c10c",
        "a7917c90-8cef-4148-b296-36896dd19367",
        conversation,
        f"A|{conversation}|f61f2c27-fd50-4782-8b84-128b0899a2f5|"
        "195322d5-0e2a-4d26-bd4e-7084442c1111|echo:Hello world",
    )
    assert isinstance(second, Reply)
    assert second.request_id == "c0f6dd04-8ab8-40e6-98e3-378eb4bf739b"
    assert second.response_id == "0486c0c9-5e22-40cf-9bbd-d846ffe2ee40"
    assert second.conversation_id == conversation
    assert second.content.endswith("|echo:second turn")
    # The failure: plain text data and an extra "error": {} field.
    assert failure == AgentError("2dddcdc2-e2c3-47fc-acea-793b5d90abaf", "Unknown error")
    assert relay.outstanding == set()


def decoded(text: str) -> dict[str, Any]:
    """A frame's fields, with the double-encoded ``data`` decoded too."""
    fields: dict[str, Any] = json.loads(text)
    if fields.get("data"):
        with contextlib.suppress(ValueError):
            fields["data"] = json.loads(fields["data"])
    return fields


def test_relay_frames_match_the_seed_relay_frames() -> None:
    frames = fixture_frames()
    expected = [text for direction, text in frames if direction == "relay->agent"]
    connection_id = json.loads(expected[0])["id"]
    relay = RelayConnection(connection_id)
    ours = [relay.send(Greeting(connection_id))]
    relay.receive_text(frame(connection_id, "Connection id"))
    ours.append(relay.send(Ping(json.loads(expected[1])["id"])))
    for text in expected[2:]:
        sent = decoded(text)
        data = sent["data"]
        ours.append(
            relay.send(
                Request(
                    sent["id"],
                    data["message_id"],
                    data["conversation_id"],
                    data["parent_id"],
                    data["content"],
                )
            )
        )
    assert [decoded(text) for text in ours] == [decoded(text) for text in expected]
    # Field order on the wire is the seed's, and data is a string (double-encoded).
    for text in ours:
        assert list(json.loads(text)) == ["id", "message", "data"]
        assert isinstance(json.loads(text)["data"], str)


def test_agent_side_understands_the_seed_relay_and_answers_like_firefox() -> None:
    frames = fixture_frames()
    agent = AgentConnection()
    for direction, text in frames:
        if direction == "relay->agent":
            event = agent.receive_text(text)
            continue
        expected = decoded(text)
        if isinstance(event, Greeting):
            ours = agent.send(event.accept())
        elif isinstance(event, Ping):
            ours = agent.send(event.reply())
        else:
            assert isinstance(event, Request)
            if expected["message"] == "error":
                ours = agent.send(event.fail(expected["data"]))
            else:
                reply = expected["data"]
                ours = agent.send(
                    event.reply(reply["response_id"], reply["conversation_id"], reply["content"])
                )
        expected.pop("error", None)
        assert decoded(ours) == expected


def test_encode_decode_round_trip() -> None:
    text = encode_frame("i", "m", '{"a": "ü"}')
    assert decode_frame(text) == ("i", "m", '{"a": "ü"}')


# -- property: nothing but RemoteProtocolError comes out of the peer's text ---------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
kinds = st.sampled_from(
    ["Connection id", "ping", "pong", "ChatGptRequest", "ChatGptResponse", "error", ""]
)
ids = st.sampled_from(["r-1", "r-2", "c", ""]) | st.text(max_size=8)
reply_data = st.fixed_dictionaries(
    {},
    optional={"response_id": json_values, "conversation_id": json_values, "content": json_values},
).map(json.dumps)
frames_like = st.builds(
    lambda i, m, d, extra: json.dumps({"id": i, "message": m, "data": d, **extra}),
    ids | json_values,
    kinds | json_values,
    reply_data | st.text(max_size=20) | json_values,
    st.dictionaries(st.text(max_size=5), json_values, max_size=2),
)
peer_text = st.text() | json_values.map(json.dumps) | frames_like


@settings(max_examples=400, deadline=None)
@given(texts=st.lists(peer_text, min_size=1, max_size=5), handshake=st.booleans())
def test_any_peer_text_gives_an_event_or_a_remote_error(texts: list[str], handshake: bool) -> None:
    pair = Pair("c")
    if handshake:
        pair.handshake()
        pair.request("r-1")
        pair.request("r-2")
    else:
        pair.relay.send(Greeting("c"))
    for text in texts:
        state = pair.relay.state
        outstanding = set(pair.relay.outstanding)
        try:
            event = pair.relay.receive_text(text)
        except RemoteProtocolError as error:
            assert str(error)
            assert pair.relay.state is state
            assert pair.relay.outstanding == outstanding
            if state is State.OPEN:
                assert error.close_code is None
        else:
            assert isinstance(event, Hello | Pong | Reply | AgentError)
            if isinstance(event, Reply | AgentError):
                assert event.request_id in outstanding
                assert event.request_id not in pair.relay.outstanding


@settings(max_examples=200, deadline=None)
@given(text=peer_text)
def test_any_relay_text_gives_the_agent_an_event_or_a_remote_error(text: str) -> None:
    agent = AgentConnection()
    agent.receive_text(frame("c", "Connection id"))
    agent.send(Hello("c", "c"))
    try:
        event = agent.receive_text(text)
    except RemoteProtocolError as error:
        assert str(error)
    else:
        assert isinstance(event, Greeting | Ping | Request)
