"""Issue 13, part 3: a new user's first hour with relayd, end to end.

What someone meets first: the seed's command line (``relayd PORT ADMIN_KEY
[-listen HOST]``), an address already in use, a browser or curl pointed at the
agent path, an agent that drops off, ``curl -i`` status lines, an admin call
with a wrong key, an upload too large for ``server.max_body`` from a client
that writes its whole body before reading, the start-up and reload log lines,
the install scripts under ``DESTDIR``, ``--help``, ``sudo relayd users add`` on a
system install, a question whose frame is too large for the agents, and an
agent that sends too much.

Everything runs against a real relayd subprocess (tests/support.py) on
127.0.0.1, or the real console script; every wait is bounded by
``trio.fail_after`` or a subprocess timeout, and logs are polled in bounded
loops. The modules under test are imported inside the tests that need their
new names, so that this file also runs (and fails where it should) against
the code from before these changes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    TextMessage,
)
from wsproto.events import Request as WsRequest

from relayd.agentkit import echo_handler
from relayd.users import UserStore
from tests.raw_http import RawClient, Response
from tests.support import ADMIN_KEY, Relayd, console_script, service_environment
from tests.test_ask_wire_e2e import (
    DEBUG,
    HEALTH,
    ask_request,
    get_request,
    open_connection,
    served,
    wait_for_inflight,
    wait_for_log,
)
from tests.test_relay_e2e import (
    client,
    connections,
    raw_handshake,
    start_agent,
    wait_for_agents,
)

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "packaging" / "install.sh"
UNINSTALL = ROOT / "packaging" / "uninstall.sh"
RUN_TIMEOUT = 30

# How relayd logs the end of an agent served through Hypercorn (an upgrade after
# another request on the connection): Hypercorn reports 1006 for every close it
# did not start, a polite close frame included, so the agent's code is unknown.
HYPERCORN_ENDED = "the agent's connection ended (Hypercorn's path does not say how)"


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment for the console script: nothing of the caller's relayd
    settings, a private HOME and state directory (nothing real is read or written)."""
    env = service_environment()
    for name in ("XDG_STATE_HOME", "STATE_DIRECTORY", "CREDENTIALS_DIRECTORY"):
        env.pop(name, None)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    env["RELAYD_STATE_DIR"] = str(tmp_path / "state")
    env["RELAYD_CONFIG"] = ""
    env["COLUMNS"] = "200"  # argparse wraps help at the terminal's width
    env.update(extra)
    return env


