"""Request framing and targets a real relayd must refuse or normalise, and agent
keys that no error body may echo (the security review's low findings).

Against a real relayd subprocess over raw loopback sockets.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import trio

from tests.raw_http import RawClient
from tests.support import Relayd
from tests.test_ask_wire_e2e import HOST, NO_AGENT, get_request, open_connection

KEY = "s3cret-agent-key-Zq9"

SMUGGLED = (
    b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\n"
    b"Authorization: %s\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
    b"0\r\n\r\n"
)


@pytest.mark.parametrize(
    "first",
    [b"", get_request("/health")],
    ids=["first-request", "after-another-on-hypercorn"],
)
async def test_transfer_encoding_with_content_length_is_400_and_the_connection_closes(
    relayd: Relayd, first: bytes
) -> None:
    """RFC 9112, 6.3: such a request may be framed differently by a proxy in
    front; it is refused, and nothing sent after it on the connection is served."""
    client = await open_connection(relayd)
    smuggled = SMUGGLED % relayd.admin_key.encode()
    with trio.fail_after(10):
        await client.send(first + smuggled + get_request("/admin/users", b"Authorization: x"))
        if first:
            assert (await client.response()).status == 200
        response = await client.response()
        assert response.status == 400
        assert response.header(b"connection") == b"close"
        assert "Transfer-Encoding and Content-Length" in response.json()["error"]
        assert await client.rest() == b""  # the appended request was never answered
    await client.aclose()


@pytest.mark.parametrize(
    "path",
    [
        f"/agent/{KEY}/client/register",
        f"//agent/{KEY}/client/register",
        f"/agent//{KEY}/client/register",
        f"/agent/{KEY}//client/register",
        f"/AGENT/{KEY}/client/register",
        f"/Agent/{KEY}/client/register/",
        f"/x/agent/{KEY}/client/register",
        f"/agent/{KEY}",
        f"/agent/{KEY}/",
        f"/agent/{KEY}/other",
        f"///agent///{KEY}///client///register",
        f"/agent/prefix/{KEY}/client/register",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "GET-upgrade"])
async def test_no_error_body_or_log_line_echoes_an_agent_key(
    relayd: Relayd, path: str, method: str
) -> None:
    client = await open_connection(relayd)
    extra = b""
    verb = method.removesuffix("-upgrade")
    if method == "GET-upgrade":
        extra = (
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        )
    request = (
        verb.encode() + b" " + path.encode() + b" HTTP/1.1\r\nHost: relay.example\r\n"
        b"Content-Length: 0\r\n" + extra + b"\r\n"
        if verb != "GET"
        else verb.encode()
        + b" "
        + path.encode()
        + b" HTTP/1.1\r\nHost: relay.example\r\n"
        + extra
        + b"\r\n"
    )
    with trio.fail_after(10):
        await client.send(request)
        response = await client.response()
    await client.aclose()
    assert response.status != 101 or path in {f"/agent/{KEY}/client/register"}, response
    assert KEY.encode() not in response.body, (path, response.body)
    assert KEY.encode() not in b"".join(value for _, value in response.headers)
    assert KEY not in relayd.log


@pytest.mark.parametrize("scheme", ["http", "HTTP", "https"])
async def test_an_absolute_form_target_is_served_as_its_path(relayd: Relayd, scheme: str) -> None:
    """RFC 9112, 3.2.2: a server must accept the absolute form."""
    client = await open_connection(relayd)
    body = json.dumps({"content": "hello"}).encode()
    with trio.fail_after(10):
        await client.send(
            b"POST " + scheme.encode() + b"://relay.example:8080/api/ask HTTP/1.1\r\n"
            b"Host: relay.example\r\nAuthorization: " + relayd.admin_key.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        response = await client.response()
        assert (response.status, response.json()) == (503, NO_AGENT)  # /api/ask, no agent
        await client.send(
            get_request(f"{scheme}://relay.example/admin/users?admin_key={relayd.admin_key}")
        )
        response = await client.response()
        assert response.status == 200
        assert "users" in response.json()
        await client.send(get_request(f"{scheme}://relay.example/health"))
        assert (await client.response()).status == 200
    await client.aclose()


async def test_an_asterisk_target_is_not_mistaken_for_a_path(relayd: Relayd) -> None:
    stream = await trio.open_tcp_stream(HOST, relayd.port)
    client = RawClient(stream)
    with trio.fail_after(10):
        await client.send(b"OPTIONS * HTTP/1.1\r\nHost: relay.example\r\n\r\n")
        response = await client.response()
    assert response.status in (200, 204, 400, 404, 405)
    await client.aclose()


REFUSED_HEADS = [
    b"POST /no-such-route HTTP/1.1\r\n",
    f"POST /agent/{KEY}/other HTTP/1.1\r\n".encode(),
    b"POST /health HTTP/1.1\r\n",
    b"POST /admin/users/add HTTP/1.1\r\nAuthorization: wrong-admin-key\r\n",
]
REFUSED_IDS = ["404", "404-agent-path", "405", "401-admin"]


def refused_request_head(head: bytes, body: bytes) -> bytes:
    head += b"Host: relay.example\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body)


@pytest.mark.parametrize("head", REFUSED_HEADS, ids=REFUSED_IDS)
async def test_a_refusal_whose_body_never_comes_says_connection_close(
    relayd: Relayd, head: bytes
) -> None:
    """The body is sent only once the answer has come: relayd waits for it a
    bounded time, then answers with ``Connection: close`` and ends the
    connection. Closing without saying so made keep-alive clients (httpx)
    send their next request into a closed socket ("server disconnected
    without sending a response")."""
    body = b'{"name": "x"}'
    client = await open_connection(relayd)
    with trio.fail_after(10):
        await client.send(refused_request_head(head, body))
        response = await client.response()  # sent before any byte of the body
        assert response.status in (401, 404, 405), response
        assert response.header(b"connection") == b"close"
        await client.send(body + get_request("/health"))
        assert await client.rest() == b""
    await client.aclose()


# Refusals of other kinds that come before the body (found by an adversarial
# review): (head, the body that would follow, the status).
EARLY_REFUSALS = {
    "413-admin-over-max-body": (
        b"POST /admin/users/add HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %(admin)s\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n",
        b"",
        413,
    ),
    "413-ask-over-max-body": (
        b"POST /api/ask HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %(admin)s\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n",
        b"",
        413,
    ),
    "413-ask-over-max-body-after-an-ask": (
        b"POST /api/ask HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %(admin)s\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        b"POST /api/ask HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %(admin)s\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n",
        b"",
        413,
    ),
    "401-ask-chunked": (
        b"POST /api/ask HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"2\r\n{}\r\n0\r\n\r\n",
        401,
    ),
    "426-agent-path-with-body": (
        b"POST /client/register HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n",
        b"{}",
        426,
    ),
    "401-admin-get-with-body": (
        b"GET /api/connections HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n",
        b"{}",
        401,
    ),
}


@pytest.mark.parametrize("case", list(EARLY_REFUSALS))
async def test_every_refusal_before_the_body_says_whether_the_connection_lives(
    relayd: Relayd, case: str
) -> None:
    """The class, on every path (Quart routes, the bare ASGI endpoints on
    Hypercorn's path): a response that starts before the body has come says
    ``Connection: close`` whenever the connection then ends; otherwise the
    connection answers the next request."""
    head, body, status = EARLY_REFUSALS[case]
    client = await open_connection(relayd)
    with trio.fail_after(15):
        await client.send(head % {b"admin": relayd.admin_key.encode()})
        response = await client.response()  # before any byte of the body
        if b"Content-Length: 2\r\n\r\n{}POST" in head:  # a first request, answered 400
            assert response.status == 400, response
            response = await client.response()
        assert response.status == status, response
        with contextlib.suppress(trio.BrokenResourceError):
            await client.send(body + get_request("/health"))
        tokens = (response.header(b"connection") or b"").lower().split(b",")
        rest = await client.rest() if b"close" in (t.strip() for t in tokens) else None
        if rest is None:
            assert (await client.response()).status == 200, case
        else:
            assert rest == b"", rest
    await client.aclose()


@pytest.mark.parametrize("head", REFUSED_HEADS, ids=REFUSED_IDS)
async def test_a_refused_request_whose_body_follows_its_head_keeps_the_connection(
    relayd: Relayd, head: bytes
) -> None:
    """Head and body in two writes (as httpx sends them): the refusal reads the
    body and the connection carries the next request."""
    body = b'{"name": "x"}'
    client = await open_connection(relayd)
    with trio.fail_after(10):
        for _ in range(3):
            await client.send(refused_request_head(head, body))
            await client.send(body)
            response = await client.response()
            assert response.status in (401, 404, 405), response
            assert response.header(b"connection") is None
        await client.send(get_request("/health"))
        assert (await client.response()).status == 200
    await client.aclose()


async def test_a_wire_path_refusal_before_the_body_says_connection_close(relayd: Relayd) -> None:
    """relayd's own /api/ask loop refuses a wrong token at once, before the body
    has come; the connection then ends (once the body has had its chance), so
    the answer says ``Connection: close``. It promised keep-alive before, and a
    body that took longer than the discard allowance left the client with a
    closed socket."""
    client = await open_connection(relayd)
    head = (
        b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Type: application/json\r\nContent-Length: 20\r\n\r\n"
    )
    with trio.fail_after(10):
        await client.send(head)
        response = await client.response()  # before any byte of the body
        assert response.status == 401
        assert response.header(b"connection") == b"close"
        assert await client.rest() == b""  # the body never came: the connection ends
    await client.aclose()


@pytest.mark.parametrize("chunks", [1, 5, 50])
@pytest.mark.parametrize("pipelined", [False, True], ids=["next-later", "next-in-same-write"])
async def test_a_refused_chunked_body_sent_whole_keeps_the_connection_every_time(
    relayd: Relayd, chunks: int, pipelined: bool
) -> None:
    """Found by an adversarial review: with the whole chunked body in the head's
    write, Hypercorn's reader may not have parsed it when the refusal ends, and
    then closed the connection after an answer that promised keep-alive (8 times
    in 40). The endpoint now reads the chunked body before it answers; the answer
    keeps the connection, and the next request is served, every time."""
    body = b"1\r\nx\r\n" * chunks + b"0\r\n\r\n"
    head = b"POST /api/ask HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    for attempt in range(40):
        with trio.fail_after(10):
            client = await open_connection(relayd)
            await client.send(head + body + (get_request("/health") if pipelined else b""))
            response = await client.response()
            assert response.status in (401, 429), response  # 429 once the address is locked
            assert response.header(b"connection") is None, (attempt, response)
            if not pipelined:
                await client.send(get_request("/health"))
            assert (await client.response()).status == 200, attempt
            await client.aclose()
