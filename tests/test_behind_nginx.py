"""relayd behind a real nginx (Debian's package) on loopback.

An agent connects through nginx, a client asks through nginx (whole and
streamed), and relayd sees the client's address from X-Forwarded-For: the
throttle locks the client, not nginx. Clients connect to nginx from other
loopback addresses (127.0.0.2, 127.0.0.3), so the client and the proxy have
different addresses, as on the internet. .ci/run installs nginx; without it
these tests fail, they never skip.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from relayd.agentkit import V2Agent, echo_stream_handler
from tests.raw_http import RawClient
from tests.support import Relayd

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""

CONFIG = """
[server]
trusted_proxies = ["127.0.0.1"]
[auth]
failure_burst = 2
failure_interval = "60s"
prefix_failure_burst = 1000
[agents]
allow_loopback_without_key = false
keys = ["agent-key-behind-nginx"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[int], int]]:
    """``start(upstream_port)`` runs nginx in front of it; returns nginx's port."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(binary).exists(), "nginx is not installed: apt-get install nginx-light"
    processes: list[subprocess.Popen[bytes]] = []

    def start(upstream: int) -> int:
        port = free_port()
        directory = tmp_path / "nginx"
        directory.mkdir()
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=directory, port=port, upstream=upstream))
        process = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(directory)], stderr=subprocess.PIPE
        )
        processes.append(process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                time.sleep(0.05)
        raise AssertionError("nginx did not start listening")

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


async def connect_from(address: str, port: int) -> RawClient:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=address)
    return RawClient(stream)


def ask_bytes(token: str, body: dict[str, object]) -> bytes:
    raw = json.dumps(body).encode()
    return (
        b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\nAuthorization: "
        + token.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(raw)
        + raw
    )


async def read_stream(client: RawClient) -> bytes:
    """A chunked response's whole body (nginx passes relayd's stream on chunked)."""
    while b"\r\n\r\n" not in client.buffer:
        await client._fill()
    head, client.buffer = client.buffer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"text/event-stream" in head
    body = b""
    while True:
        while b"\r\n" not in client.buffer:
            await client._fill()
        size_line, client.buffer = client.buffer.split(b"\r\n", 1)
        size = int(size_line, 16)
        data = await client.read_exactly(size + 2)
        if size == 0:
            return body
        body += data[:-2]


@pytest.mark.slow
async def test_an_agent_and_clients_through_nginx_and_the_throttle_sees_the_client(
    relayd_factory: Callable[..., Relayd], nginx: Callable[[int], int]
) -> None:
    relayd = relayd_factory(config=CONFIG)
    port = nginx(relayd.port)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agent = V2Agent(
                f"ws://127.0.0.1:{port}/client/register",
                echo_stream_handler(),
                headers=[(b"authorization", b"Bearer agent-key-behind-nginx")],
            )
            agent_id = await nursery.start(agent.run)
            assert agent_id
            # A whole answer and a streamed one, through nginx.
            client = await connect_from("127.0.0.2", port)
            await client.send(ask_bytes(relayd.admin_key, {"content": "hello nginx"}))
            response = await client.response()
            assert response.status == 200, response.body
            assert response.json()["content"] == "echo:hello nginx"
            await client.send(
                ask_bytes(relayd.admin_key, {"content": "streamed through", "stream": True})
            )
            body = await read_stream(client)
            assert b"event: delta" in body and b"event: done" in body
            assert b"echo:streamed through" in body
            await client.aclose()
            # A client that keeps failing from 127.0.0.3 is locked out...
            statuses = []
            for _ in range(4):
                bad = await connect_from("127.0.0.3", port)
                await bad.send(ask_bytes("wrong-token", {"content": "x"}))
                statuses.append((await bad.response()).status)
                await bad.aclose()
            assert statuses == [401, 401, 429, 429], statuses
            # ...and nobody else is: 127.0.0.2 behind the same nginx still gets in
            # with the admin key (which a locked address could not use).
            other = await connect_from("127.0.0.2", port)
            await other.send(ask_bytes(relayd.admin_key, {"content": "still fine"}))
            assert (await other.response()).status == 200
            await other.aclose()
            nursery.cancel_scope.cancel()
    log = relayd.log
    assert "remote=127.0.0.3" in log, log
    assert "authentication failed: invalid token remote=127.0.0.1 " not in log
    # The agent's own address, as relayd sees it behind nginx, is nginx's client's.
    assert "agent connected: agent-" in log


@pytest.mark.slow
async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(
    relayd_factory: Callable[..., Relayd],
) -> None:
    """A client that talks to relayd directly cannot pick its own address."""
    relayd = relayd_factory(config=CONFIG.replace('["127.0.0.1"]', '["10.9.9.9"]'))
    with trio.fail_after(20):
        statuses = []
        for _ in range(3):
            client = await connect_from("127.0.0.4", relayd.port)
            await client.send(
                ask_bytes("wrong", {"content": "x"}).replace(
                    b"\r\n\r\n", b"\r\nX-Forwarded-For: 198.51.100.77\r\n\r\n", 1
                )
            )
            statuses.append((await client.response()).status)
            await client.aclose()
    assert statuses == [401, 401, 429]
    assert "remote=127.0.0.4" in relayd.log
    assert "198.51.100.77" not in relayd.log
