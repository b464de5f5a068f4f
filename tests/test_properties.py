"""Properties over arbitrary input: whatever a peer or an operator sends, relayd
answers with its own errors and nothing else.

* The sans-I/O protocol: any text or bytes fed to either end returns an event or
  raises :class:`RemoteProtocolError`, and a rejected frame leaves the state as
  it was.
* The configuration: any TOML-shaped document given to ``parse_config`` (and any
  bytes given to ``load_config``) yields a ``Config`` or a ``ConfigError``;
  ``listen_address_problem`` (also used by the CLI on ``--listen``) never raises,
  and what it accepts can be bound.
* The HTTP API: any body POSTed to ``/api/ask``, ``/admin/users/add`` and
  ``/admin/users/delete`` gets a JSON answer with a status from a short list,
  never a 500. The requests go through ``create_asgi_app(state)``, the very
  application Hypercorn serves (``/api/ask`` is a bare ASGI endpoint, the rest
  Quart), driven in-process by a minimal ASGI client.

Examples are kept to about 200 per property so the module runs in seconds.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relayd.agents.auth import AgentKeys
from relayd.api import AsgiApp, create_asgi_app
from relayd.config import (
    SCHEMA,
    Config,
    ConfigError,
    listen_address_problem,
    load_config,
    parse_config,
)
from relayd.daemon import assemble
from relayd.locate import AdminKey
from relayd.protocol import (
    AgentConnection,
    AgentError,
    Greeting,
    Hello,
    Ping,
    Pong,
    RelayConnection,
    RemoteProtocolError,
    Reply,
    Request,
    State,
)
from relayd.state import Snapshot
from relayd.users import UserStore, UserTable

EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
KINDS = ["Connection id", "ping", "pong", "ChatGptRequest", "ChatGptResponse", "error"]
REQUEST_IDS = ["r1", "r2", "c0"]
frame_ids = st.sampled_from(REQUEST_IDS) | st.text(max_size=12)
reply_data = st.fixed_dictionaries(
    {},
    optional={
        name: st.text(max_size=12) | json_values
        for name in ("response_id", "conversation_id", "content", "message_id", "parent_id")
    },
).map(json.dumps)
frame_data = reply_data | st.text(max_size=30) | json_values.map(json.dumps)
frames = st.fixed_dictionaries(
    {},
    optional={
        "id": frame_ids | json_values,
        "message": st.sampled_from(KINDS) | st.text(max_size=12) | json_values,
        "data": frame_data | json_values,
        "error": json_values,
    },
).map(json.dumps)
texts = frames | json_values.map(json.dumps) | st.text() | st.just("[" * 5000)


# -- the protocol --------------------------------------------------------------------------


def open_relay() -> RelayConnection:
    relay = RelayConnection("c0")
    relay.send(Greeting("c0"))
    relay.receive_text(json.dumps({"id": "c0", "message": "Connection id", "data": ""}))
    for request_id in ("r1", "r2"):
        relay.send(Request(request_id, "m", "", "p", "question"))
    return relay


@EXAMPLES
@given(text=texts)
def test_relay_side_raises_only_remote_protocol_errors(text: str) -> None:
    greeting_only = RelayConnection("c0")
    greeting_only.send(Greeting("c0"))
    for relay in (greeting_only, open_relay()):
        state, outstanding = relay.state, set(relay.outstanding)
        try:
            event = relay.receive_text(text)
        except RemoteProtocolError as error:
            assert str(error)
            assert relay.state is state and relay.outstanding == outstanding
            continue
        if state is State.AWAIT_HELLO:
            assert isinstance(event, Hello) and event.connection_id
            assert relay.state is State.OPEN
        else:
            assert isinstance(event, Pong | Reply | AgentError)
            if isinstance(event, Reply | AgentError):
                assert event.request_id in outstanding
                assert relay.outstanding == outstanding - {event.request_id}


@EXAMPLES
@given(data=st.binary())
def test_binary_frames_are_remote_protocol_errors(data: bytes) -> None:
    relay = open_relay()
    with pytest.raises(RemoteProtocolError):
        relay.receive_bytes(data)
    assert relay.state is State.OPEN and relay.outstanding == {"r1", "r2"}


@EXAMPLES
@given(text=texts)
def test_agent_side_raises_only_remote_protocol_errors(text: str) -> None:
    fresh = AgentConnection()
    greeted = AgentConnection()
    greeted.send(Greeting("c0").accept())
    for agent in (fresh, greeted):
        state, pending = agent.state, set(agent.pending)
        try:
            event = agent.receive_text(text)
        except RemoteProtocolError as error:
            assert str(error)
            assert agent.state is state and agent.pending == pending
            continue
        assert isinstance(event, Greeting | Ping | Request)


# -- the configuration -------------------------------------------------------------------

durations = st.from_regex(r"\A\s?[0-9]{1,6}(\.[0-9]{1,3})?\s?(ms|s|m|h|d|)\s?\Z")
sizes = st.from_regex(r"\A\s?[0-9]{1,12}\s?(B|KiB|MiB|GiB|kb|)\s?\Z")
# Digits beyond ASCII too: str.isdigit() accepts "\u00b2" (superscript two) and
# "\u0661" (Arabic-Indic one), and int() accepts only the second.
OTHER_DIGITS = "\u00b2\u0661"
listens = st.from_regex(
    rf"\A(unix:.{{0,10}}|fd://[0-9{OTHER_DIGITS}]{{0,3}}|\[?[0-9a-z.:]{{0,12}}\]?:[0-9{OTHER_DIGITS}]{{0,6}})\Z"
)
toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.datetimes()
    | st.dates()
    | st.times()
    | durations
    | sizes
    | listens
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
key_names = st.sampled_from(sorted({key for keys in SCHEMA.values() for key in keys}))
tables = st.dictionaries(key_names | st.text(max_size=12), toml_values, max_size=8)
documents = st.dictionaries(
    st.sampled_from(list(SCHEMA)) | st.text(max_size=10), tables | toml_values, max_size=6
)


@EXAMPLES
@given(document=documents)
def test_parse_config_raises_only_config_error(document: dict[str, Any]) -> None:
    try:
        config = parse_config(document, source="fuzz.toml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.toml: ")
        return
    assert isinstance(config, Config)
    assert config.agents.heartbeat_timeout > config.agents.heartbeat_interval


@EXAMPLES
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_load_config_raises_only_config_error(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "relayd.toml"
        path.write_bytes(raw)
        try:
            load_config(path)
        except ConfigError as error:
            assert str(error).startswith(str(path))


@EXAMPLES
@given(value=listens | st.text(max_size=30))
def test_listen_address_problem_never_raises(value: str) -> None:
    """It is called on ``--listen`` by the CLI too, outside ``parse_config``'s
    net: it must return a problem or None, and what it accepts must be usable."""
    problem = listen_address_problem(value)
    assert problem is None or isinstance(problem, str)
    if problem is None and value.startswith("fd://"):
        assert value[5:].isascii() and value[5:].isdigit(), value
        int(value[5:])
    elif problem is None and not value.startswith("unix:"):
        port = value.rpartition(":")[2]
        assert port.isascii() and 0 <= int(port) <= 65535, value


# -- the HTTP API ------------------------------------------------------------------------

ADMIN_KEY = "properties-admin-key"
MAX_BODY = 4096


@pytest.fixture(scope="module")
def asgi_app() -> Iterator[AsgiApp]:
    """The whole application over a relay with no agents and a scratch state directory.

    The throttle never trips (interval 0): thousands of failures are the point here.
    """
    with tempfile.TemporaryDirectory() as directory:
        config = parse_config(
            {
                "server": {"max_body": f"{MAX_BODY}B"},
                "auth": {"failure_burst": 1_000_000, "failure_interval": "0s"},
                "requests": {"max_content": "1KiB"},
            }
        )
        keys = AgentKeys.of((), allow_loopback_without_key=True)
        state, _ = assemble(
            Snapshot(config, UserTable.of(()), keys),
            admin=AdminKey.of(ADMIN_KEY, "tests"),
            store=UserStore(Path(directory)),
            state_dir=Path(directory),
        )
        yield create_asgi_app(state)


async def call(
    app: AsgiApp, method: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request through the ASGI app, in-process; (status, headers, body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"relayd.test"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "extensions": {},
        "state": {},
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(dict(message))

    with trio.fail_after(10):
        await app(scope, receive, send)  # type: ignore[arg-type]
    starts = [message for message in sent if message["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    response_headers = {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in starts[0].get("headers", [])
    }
    content = b"".join(
        message.get("body", b"") for message in sent if message["type"] == "http.response.body"
    )
    return starts[0]["status"], response_headers, content


FIELDS = ["content", "conversation_id", "parent_id", "admin_key", "user_id", "name"]
field_values = json_values | st.just(ADMIN_KEY) | st.text(min_size=1, max_size=30)
documents_for_api = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=10), field_values, max_size=6
)
# Close to valid, so that the deeper checks are reached too.
near_valid = st.fixed_dictionaries(
    {"content": st.text(min_size=1, max_size=40) | field_values},
    optional={
        "conversation_id": st.text(max_size=10) | field_values,
        "parent_id": st.text(max_size=10) | field_values,
    },
) | st.fixed_dictionaries(
    {"admin_key": st.just(ADMIN_KEY) | field_values},
    optional={"name": st.text(max_size=20) | field_values, "user_id": field_values},
)
bodies = (
    ((near_valid | documents_for_api | json_values).map(json.dumps) | st.text(max_size=50)).map(
        str.encode
    )
    | st.binary(max_size=100)
    | st.integers(1, 3).map(lambda n: b'{"content": "' + b"x" * (MAX_BODY * n) + b'"}')
)
header_text = st.text(
    alphabet=string.ascii_letters + string.digits + string.punctuation + " \xe9", max_size=40
)
authorizations = (
    st.sampled_from([ADMIN_KEY, f"Bearer {ADMIN_KEY}", f"bearer  {ADMIN_KEY} ", None, "Bearer", ""])
    | header_text
)
content_types = st.sampled_from(
    [None, "application/json", "application/x-www-form-urlencoded", "text/plain", "multipart/x"]
)


@EXAMPLES
@given(
    path=st.sampled_from(["/api/ask", "/admin/users/add", "/admin/users/delete"]),
    body=bodies,
    authorization=authorizations,
    content_type=content_types,
)
async def test_api_answers_any_body_with_a_json_status(
    asgi_app: AsgiApp,
    path: str,
    body: bytes,
    authorization: str | None,
    content_type: str | None,
) -> None:
    headers = []
    if authorization is not None:
        headers.append((b"authorization", authorization.encode("latin-1")))
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    status, response_headers, content = await call(asgi_app, "POST", path, body, headers)
    event(f"{path} {status}")
    assert response_headers.get("content-type", "").startswith("application/json"), (
        status,
        response_headers,
        content[:200],
    )
    document = json.loads(content)
    assert isinstance(document, dict)
    if status == 200:
        # Only a well-formed user creation can succeed (there is no agent to ask,
        # and no user to delete).
        assert path == "/admin/users/add", (path, document)
        assert set(document) >= {"user_id", "token"}
        return
    assert status in {400, 401, 404, 413, 503}, (status, document, body[:200])
    assert isinstance(document.get("error"), str) and document["error"], document
