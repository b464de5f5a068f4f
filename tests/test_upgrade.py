"""The sans-I/O side of an agent's WebSocket upgrade (relayd/front/agent_upgrade.py).

* :func:`parse_agent_upgrade` accepts exactly one complete ``GET`` head over
  HTTP/1.1, with no body (not even an empty one), carrying a version 13
  WebSocket upgrade to ``/client/register`` or ``/agent/<key>/client/register``;
  for anything else it returns None and never raises. Bytes after such a head
  (which a client must not send before the ``101``) come back as ``early_data``,
  for the caller to refuse. Checked on hand-written heads (one per way of being
  wrong), on the very bytes a real client (wsproto's) sends, and with hypothesis
  on arbitrary bytes and on mutations of a valid head.
* :func:`accept_response` completes a real client's handshake: wsproto's client
  is fed the ``101`` and must report ``AcceptConnection``.
* :func:`refusal_response` is a well-formed HTTP response, read back with h11 as
  the client would (status, JSON body, framing, ``connection: close``,
  ``www-authenticate`` on 401 only, ``retry-after`` only when given).

Everything here is synchronous and in memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
from http import HTTPStatus

import h11
import pytest
import wsproto
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, Request
from wsproto.extensions import PerMessageDeflate

from relayd.agents.auth import agent_key_from_path
from relayd.front.agent_upgrade import (
    AgentUpgrade,
    accept_response,
    may_be_agent_upgrade,
    parse_agent_upgrade,
    refusal_body,
    refusal_headers,
    refusal_response,
)
from relayd.front.http1 import MAX_HEAD

EXAMPLES = settings(max_examples=200, deadline=None)

# RFC 6455, section 1.3: this key's accept token.
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
KEY_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

UPGRADE_HEADERS: dict[str, str] = {
    "Host": "relay.example",
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": KEY,
}


def request_head(
    target: str = "/client/register",
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    headers: dict[str, str | None] | None = None,
) -> bytes:
    """A request head with the upgrade headers; ``headers`` overrides them (None drops one)."""
    fields: dict[str, str | None] = {**UPGRADE_HEADERS, **(headers or {})}
    lines = [f"{method} {target} {version}"]
    lines += [f"{name}: {value}" for name, value in fields.items() if value is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


VALID_HEAD = request_head()


def padded_head(size: int) -> bytes:
    """A valid upgrade head of exactly ``size`` bytes (padded with an extra header)."""
    bare = request_head(headers={"X-Pad": ""})
    head = request_head(headers={"X-Pad": "p" * (size - len(bare))})
    assert len(head) == size
    return head


def parse_upgrade(head: bytes) -> AgentUpgrade:
    """``parse_agent_upgrade(head)``, which must accept it."""
    upgrade = parse_agent_upgrade(head)
    assert upgrade is not None
    return upgrade


def assert_well_formed(upgrade: AgentUpgrade) -> None:
    """What any AgentUpgrade, however it was obtained, must satisfy."""
    assert agent_key_from_path(upgrade.path)[0]
    assert upgrade.key
    assert (b"sec-websocket-key", upgrade.key) in [(n, v.strip()) for n, v in upgrade.headers]
    assert all(name == name.lower() for name, _ in upgrade.headers)


# -- may_be_agent_upgrade --------------------------------------------------------------


@pytest.mark.parametrize(
    "first_bytes",
    [VALID_HEAD, b"GET /client/register", b"GET /agent/", b"GET /agent/k/client/register?x"],
)
def test_may_be_agent_upgrade_for_agent_paths(first_bytes: bytes) -> None:
    assert may_be_agent_upgrade(first_bytes) is True


@pytest.mark.parametrize(
    "first_bytes",
    [b"", b"GET / HTTP/1.1\r\n", b"POST /client/register", b"GET /v1/chat", b"get /agent/"],
)
def test_may_not_be_agent_upgrade_for_anything_else(first_bytes: bytes) -> None:
    assert may_be_agent_upgrade(first_bytes) is False


# -- parse_agent_upgrade: what it accepts --------------------------------------------


def test_parses_a_plain_upgrade() -> None:
    upgrade = parse_agent_upgrade(VALID_HEAD)
    assert upgrade == AgentUpgrade(
        path="/client/register",
        query=b"",
        headers=[
            (b"host", b"relay.example"),
            (b"connection", b"Upgrade"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-version", b"13"),
            (b"sec-websocket-key", KEY.encode()),
        ],
        key=KEY.encode(),
    )


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/client/register?key=abc", "/client/register", b"key=abc"),
        ("/client/register?", "/client/register", b""),
        ("/agent/k1/client/register", "/agent/k1/client/register", b""),
        ("/agent/my%20key/client/register", "/agent/my key/client/register", b""),
        ("/client%2Fregister", "/client/register", b""),
        (
            "/agent/k/client/register?key=a%2Fb&x=%20",
            "/agent/k/client/register",
            b"key=a%2Fb&x=%20",
        ),
    ],
)
def test_path_is_percent_decoded_and_query_kept_raw(target: str, path: str, query: bytes) -> None:
    upgrade = parse_agent_upgrade(request_head(target))
    assert upgrade is not None
    assert (upgrade.path, upgrade.query) == (path, query)


@pytest.mark.parametrize(
    "headers",
    [
        {"Connection": "keep-alive, Upgrade"},
        {"Connection": "Upgrade,keep-alive"},
        {"Connection": "UPGRADE"},
        {"Connection": "upgrade"},
        {"Upgrade": "WebSocket"},
        {"Upgrade": "WEBSOCKET"},
        {"Sec-WebSocket-Key": "  padded==  "},
        {"Sec-WebSocket-Protocol": "chat", "Sec-WebSocket-Extensions": "permessage-deflate"},
        {"Authorization": "Bearer secret"},
    ],
)
def test_accepts_header_variants(headers: dict[str, str | None]) -> None:
    upgrade = parse_agent_upgrade(request_head(headers=headers))
    assert upgrade is not None
    assert_well_formed(upgrade)
    for name, value in headers.items():
        assert (name.lower().encode(), (value or "").strip().encode()) in upgrade.headers


def test_header_names_are_lower_cased_and_the_key_is_stripped() -> None:
    upgrade = parse_agent_upgrade(request_head(headers={"SEC-WEBSOCKET-KEY": " abc== "}))
    assert upgrade is not None
    # Both key headers are kept; the last one is the key.
    assert upgrade.key == b"abc=="
    assert [name for name, _ in upgrade.headers].count(b"sec-websocket-key") == 2


def test_accepts_a_head_of_exactly_max_head() -> None:
    upgrade = parse_agent_upgrade(padded_head(MAX_HEAD))
    assert upgrade is not None
    assert upgrade.path == "/client/register"


# -- parse_agent_upgrade: what it declines -------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/client/registe",
        "/client/register/",
        "/Client/Register",
        "/v1/chat/completions",
        "/agent/client/register",
        "/agent//client/register",
        "/agent/a/b/client/register",
        "/agent/a%2Fb/client/register",
        "/agent/k/client/register/x",
        "/agent/k/client/registerx",
        "//client/register",
        "http://relay.example/client/register",
        "*",
    ],
)
def test_declines_other_paths(target: str) -> None:
    assert parse_agent_upgrade(request_head(target)) is None


@pytest.mark.parametrize("method", ["POST", "HEAD", "PUT", "OPTIONS", "get"])
def test_declines_other_methods(method: str) -> None:
    assert parse_agent_upgrade(request_head(method=method)) is None


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2"])
def test_declines_other_http_versions(version: str) -> None:
    assert parse_agent_upgrade(request_head(version=version)) is None


@pytest.mark.parametrize(
    "headers",
    [
        {"Connection": None},
        {"Connection": "keep-alive"},
        {"Connection": "upgrades"},
        {"Connection": "close"},
        {"Upgrade": None},
        {"Upgrade": "h2c"},
        {"Upgrade": "websocket2"},
        {"Upgrade": "websocket, h2c"},
        {"Sec-WebSocket-Version": None},
        {"Sec-WebSocket-Version": "8"},
        {"Sec-WebSocket-Version": "13, 8"},
        {"Sec-WebSocket-Version": "013"},
        {"Sec-WebSocket-Key": None},
        {"Sec-WebSocket-Key": ""},
    ],
    ids=lambda headers: repr(headers),
)
def test_declines_missing_or_invalid_upgrade_headers(headers: dict[str, str | None]) -> None:
    assert parse_agent_upgrade(request_head(headers=headers)) is None


@pytest.mark.parametrize(
    "head",
    [
        request_head(headers={"Content-Length": "5"}) + b"hello",
        request_head(headers={"Content-Length": "5"}),  # the body has not arrived
        request_head(headers={"Content-Length": "5"}) + b"hel",
        request_head(headers={"Content-Length": "0"}),
        request_head(headers={"Transfer-Encoding": "chunked"}),
        request_head(headers={"Transfer-Encoding": "chunked"}) + b"5\r\nhello\r\n0\r\n\r\n",
        request_head(headers={"Transfer-Encoding": "chunked"}) + b"0\r\n\r\n",
    ],
    ids=[
        "content-length",
        "content-length-no-body",
        "content-length-part",
        "content-length-0",
        "chunked",
        "chunked-5",
        "chunked-empty",
    ],
)
def test_declines_a_request_with_a_body(head: bytes) -> None:
    assert parse_agent_upgrade(head) is None


@pytest.mark.parametrize(
    "after",
    [
        b"x",
        b"x\n",
        b"\r\n",
        b"\x00",
        b"\x81\x85\x01\x02\x03\x04hello",  # a client's first frame, sent too early
        VALID_HEAD,  # two upgrades, pipelined
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
    ids=["x", "x-lf", "crlf", "nul", "frame", "pipelined-upgrade", "pipelined-get"],
)
def test_bytes_after_the_head_are_early_data(after: bytes) -> None:
    upgrade = parse_agent_upgrade(VALID_HEAD + after)
    assert upgrade is not None
    assert upgrade.early_data == after
    assert upgrade == dataclasses.replace(parse_upgrade(VALID_HEAD), early_data=after)


def test_a_head_alone_has_no_early_data() -> None:
    assert parse_upgrade(VALID_HEAD).early_data == b""


def test_declines_every_incomplete_head() -> None:
    declined = [n for n in range(len(VALID_HEAD)) if parse_agent_upgrade(VALID_HEAD[:n]) is None]
    assert declined == list(range(len(VALID_HEAD)))


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 64,
        b"\r\n\r\n",
        b"hello\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # TLS ClientHello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ],
)
def test_declines_garbage(garbage: bytes) -> None:
    assert parse_agent_upgrade(garbage) is None


@pytest.mark.parametrize(
    "head",
    [
        VALID_HEAD.replace(b" HTTP/1.1", b""),  # HTTP/0.9
        VALID_HEAD.replace(b"GET /", b"GET  /"),
        VALID_HEAD.replace(b"GET /client/register", b"GET /client/ register"),
        VALID_HEAD.replace(b"Host:", b"no colon\r\nHost:"),
        VALID_HEAD.replace(b"Host:", b": empty name\r\nHost:"),
        VALID_HEAD.replace(b"Upgrade: websocket", b"Upgrade : websocket"),
        VALID_HEAD.replace(b"Host:", b"X-A: a\x00b\r\nHost:"),
        VALID_HEAD.replace(b"\r\n", b"\r\r\n", 1),
    ],
    ids=[
        "http-0.9",
        "double-space",
        "space-in-target",
        "no-colon",
        "empty-name",
        "space-before-colon",
        "nul-in-value",
        "bare-cr",
    ],
)
def test_declines_a_malformed_head(head: bytes) -> None:
    assert parse_agent_upgrade(head) is None


@pytest.mark.parametrize(
    "head",
    [
        VALID_HEAD.replace(b"/client/register", b"/agent/\xc3\xa9/client/register"),
        VALID_HEAD.replace(b"/client/register", b"/client/register?key=\xff"),
        VALID_HEAD.replace(b"GET", b"G\xc9T"),
        VALID_HEAD.replace(b"Host:", b"H\xf6st:"),
        VALID_HEAD.replace(b"HTTP/1.1", b"HTTP/1.1\xa0"),
    ],
    ids=["path", "query", "method", "header-name", "version"],
)
def test_declines_non_ascii_bytes(head: bytes) -> None:
    assert parse_agent_upgrade(head) is None


@pytest.mark.parametrize("size", [MAX_HEAD + 1, 2 * MAX_HEAD, 4 * MAX_HEAD])
def test_declines_a_head_over_max_head(size: int) -> None:
    """A complete head longer than 16 KiB, arrived in one read, is declined too."""
    assert parse_agent_upgrade(padded_head(size)) is None


def test_declines_a_header_line_over_max_head() -> None:
    head = VALID_HEAD[:-2] + b"X-Pad: " + b"p" * MAX_HEAD  # no end of head yet
    assert parse_agent_upgrade(head) is None


# -- the handshake with a real client ----------------------------------------------


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/client/register", "/client/register", b""),
        ("/client/register?key=k%2B1", "/client/register", b"key=k%2B1"),
        ("/agent/s3cr%C3%A9t/client/register", "/agent/s3cr\u00e9t/client/register", b""),
    ],
)
def test_a_wsproto_client_handshake_completes(target: str, path: str, query: bytes) -> None:
    client = wsproto.WSConnection(ConnectionType.CLIENT)
    head = client.send(Request(host="relay.example:8080", target=target))
    upgrade = parse_agent_upgrade(head)
    assert upgrade is not None
    assert (upgrade.path, upgrade.query, upgrade.early_data) == (path, query, b"")
    assert_well_formed(upgrade)
    client.receive_data(accept_response(upgrade))
    events = list(client.events())
    assert events == [AcceptConnection(subprotocol=None, extensions=[], extra_headers=[])]
    assert client.state is wsproto.ConnectionState.OPEN


def test_a_client_offering_compression_and_subprotocols_is_accepted_without_them() -> None:
    client = wsproto.WSConnection(ConnectionType.CLIENT)
    head = client.send(
        Request(
            host="relay.example",
            target="/client/register",
            extensions=[PerMessageDeflate()],
            subprotocols=["chat", "superchat"],
            extra_headers=[(b"Authorization", b"Bearer k")],
        )
    )
    upgrade = parse_agent_upgrade(head)
    assert upgrade is not None
    assert (b"authorization", b"Bearer k") in upgrade.headers
    client.receive_data(accept_response(upgrade))
    [event] = client.events()
    assert isinstance(event, AcceptConnection)
    assert event.subprotocol is None
    assert event.extensions == []


def test_accept_response_is_the_rfc_101() -> None:
    upgrade = parse_agent_upgrade(VALID_HEAD)
    assert upgrade is not None
    client = h11.Connection(h11.CLIENT)
    client.send(
        h11.Request(method="GET", target="/client/register", headers=list(UPGRADE_HEADERS.items()))
    )
    client.send(h11.EndOfMessage())
    client.receive_data(accept_response(upgrade))
    response = client.next_event()
    assert isinstance(response, h11.InformationalResponse)
    assert response.status_code == 101
    assert dict(response.headers) == {
        b"upgrade": b"websocket",
        b"connection": b"Upgrade",
        b"sec-websocket-accept": KEY_ACCEPT,
    }
    assert client.next_event() is h11.PAUSED
    assert client.trailing_data == (b"", False)


# -- refusals --------------------------------------------------------------------------


def read_response(raw: bytes) -> tuple[h11.Response, bytes]:
    """The response and body in ``raw``, read by h11 as the client of an upgrade request;
    asserts that nothing follows the body and that the server closes after it."""
    client = h11.Connection(h11.CLIENT)
    client.send(
        h11.Request(method="GET", target="/client/register", headers=list(UPGRADE_HEADERS.items()))
    )
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    client.receive_data(b"")  # the server closes the connection after the refusal
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    event = client.next_event()
    while isinstance(event, h11.Data):
        body += event.data
        event = client.next_event()
    assert isinstance(event, h11.EndOfMessage)
    assert isinstance(client.next_event(), h11.ConnectionClosed)
    assert client.their_state is h11.CLOSED
    return response, body


@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 503])
def test_refusal_is_a_json_error_that_closes(status: int) -> None:
    message = 'refused: "quoted", \u00fcnicode \u2603 and \\ backslash'
    response, body = read_response(refusal_response(status, message))
    assert response.status_code == status
    assert response.reason == HTTPStatus(status).phrase.encode()
    assert response.http_version == b"1.1"
    headers = dict(response.headers)
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"connection"] == b"close"
    assert b"retry-after" not in headers
    assert (b"www-authenticate" in headers) == (status == 401)
    assert json.loads(body) == {"error": message}


def test_refusal_401_asks_for_a_bearer_key() -> None:
    response, _ = read_response(refusal_response(401, "an agent key is required"))
    assert dict(response.headers)[b"www-authenticate"].startswith(b"Bearer ")


@pytest.mark.parametrize("retry_after", [1, 5, 30.0, 3600])
def test_refusal_carries_retry_after_when_given(retry_after: float) -> None:
    response, body = read_response(refusal_response(429, "too many failed attempts", retry_after))
    headers = dict(response.headers)
    assert headers[b"retry-after"] == str(int(retry_after)).encode()
    assert headers[b"content-length"] == str(len(body)).encode()
    assert set(headers) == {
        b"content-type",
        b"content-length",
        b"retry-after",
        b"connection",
    }


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(0.2, b"1"), (1.0, b"1"), (1.2, b"2"), (2.5, b"3"), (4.01, b"5"), (29.5, b"30")],
)
def test_refusal_retry_after_is_rounded_up_to_whole_seconds(
    retry_after: float, header: bytes
) -> None:
    """Rounded down, Retry-After would send a throttled agent back before its wait is over."""
    assert header == str(max(1, math.ceil(retry_after))).encode()
    response, _ = read_response(refusal_response(429, "too many failed attempts", retry_after))
    assert dict(response.headers)[b"retry-after"] == header


def test_refusal_headers_are_those_of_the_response() -> None:
    """The ASGI path sends refusal_headers and refusal_body: the same refusal."""
    body = refusal_body("invalid agent key")
    assert json.loads(body) == {"error": "invalid agent key"}
    response, read_body = read_response(refusal_response(401, "invalid agent key", 7))
    assert read_body == body
    assert [*refusal_headers(401, body, 7), (b"connection", b"close")] == list(response.headers)


def test_refusal_headers_depend_on_status_and_retry_after() -> None:
    body = refusal_body("x")
    assert refusal_headers(403, body) == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    names_401 = [name for name, _ in refusal_headers(401, body, 5)]
    assert names_401 == [b"content-type", b"content-length", b"www-authenticate", b"retry-after"]


# -- properties ------------------------------------------------------------------------

SPICE = [b"\r\n", b"\r\n\r\n", b"\n", b":", b",", b"%", b"%2F", b"/", b"?", b" ", b"\x00", b"\xff"]


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    """A valid head with a few bytes inserted, deleted or overwritten."""
    head = bytearray(VALID_HEAD)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(head)))
        chunk = draw(st.sampled_from(SPICE) | st.binary(min_size=1, max_size=8))
        kind = draw(st.sampled_from(["insert", "delete", "overwrite"]))
        if kind == "insert":
            head[at:at] = chunk
        elif kind == "delete":
            del head[at : at + len(chunk)]
        else:
            head[at : at + len(chunk)] = chunk
    return bytes(head)


@EXAMPLES
@given(st.binary(max_size=1024))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    upgrade = parse_agent_upgrade(data)
    assert upgrade is None or isinstance(upgrade, AgentUpgrade)
    if upgrade is not None:
        assert_well_formed(upgrade)


@EXAMPLES
@given(st.binary(max_size=256).map(lambda tail: b"GET /client/register HTTP/1.1\r\n" + tail))
def test_arbitrary_headers_never_raise(data: bytes) -> None:
    upgrade = parse_agent_upgrade(data)
    if upgrade is not None:
        assert_well_formed(upgrade)


@EXAMPLES
@given(mutated_heads())
def test_mutated_heads_never_raise(head: bytes) -> None:
    upgrade = parse_agent_upgrade(head)
    if upgrade is not None:
        assert_well_formed(upgrade)


@EXAMPLES
@given(st.binary(min_size=1, max_size=256))
def test_anything_after_a_valid_head_is_early_data(tail: bytes) -> None:
    upgrade = parse_agent_upgrade(VALID_HEAD + tail)
    assert upgrade is not None
    assert upgrade.early_data == tail


KEY_CHARS = string.ascii_letters + string.digits + "-._~"


@EXAMPLES
@given(
    agent_key=st.none() | st.text(KEY_CHARS, min_size=1, max_size=40),
    query=st.text(KEY_CHARS + "=&%+", max_size=40),
    connection=st.sampled_from(["Upgrade", "upgrade", "keep-alive, Upgrade", "UPGRADE, x"]),
    upgrade_value=st.sampled_from(["websocket", "WebSocket", "WEBSOCKET"]),
    key=st.text(string.ascii_letters + string.digits + "+/=", min_size=1, max_size=30),
)
def test_valid_upgrades_are_accepted(
    agent_key: str | None, query: str, connection: str, upgrade_value: str, key: str
) -> None:
    path = "/client/register" if agent_key is None else f"/agent/{agent_key}/client/register"
    head = request_head(
        f"{path}?{query}" if query else path,
        headers={"Connection": connection, "Upgrade": upgrade_value, "Sec-WebSocket-Key": key},
    )
    upgrade = parse_agent_upgrade(head)
    assert upgrade is not None
    assert upgrade.path == path
    assert upgrade.query == query.encode()
    assert upgrade.key == key.encode()
    assert agent_key_from_path(upgrade.path) == (True, agent_key)
