"""The sans-I/O HTTP/1.1 of the ``/api/ask`` wire path (relayd/front/http1.py).

* :func:`parse_ask_head` accepts a plain ``POST /api/ask HTTP/1.1`` head and
  says where its body starts and ends, whether the client keeps the connection
  alive and whether it waits for ``100 Continue``; it returns None while the
  head is incomplete, and raises :class:`NotPlainAsk` as soon as the bytes show a
  request Hypercorn must serve instead (one case per way of not being plain).
* :func:`response_bytes` writes whole JSON responses, byte for byte.
* :class:`HttpDate` formats the ``Date`` header (RFC 7231) once a second.

Everything here is synchronous and in memory.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

import pytest

import relayd.front.http1
from relayd.front.http1 import (
    ASK_REQUEST_LINE,
    CONTINUE,
    MAX_HEAD,
    AskHead,
    HttpDate,
    NotPlainAsk,
    may_be_ask,
    parse_ask_head,
    response_bytes,
)

MAX_BODY = 1024
BODY = b'{"content": "hello"}'


def head(*lines: bytes, request_line: bytes = ASK_REQUEST_LINE) -> bytes:
    """A request head: ``request_line``, then each header line, then the blank line."""
    return request_line + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def plain(*extra: bytes, length: int = len(BODY)) -> bytes:
    """A plain head for a body of ``length`` bytes, with ``extra`` header lines at the end."""
    return head(b"Host: relay.example", b"Content-Length: %d" % length, *extra)


def parse(buffer: bytes, max_body: int = MAX_BODY) -> AskHead:
    parsed = parse_ask_head(buffer, max_body)
    assert parsed is not None
    return parsed


# -- a plain request -------------------------------------------------------------------


def test_a_plain_request_is_parsed() -> None:
    request_head = head(
        b"Host: relay.example",
        b"Authorization: Bearer secret-token",
        b"Content-Type: application/x-www-form-urlencoded",
        b"Content-Length: %d" % len(BODY),
        b"User-Agent: curl/8.5.0",
    )
    parsed = parse(request_head + BODY)
    assert parsed == AskHead(
        authorization="Bearer secret-token",
        body_start=len(request_head),
        body_length=len(BODY),
        keep_alive=True,
        expects_continue=False,
    )
    assert parsed.end == len(request_head) + len(BODY)


def test_without_authorization_it_is_none() -> None:
    assert parse(plain() + BODY).authorization is None


def test_an_incomplete_head_is_none_at_every_split_point() -> None:
    request = plain(b"Authorization: token", b"Expect: 100-continue") + BODY
    head_length = request.index(b"\r\n\r\n") + 4
    for split in range(head_length):
        assert parse_ask_head(request[:split], MAX_BODY) is None, request[:split]
    for split in range(head_length, len(request) + 1):  # with any part of the body
        assert parse(request[:split]).body_start == head_length


@pytest.mark.parametrize("after", [b"", b"x", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"])
def test_bytes_after_the_body_are_left_alone(after: bytes) -> None:
    request = plain() + BODY
    buffer = bytearray(request + after)
    parsed = parse_ask_head(buffer, MAX_BODY)
    assert parsed is not None
    assert parsed.end == len(request)
    assert buffer[parsed.body_start : parsed.end] == BODY
    assert buffer[parsed.end :] == after
    assert buffer == request + after  # not consumed: the parser only reads


def test_a_bytearray_parses_like_bytes() -> None:
    request = plain(b"Authorization: token") + BODY
    assert parse_ask_head(bytearray(request), MAX_BODY) == parse(request)


def test_a_body_of_exactly_max_body_is_accepted() -> None:
    parsed = parse(plain(length=MAX_BODY))
    assert parsed.body_length == MAX_BODY


def test_an_empty_body_is_accepted() -> None:
    request = plain(length=0)
    parsed = parse(request)
    assert (parsed.body_length, parsed.end) == (0, len(request))


# -- header values -----------------------------------------------------------------------


def test_the_last_authorization_wins() -> None:
    request = plain(b"Authorization: first", b"X-Other: 1", b"authorization: second")
    assert parse(request).authorization == "second"


def test_surrounding_spaces_and_tabs_are_trimmed() -> None:
    request = head(
        b"Host:relay.example",
        b"Authorization: \t token with inner  space\t \t",
        b"Content-Length:\t 20 \t",
    )
    parsed = parse(request)
    assert parsed.authorization == "token with inner  space"
    assert parsed.body_length == 20


def test_authorization_is_decoded_as_latin_1() -> None:
    assert parse(plain(b"Authorization: caf\xe9")).authorization == "caf\u00e9"


def test_header_names_are_case_insensitive() -> None:
    parsed = parse(
        head(b"HOST: x", b"content-LENGTH: 3", b"AUTHORIZATION: t", b"EXPECT: 100-continue")
    )
    assert (parsed.body_length, parsed.authorization, parsed.expects_continue) == (3, "t", True)


@pytest.mark.parametrize(
    "connection",
    [
        b"close",
        b"Close",
        b"CLOSE",
        b"keep-alive, close",
        b"close,keep-alive",
        b"TE,\tClose ,foo",
        b" close ",
    ],
)
def test_connection_close_is_found_in_the_token_list(connection: bytes) -> None:
    assert parse(plain(b"Connection: " + connection)).keep_alive is False


@pytest.mark.parametrize("connection", [b"keep-alive", b"Keep-Alive", b"closed", b"not-close"])
def test_other_connection_tokens_keep_it_alive(connection: bytes) -> None:
    assert parse(plain(b"Connection: " + connection)).keep_alive is True


def test_close_in_any_connection_header_counts() -> None:
    request = plain(b"Connection: close", b"Connection: keep-alive")
    assert parse(request).keep_alive is False
    request = plain(b"Connection: keep-alive", b"Connection: close")
    assert parse(request).keep_alive is False


@pytest.mark.parametrize("expect", [b"100-continue", b"100-Continue", b"100-CONTINUE"])
def test_expect_100_continue_is_case_insensitive(expect: bytes) -> None:
    assert parse(plain(b"Expect: " + expect)).expects_continue is True


def test_a_tab_in_a_value_is_allowed() -> None:
    assert parse(plain(b"Authorization: a\tb")).authorization == "a\tb"


# -- not plain: the request line -------------------------------------------------------


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /api/ask HTTP/1.1\r\n",
        b"PUT /api/ask HTTP/1.1\r\n",
        b"post /api/ask HTTP/1.1\r\n",
        b"POST /api/ask?x=1 HTTP/1.1\r\n",
        b"POST /api/askx HTTP/1.1\r\n",
        b"POST /api/ask/ HTTP/1.1\r\n",
        b"POST /api/Ask HTTP/1.1\r\n",
        b"POST /API/ask HTTP/1.1\r\n",
        b"POST http://relay.example/api/ask HTTP/1.1\r\n",
        b"POST //api/ask HTTP/1.1\r\n",
        b"POST  /api/ask HTTP/1.1\r\n",
        b"POST /api/ask HTTP/1.0\r\n",
        b"POST /api/ask HTTP/2.0\r\n",
        b"POST /api/ask http/1.1\r\n",
        b"POST /api/ask HTTP/1.1 \r\n",
        b"POST /api/ask HTTP/1.1\n",
        b" POST /api/ask HTTP/1.1\r\n",
    ],
)
def test_any_other_request_line_is_not_simple(request_line: bytes) -> None:
    request = head(b"Host: x", b"Content-Length: 2", request_line=request_line) + b"{}"
    with pytest.raises(NotPlainAsk):
        parse_ask_head(request, MAX_BODY)
    assert not may_be_ask(request)


@pytest.mark.parametrize(
    "first_bytes",
    [
        b"G",
        b"GET ",
        b"GET /health HTTP/1.1\r\n",
        b"P0",
        b"POST /api/ask?",
        b"POST /api/ask HTTP/1.0",
    ],
)
def test_a_prefix_that_already_differs_raises_at_once(first_bytes: bytes) -> None:
    with pytest.raises(NotPlainAsk):
        parse_ask_head(first_bytes, MAX_BODY)


def test_every_prefix_of_the_request_line_waits_for_more() -> None:
    for end in range(len(ASK_REQUEST_LINE) + 1):
        assert parse_ask_head(ASK_REQUEST_LINE[:end], MAX_BODY) is None


# -- not plain: the headers ------------------------------------------------------------

LENGTH = b"Content-Length: 2"
HOST = b"Host: x"


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param([LENGTH], id="no-host"),
        pytest.param([HOST, b"Host: y", LENGTH], id="two-hosts"),
        pytest.param([HOST, LENGTH, b"host: x"], id="two-hosts-other-case"),
        pytest.param([HOST], id="no-content-length"),
        pytest.param([], id="no-headers-at-all"),
        pytest.param([HOST, LENGTH, LENGTH], id="two-content-lengths-same"),
        pytest.param([HOST, LENGTH, b"content-length: 3"], id="two-content-lengths"),
        pytest.param([HOST, b"Content-Length: 2, 2"], id="content-length-list"),
        pytest.param([HOST, b"Content-Length: abc"], id="content-length-letters"),
        pytest.param([HOST, b"Content-Length: +2"], id="content-length-plus"),
        pytest.param([HOST, b"Content-Length: -2"], id="content-length-minus"),
        pytest.param([HOST, b"Content-Length: 0x10"], id="content-length-hex"),
        pytest.param([HOST, b"Content-Length: 1 2"], id="content-length-inner-space"),
        pytest.param([HOST, b"Content-Length: 2.0"], id="content-length-decimal"),
        pytest.param([HOST, b"Content-Length:"], id="content-length-empty"),
        pytest.param([HOST, b"Content-Length: \xd9\xa2"], id="content-length-arabic-digit"),
        pytest.param([HOST, b"Content-Length: %d" % (MAX_BODY + 1)], id="over-max-body"),
        pytest.param([HOST, b"Content-Length: %d" % (10 * MAX_BODY)], id="far-over-max-body"),
        pytest.param([HOST, LENGTH, b"Transfer-Encoding: chunked"], id="transfer-encoding"),
        pytest.param([HOST, b"Transfer-Encoding: chunked"], id="chunked-no-length"),
        pytest.param([HOST, LENGTH, b"transfer-encoding: identity"], id="te-identity"),
        pytest.param([HOST, LENGTH, b"Upgrade: websocket"], id="upgrade"),
        pytest.param([HOST, LENGTH, b"UPGRADE: h2c"], id="upgrade-h2c"),
        pytest.param([HOST, LENGTH, b"Expect: 200-ok"], id="expect-other"),
        pytest.param([HOST, LENGTH, b"Expect: 100-continue, foo"], id="expect-list"),
        pytest.param([HOST, LENGTH, b"Expect:"], id="expect-empty"),
        pytest.param([HOST, LENGTH, b"X-Long: a", b" folded"], id="obs-fold-space"),
        pytest.param([HOST, LENGTH, b"X-Long: a", b"\tfolded: b"], id="obs-fold-tab"),
        pytest.param([b" Host: x", LENGTH], id="space-before-first-header"),
        pytest.param([HOST, LENGTH, b"X-Bad: a\x01b"], id="control-character"),
        pytest.param([HOST, LENGTH, b"X-Bad: a\x00b"], id="nul"),
        pytest.param([HOST, LENGTH, b"X-Bad: a\x7fb"], id="del"),
        pytest.param([HOST, LENGTH, b"X-Bad: a\rb"], id="bare-cr"),
        pytest.param([HOST, LENGTH, b"X-Bad: a\nb"], id="bare-lf"),
        pytest.param([HOST, LENGTH, b"Authorization: tok\x1ben"], id="escape-in-authorization"),
        pytest.param([HOST, LENGTH, b"X Bad: a"], id="space-in-name"),
        pytest.param([HOST, b"Content-Length : 2"], id="space-before-colon"),
        pytest.param([HOST, LENGTH, b": a"], id="empty-name"),
        pytest.param([HOST, LENGTH, b"no colon"], id="no-colon"),
        pytest.param([HOST, LENGTH, b"X(Bad): a"], id="separator-in-name"),
        pytest.param([HOST, LENGTH, b"X-B\xe9d: a"], id="non-ascii-name"),
    ],
)
def test_headers_that_are_not_plain(lines: list[bytes]) -> None:
    with pytest.raises(NotPlainAsk):
        parse_ask_head(head(*lines) + b"{}", MAX_BODY)


# -- the head's size ---------------------------------------------------------------------


def padded(size: int, *, complete: bool = True) -> bytes:
    """A plain head of exactly ``size`` bytes (or, not ``complete``, its first ``size``
    bytes with no blank line)."""
    base = plain(b"X-Pad: ")
    filler = b"a" * (size - len(base))
    whole = plain(b"X-Pad: " + filler)
    assert len(whole) == size
    return whole if complete else whole[:-4] + filler[:4]


def test_a_complete_head_of_max_head_bytes_is_accepted() -> None:
    assert parse(padded(MAX_HEAD)).body_start == MAX_HEAD


def test_a_complete_head_over_max_head_is_not_simple() -> None:
    with pytest.raises(NotPlainAsk):
        parse_ask_head(padded(MAX_HEAD + 1), MAX_BODY)
    with pytest.raises(NotPlainAsk):
        parse_ask_head(padded(MAX_HEAD + 1) + BODY, MAX_BODY)


def test_an_incomplete_head_up_to_max_head_waits() -> None:
    buffer = padded(MAX_HEAD, complete=False)
    assert len(buffer) == MAX_HEAD and b"\r\n\r\n" not in buffer
    assert parse_ask_head(buffer, MAX_BODY) is None


def test_an_incomplete_head_longer_than_max_head_is_not_simple() -> None:
    buffer = padded(MAX_HEAD + 1, complete=False)
    assert len(buffer) == MAX_HEAD + 1 and b"\r\n\r\n" not in buffer
    with pytest.raises(NotPlainAsk):
        parse_ask_head(buffer, MAX_BODY)


def test_a_content_length_of_thousands_of_digits_is_not_simple() -> None:
    """Hypercorn answers such a request with a 400; the wire path must hand it
    over (NotPlainAsk), not fail with a ValueError that closes the connection."""
    with pytest.raises(NotPlainAsk):
        parse_ask_head(head(HOST, b"Content-Length: " + b"0" * 5000 + b"2") + b"{}", MAX_BODY)


# -- may_be_ask --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_bytes", "expected"),
    [
        (ASK_REQUEST_LINE, True),
        (plain() + BODY, True),
        (ASK_REQUEST_LINE + b"Transfer-Encoding: chunked\r\n", True),  # decided on the head
        (b"", False),
        (ASK_REQUEST_LINE[:-1], False),  # not even the whole request line yet
        (b"POST /api/ask", False),
        (b"GET /health HTTP/1.1\r\n\r\n", False),
        (b"POST /api/ask HTTP/1.0\r\n", False),
        (b"POST /api/ask?x HTTP/1.1\r\n", False),
        (b"GET /client/register HTTP/1.1\r\n", False),
    ],
)
def test_may_be_ask(first_bytes: bytes, expected: bool) -> None:
    assert may_be_ask(first_bytes) is expected


# -- responses ---------------------------------------------------------------------------

DATE = b"Sun, 06 Nov 1994 08:49:37 GMT"


def test_continue_bytes() -> None:
    assert CONTINUE == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_a_200_response() -> None:
    body = b'{"content": "hi", "error": ""}'
    assert response_bytes(200, body, DATE) == (
        b"HTTP/1.1 200 OK\r\n"
        b"content-type: application/json\r\n"
        b"content-length: 30\r\n"
        b"date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
        b"\r\n" + body
    )
    assert response_bytes(200, body, DATE, []) == response_bytes(200, body, DATE)


def test_a_429_with_retry_after_that_closes() -> None:
    body = b'{"error": "too many failed attempts"}'
    response = response_bytes(429, body, DATE, [(b"retry-after", b"7")], close=True)
    assert response == (
        b"HTTP/1.1 429 Too Many Requests\r\n"
        b"content-type: application/json\r\n"
        b"content-length: 37\r\n"
        b"date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
        b"retry-after: 7\r\n"
        b"connection: close\r\n"
        b"\r\n" + body
    )


@pytest.mark.parametrize(
    ("status", "status_line"),
    [
        (400, b"HTTP/1.1 400 Bad Request\r\n"),
        (401, b"HTTP/1.1 401 Unauthorized\r\n"),
        (413, b"HTTP/1.1 413 Request Entity Too Large\r\n"),
        (500, b"HTTP/1.1 500 Internal Server Error\r\n"),
        (502, b"HTTP/1.1 502 Bad Gateway\r\n"),
        (503, b"HTTP/1.1 503 Service Unavailable\r\n"),
        (504, b"HTTP/1.1 504 Gateway Timeout\r\n"),
    ],
)
def test_status_lines(status: int, status_line: bytes) -> None:
    response = response_bytes(status, b'{"error": "x"}', DATE)
    assert response.startswith(status_line)
    assert response.endswith(b"\r\n\r\n" + b'{"error": "x"}')
    assert b"content-length: 14\r\n" in response


def test_an_empty_body_has_content_length_zero() -> None:
    assert response_bytes(200, b"", DATE).endswith(
        b"content-length: 0\r\ndate: " + DATE + b"\r\n\r\n"
    )


# -- the Date header ---------------------------------------------------------------------


def test_http_date_formats_rfc_7231_dates_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [784111777.0]  # RFC 7231, section 7.1.1.1: Sun, 06 Nov 1994 08:49:37 GMT
    formatted: list[float] = []
    real_formatdate = relayd.front.http1.formatdate

    def counting_formatdate(timeval: float, *, usegmt: bool) -> str:
        formatted.append(timeval)
        return real_formatdate(timeval, usegmt=usegmt)

    monkeypatch.setattr(relayd.front.http1.time, "time", lambda: now[0])
    monkeypatch.setattr(relayd.front.http1, "formatdate", counting_formatdate)
    date = HttpDate()
    assert date.now() == b"Sun, 06 Nov 1994 08:49:37 GMT"
    now[0] = 784111777.999
    assert date.now() == b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert formatted == [784111777]  # the same second: not formatted again
    now[0] = 784111778.0
    assert date.now() == b"Sun, 06 Nov 1994 08:49:38 GMT"
    now[0] = 784111778.5
    assert date.now() == b"Sun, 06 Nov 1994 08:49:38 GMT"
    now[0] = 1_700_000_000.25
    assert date.now() == b"Tue, 14 Nov 2023 22:13:20 GMT"
    now[0] = 784111778.0  # the clock stepped back: still the right date
    assert date.now() == b"Sun, 06 Nov 1994 08:49:38 GMT"
    assert formatted == [784111777, 784111778, 1_700_000_000, 784111778]


def test_http_date_is_now() -> None:
    before = time.time()
    value = HttpDate().now()
    after = time.time()
    moment = parsedate_to_datetime(value.decode()).timestamp()
    assert int(before) <= moment <= after
    assert value.endswith(b" GMT")


def modules_loaded_by(module: str, candidates: tuple[str, ...]) -> list[str]:
    """Which of ``candidates`` importing ``module`` loads, in a fresh interpreter."""
    import subprocess
    import sys

    probe = f"import sys, {module}; print(*sorted(m for m in {candidates!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.split()


@pytest.mark.parametrize(
    "module",
    ["relayd.front.http1", "relayd.front.agent_upgrade", "relayd.protocol.v2", "relayd.asgi"],
)
def test_the_parsers_are_sans_io(module: str) -> None:
    """Importing a parser loads neither Trio nor Hypercorn (a fresh interpreter)."""
    assert modules_loaded_by(module, ("trio", "hypercorn", "quart")) == []


def test_the_socket_helpers_are_a_leaf() -> None:
    """relayd's own loops depend on relayd.front.sockets, not on the server loop:
    importing it loads Trio and nothing of Hypercorn, h11, wsproto or Quart."""
    loaded = modules_loaded_by(
        "relayd.front.sockets",
        ("trio", "hypercorn", "h11", "wsproto", "quart", "relayd.front.server"),
    )
    assert loaded == ["trio"]


def test_the_server_loop_knows_no_endpoint() -> None:
    """The daemon hands the server loop its takeovers; the loop imports none."""
    domain = ("relayd.agents", "relayd.ask", "relayd.dispatch", "relayd.api", "relayd.state")
    assert modules_loaded_by("relayd.front.server", domain) == []


@pytest.mark.parametrize(
    "module",
    [
        "relayd.agents.session",
        "relayd.agents.pool",
        "relayd.agents.heartbeat",
        "relayd.agents.auth",
    ],
)
def test_agents_know_no_http(module: str) -> None:
    """The agents package keeps sessions, pool, heartbeat and auth; HTTP,
    ASGI and WebSocket framing live in relayd.front."""
    assert modules_loaded_by(module, ("hypercorn", "h11", "wsproto", "quart", "relayd.front")) == []