def run_relayd(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """The ``relayd`` console script beside this interpreter, run to its end."""
    return subprocess.run(
        [console_script(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(tmp_path) if env is None else env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )


async def wait_for_log_match(relayd: Relayd, pattern: str, count: int = 1) -> list[str]:
    """Poll the log (bounded by the caller's fail_after) until ``pattern`` matches
    ``count`` times; the matches."""
    while True:
        found = re.findall(pattern, relayd.log)
        if len(found) >= count:
            return found
        await trio.sleep(0.02)


# -- 1. the seed's command line: relayd PORT ADMIN_KEY [-listen HOST] ---------------------

SEED_FORMS = {
    "default-loopback": (["8091", "k"], "127.0.0.1:8091"),
    "-listen HOST": (["8091", "k", "-listen", "0.0.0.0"], "0.0.0.0:8091"),
    "-listen=HOST": (["8091", "k", "-listen=127.0.0.2"], "127.0.0.2:8091"),
    "--listen HOST": (["8091", "k", "--listen", "127.0.0.2"], "127.0.0.2:8091"),
    "--listen=HOST": (["8091", "k", "--listen=127.0.0.2"], "127.0.0.2:8091"),
    "-listen name": (["8091", "k", "-listen", "localhost"], "localhost:8091"),
    "-listen bare-ipv6": (["8091", "k", "-listen", "::1"], "[::1]:8091"),
    "-listen=bare-ipv6": (["8091", "k", "-listen=::1"], "[::1]:8091"),
    "-listen [ipv6]": (["8091", "k", "-listen", "[::1]"], "[::1]:8091"),
}


@pytest.mark.parametrize(("argv", "address"), SEED_FORMS.values(), ids=SEED_FORMS.keys())
def test_seed_form_is_parsed(argv: list[str], address: str) -> None:
    from relayd.cli import _seed_arguments

    args = _seed_arguments(argv)
    assert args is not None
    assert args.command == "serve"
    assert args.port == 8091
    assert args.admin_key == "k"
    assert args.listen == [address]


def test_not_the_seed_form_is_left_to_the_main_parser() -> None:
    from relayd.cli import _seed_arguments

    for argv in ([], ["serve"], ["--listen", "127.0.0.1:8091"], ["users", "list"]):
        assert _seed_arguments(argv) is None, argv


SEED_ERRORS = {
    # a host:port: the port belongs first, and the message says how to write it
    "host:port": (
        ["8091", "SEEDKEY", "-listen", "127.0.0.1:8093"],
        ["-listen takes a host", "relayd 8093 ADMIN_KEY -listen 127.0.0.1"],
    ),
    "host:port with =": (
        ["8091", "SEEDKEY", "-listen=127.0.0.1:8093"],
        ["-listen takes a host", "relayd 8093 ADMIN_KEY -listen 127.0.0.1"],
    ),
    "no value": (["8091", "SEEDKEY", "-listen"], ["argument -listen", "expected one argument"]),
    "[ipv6]:port": (["8091", "SEEDKEY", "-listen", "[::1]:80"], ["-listen takes a host"]),
    "empty host": (["8091", "SEEDKEY", "-listen="], ["-listen takes a host", "empty host"]),
}


@pytest.mark.parametrize(("argv", "fragments"), SEED_ERRORS.values(), ids=SEED_ERRORS.keys())
def test_seed_form_usage_errors_from_the_parser(
    argv: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from relayd.cli import _seed_arguments

    with pytest.raises(SystemExit) as info:
        _seed_arguments(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert "relayd PORT ADMIN_KEY [-listen HOST]" in err  # the usage line
    assert "SEEDKEY" not in err  # the admin key is never echoed


@pytest.mark.parametrize("host_port", ["127.0.0.1:8093", "0.0.0.0:8093", "localhost:8093", ":8093"])
def test_the_suggested_seed_command_is_itself_accepted(
    host_port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-listen HOST:PORT`` suggests ``relayd PORT ADMIN_KEY -listen HOST``; running the
    suggestion must not be another usage error (``:8093`` is Go's "all interfaces")."""
    from relayd.cli import _seed_arguments

    with pytest.raises(SystemExit):
        _seed_arguments(["8091", "k", "-listen", host_port])
    err = capsys.readouterr().err
    match = re.search(r"did you mean (relayd .*?)\?$", err, re.MULTILINE)
    assert match, err
    suggested = match[1].split()[1:]
    assert suggested[0] == "8093", err
    suggested[1] = "k"  # ADMIN_KEY
    try:
        args = _seed_arguments(suggested)
    except SystemExit:
        raise AssertionError(f"the suggestion {match[1]!r} is a usage error too") from None
    assert args is not None
    assert args.listen[0].endswith(":8093")


@pytest.mark.parametrize(("argv", "fragments"), SEED_ERRORS.values(), ids=SEED_ERRORS.keys())
def test_seed_form_usage_errors_exit_2(
    tmp_path: Path, argv: list[str], fragments: list[str]
) -> None:
    """Through the real console script: exit 2 before serving, a message on stderr."""
    result = run_relayd(tmp_path, *argv, timeout=20)
    assert result.returncode == 2, result
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "SEEDKEY" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()  # nothing started


# -- 2. an address already in use -------------------------------------------------------


def busy_socket() -> socket.socket:
    """A listening socket on 127.0.0.1 holding a port."""
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind((HOST, 0))
    busy.listen(1)
    return busy


def serve_env(tmp_path: Path) -> dict[str, str]:
    env = service_environment()
    env.update(
        RELAYD_STATE_DIR=str(tmp_path / "state"),
        RELAYD_ADMIN_KEY="x",
        RELAYD_CONFIG="",
        HOME=str(tmp_path),
    )
    return env


def test_an_address_in_use_exits_1_naming_it(tmp_path: Path) -> None:
    with busy_socket() as busy:
        port = busy.getsockname()[1]
        start = time.monotonic()
        result = run_relayd(
            tmp_path, "--listen", f"127.0.0.1:{port}", env=serve_env(tmp_path), timeout=20
        )
        elapsed = time.monotonic() - start
    assert result.returncode == 1, result
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 10


def test_an_address_in_use_in_the_seed_form_exits_1_naming_it(tmp_path: Path) -> None:
    with busy_socket() as busy:
        port = busy.getsockname()[1]
        result = run_relayd(
            tmp_path,
            str(port),
            "seed-admin-key-on-the-command-line",
            "-listen",
            "127.0.0.1",
            env=serve_env(tmp_path),
            timeout=20,
        )
    assert result.returncode == 1, result
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "seed-admin-key-on-the-command-line" not in result.stderr


def test_the_one_address_in_use_of_two_is_the_one_named(tmp_path: Path) -> None:
    with busy_socket() as busy, socket.socket() as probe:
        port = busy.getsockname()[1]
        probe.bind((HOST, 0))
        free = probe.getsockname()[1]
        probe.close()
        result = run_relayd(
            tmp_path,
            "--listen",
            f"127.0.0.1:{free}",
            "--listen",
            f"127.0.0.1:{port}",
            env=serve_env(tmp_path),
            timeout=20,
        )
    assert result.returncode == 1, result
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert f"cannot listen on 127.0.0.1:{free}" not in result.stderr


# -- 3. an agent path without an upgrade: 426 --------------------------------------------

AGENT_KEY = "agent-key-" + "7" * 24


@pytest.mark.parametrize("target", ["/client/register", f"/agent/{AGENT_KEY}/client/register"])
@pytest.mark.parametrize("first", [True, False], ids=["first-request", "after-health"])
async def test_an_agent_path_without_an_upgrade_is_426(
    relayd_factory: Callable[..., Relayd], target: str, first: bool
) -> None:
    relayd = relayd_factory(config=f'[agents]\nkeys = ["{AGENT_KEY}"]\n')
    with trio.fail_after(20):
        connection = await open_connection(relayd)
        if not first:
            await connection.send(HEALTH)
            assert (await connection.response()).status == 200
        await connection.send(get_request(target, b"Accept: text/html"))
        refused = await connection.response()
        # The connection is still good for other requests.
        await connection.send(HEALTH)
        health = await connection.response()
        await connection.aclose()
    assert refused.status_line == b"HTTP/1.1 426 Upgrade Required", refused
    error = refused.json()["error"]
    assert "WebSocket" in error
    assert refused.header(b"upgrade") is not None
    assert refused.header(b"upgrade").lower() == b"websocket"
    for name, value in refused.headers:
        assert AGENT_KEY.encode() not in name + value
    assert AGENT_KEY.encode() not in refused.body
    assert (health.status, health.body) == (200, b"OK")
    assert AGENT_KEY not in relayd.log
    assert relayd.process.poll() is None


async def test_a_browser_at_the_agent_path_gets_426_through_httpx(relayd: Relayd) -> None:
    with trio.fail_after(20):
        async with client(relayd) as http:
            response = await http.get("/client/register")
            health = await http.get("/health")
    assert response.status_code == 426
    assert response.reason_phrase == "Upgrade Required"
    assert "WebSocket" in response.json()["error"]
    assert health.status_code == 200


# -- raw WebSocket agents (wsproto over a plain socket) ------------------------------------


class RawAgent:
    """A foreign agent: wsproto's client over a plain TCP socket, so that a test
    decides every byte (close frames, fragments, vanishing)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: deque[Event] = deque()
        self.id = ""

    @classmethod
    async def connect(cls, relayd: Relayd, *, through_hypercorn: bool = False) -> RawAgent:
        """Upgrade (on a fresh connection, or after a GET /health on it, which
        leaves the upgrade to Hypercorn) and answer the greeting."""
        stream = await trio.open_tcp_stream(HOST, relayd.port)
        agent = cls(stream)
        if through_hypercorn:
            http = RawClient(stream)
            await http.send(HEALTH)
            health = await http.response()
            assert health.status == 200
            assert http.buffer == b""
        await agent.send(WsRequest(host="relay.example", target="/client/register"))
        accepted = await agent.event()
        assert isinstance(accepted, AcceptConnection), accepted
        greeting = json.loads(await agent.message())
        assert greeting["message"] == "Connection id"
        assert greeting["data"] == ""
        agent.id = greeting["id"]
        # The same JSON back, as the seed's agents do (in one masked text frame).
        await agent.send(TextMessage(data=json.dumps(greeting)))
        return agent

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def event(self) -> Event:
        while not self.pending:
            self.pending.extend(self.ws.events())
            if self.pending:
                break
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("relayd closed the connection")
            self.ws.receive_data(data)
        return self.pending.popleft()

    async def message(self) -> str:
        """The next text message (WebSocket pings answered on the way)."""
        parts = []
        while True:
            event = await self.event()
            if isinstance(event, Ping):
                await self.send(event.response())
            elif isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts)
            else:
                raise AssertionError(f"expected a text message, got {event!r}")

    async def close_frame(self) -> CloseConnection:
        """Read until relayd's close frame."""
        while True:
            event = await self.event()
            if isinstance(event, CloseConnection):
                return event

    async def vanish(self, *, reset: bool = False) -> None:
        """Close the socket without a close frame (with a TCP reset if ``reset``)."""
        if reset:
            self.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        await self.stream.aclose()

    @property
    def name(self) -> str:
        return f"agent-{self.id[:8]}"


def disconnected(agent_name: str) -> str:
    return f"agent disconnected: {agent_name} reason="


PATHS = {"wire": False, "hypercorn": True}


# -- 4. an agent gone without a close frame is 1006 ---------------------------------------


@pytest.mark.parametrize("through_hypercorn", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
async def test_an_agent_gone_without_a_close_frame_is_logged_1006(
    relayd: Relayd, through_hypercorn: bool, reset: bool
) -> None:
    with trio.fail_after(20):
        async with client(relayd) as http:
            agent = await RawAgent.connect(relayd, through_hypercorn=through_hypercorn)
            await wait_for_agents(http, relayd, ids={agent.id})
            await agent.vanish(reset=reset)
            await wait_for_log(relayd, disconnected(agent.name))
            await wait_for_agents(http, relayd, count=0)
            health = await http.get("/health")
    (line,) = [line for line in relayd.log.splitlines() if disconnected(agent.name) in line]
    if through_hypercorn:
        assert f"agent disconnected: {agent.name} reason={HYPERCORN_ENDED} code=1006" in line
    else:
        assert (
            f"agent disconnected: {agent.name} reason=agent went away without a close frame "
            "code=1006" in line
        ), line
    assert "agent closed the connection" not in relayd.log
    assert health.status_code == 200


@pytest.mark.parametrize("through_hypercorn", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("code", [1000, 1001])
async def test_an_agent_that_closes_politely_is_logged_with_its_code(
    relayd: Relayd, through_hypercorn: bool, code: int
) -> None:
    with trio.fail_after(20):
        async with client(relayd) as http:
            agent = await RawAgent.connect(relayd, through_hypercorn=through_hypercorn)
            await wait_for_agents(http, relayd, ids={agent.id})
            await agent.send(CloseConnection(code=code, reason="bye"))
            echoed = await agent.close_frame()
            await agent.stream.aclose()
            await wait_for_log(relayd, disconnected(agent.name))
            await wait_for_agents(http, relayd, count=0)
    (line,) = [line for line in relayd.log.splitlines() if disconnected(agent.name) in line]
    if through_hypercorn:  # Hypercorn reports 1006 for every close it did not start
        assert f"agent disconnected: {agent.name} reason={HYPERCORN_ENDED} code=1006" in line
    else:
        assert (
            f"agent disconnected: {agent.name} reason=agent closed the connection code={code} "
            in line
        ), line
    assert "without a close frame" not in relayd.log
    assert echoed.code == code  # the closing handshake completed


# -- 5. a reason phrase in every status line ----------------------------------------------

POST_HEALTH = b"POST /health HTTP/1.1\r\nHost: relay.example\r\nContent-Length: 0\r\n\r\n"
BIG_DECLARED = (
    b"POST /admin/users/add HTTP/1.1\r\nHost: relay.example\r\n"
    b"Authorization: " + ADMIN_KEY.encode() + b"\r\nContent-Length: 5000000\r\n\r\n"
)

STATUS_LINES = {
    "health": (HEALTH, b"HTTP/1.1 200 OK"),
    "index": (get_request("/"), b"HTTP/1.1 200 OK"),
    "no-route": (get_request("/nope"), b"HTTP/1.1 404 Not Found"),
    "no-key": (get_request("/admin/users"), b"HTTP/1.1 401 Unauthorized"),
    "wrong-method": (POST_HEALTH, b"HTTP/1.1 405 Method Not Allowed"),
    "agent-path": (get_request("/client/register"), b"HTTP/1.1 426 Upgrade Required"),
    "too-large": (BIG_DECLARED, b"HTTP/1.1 413 " + HTTPStatus(413).phrase.encode()),
}


@pytest.mark.parametrize(("request_", "status_line"), STATUS_LINES.values(), ids=STATUS_LINES)
async def test_status_lines_carry_the_reason_phrase(
    relayd: Relayd, request_: bytes, status_line: bytes
) -> None:
    with trio.fail_after(20):
        connection = await open_connection(relayd)
        await connection.send(request_)
        response = await connection.response()
        await connection.aclose()
    assert response.status_line == status_line, response


async def response_head(connection: RawClient) -> bytes:
    """The next response's head, whatever follows it (a 1xx or a 101 has no
    Content-Length)."""
    while b"\r\n\r\n" not in connection.buffer:
        data = await connection.stream.receive_some(65536)
        assert data, connection.buffer
        connection.buffer += data
    head, connection.buffer = connection.buffer.split(b"\r\n\r\n", 1)
    return head


def upgrade_request(target: str) -> bytes:
    return WSConnection(ConnectionType.CLIENT).send(WsRequest(host="relay.example", target=target))


@pytest.mark.parametrize("through_hypercorn", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize(
    ("target", "status_line"),
    [
        ("/client/register", b"HTTP/1.1 101 Switching Protocols"),
        ("/client/register?key=wrong", b"HTTP/1.1 403 Forbidden"),
    ],
    ids=["accepted", "refused"],
)
async def test_agent_upgrades_carry_the_reason_phrase(
    relayd_factory: Callable[..., Relayd], through_hypercorn: bool, target: str, status_line: bytes
) -> None:
    relayd = relayd_factory(config=f'[agents]\nkeys = ["{AGENT_KEY}"]\n')
    with trio.fail_after(20):
        connection = await open_connection(relayd)
        if through_hypercorn:
            await connection.send(HEALTH)
            assert (await connection.response()).status == 200
        await connection.send(upgrade_request(target))
        head = await response_head(connection)
        await connection.aclose()
    assert head.split(b"\r\n")[0] == status_line, head


async def test_a_malformed_request_gets_a_reason_phrase(relayd: Relayd) -> None:
    """Hypercorn's own error responses (h11's 400) are reasoned too."""
    with trio.fail_after(20):
        connection = await open_connection(relayd)
        await connection.send(b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        data = await connection.rest()
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data


async def test_100_continue_carries_its_reason_phrase(relayd: Relayd) -> None:
    body = b'{"name": "continued"}'
    head = (
        b"POST /admin/users/add HTTP/1.1\r\nHost: relay.example\r\n"
        b"Authorization: " + ADMIN_KEY.encode() + b"\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with trio.fail_after(20):
        connection = await open_connection(relayd)
        await connection.send(head)
        interim = await response_head(connection)
        await connection.send(body)
        added = await connection.response()
        await connection.aclose()
    assert interim.split(b"\r\n")[0] == b"HTTP/1.1 100 Continue", interim
    assert added.status_line == b"HTTP/1.1 200 OK"


async def test_ask_has_reason_phrases_on_both_paths(relayd_factory: Callable[..., Relayd]) -> None:
    relayd = relayd_factory(args=DEBUG)
    request = ask_request(relayd, {"content": "anyone there?"})
    unauthorized = ask_request(relayd, {"content": "hi"}, authorization="not-a-token")
    with trio.fail_after(20):
        wire = await open_connection(relayd)
        await wire.send(request + unauthorized)
        on_wire = [await wire.response(), await wire.response()]
        hypercorn = await open_connection(relayd)
        await hypercorn.send(HEALTH + request + unauthorized)
        health = await hypercorn.response()
        through_hypercorn = [await hypercorn.response(), await hypercorn.response()]
        await wire.aclose()
        await hypercorn.aclose()
    assert served(relayd, wire) == (True, False)
    assert served(relayd, hypercorn) == (False, False)
    assert health.status_line == b"HTTP/1.1 200 OK"
    for responses in (on_wire, through_hypercorn):
        no_agent, refused = responses
        assert no_agent.status_line == b"HTTP/1.1 503 Service Unavailable", no_agent
        assert refused.status_line == b"HTTP/1.1 401 Unauthorized", refused


# -- 6. admin POST routes: a wrong header credential is 401 before the body ---------------


async def admin_post(
    http: httpx.AsyncClient, path: str, body: bytes, authorization: str | None
) -> httpx.Response:
    headers = {} if authorization is None else {"Authorization": authorization}
    return await http.post(path, content=body, headers=headers)


@pytest.mark.parametrize("path", ["/admin/users/add", "/admin/users/delete"])
@pytest.mark.parametrize("authorization", ["wrong-key", "Bearer wrong-key"])
async def test_a_wrong_header_with_an_empty_body_is_401(
    relayd: Relayd, path: str, authorization: str
) -> None:
    with trio.fail_after(20):
        async with client(relayd) as http:
            response = await admin_post(http, path, b"", authorization)
    assert response.status_code == 401, response.text
    assert response.json()["error"]
    assert "empty" not in response.json()["error"]


@pytest.mark.parametrize("path", ["/admin/users/add", "/admin/users/delete"])
async def test_a_wrong_query_key_with_an_empty_body_is_401(relayd: Relayd, path: str) -> None:
    with trio.fail_after(20):
        async with client(relayd) as http:
            response = await http.post(path + "?admin_key=wrong-key", content=b"")
    assert response.status_code == 401, response.text


async def test_the_header_is_checked_before_the_body_key(relayd: Relayd) -> None:
    right = json.dumps({"admin_key": relayd.admin_key, "name": "sneaky"}).encode()
    # A connection per request: whether a connection survives an early 401 is
    # test_after_an_early_401_the_connection_is_reusable_or_says_close's business.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relayd.url, timeout=30, limits=no_reuse) as http:
            added = await admin_post(http, "/admin/users/add", right, "wrong-key")
            users = await http.get("/admin/users", headers={"Authorization": relayd.admin_key})
            created = await admin_post(
                http,
                "/admin/users/add",
                json.dumps({"admin_key": relayd.admin_key, "name": "alice"}).encode(),
                None,
            )
            user_id = created.json()["user_id"]
            delete_body = json.dumps({"admin_key": relayd.admin_key, "user_id": user_id}).encode()
            refused = await admin_post(http, "/admin/users/delete", delete_body, "wrong-key")
            deleted = await admin_post(http, "/admin/users/delete", delete_body, None)
    assert added.status_code == 401, added.text
    assert users.json()["users"] == []  # nothing was added
    assert created.status_code == 200, created.text
    assert created.json()["name"] == "alice"
    assert refused.status_code == 401, refused.text
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"message": "User deleted"}


@pytest.mark.parametrize("path", ["/admin/users/add", "/admin/users/delete", "/api/ask"])
async def test_after_an_early_401_the_connection_is_reusable_or_says_close(
    relayd: Relayd, path: str
) -> None:
    """A 401 sent before the body came: the body then arrives, and the client reuses
    the connection (as httpx or a requests Session do) unless the 401 said
    ``Connection: close``. Either the next request is answered, or the client was told.

    /api/ask (here on the wire path) answers at once and drops the body that follows
    within DISCARD_WAIT; the admin routes now answer at once too (the header is checked
    before the body is read), so the same is expected of them."""
    body = json.dumps({"content": "hello", "name": "x", "user_id": "u"}).encode()
    head = (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: relay.example\r\n"
        b"Authorization: wrong-key\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with trio.fail_after(20):
        connection = await open_connection(relayd)
        await connection.send(head)
        with trio.fail_after(5):  # at once, not after a body timeout
            refused = await connection.response()
        # Within a second relayd has either closed the connection or kept it for the body.
        kept = await connection.silent_for(1.0)
        after: Response | None = None
        if kept:
            await connection.send(body + HEALTH)
            after = await connection.response()
        await connection.aclose()
    assert refused.status == 401, refused
    if not kept:
        assert refused.header(b"connection") == b"close", (
            f"relayd closed the connection after a 401 that did not say so: {refused.headers}"
        )
    else:
        assert after is not None
        assert (after.status, after.body) == (200, b"OK")


async def test_a_wrong_header_is_401_without_waiting_for_the_body(
    relayd_factory: Callable[..., Relayd],
) -> None:
    """The body never comes; the answer does not wait for it (body_timeout is long)."""
    relayd = relayd_factory(config='[server]\nbody_timeout = "60s"\nidle_timeout = "60s"\n')
    head = (
        b"POST /admin/users/add HTTP/1.1\r\nHost: relay.example\r\n"
        b"Authorization: wrong-key\r\nContent-Length: 100\r\n\r\n"
    )
    with trio.fail_after(20):
        connection = await open_connection(relayd)
        await connection.send(HEALTH)
        await connection.response()
        await connection.send(head)
        with trio.fail_after(5):
            refused = await connection.response()
        await connection.aclose()
    assert refused.status_line == b"HTTP/1.1 401 Unauthorized", refused


# -- 7. a body over server.max_body from a client that writes it all first ----------------


def urlopen(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes] | OSError:
    """``urllib.request.urlopen`` of a POST: ``(status, body)`` or the OSError it raised."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()
    except urllib.error.URLError as error:
        if isinstance(error.reason, OSError):
            return error.reason
        raise
    except OSError as error:
        return error


@pytest.mark.parametrize("path", ["/api/ask", "/admin/users/add"])
@pytest.mark.parametrize("mib", [3, 10])
async def test_urllib_sees_the_413_of_a_large_body(relayd: Relayd, path: str, mib: int) -> None:
    """3 MiB may fit the socket buffers of loopback (the old code's reset then raced
    the 413); 10 MiB does not, but is within the lingering read's 16 MiB."""
    body = json.dumps({"content": "x" * (mib * 1024 * 1024), "name": "big"}).encode()
    headers = {"Authorization": relayd.admin_key, "Content-Type": "application/json"}
    with trio.fail_after(30):
        outcome = await trio.to_thread.run_sync(urlopen, relayd.url + path, body, headers)
        async with client(relayd) as http:
            health = await http.get("/health")
    assert isinstance(outcome, tuple), f"urllib got {outcome!r}, not the 413"
    status, answer = outcome
    assert status == 413
    error = json.loads(answer)["error"]
    assert "server.max_body" in error
    assert "1048576" in error
    assert health.status_code == 200
    assert relayd.process.poll() is None


@pytest.mark.parametrize("path", ["/api/ask", "/admin/users/add"])
@pytest.mark.parametrize("max_body", ["1MiB", "32MiB"], ids=["over-max_body", "within-max_body"])
async def test_urllib_sees_the_401_of_a_wrong_key_with_a_10_mib_body(
    relayd_factory: Callable[..., Relayd], path: str, max_body: str
) -> None:
    """The credentials are refused before the body is read; the client still gets
    the answer, not a reset. (Within server.max_body, /api/ask is on the wire path,
    where urllib's ``Connection: close`` makes the refusal close the connection.)"""
    relayd = relayd_factory(config=f'[server]\nmax_body = "{max_body}"\n')
    body = json.dumps({"content": "x" * (10 * 1024 * 1024)}).encode()
    with trio.fail_after(30):
        outcome = await trio.to_thread.run_sync(
            urlopen, relayd.url + path, body, {"Authorization": "wrong-key"}
        )
    assert isinstance(outcome, tuple), f"urllib got {outcome!r}, not the 401"
    assert outcome[0] == 401
    assert json.loads(outcome[1])["error"]


async def test_a_10_mib_body_after_another_request_sees_the_413(relayd: Relayd) -> None:
    """The same on a keep-alive connection (http.client, which also writes the whole
    body before reading)."""
    import http.client

    body = b"x" * (10 * 1024 * 1024)

    def post_after_health() -> tuple[int, int, bytes] | OSError:
        connection = http.client.HTTPConnection(HOST, relayd.port, timeout=30)
        try:
            connection.request("GET", "/health")
            first = connection.getresponse()
            first.read()
            connection.request(
                "POST", "/api/ask", body=body, headers={"Authorization": relayd.admin_key}
            )
            second = connection.getresponse()
            return first.status, second.status, second.read()
        except OSError as error:
            return error
        finally:
            connection.close()

    with trio.fail_after(30):
        outcome = await trio.to_thread.run_sync(post_after_health)
    assert isinstance(outcome, tuple), f"http.client got {outcome!r}, not the 413"
    assert outcome[:2] == (200, 413)
    assert "server.max_body" in json.loads(outcome[2])["error"]


async def test_the_lingering_close_after_a_413_is_bounded_in_time(relayd: Relayd) -> None:
    """A client that goes on sending after its 413 is cut off within about 2 s."""
    head = BIG_DECLARED.replace(b"5000000", b"100000000")
    chunk = b"x" * 65536
    with trio.fail_after(20):
        connection = await open_connection(relayd)
        await connection.send(head + chunk)
        refused = await connection.response()
        answered = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):
            while trio.current_time() - answered < 10:
                await connection.send(chunk)
                await trio.sleep(0.05)
        cut_off = trio.current_time() - answered
        await connection.aclose()
        async with client(relayd) as http:
            health = await http.get("/health")
    assert refused.status == 413, refused
    assert "server.max_body" in refused.json()["error"]
    assert cut_off < 6, cut_off
    assert health.status_code == 200


@pytest.mark.parametrize("path", ["/api/ask", "/admin/users/add"])
async def test_a_20_mib_body_is_413_or_reset_and_relayd_serves_on(
    relayd: Relayd, path: str
) -> None:
    body = b"x" * (20 * 1024 * 1024)
    headers = {"Authorization": relayd.admin_key}
    with trio.fail_after(30):
        start = trio.current_time()
        outcome = await trio.to_thread.run_sync(urlopen, relayd.url + path, body, headers)
        elapsed = trio.current_time() - start
        async with client(relayd) as http:
            health = await http.get("/health")
            again = await http.post("/api/ask", content=b'{"content": "hi"}', headers=headers)
    if isinstance(outcome, tuple):
        assert outcome[0] == 413
        assert "server.max_body" in json.loads(outcome[1])["error"]
    else:
        assert isinstance(outcome, ConnectionResetError | BrokenPipeError), outcome
    assert elapsed < 15  # the lingering read is bounded (16 MiB, 2 s)
    assert health.status_code == 200
    assert again.status_code == 503  # no agent: served as usual
    assert relayd.process.poll() is None


# -- 8. log grammar: 1 user, 2 users --------------------------------------------------------


def add_users(state_dir: Path, count: int) -> None:
    state_dir.mkdir(mode=0o700, exist_ok=True)
    store = UserStore(state_dir)
    for index in range(count):
        store.add(f"user{index}")


def keys_config(count: int) -> str:
    keys = ", ".join(f'"agent-key-{index}-{"k" * 20}"' for index in range(count))
    return f"[agents]\nkeys = [{keys}]\n"


def config_path_of(relayd: Relayd) -> Path:
    args = list(relayd.process.args)  # type: ignore[arg-type]
    return Path(args[args.index("--config") + 1])


def counted(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


@pytest.mark.parametrize("count", [0, 1, 2])
async def test_start_up_and_reload_lines_count_in_good_english(
    tmp_path: Path, relayd_factory: Callable[..., Relayd], count: int
) -> None:
    add_users(tmp_path / "state", count)
    relayd = relayd_factory(config=keys_config(count))
    log = relayd.log
    users, keys = counted(count, "user"), counted(count, "agent key")
    assert re.search(rf"state directory \S+: {users}$", log, re.MULTILINE), log
    assert re.search(rf"starting: .*; {keys}; ", log), log
    with trio.fail_after(20):
        relayd.signal(signal.SIGHUP)
        (line,) = await wait_for_log_match(relayd, r"reloaded [^\n]*")
    assert line.endswith(f": {users}, {keys}"), line
    # One more of each, and reload again: the counts follow.
    add_users(tmp_path / "state", 1)
    config_path_of(relayd).write_text(keys_config(count + 1))
    with trio.fail_after(20):
        relayd.signal(signal.SIGHUP)
        lines = await wait_for_log_match(relayd, r"reloaded [^\n]*", count=2)
    more_users, more_keys = counted(count + 1, "user"), counted(count + 1, "agent key")
    assert lines[1].endswith(f": {more_users}, {more_keys}"), lines
    assert "1 users" not in relayd.log
    assert "1 agent keys" not in relayd.log


async def test_log_level_from_the_command_line_survives_a_reload(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config='[server]\nlog_level = "warning"\n', args=DEBUG)
    assert "log level debug" in relayd.log
    with trio.fail_after(20):
        relayd.signal(signal.SIGHUP)
        await wait_for_log(relayd, "reloaded ")
        connection = await open_connection(relayd)
        await connection.send(ask_request(relayd, {"content": "after reload"}))
        await connection.response()
        await connection.aclose()
        # A debug line after the reload: --log-level debug beats server.log_level.
        await wait_for_log(relayd, f"connection served on the wire path: remote={connection.local}")


# -- 9. the install scripts print the paths they wrote under DESTDIR ---------------------


def fake_venv(venv: Path) -> None:
    """What install.sh takes for an existing venv (so it creates none), and uninstall.sh
    recognises as one (so it removes it)."""
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "pyvenv.cfg").write_text(f"home = {Path(sys.executable).parent}\n")


def run_script(script: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        ["bash", str(script), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_install_and_uninstall_print_the_paths_under_destdir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config_src = tmp_path / "relayd.toml"
    config_src.write_text("# relayd\n")
    fake_venv(root / "opt/relayd")
    env = {
        "DESTDIR": str(root),
        "RELAYD_CONFIG_SRC": str(config_src),
        "RELAYD_PYTHON": sys.executable,
        "RELAYD_SKIP_PIP": "1",
    }
    config = root / "etc/relayd/relayd.toml"

    out = run_script(INSTALL, env)
    assert f"config   installed {config}\n" in out, out
    assert config.read_text() == "# relayd\n"
    assert f"venv     {root}/opt/relayd\n" in out
    assert f"units    {root}/etc/systemd/system/relayd.service" in out
    assert (root / "etc/systemd/system/relayd.service").exists()

    out = run_script(INSTALL, env)
    assert f"config   {config} unchanged\n" in out, out

    config.write_text("# relayd, edited by the admin\n")
    config_src.write_text("# relayd, a new default\n")
    out = run_script(INSTALL, env)
    dist = Path(f"{config}.dist")
    assert (
        f"kept your edited {config}; the new default is {dist} "
        f"(compare with: diff -u {config} {dist})" in out
    ), out
    assert dist.read_text() == "# relayd, a new default\n"
    assert config.read_text() == "# relayd, edited by the admin\n"

    out = run_script(UNINSTALL, env)
    assert (
        f"relayd removed; kept {root}/etc/relayd and {root}/var/lib/relayd "
        "(use --purge to delete them)" in out
    ), out
    assert config.exists()
    assert not (root / "opt/relayd").exists()

    out = run_script(UNINSTALL, env, "--purge")
    assert f"including {root}/etc/relayd and {root}/var/lib/relayd (--purge)" in out, out
    assert not (root / "etc/relayd").exists()


def test_install_with_custom_directories_prints_them_under_destdir(tmp_path: Path) -> None:
    """The config line names the file as written: DESTDIR plus RELAYD_CONFDIR."""
    root = tmp_path / "root"
    config_src = tmp_path / "relayd.toml"
    config_src.write_text("# relayd\n")
    fake_venv(root / "srv/venv")
    env = {
        "DESTDIR": str(root),
        "RELAYD_CONFIG_SRC": str(config_src),
        "RELAYD_PYTHON": sys.executable,
        "RELAYD_SKIP_PIP": "1",
        "RELAYD_CONFDIR": "/srv/etc",
        "RELAYD_PREFIX": "/srv/venv",
    }
    out = run_script(INSTALL, env)
    assert f"config   installed {root}/srv/etc/relayd.toml\n" in out, out
    assert (root / "srv/etc/relayd.toml").exists()
    out = run_script(UNINSTALL, {**env, "RELAYD_STATEDIR": "/srv/state"})
    assert f"kept {root}/srv/etc and {root}/srv/state" in out, out


# -- 10. --help --------------------------------------------------------------------------


def test_help_shows_the_seed_form(tmp_path: Path) -> None:
    result = run_relayd(tmp_path, "--help")
    assert result.returncode == 0, result
    assert "relayd PORT ADMIN_KEY [-listen HOST]" in result.stdout, result.stdout


def test_serve_help_shows_the_resolved_state_dir_and_log_level(tmp_path: Path) -> None:
    some_dir = tmp_path / "some" / "dir"
    result = run_relayd(
        tmp_path, "serve", "--help", env=cli_env(tmp_path, RELAYD_STATE_DIR=str(some_dir))
    )
    assert result.returncode == 0, result
    assert "--state-dir" in result.stdout
    assert str(some_dir) in result.stdout, result.stdout
    assert "--log-level" in result.stdout
    for level in ("debug", "info", "warning", "error", "critical"):
        assert level in result.stdout
    assert not some_dir.exists()  # --help creates nothing


def test_serve_help_shows_the_default_under_home(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    env.pop("RELAYD_STATE_DIR")
    result = run_relayd(tmp_path, "serve", "--help", env=env)
    assert result.returncode == 0, result
    assert f"{tmp_path}/home/.local/state/relayd" in result.stdout, result.stdout


def test_a_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    result = run_relayd(tmp_path, "serve", "--log-level", "loud", timeout=20)
    assert result.returncode == 2, result
    assert "relayd serve: error: argument --log-level" in result.stderr, result.stderr


@pytest.mark.parametrize("command", [["serve"], ["users"], ["users", "add"], ["check-config"]])
def test_a_command_help_names_the_command_in_its_usage(tmp_path: Path, command: list[str]) -> None:
    """The top-level usage (which shows the seed form) is not the commands' program name."""
    result = run_relayd(tmp_path, *command, "--help")
    assert result.returncode == 0, result
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"usage: relayd {' '.join(command)} [-h]"), result.stdout
    assert "ChatGPT-API-server" not in result.stdout.split("\n\n")[0]


def test_serve_help_follows_the_config_given_with_it(tmp_path: Path) -> None:
    """``relayd serve --config FILE --help``: the default shown is the one FILE makes."""
    config = tmp_path / "relayd.toml"
    state = tmp_path / "from-the-config"
    config.write_text(f'[server]\nstate_dir = "{state}"\n')
    env = cli_env(tmp_path)
    env.pop("RELAYD_STATE_DIR")
    through_env = run_relayd(tmp_path, "serve", "--help", env={**env, "RELAYD_CONFIG": str(config)})
    assert str(state) in through_env.stdout, through_env.stdout
    on_command_line = run_relayd(tmp_path, "serve", "--config", str(config), "--help", env=env)
    assert on_command_line.returncode == 0, on_command_line
    assert str(state) in on_command_line.stdout, on_command_line.stdout


# -- 11. root on a system install shares the service's state directory --------------------


def test_state_dir_for_root_on_a_system_install() -> None:
    from relayd.config import parse_config
    from relayd.locate import find_state_dir

    defaults = parse_config({})
    service = Path("/var/lib/relayd")
    home = {"HOME": "/home/someone"}
    xdg = {**home, "XDG_STATE_HOME": "/home/someone/.xdg"}
    assert find_state_dir(None, defaults, home, system_install=True) == service
    assert find_state_dir(None, defaults, xdg, system_install=True) == service
    # Not a system install: as before.
    assert find_state_dir(None, defaults, home, system_install=False) == Path(
        "/home/someone/.local/state/relayd"
    )
    assert find_state_dir(None, defaults, xdg) == Path("/home/someone/.xdg/relayd")
    # Anything that says otherwise wins.
    assert find_state_dir(Path("/cli"), defaults, home, system_install=True) == Path("/cli")
    assert find_state_dir(
        None, defaults, {**home, "RELAYD_STATE_DIR": "/env"}, system_install=True
    ) == Path("/env")
    configured = parse_config({"server": {"state_dir": "/configured"}})
    assert find_state_dir(None, configured, home, system_install=True) == Path("/configured")
    assert find_state_dir(
        None, defaults, {**home, "STATE_DIRECTORY": "/run/one:/run/two"}, system_install=True
    ) == Path("/run/one")


def test_is_system_install() -> None:
    from relayd.locate import is_system_install

    assert is_system_install(Path("/etc/relayd/relayd.toml"), 0) is True
    assert is_system_install(Path("/etc/relayd/relayd.toml"), 1000) is False
    assert is_system_install(Path("/srv/relayd/relayd.toml"), 0) is False
    assert is_system_install(Path("relayd.toml"), 0) is False
    assert is_system_install(None, 0) is False


# -- 12. a request whose frame would be over agents.max_message ---------------------------

# Within requests.max_content (256 KiB) and, as JSON, server.max_body (1 MiB); but each NUL
# is \u0000 in the request's JSON, and \\u0000 in the agent's frame: over 1 MiB.
NULS = "\u0000" * 160_000


@pytest.mark.parametrize("through_hypercorn", PATHS.values(), ids=PATHS.keys())
async def test_a_request_too_large_for_the_agents_frame_is_413(
    relayd_factory: Callable[..., Relayd], through_hypercorn: bool
) -> None:
    relayd = relayd_factory(args=DEBUG)
    too_large = ask_request(relayd, {"content": NULS})
    assert len(too_large) < 1024 * 1024
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_agent(nursery, relayd.agent_url, echo_handler())
            await wait_for_agents(http, relayd, ids={agent.id})
            connection = await open_connection(relayd)
            if through_hypercorn:
                await connection.send(HEALTH)
                await connection.response()
            await connection.send(too_large)
            refused = await connection.response()
            await wait_for_inflight(http, relayd, [0])
            sent_before = agent.stats.contents[:]
            # The agent is still there, and answers the next question.
            await connection.send(ask_request(relayd, {"content": "next"}))
            answered = await connection.response()
            listing = await connections(http, relayd)
            log = relayd.log  # before the agent is cancelled (and goes away)
            await connection.aclose()
            nursery.cancel_scope.cancel()
    assert served(relayd, connection)[0] is not through_hypercorn
    assert refused.status == 413, refused
    assert "agents.max_message" in refused.json()["error"]
    assert sent_before == []  # nothing reached the agent
    assert answered.status == 200, answered
    assert answered.json()["content"] == "echo:next"
    assert agent.stats.contents == ["next"]
    assert [entry["Id"] for entry in listing] == [agent.id]
    assert [entry["inflight"] for entry in listing] == [0]
    assert "agent disconnected" not in log


async def test_a_request_of_nuls_under_the_frame_limit_is_relayed(relayd: Relayd) -> None:
    """The check is on the encoded frame, not a guess: 100,000 NULs (~700 KB) pass."""
    content = "\u0000" * 100_000
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_agent(nursery, relayd.agent_url, echo_handler())
            await wait_for_agents(http, relayd, ids={agent.id})
            response = await http.post(
                "/api/ask",
                content=json.dumps({"content": content}).encode(),
                headers={"Authorization": relayd.admin_key},
            )
            nursery.cancel_scope.cancel()
    assert response.status_code == 200, response.text[:200]
    assert agent.stats.contents == [content]


# -- 13. an agent that sends more than agents.max_message -----------------------------------

SMALL_FRAMES = '[agents]\nmax_message = "1KiB"\n'


def assert_closed_for_a_bad_frame(relayd: Relayd, name: str) -> None:
    log = relayd.log
    assert f"agent sent a bad frame, closing: {name}: message too big" in log, log
    (line,) = [line for line in log.splitlines() if disconnected(name) in line]
    assert "code=1009" in line, line
    assert f"{disconnected(name)}closed by relayd: message too big code=1009" in line, line
    assert "agent closed the connection" not in log


async def test_an_oversized_message_closes_the_agent_with_1009(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config=SMALL_FRAMES)
    with trio.fail_after(20):
        async with client(relayd) as http:
            async with open_websocket_url(relayd.agent_url) as ws:
                agent_id = await raw_handshake(ws)
                await wait_for_agents(http, relayd, ids={agent_id})
                await ws.send_message(
                    json.dumps({"id": "p", "message": "pong", "data": "x" * 2048})
                )
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await ws.get_message()
            name = f"agent-{agent_id[:8]}"
            await wait_for_log(relayd, disconnected(name))
            await wait_for_agents(http, relayd, count=0)
    assert info.value.reason.code == 1009
    assert_closed_for_a_bad_frame(relayd, name)


@pytest.mark.parametrize("through_hypercorn", PATHS.values(), ids=PATHS.keys())
async def test_an_oversized_fragmented_message_closes_the_agent_with_1009(
    relayd_factory: Callable[..., Relayd], through_hypercorn: bool
) -> None:
    relayd = relayd_factory(config=SMALL_FRAMES)
    with trio.fail_after(20):
        async with client(relayd) as http:
            agent = await RawAgent.connect(relayd, through_hypercorn=through_hypercorn)
            await wait_for_agents(http, relayd, ids={agent.id})
            for _ in range(3):  # 3 x 512 characters: over 1 KiB only as a whole
                await agent.send(TextMessage(data="x" * 512, message_finished=False))
            await agent.send(TextMessage(data="}", message_finished=True))
            closed = await agent.close_frame()
            await agent.stream.aclose()
            await wait_for_log(relayd, disconnected(agent.name))
            await wait_for_agents(http, relayd, count=0)
    assert closed.code == 1009
    if through_hypercorn:  # Hypercorn closed it and does not tell relayd why
        assert f"agent disconnected: {agent.name} reason={HYPERCORN_ENDED}" in relayd.log
    else:
        assert_closed_for_a_bad_frame(relayd, agent.name)
