"""TLS on relayd's own listeners (#14 part 4), end to end with real TLS clients.

A real relayd subprocess (tests/support.py) serves https and wss on 127.0.0.1 with a
certificate issued at test time by a trustme CA: the clients are Python's ssl (httpx,
trio's SSLStream under tests/raw_http.py's RawClient), curl with ``--cacert``, and
trio-websocket agents (v1 and v2) over wss. The certificate comes from
``server.tls_certificate``/``server.tls_key`` or from systemd credentials, and is
reloaded on SIGHUP: new connections get the new one, open ones go on, and a broken pair
keeps the old one with an error in the log.

TLS 1.1 must be refused by relayd, not by the client: the refusing clients are set up
to speak TLS 1.0-1.1 (``@SECLEVEL=0``; OpenSSL 3 would not otherwise) and are first
shown to complete a TLS 1.1 handshake with a legacy server started in the test, and to
be served by relayd when allowed TLS 1.2.

Every wait is bounded (``trio.fail_after``, subprocess timeouts); a reload is awaited
through relayd's ``READY=1`` notification, never a sleep.
"""

from __future__ import annotations

import contextlib
import json
import signal
import ssl
import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from trio_websocket import HandshakeError, open_websocket_url

from relayd.agentkit import (
    AgentProfile,
    AgentStats,
    V2Agent,
    echo_handler,
    echo_stream_handler,
    serve_agent,
)
from relayd.protocol.v2 import SUBPROTOCOL
from relayd.tls import handshake
from tests.raw_http import RawClient, Response
from tests.support import Relayd, service_environment
from tests.test_ask_wire_e2e import DEBUG, HEALTH, NO_AGENT, ask_request, served
from tests.test_relay_e2e import wait_for_agents

HOST = "127.0.0.1"
CURL = Path("/usr/bin/curl")
RUN_TIMEOUT = 30
# curl offering TLS 1.0-1.1 only (OpenSSL 3 needs security level 0 for them), and the same
# up to TLS 1.2.
CURL_TLS_1_1 = ("--tlsv1.0", "--tls-max", "1.1", "--ciphers", "DEFAULT@SECLEVEL=0")
CURL_TLS_1_2 = ("--tlsv1.0", "--tls-max", "1.2", "--ciphers", "DEFAULT@SECLEVEL=0")


# -- certificates --------------------------------------------------------------------------


@dataclass
class Pair:
    """A certificate issued by the test CA, as relayd is given it."""

    leaf: trustme.LeafCert
    certificate: Path
    key: Path

    @property
    def parsed(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.leaf.cert_chain_pems[0].bytes())

    @property
    def der(self) -> bytes:
        return self.parsed.public_bytes(Encoding.DER)

    @property
    def serial(self) -> int:
        return self.parsed.serial_number


def issue(
    ca: trustme.CA,
    directory: Path,
    *names: str,
    certificate: str = "cert.pem",
    key: str = "key.pem",
) -> Pair:
    """A certificate for 127.0.0.1 (and ``names``) written as PEM files in ``directory``
    (overwriting what is there: a renewal)."""
    directory.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(HOST, *names)
    pair = Pair(leaf, directory / certificate, directory / key)
    pair.certificate.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    pair.key.write_bytes(leaf.private_key_pem.bytes())
    return pair


def tls_config(pair: Pair, extra: str = "") -> str:
    return (
        f"[server]\ntls_certificate = {json.dumps(str(pair.certificate))}\n"
        f"tls_key = {json.dumps(str(pair.key))}\n{extra}"
    )


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts the test CA (and nothing else)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    return context


def legacy(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context`` made to offer TLS 1.0-1.1 only (OpenSSL 3 needs security level 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def https_url(relayd: Relayd) -> str:
    return f"https://{HOST}:{relayd.port}"


def wss_url(relayd: Relayd) -> str:
    return f"wss://{HOST}:{relayd.port}/client/register"


def admin(relayd: Relayd) -> dict[str, str]:
    return {"Authorization": relayd.admin_key}


def https_client(relayd: Relayd, context: ssl.SSLContext) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=https_url(relayd), verify=context, timeout=30)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA(organization_name="relayd test CA")


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def pair(ca: trustme.CA, tmp_path: Path) -> Pair:
    return issue(ca, tmp_path / "tls", "relay.test")


@pytest.fixture
def relayd(relayd_factory: Callable[..., Relayd], pair: Pair) -> Relayd:
    """A relayd serving TLS with ``pair``, logging which loop serves each connection."""
    return relayd_factory(config=tls_config(pair), args=DEBUG)


# -- raw connections -----------------------------------------------------------------------


async def open_tls(relayd: Relayd, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection to relayd, handshake done (verification per ``context``)."""
    stream = await trio.open_ssl_over_tcp_stream(
        HOST, relayd.port, ssl_context=context, https_compatible=True
    )
    await stream.do_handshake()
    return stream


async def raw_tls(relayd: Relayd, context: ssl.SSLContext) -> RawClient:
    """A RawClient over TLS; ``local`` is the client's address, as relayd logs it."""
    stream = await open_tls(relayd, context)
    connection = RawClient(stream)
    host, port = stream.transport_stream.socket.getsockname()[:2]
    connection.local = f"{host}:{port}"
    return connection


def peer_der(connection: RawClient | trio.SSLStream[trio.SocketStream]) -> bytes:
    stream = connection.stream if isinstance(connection, RawClient) else connection
    assert isinstance(stream, trio.SSLStream)
    der = stream.getpeercert(binary_form=True)
    assert der is not None
    return der


async def presented(relayd: Relayd, context: ssl.SSLContext) -> x509.Certificate:
    """The certificate relayd presents to a new connection."""
    stream = await open_tls(relayd, context)
    try:
        return x509.load_der_x509_certificate(peer_der(stream))
    finally:
        await stream.aclose()


async def handshake_error(relayd: Relayd, context: ssl.SSLContext) -> ssl.SSLError:
    """The error a TLS handshake with ``context`` ends in (it must fail)."""
    with pytest.raises(trio.BrokenResourceError) as caught:
        stream = await open_tls(relayd, context)
        await stream.aclose()
    cause = caught.value.__cause__
    assert isinstance(cause, ssl.SSLError), repr(cause)
    return cause


def chain(error: BaseException) -> list[BaseException]:
    """``error`` and its causes and contexts."""
    errors = [error]
    while (error := error.__cause__ or error.__context__) is not None and error not in errors:
        errors.append(error)
    return errors


def chunked_ask(relayd: Relayd, body: dict[str, Any]) -> bytes:
    raw = json.dumps(body).encode()
    return (
        b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\n"
        b"Authorization: " + relayd.admin_key.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(raw) + raw + b"\r\n0\r\n\r\n"
    )


def echoed(response: Response, prompt: str) -> None:
    assert response.status == 200, response
    answer = response.json()
    assert answer["error"] == ""
    assert answer["content"] == "echo:" + prompt


# -- agents over wss -----------------------------------------------------------------------


async def start_v1_agent(
    nursery: trio.Nursery, relayd: Relayd, context: ssl.SSLContext, stats: AgentStats
) -> str:
    """agentkit's v1 agent (serve_agent: run_agent takes no ssl_context) over wss."""

    async def run(task_status: trio.TaskStatus[str]) -> None:
        async with open_websocket_url(
            wss_url(relayd), ssl_context=context, message_queue_size=16
        ) as ws:
            await serve_agent(ws, echo_handler(), stats=stats, task_status=task_status)

    agent_id: str = await nursery.start(run)
    return agent_id


async def start_v2_agent(
    nursery: trio.Nursery, relayd: Relayd, context: ssl.SSLContext, agent: V2Agent
) -> str:
    """V2Agent.serve on a wss connection of our own."""

    async def run(task_status: trio.TaskStatus[str]) -> None:
        async with open_websocket_url(
            wss_url(relayd), ssl_context=context, subprotocols=[SUBPROTOCOL], message_queue_size=16
        ) as ws:
            await agent.serve(ws, task_status=task_status)

    agent_id: str = await nursery.start(run)
    return agent_id


def sse_events(text: str) -> list[Any]:
    """Server-sent events as (event, data) pairs."""
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def streamed_ask(http: httpx.AsyncClient, relayd: Relayd, prompt: str) -> list[Any]:
    """``{"stream": true}`` over https: the server-sent events as (event, data) pairs."""
    body = json.dumps({"content": prompt, "stream": True}).encode()
    async with http.stream("POST", "/api/ask", content=body, headers=admin(relayd)) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        text = (await response.aread()).decode()
    return sse_events(text)


async def chunked_response(connection: RawClient) -> tuple[bytes, bytes]:
    """The head and the de-chunked body of the next response (chunked) on ``connection``."""

    async def fill() -> None:
        data = await connection.stream.receive_some(65536)
        assert data, f"the connection ended; unparsed: {connection.buffer!r}"
        connection.buffer += data

    while b"\r\n\r\n" not in connection.buffer:
        await fill()
    head, connection.buffer = connection.buffer.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while True:
        while b"\r\n" not in connection.buffer:
            await fill()
        size_line, connection.buffer = connection.buffer.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        while len(connection.buffer) < size + 2:
            await fill()
        chunk, connection.buffer = connection.buffer[:size], connection.buffer[size + 2 :]
        if size == 0:
            return head, body
        body += chunk


async def ask(http: httpx.AsyncClient, relayd: Relayd, prompt: str) -> dict[str, Any]:
    response = await http.post(
        "/api/ask", content=json.dumps({"content": prompt}).encode(), headers=admin(relayd)
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


# -- a legacy TLS server: proof that the TLS 1.1 clients can speak TLS 1.1 -----------------


async def legacy_server(nursery: trio.Nursery, ca: trustme.CA, versions: list[str]) -> int:
    """A TLS 1.0-1.1 server for 127.0.0.1 (same CA) that answers any request with a 200;
    the versions it negotiated are appended to ``versions``. Returns its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST).configure_cert(context)
    legacy(context)
    listeners = await trio.open_tcp_listeners(0, host=HOST)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
            versions.append(str(stream.version()))
            await stream.receive_some(65536)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )
            await stream.aclose()
        except trio.BrokenResourceError:
            pass

    ssl_listeners = [
        trio.SSLListener(listener, context, https_compatible=True) for listener in listeners
    ]
    nursery.start_soon(trio.serve_listeners, handle, ssl_listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_a_refused_handshake_sends_its_alert_over_memory_streams(ca: trustme.CA) -> None:
    """relayd.tls.handshake alone: it returns False and the client reads the alert.
    It takes the alert from trio.SSLStream's private outgoing buffer (``_outgoing``);
    if trio renames it, this fails rather than the alert being lost again."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_2
    ca.issue_cert("relay.test").configure_cert(server_context)
    client_end, server_end = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_end, server_context, server_side=True)
    client = trio.SSLStream(client_end, legacy(trusting(ca)), server_hostname="relay.test")
    completed: list[bool] = []

    async def serve() -> None:
        completed.append(await handshake(server))  # type: ignore[arg-type]  # a memory stream

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.raises(trio.BrokenResourceError) as caught:
                await client.do_handshake()
    assert completed == [False]
    cause = caught.value.__cause__
    assert isinstance(cause, ssl.SSLError) and cause.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


# -- curl ----------------------------------------------------------------------------------


def curl_path() -> str:
    assert CURL.is_file(), f"{CURL} is missing: these tests need curl (apt-get install curl)"
    return str(CURL)


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(RUN_TIMEOUT):
        return await trio.run_process(
            [curl_path(), "-sS", "--max-time", "20", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )


# -- reload --------------------------------------------------------------------------------


async def reload(relayd: Relayd) -> str:
    """SIGHUP, then wait for the READY=1 that ends the reload; what it logged."""
    before = len(relayd.log)
    relayd.signal(signal.SIGHUP)
    await trio.to_thread.run_sync(relayd.wait_notification, "READY=1")
    return relayd.log[before:]


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


# -- https with Python's ssl ---------------------------------------------------------------


async def test_https_health_and_asks_on_both_paths_with_the_test_certificate(
    relayd: Relayd, ca: trustme.CA, pair: Pair
) -> None:
    context = trusting(ca)
    prompts = [f"tls {n} {uuid.uuid4()}" for n in range(4)]
    stats = AgentStats()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, https_client(relayd, context) as http:
            health = await http.get("/health")
            agent_id = await start_v1_agent(nursery, relayd, context, stats)
            await wait_for_agents(http, relayd, ids={agent_id})

            # The wire path: a connection whose first request is a plain POST /api/ask.
            wire = await raw_tls(relayd, context)
            await wire.send(ask_request(relayd, {"content": prompts[0]}))
            wire_answer = await wire.response()
            wire_served = served(relayd, wire)
            await wire.aclose()

            # Hypercorn's path: a GET /health first, then an ask on the same connection.
            after_health = await raw_tls(relayd, context)
            await after_health.send(HEALTH)
            health_first = await after_health.response()
            await after_health.send(ask_request(relayd, {"content": prompts[1]}))
            hypercorn_answer = await after_health.response()
            after_health_served = served(relayd, after_health)
            await after_health.aclose()

            # Hypercorn's path: a chunked ask (not the wire path's kind of request).
            chunked = await raw_tls(relayd, context)
            await chunked.send(chunked_ask(relayd, {"content": prompts[2]}))
            chunked_answer = await chunked.response()
            chunked_served = served(relayd, chunked)
            await chunked.aclose()

            # httpx: Python's ssl under an ordinary client.
            answer = await ask(http, relayd, prompts[3])
            nursery.cancel_scope.cancel()
    assert (health.status_code, health.text) == (200, "OK")
    assert health.http_version == "HTTP/1.1"
    echoed(wire_answer, prompts[0])
    assert wire_served == (True, False)
    assert (health_first.status, health_first.body) == (200, b"OK")
    echoed(hypercorn_answer, prompts[1])
    assert after_health_served == (False, False)
    echoed(chunked_answer, prompts[2])
    assert chunked_served == (False, False)
    assert answer["content"] == "echo:" + prompts[3]
    assert stats.contents == prompts
    assert relayd.process.poll() is None


async def test_the_certificate_presented_is_the_test_cas(
    relayd: Relayd, ca: trustme.CA, pair: Pair
) -> None:
    ca_certificate = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    with trio.fail_after(20):
        stream = await open_tls(relayd, trusting(ca))
        der = peer_der(stream)
        version = stream.version()
        alpn = stream.selected_alpn_protocol()
        await stream.aclose()
        offered = trusting(ca)
        offered.set_alpn_protocols(["h2", "http/1.1"])
        stream = await open_tls(relayd, offered)
        offered_alpn = stream.selected_alpn_protocol()
        await stream.aclose()
        tls12 = trusting(ca)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        stream = await open_tls(relayd, tls12)
        tls12_version = stream.version()
        await stream.aclose()
    served_certificate = x509.load_der_x509_certificate(der)
    assert der == pair.der
    assert served_certificate.serial_number == pair.serial
    assert served_certificate.issuer == ca_certificate.subject
    assert version == "TLSv1.3"
    assert alpn is None  # the client offered none
    assert offered_alpn == "http/1.1"  # relayd's front speaks HTTP/1.1 only
    assert tls12_version == "TLSv1.2"  # TLS 1.2 is still served


async def test_a_client_without_the_test_ca_fails_verification(
    relayd: Relayd, ca: trustme.CA
) -> None:
    other = trustme.CA()  # trusts a CA, not this one
    with trio.fail_after(20):
        system = await handshake_error(relayd, ssl.create_default_context())
        wrong = await handshake_error(relayd, trusting(other))
        async with httpx.AsyncClient(base_url=https_url(relayd), timeout=10) as http:
            with pytest.raises(httpx.ConnectError) as refused:
                await http.get("/health")
        # And the name is checked: the certificate is for 127.0.0.1, not for this host.
        stream = await trio.open_tcp_stream(HOST, relayd.port)
        misnamed = trio.SSLStream(stream, trusting(ca), server_hostname="elsewhere.test")
        with pytest.raises(trio.BrokenResourceError) as caught:
            await misnamed.do_handshake()
        await stream.aclose()
        # relayd goes on serving verified clients.
        async with https_client(relayd, trusting(ca)) as http:
            health = await http.get("/health")
    assert isinstance(system, ssl.SSLCertVerificationError), system
    assert isinstance(wrong, ssl.SSLCertVerificationError), wrong
    assert any(isinstance(error, ssl.SSLCertVerificationError) for error in chain(refused.value))
    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in str(caught.value.__cause__)
    assert health.status_code == 200
    assert relayd.process.poll() is None


@pytest.mark.parametrize(
    "path", ["/admin/users/add", "/api/ask"], ids=["quart-route", "ask-endpoint"]
)
async def test_a_413_over_tls_closes_its_connection_after_the_answer(
    relayd: Relayd, ca: trustme.CA, path: str
) -> None:
    """A body over server.max_body is refused before it is read; the close that
    follows lingers (reads and drops what still comes) after shutting the write
    side, which on TLS is the socket's: trio's TLS stream has no half-close, and
    the close raised there, leaving the client waiting and a traceback in the log."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: relay.test\r\nAuthorization: Bearer "
        f"{relayd.admin_key}\r\nContent-Type: application/json\r\n"
        "Content-Length: 2000000\r\n\r\n"
    ).encode()
    with trio.fail_after(15):
        client = RawClient(await open_tls(relayd, trusting(ca)))
        await client.send(head + b"x" * 100_000)
        response = await client.response()
        assert response.status == 413
        assert response.header(b"connection") == b"close"
        with contextlib.suppress(trio.BrokenResourceError):
            assert await client.rest() == b""
        await client.aclose()
    assert "Traceback" not in relayd.log
    assert relayd.process.poll() is None


async def test_plain_http_on_the_tls_port_gets_no_http_answer(
    relayd: Relayd, ca: trustme.CA
) -> None:
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream(HOST, relayd.port)
        await stream.send_all(HEALTH)
        connection = RawClient(stream)
        rest = await connection.rest()
        await stream.aclose()
        async with https_client(relayd, trusting(ca)) as http:
            health = await http.get("/health")
    assert not rest.startswith(b"HTTP/"), rest
    assert health.status_code == 200
    assert relayd.process.poll() is None


async def test_python_ssl_limited_to_tls_1_1_is_refused(relayd: Relayd, ca: trustme.CA) -> None:
    versions: list[str] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await legacy_server(nursery, ca, versions)
            # The client can speak TLS 1.1: it does, with the legacy server.
            control = await trio.open_ssl_over_tcp_stream(
                HOST, port, ssl_context=legacy(trusting(ca)), https_compatible=True
            )
            await control.do_handshake()
            control_version = control.version()
            await control.aclose()
            refusal = await handshake_error(relayd, legacy(trusting(ca)))
            nursery.cancel_scope.cancel()
        # The same client allowed TLS 1.2 is served.
        upto12 = legacy(trusting(ca))
        upto12.maximum_version = ssl.TLSVersion.TLSv1_2
        stream = await open_tls(relayd, upto12)
        served_version = stream.version()
        await stream.aclose()
    assert control_version == "TLSv1.1"
    assert refusal.reason == "TLSV1_ALERT_PROTOCOL_VERSION"  # told why (see the next test)
    assert served_version == "TLSv1.2"
    assert relayd.process.poll() is None


async def test_a_tls_1_1_client_is_told_why_with_a_protocol_version_alert(
    relayd: Relayd, ca: trustme.CA, ca_file: Path
) -> None:
    """RFC 5246 E.1 and RFC 8446 D: the server MUST answer an old version with a
    protocol_version alert. trio drops it when a handshake fails; relayd.tls.handshake
    sends it (curl said SSL_ERROR_SYSCALL before)."""
    with trio.fail_after(30):
        refusal = await handshake_error(relayd, legacy(trusting(ca)))
        refused = await curl("--cacert", str(ca_file), *CURL_TLS_1_1, f"{https_url(relayd)}/health")
    assert refused.returncode == 35, refused
    assert b"alert protocol version" in refused.stderr, refused.stderr
    assert refusal.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refusal


# -- curl ----------------------------------------------------------------------------------


async def test_curl_with_the_test_ca_health_and_ask(
    relayd: Relayd, ca: trustme.CA, ca_file: Path
) -> None:
    context = trusting(ca)
    prompt = f"curl {uuid.uuid4()}"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, https_client(relayd, context) as http:
            agent_id = await start_v1_agent(nursery, relayd, context, AgentStats())
            await wait_for_agents(http, relayd, ids={agent_id})
            health = await curl("--cacert", str(ca_file), f"{https_url(relayd)}/health")
            asked = await curl(
                "--cacert",
                str(ca_file),
                "-H",
                f"Authorization: {relayd.admin_key}",
                "-d",
                json.dumps({"content": prompt}),
                f"{https_url(relayd)}/api/ask",
            )
            unverified = await curl(f"{https_url(relayd)}/health")
            nursery.cancel_scope.cancel()
    assert (health.returncode, health.stdout) == (0, b"OK"), health.stderr
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["content"] == "echo:" + prompt
    assert unverified.returncode == 60, unverified  # CURLE_PEER_FAILED_VERIFICATION
    assert b"certificate" in unverified.stderr


async def test_curl_tls_max_1_1_is_refused(relayd: Relayd, ca: trustme.CA, ca_file: Path) -> None:
    versions: list[str] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await legacy_server(nursery, ca, versions)
            control = await curl("--cacert", str(ca_file), *CURL_TLS_1_1, f"https://{HOST}:{port}/")
            refused = await curl(
                "--cacert", str(ca_file), *CURL_TLS_1_1, f"{https_url(relayd)}/health"
            )
            nursery.cancel_scope.cancel()
        # The same curl allowed TLS 1.2 gets its answer.
        health = await curl("--cacert", str(ca_file), *CURL_TLS_1_2, f"{https_url(relayd)}/health")
    assert (control.returncode, control.stdout) == (0, b"ok"), control.stderr
    assert versions == ["TLSv1.1"]
    assert refused.returncode == 35, refused  # CURLE_SSL_CONNECT_ERROR: in the handshake
    assert refused.stdout == b""
    assert (health.returncode, health.stdout) == (0, b"OK"), health.stderr
    assert relayd.process.poll() is None


# -- agents over wss -----------------------------------------------------------------------


async def test_a_v1_agent_over_wss_answers_asks_and_a_streamed_ask(
    relayd: Relayd, ca: trustme.CA
) -> None:
    context = trusting(ca)
    stats = AgentStats()
    prompts = [f"v1 {uuid.uuid4()}", f"v1 streamed {uuid.uuid4()}"]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, https_client(relayd, context) as http:
            agent_id = await start_v1_agent(nursery, relayd, context, stats)
            (entry,) = await wait_for_agents(http, relayd, ids={agent_id})
            answer = await ask(http, relayd, prompts[0])
            events = await streamed_ask(http, relayd, prompts[1])
            nursery.cancel_scope.cancel()
    assert answer["content"] == "echo:" + prompts[0]
    assert answer["error"] == ""
    # A v1 agent's answer streams as one delta, then done.
    assert [event for event, _ in events] == ["delta", "done"]
    assert events[0][1] == {"content": "echo:" + prompts[1]}
    assert events[1][1]["content"] == "echo:" + prompts[1]
    assert events[1][1]["error"] == ""
    assert stats.contents == prompts
    assert entry["Id"] == agent_id


async def test_a_v2_agent_over_wss_answers_asks_and_streams_on_both_paths(
    relayd: Relayd, ca: trustme.CA
) -> None:
    context = trusting(ca)
    agent = V2Agent(wss_url(relayd), echo_stream_handler(0.01), AgentProfile(capacity=2))
    prompts = [
        f"v2 {uuid.uuid4()}",
        f"v2 streamed in six words {uuid.uuid4()}",
        f"v2 streamed on the wire path {uuid.uuid4()}",
    ]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, https_client(relayd, context) as http:
            agent_id = await start_v2_agent(nursery, relayd, context, agent)
            await wait_for_agents(http, relayd, ids={agent_id})
            answer = await ask(http, relayd, prompts[0])
            # On httpx's connection, which began with GET /api/connections: Hypercorn's.
            events = await streamed_ask(http, relayd, prompts[1])
            # A fresh connection whose first request is the streamed ask: the wire path.
            wire = await raw_tls(relayd, context)
            await wire.send(ask_request(relayd, {"content": prompts[2], "stream": True}))
            head, body = await chunked_response(wire)
            wire_served = served(relayd, wire)
            await wire.aclose()
            nursery.cancel_scope.cancel()
    assert answer["content"] == "echo:" + prompts[0]
    assert answer["error"] == ""
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"text/event-stream" in head.lower()
    assert wire_served == (True, False)
    for prompt, streamed in ((prompts[1], events), (prompts[2], sse_events(body.decode()))):
        *deltas, (last, done) = streamed
        assert last == "done"
        assert done["content"] == "echo:" + prompt
        assert done["error"] == ""
        assert {event for event, _ in deltas} == {"delta"}
        assert len(deltas) > 1  # it streamed, piece by piece
        assert "".join(data["content"] for _, data in deltas) == "echo:" + prompt
    assert agent.stats.contents == prompts
    assert agent.stats.replies == 3


async def test_an_agent_without_the_test_ca_cannot_connect_over_wss(
    relayd: Relayd, ca: trustme.CA
) -> None:
    # trio-websocket reports the failed verification as a connect timeout (its reader
    # task swallows the TLS error), hence the short connect_timeout.
    with trio.fail_after(20):
        with pytest.raises((HandshakeError, trio.BrokenResourceError)):
            async with open_websocket_url(
                wss_url(relayd), ssl_context=trusting(trustme.CA()), connect_timeout=2
            ):
                pass
        async with https_client(relayd, trusting(ca)) as http:
            response = await http.get("/api/connections", headers=admin(relayd))
    assert response.json()["connections"] == []
    assert "agent connected" not in relayd.log


# -- reload on SIGHUP ----------------------------------------------------------------------


async def test_sighup_reloads_the_certificate_and_a_broken_pair_keeps_the_old_one(
    relayd: Relayd, ca: trustme.CA, pair: Pair, tmp_path: Path
) -> None:
    context = trusting(ca)
    with trio.fail_after(60):
        first = await presented(relayd, context)
        # Keep-alive connections made with the first certificate, on both paths.
        hypercorn = await raw_tls(relayd, context)
        await hypercorn.send(HEALTH)
        before = await hypercorn.response()
        wire = await raw_tls(relayd, context)
        await wire.send(ask_request(relayd, {"content": "before"}))
        wire_before = await wire.response()

        renewed = issue(ca, tmp_path / "tls", "renewed.relay.test")  # same files, new pair
        renewal_log = await reload(relayd)
        second = await presented(relayd, context)
        await hypercorn.send(HEALTH)
        after = await hypercorn.response()
        await wire.send(ask_request(relayd, {"content": "after"}))
        wire_after = await wire.response()

        # A certificate file that is not PEM.
        good_certificate = renewed.certificate.read_bytes()
        renewed.certificate.write_text("this is not a certificate\n")
        garbage_log = await reload(relayd)
        after_garbage = await presented(relayd, context)

        # A certificate with a key that is not its own.
        other = issue(ca, tmp_path / "other", "other.relay.test")
        renewed.certificate.write_bytes(other.certificate.read_bytes())
        mismatch_log = await reload(relayd)
        after_mismatch = await presented(relayd, context)

        # A good pair again is taken.
        renewed.certificate.write_bytes(good_certificate)
        third = issue(ca, tmp_path / "tls", "third.relay.test")
        recovery_log = await reload(relayd)
        fourth = await presented(relayd, context)

        await hypercorn.send(HEALTH)
        still = await hypercorn.response()
        hypercorn_der = peer_der(hypercorn)
        await hypercorn.aclose()
        await wire.aclose()
    assert first.serial_number == pair.serial
    assert pair.serial != renewed.serial

    assert second.serial_number == renewed.serial
    assert second.public_bytes(Encoding.DER) == renewed.der
    assert "TLS certificate loaded from the config: " + str(renewed.certificate) in renewal_log
    assert error_lines(renewal_log) == []
    for response in (before, after, still):
        assert (response.status, response.body) == (200, b"OK")
    for response in (wire_before, wire_after):
        assert response.status == 503
        assert response.json() == NO_AGENT
    assert served(relayd, wire) == (True, False)  # still the wire path's connection
    assert hypercorn_der == pair.der  # made before the reloads: its certificate stays

    for log in (garbage_log, mismatch_log):
        (error,) = error_lines(log)
        assert str(renewed.certificate) in error, error
        assert "still serving the previous certificate" in error, error
        assert "TLS certificate loaded" not in log
    assert after_garbage.serial_number == renewed.serial
    assert after_mismatch.serial_number == renewed.serial
    assert str(renewed.key) in error_lines(mismatch_log)[0]

    assert fourth.serial_number == third.serial
    assert error_lines(recovery_log) == []
    assert relayd.process.poll() is None


# -- configuration -------------------------------------------------------------------------


def run_relayd(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    environment = service_environment()
    environment.pop("CREDENTIALS_DIRECTORY", None)
    environment["HOME"] = str(tmp_path)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "relayd", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=environment,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("given", "missing"),
    [("tls_certificate", "server.tls_key"), ("tls_key", "server.tls_certificate")],
)
def test_check_config_wants_both_tls_keys(
    tmp_path: Path, pair: Pair, given: str, missing: str
) -> None:
    path = tmp_path / "relayd.toml"
    value = pair.certificate if given == "tls_certificate" else pair.key
    path.write_text(f"[server]\n{given} = {json.dumps(str(value))}\n")
    result = run_relayd(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.startswith(f"relayd: {path}: {missing}: "), result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_with_both_tls_keys_is_ok(tmp_path: Path, pair: Pair) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text(tls_config(pair))
    result = run_relayd(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("relayd: configuration OK: "), result.stdout


def test_check_config_loads_the_pair(tmp_path: Path, pair: Pair) -> None:
    """A pair that does not load is caught before a restart, not at it."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    path = tmp_path / "relayd.toml"
    path.write_text(
        f"[server]\ntls_certificate = {json.dumps(str(garbage))}\n"
        f"tls_key = {json.dumps(str(pair.key))}\n"
    )
    result = run_relayd(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 1, result
    assert str(garbage) in result.stderr and "do not load as a pair" in result.stderr


def test_half_a_credential_pair_is_an_error_not_plain_http(tmp_path: Path, pair: Pair) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "tls_certificate").write_bytes(Path(pair.certificate).read_bytes())
    path = tmp_path / "relayd.toml"
    path.write_text("")
    result = run_relayd(
        tmp_path,
        "check-config",
        "--config",
        str(path),
        env={"CREDENTIALS_DIRECTORY": str(credentials)},
    )
    assert result.returncode == 1, result
    assert "tls_key is missing" in result.stderr, result.stderr


def start_failure(tmp_path: Path, config: str) -> tuple[int, str]:
    """``relayd serve`` with ``config``, which must not start: exit code and output."""
    path = tmp_path / "relayd.toml"
    path.write_text(config)
    result = run_relayd(
        tmp_path,
        "serve",
        "--config",
        str(path),
        "--listen",
        f"{HOST}:0",
        "--state-dir",
        str(tmp_path / "state"),
        env={"RELAYD_ADMIN_KEY": "test-admin-key-0123456789"},
    )
    return result.returncode, result.stdout + result.stderr


def test_a_missing_certificate_file_stops_relayd_at_start(tmp_path: Path, pair: Pair) -> None:
    absent = tmp_path / "tls" / "absent-cert.pem"
    config = f"[server]\ntls_certificate = {json.dumps(str(absent))}\n"
    config += f"tls_key = {json.dumps(str(pair.key))}\n"
    code, output = start_failure(tmp_path, config)
    assert code == 1, output
    assert str(absent) in output
    assert "relayd ready" not in output
    assert "Traceback" not in output


def test_a_missing_key_file_stops_relayd_at_start_naming_the_key(
    tmp_path: Path, pair: Pair
) -> None:
    absent = tmp_path / "tls" / "absent-key.pem"
    config = f"[server]\ntls_certificate = {json.dumps(str(pair.certificate))}\n"
    config += f"tls_key = {json.dumps(str(absent))}\n"
    code, output = start_failure(tmp_path, config)
    assert code == 1, output
    assert "relayd ready" not in output
    assert "Traceback" not in output
    assert str(absent) in output, output


def test_a_key_that_is_not_the_certificates_stops_relayd_at_start(
    tmp_path: Path, ca: trustme.CA, pair: Pair
) -> None:
    other = issue(ca, tmp_path / "other", "other.relay.test")
    config = f"[server]\ntls_certificate = {json.dumps(str(pair.certificate))}\n"
    config += f"tls_key = {json.dumps(str(other.key))}\n"
    code, output = start_failure(tmp_path, config)
    assert code == 1, output
    assert str(pair.certificate) in output
    assert "relayd ready" not in output
    assert "Traceback" not in output


# -- systemd credentials -------------------------------------------------------------------


async def test_systemd_credentials_serve_https_when_the_config_names_none(
    relayd_factory: Callable[..., Relayd], ca: trustme.CA, tmp_path: Path
) -> None:
    credentials = tmp_path / "credentials"
    pair = issue(ca, credentials, certificate="tls_certificate", key="tls_key")
    relayd = relayd_factory(env={"CREDENTIALS_DIRECTORY": str(credentials)})
    with trio.fail_after(20):
        certificate = await presented(relayd, trusting(ca))
        async with https_client(relayd, trusting(ca)) as http:
            health = await http.get("/health")
    assert certificate.public_bytes(Encoding.DER) == pair.der
    assert (health.status_code, health.text) == (200, "OK")
    assert f"certificate from systemd credentials: {pair.certificate}" in relayd.log


async def test_the_config_wins_over_systemd_credentials(
    relayd_factory: Callable[..., Relayd], ca: trustme.CA, pair: Pair, tmp_path: Path
) -> None:
    credentials = tmp_path / "credentials"
    issue(ca, credentials, certificate="tls_certificate", key="tls_key")
    relayd = relayd_factory(
        config=tls_config(pair), env={"CREDENTIALS_DIRECTORY": str(credentials)}
    )
    with trio.fail_after(20):
        certificate = await presented(relayd, trusting(ca))
    assert certificate.public_bytes(Encoding.DER) == pair.der
    assert f"certificate from the config: {pair.certificate}" in relayd.log


# -- the listen line -----------------------------------------------------------------------


def test_the_listen_line_says_https(relayd: Relayd) -> None:
    ready = f"relayd ready: listening on https://{HOST}:{relayd.port}"
    assert ready in relayd.log
    assert any(f"https://{HOST}:{relayd.port}" in note for note in relayd.notifications)
    assert f"http://{HOST}:{relayd.port}" not in relayd.log


def test_without_tls_the_listen_line_says_http(relayd_factory: Callable[..., Relayd]) -> None:
    relayd = relayd_factory(env={"CREDENTIALS_DIRECTORY": ""})  # none from the test's runner
    assert f"relayd ready: listening on http://{HOST}:{relayd.port}" in relayd.log
    assert "https://" not in relayd.log
