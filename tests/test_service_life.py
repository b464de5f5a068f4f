"""End-to-end: relayd's life as a systemd service, against a real relayd subprocess.

Every test runs ``python -m relayd serve`` for real (tests/support.py) and plays the service
manager through a real ``NOTIFY_SOCKET`` datagram socket: what the test receives is exactly
what systemd would. Agents are real trio-websocket clients (``relayd.agentkit``), clients are
httpx. Signals are real signals.

Time is real here, so every wait is bounded: ``trio.fail_after`` around each async step, a
timeout on every datagram wait and every process wait. Waiting for a datagram or a process
blocks, so async tests do it in a worker thread (`notification`, `exit_code`), not on the
Trio loop the agents run on. Where a test measures a duration (a watchdog period, a timeout,
a grace) the bounds are wide enough for a loaded CI machine and narrow enough to tell the
setting apart from the default.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from relayd.agentkit import AgentStats, run_agent
from relayd.protocol import AgentConnection, Greeting, Request
from tests.raw_http import RawClient
from tests.support import ADMIN_KEY, Relayd, relayd_command, start_relayd, stop_all

REPO = Path(__file__).resolve().parents[1]
STEP = 10.0  # bound on any one step that should take well under a second
RelaydFactory = Callable[..., Relayd]


# -- helpers -------------------------------------------------------------------------------


def fields(message: str) -> dict[str, str]:
    """An sd_notify datagram as ``{KEY: value}``."""
    return dict(line.split("=", 1) for line in message.splitlines() if "=" in line)


def has_field(message: str, assignment: str) -> bool:
    return assignment in message.splitlines()


def collect(relayd: Relayd, seconds: float) -> list[tuple[float, str]]:
    """Every datagram that arrives within ``seconds``, with its ``time.monotonic()`` of
    arrival (also kept in ``relayd.notifications``)."""
    deadline = time.monotonic() + seconds
    got: list[tuple[float, str]] = []
    while (remaining := deadline - time.monotonic()) > 0:
        relayd.notify.settimeout(remaining)
        try:
            message = relayd.notify.recv(65536).decode()
        except TimeoutError:
            break
        relayd.notifications.append(message)
        got.append((time.monotonic(), message))
    return got


async def notification(relayd: Relayd, prefix: str, patience: float = STEP) -> dict[str, str]:
    """`Relayd.wait_notification` off the Trio loop, so agents keep running meanwhile.

    The thread cannot be cancelled, so the wait is bounded by ``patience`` seconds, not by
    an enclosing ``fail_after``."""
    message = await trio.to_thread.run_sync(relayd.wait_notification, prefix, patience)
    return fields(message)


async def exit_code(relayd: Relayd, patience: float = STEP) -> int:
    """Wait (off the loop) for relayd to exit by itself; fail with its log if it does not."""
    try:
        return await trio.to_thread.run_sync(relayd.process.wait, patience)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"relayd still running after {patience}s:\n{relayd.log}") from None


async def exit_code_after_stop(relayd: Relayd) -> int:
    """`Relayd.stop` off the loop: the agents must be able to answer the close handshake."""
    return await trio.to_thread.run_sync(relayd.stop)


def datagram(sock: socket.socket, prefix: str, timeout: float = STEP) -> str:
    """The next datagram on ``sock`` with a line starting with ``prefix`` (for a service
    manager socket that is not a `Relayd`'s)."""
    deadline = time.monotonic() + timeout
    seen = []
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            message = sock.recv(65536).decode()
        except TimeoutError:
            break
        seen.append(message)
        if any(line.startswith(prefix) for line in message.splitlines()):
            return message
    raise AssertionError(f"no {prefix!r} datagram within {timeout}s; got {seen}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def start_with_config(
    relayd_factory: RelaydFactory, path: Path, text: str, **kwargs: object
) -> Relayd:
    """A relayd reading ``path`` (written with ``text``), which the test may rewrite to reload."""
    write_config(path, text)
    return relayd_factory(config=None, args=["--config", str(path)], **kwargs)


async def reload(relayd: Relayd) -> str:
    """SIGHUP, then the STATUS= of the READY=1 that ends the reload."""
    relayd.signal(signal.SIGHUP)
    await notification(relayd, "RELOADING=1")
    ready = await notification(relayd, "READY=1")
    return ready.get("STATUS", "")


async def reload_ok(relayd: Relayd) -> None:
    """`reload`, which must not fail."""
    status = await reload(relayd)
    assert "reload failed" not in status, status


@contextlib.asynccontextmanager
async def serving(relayd: Relayd) -> AsyncIterator[tuple[trio.Nursery, httpx.AsyncClient]]:
    """Within 30 s: a nursery for the test's agents and a client; the agents are cancelled
    when the body is done."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client_for(relayd) as client:
            yield nursery, client
            nursery.cancel_scope.cancel()


class Gate:
    """An agent handler: notes each request, answers ``echo:<content>`` after ``delay``
    seconds (``math.inf``: never)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.received = trio.Event()

    async def __call__(self, request: Request) -> tuple[str, str, str]:
        self.received.set()
        await trio.sleep(self.delay)
        return request.request_id, "conversation-" + request.request_id, "echo:" + request.content


@dataclass
class Agent:
    stats: AgentStats = field(default_factory=AgentStats)
    gone: trio.Event = field(default_factory=trio.Event)


async def start_agent(
    nursery: trio.Nursery, relayd: Relayd, handler: Gate, *, key: str | None = None
) -> Agent:
    """A real agent, connected and admitted; ``gone`` is set when its connection ends."""
    agent = Agent()
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else None

    async def run(task_status: trio.TaskStatus[str]) -> None:
        try:
            await run_agent(
                relayd.agent_url,
                handler,
                stats=agent.stats,
                headers=headers,
                task_status=task_status,
            )
        finally:
            agent.gone.set()

    agent_id = await nursery.start(run)
    await admitted(relayd, agent_id)
    return agent


async def admitted(relayd: Relayd, agent_id: str) -> None:
    """Until relayd lists the agent. The agent's hello gets no answer, so this listing is the
    only sign that relayd has admitted it (an ask sent before that gets 503 "no agent", a
    reload before that does not see it); hence a bounded poll."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=relayd.url, headers=admin, timeout=STEP) as client:
        with trio.move_on_after(STEP):
            while True:
                listing = (await client.get("/api/connections")).json()["connections"]
                if any(connection["Id"] == agent_id for connection in listing):
                    return
                await trio.sleep(0.01)
    raise AssertionError(f"relayd did not admit agent {agent_id} within {STEP}s:\n{relayd.log}")


async def gone(agent: Agent, relayd: Relayd) -> None:
    """Wait for relayd to close ``agent``'s connection."""
    with trio.move_on_after(STEP):
        await agent.gone.wait()
        return
    raise AssertionError(f"the agent is still connected after {STEP}s:\n{relayd.log}")


async def ask(client: httpx.AsyncClient, token: str, content: str) -> httpx.Response:
    return await client.post(
        "/api/ask", json={"content": content}, headers={"Authorization": token}
    )


def client_for(relayd: Relayd) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=relayd.url, timeout=STEP * 3)


def assert_clean_stop(relayd: Relayd) -> None:
    log = relayd.log
    assert "relayd stopped" in log, log
    assert "Traceback" not in log, log


def keys_config(*keys: str) -> str:
    quoted = ", ".join(f'"{key}"' for key in keys)
    return f"[agents]\nallow_loopback_without_key = false\nkeys = [{quoted}]\n"


async def add_user(config: Path, *args: str) -> str:
    """Run ``relayd <args>`` (a ``users add --json``) as an operator would; the new token."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RELAYD_")}
    environment["RELAYD_CONFIG"] = str(config)
    added = await trio.run_process(
        [*relayd_command(), *args], capture_stdout=True, capture_stderr=True, env=environment,
        check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr.decode()
    token: str = json.loads(added.stdout)["token"]
    return token


# -- start-up ------------------------------------------------------------------------------


def test_ready_says_where_it_listens_and_the_port_answers_at_once(
    relayd_factory: RelaydFactory,
) -> None:
    # A port relayd binds itself (besides the fd the fixture passes): connecting to it right
    # after READY=1, without any retry, proves READY comes after the bind, not before.
    port = free_port()
    relayd = relayd_factory(args=["--listen", f"127.0.0.1:{port}"])
    ready = fields(next(m for m in relayd.notifications if has_field(m, "READY=1")))
    status = ready.get("STATUS", "")
    assert status.startswith("listening on "), ready
    assert f"127.0.0.1:{port}" in status, status
    assert f"127.0.0.1:{relayd.port}" in status, status
    response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assert (response.status_code, response.text) == (200, "OK")
    assert relayd.stop() == 0
    assert_clean_stop(relayd)


# -- the watchdog --------------------------------------------------------------------------


def test_watchdog_pings_at_half_of_watchdog_usec(relayd_factory: RelaydFactory) -> None:
    relayd = relayd_factory(env={"WATCHDOG_USEC": "400000"})
    pings = [at for at, message in collect(relayd, 1.6) if has_field(message, "WATCHDOG=1")]
    # Every 0.2s: about 8 in 1.6s. Fewer than 5 is a stalled loop or pinging at the full
    # WATCHDOG_USEC (4 pings; one late ping away from being killed); more than 12 is a busy loop.
    assert 5 <= len(pings) <= 12, relayd.notifications
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    assert 0.15 <= gaps[len(gaps) // 2] <= 0.3, gaps
    assert "pinging every 0.2s" in relayd.log
    assert relayd.stop() == 0


def test_watchdog_meant_for_another_process_is_not_ours(relayd_factory: RelaydFactory) -> None:
    # WATCHDOG_PID names the process the watchdog is for; here, the test (a "parent" that
    # leaked its variables to relayd).
    relayd = relayd_factory(env={"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())})
    messages = [message for _, message in collect(relayd, 1.0)]
    assert not [m for m in messages if has_field(m, "WATCHDOG=1")], messages
    assert "pinging every" not in relayd.log
    assert relayd.stop() == 0


# -- reload --------------------------------------------------------------------------------


def test_sighup_announces_reloading_with_a_monotonic_timestamp_then_ready(relayd: Relayd) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    relayd.signal(signal.SIGHUP)
    reloading = relayd.wait_notification("RELOADING=1", STEP)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert not has_field(reloading, "READY=1"), reloading
    # Same clock (CLOCK_MONOTONIC is system-wide), so the stamp lies between our two readings.
    assert before <= int(fields(reloading)["MONOTONIC_USEC"]) <= after, (before, reloading, after)
    ready = fields(relayd.wait_notification("READY=1", STEP))
    assert "reload failed" not in ready.get("STATUS", ""), ready
    assert "reloaded" in relayd.log
    assert relayd.stop() == 0


async def test_broken_config_on_reload_keeps_everything_running(
    relayd_factory: RelaydFactory, tmp_path: Path
) -> None:
    config = tmp_path / "relayd.toml"
    good = '[requests]\ntimeout = "30s"\n'
    relayd = start_with_config(relayd_factory, config, good)
    async with serving(relayd) as (nursery, client):
        agent = await start_agent(nursery, relayd, Gate())
        assert (await ask(client, ADMIN_KEY, "before")).status_code == 200

        broken = (
            (good + "[server]\nbogus_key = 1\n", "server.bogus_key"),
            ("this is [not toml\n", "invalid TOML"),
        )
        for number, (text, what) in enumerate(broken, start=1):
            write_config(config, text)
            status = await reload(relayd)
            assert "reload failed" in status, status
            errors = [line for line in relayd.log.splitlines() if " ERROR " in line]
            assert len(errors) == number, relayd.log
            assert str(config) in errors[-1] and what in errors[-1], errors[-1]

            health = await client.get("/health")
            assert (health.status_code, health.text) == (200, "OK")
            answer = await ask(client, ADMIN_KEY, f"after {number}")
            assert answer.status_code == 200, answer.text
            assert answer.json()["content"] == f"echo:after {number}"
            assert not agent.gone.is_set() and agent.stats.close_code is None
        assert agent.stats.replies == 3
    assert await exit_code_after_stop(relayd) == 0


async def test_user_added_on_disk_works_only_after_sighup(
    relayd_factory: RelaydFactory, tmp_path: Path
) -> None:
    config = tmp_path / "relayd.toml"
    relayd = start_with_config(relayd_factory, config, '[requests]\ntimeout = "30s"\n')
    async with serving(relayd) as (nursery, client):
        agent = await start_agent(nursery, relayd, Gate())
        # The working spelling: --state-dir before the action (see the next test).
        token = await add_user(config, "users", "--state-dir", str(relayd.state_dir),
                               "add", "--json", "--name", "late")  # fmt: skip

        refused = await ask(client, token, "too early")
        assert refused.status_code == 401, refused.text

        await reload_ok(relayd)
        answered = await ask(client, token, "now")
        assert answered.status_code == 200, answered.text
        assert answered.json()["content"] == "echo:now"
        assert agent.stats.contents == ["now"]
    assert await exit_code_after_stop(relayd) == 0


async def test_users_add_as_the_readme_spells_it_then_sighup(
    relayd_factory: RelaydFactory, tmp_path: Path
) -> None:
    # README: `sudo relayd users add --name alice --state-dir /var/lib/relayd`, then reload.
    config = tmp_path / "relayd.toml"
    relayd = start_with_config(relayd_factory, config, '[requests]\ntimeout = "30s"\n')
    async with serving(relayd) as (nursery, client):
        await start_agent(nursery, relayd, Gate())
        token = await add_user(config, "users", "add", "--json", "--name", "alice",
                               "--state-dir", str(relayd.state_dir))  # fmt: skip
        assert (await ask(client, token, "too early")).status_code == 401
        await reload_ok(relayd)
        answered = await ask(client, token, "now")
        assert answered.status_code == 200, answered.text
    assert await exit_code_after_stop(relayd) == 0


async def test_removed_agent_key_disconnects_only_its_agent(
    relayd_factory: RelaydFactory, tmp_path: Path
) -> None:
    kept_key, removed_key = "kept-agent-key-0123456789", "removed-agent-key-0123456789"
    config = tmp_path / "relayd.toml"
    relayd = start_with_config(relayd_factory, config, keys_config(kept_key, removed_key))
    async with serving(relayd) as (nursery, client):
        kept = await start_agent(nursery, relayd, Gate(), key=kept_key)
        removed = await start_agent(nursery, relayd, Gate(), key=removed_key)

        write_config(config, keys_config(kept_key))
        await reload_ok(relayd)
        await gone(removed, relayd)
        assert removed.stats.close_code == 1008, removed.stats
        assert "agent key revoked" in relayd.log

        for number in range(3):
            answer = await ask(client, ADMIN_KEY, f"q{number}")
            assert answer.status_code == 200, answer.text
        assert kept.stats.contents[-3:] == ["q0", "q1", "q2"]
        assert not kept.gone.is_set() and kept.stats.close_code is None
    assert await exit_code_after_stop(relayd) == 0


async def test_new_request_timeout_applies_on_reload(
    relayd_factory: RelaydFactory, tmp_path: Path
) -> None:
    config = tmp_path / "relayd.toml"
    relayd = start_with_config(relayd_factory, config, '[requests]\ntimeout = "30s"\n')
    async with serving(relayd) as (nursery, client):
        agent = await start_agent(nursery, relayd, Gate(delay=3.0))
        write_config(config, '[requests]\ntimeout = "1s"\n')
        await reload_ok(relayd)

        started = trio.current_time()
        answer = await ask(client, ADMIN_KEY, "slow")
        took = trio.current_time() - started
        # Under the old 30s timeout this would be a 200 after the agent's 3s.
        assert answer.status_code == 504, answer.text
        assert 0.8 <= took <= 2.5, took
        assert "requests.timeout (1s)" in answer.json()["error"]
        assert not agent.gone.is_set()
    assert await exit_code_after_stop(relayd) == 0


async def test_agent_mid_handshake_during_reload_cannot_keep_a_revoked_key(
    relayd_factory: RelaydFactory, tmp_path: Path
) -> None:
    # The upgrade is authenticated with a key, then the key is revoked, then the agent says
    # hello: relayd must not admit (and keep) an agent on a key it no longer accepts.
    kept_key, removed_key = "kept-agent-key-0123456789", "removed-agent-key-0123456789"
    config = tmp_path / "relayd.toml"
    relayd = start_with_config(relayd_factory, config, keys_config(kept_key, removed_key))
    code = None
    with trio.fail_after(30):
        headers = [(b"authorization", f"Bearer {removed_key}".encode())]
        async with open_websocket_url(relayd.agent_url, extra_headers=headers) as ws:
            connection = AgentConnection()
            greeting = connection.receive_text(str(await ws.get_message()))
            assert isinstance(greeting, Greeting), greeting
            write_config(config, keys_config(kept_key))
            await reload_ok(relayd)
            await ws.send_message(connection.send(greeting.accept()))
            with trio.move_on_after(3):
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed as closed:
                    code = closed.reason.code if closed.reason else None
    assert code == 1008, (
        f"an agent whose key was revoked during its handshake is still connected:\n{relayd.log}"
    )


# -- stopping ------------------------------------------------------------------------------


async def test_sigterm_drains_in_flight_requests_then_exits_zero(
    relayd_factory: RelaydFactory,
) -> None:
    relayd = relayd_factory()
    gate = Gate(delay=2.0)  # long enough to keep the drain open while we knock
    in_flight: list[httpx.Response] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client_for(relayd) as client:
            agent = await start_agent(nursery, relayd, gate)

            async def first() -> None:
                in_flight.append(await ask(client, ADMIN_KEY, "in flight"))

            nursery.start_soon(first)
            await gate.received.wait()
            relayd.signal(signal.SIGTERM)
            await notification(relayd, "STOPPING=1")

            # A new connection during the drain is not accepted: under socket
            # activation it waits in the socket for the next relayd (see
            # tests/test_restart.py); here nobody else holds the socket.
            async with client_for(relayd) as late_client:
                with pytest.raises(httpx.TransportError):
                    await ask(late_client, ADMIN_KEY, "during the drain")
            assert not in_flight, "the drain was already over: the test proves nothing"

            await gone(agent, relayd)
            assert in_flight and in_flight[0].status_code == 200, in_flight
            assert in_flight[0].json()["content"] == "echo:in flight"
            assert agent.stats.close_code == 1001, agent.stats
        assert await exit_code(relayd) == 0
    assert_clean_stop(relayd)


async def test_an_answer_during_the_drain_on_hypercorns_path_says_connection_close(
    relayd_factory: RelaydFactory,
) -> None:
    """A request in flight at SIGTERM on Hypercorn's path (a chunked /api/ask) is
    answered, and its connection then ends (Hypercorn does not recycle once
    shutdown began): the answer says so, as relayd's own loops' answers do."""
    relayd = relayd_factory()
    gate = Gate(delay=2.0)
    body = json.dumps({"content": "in flight"}).encode()
    request = (
        b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\nAuthorization: "
        + ADMIN_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agent = await start_agent(nursery, relayd, gate)
            client = RawClient(await trio.open_tcp_stream("127.0.0.1", relayd.port))
            await client.send(request)
            await gate.received.wait()
            relayd.signal(signal.SIGTERM)
            await notification(relayd, "STOPPING=1")
            response = await client.response()
            assert response.status == 200, response
            assert response.header(b"connection") == b"close", response.headers
            assert await client.rest() == b""
            await client.aclose()
            await gone(agent, relayd)
        assert await exit_code(relayd) == 0
    assert_clean_stop(relayd)


async def test_shutdown_grace_bounds_the_drain(
    relayd_factory: RelaydFactory, tmp_path: Path
) -> None:
    config = tmp_path / "relayd.toml"
    relayd = start_with_config(relayd_factory, config, '[server]\nshutdown_grace = "1s"\n')
    gate = Gate(delay=math.inf)
    in_flight: list[tuple[float, httpx.Response]] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client_for(relayd) as client:
            agent = await start_agent(nursery, relayd, gate)

            async def first() -> None:
                response = await ask(client, ADMIN_KEY, "never answered")
                in_flight.append((trio.current_time(), response))

            nursery.start_soon(first)
            await gate.received.wait()
            signalled = trio.current_time()
            relayd.signal(signal.SIGTERM)
            assert await exit_code(relayd) == 0
            await gone(agent, relayd)
        assert agent.stats.close_code == 1001, agent.stats
    [(answered, response)] = in_flight
    assert response.status_code == 503, response.text
    assert 0.8 <= answered - signalled <= 3.0, answered - signalled
    assert_clean_stop(relayd)


async def test_second_sigterm_during_the_drain_exits_at_once(
    relayd_factory: RelaydFactory,
) -> None:
    relayd = relayd_factory()  # shutdown_grace 30s: the drain would last 30s
    gate = Gate(delay=math.inf)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client_for(relayd) as client:
            await start_agent(nursery, relayd, gate)

            async def first() -> None:
                with contextlib.suppress(httpx.HTTPError):  # relayd is gone: no answer
                    await ask(client, ADMIN_KEY, "never answered")

            nursery.start_soon(first)
            await gate.received.wait()
            relayd.signal(signal.SIGTERM)
            await notification(relayd, "STOPPING=1")
            assert relayd.process.poll() is None, "the drain ended early: the test proves nothing"
            relayd.signal(signal.SIGTERM)
            code = await exit_code(relayd, patience=2.0)
            nursery.cancel_scope.cancel()
    assert code != 0
    assert "second SIGTERM" in relayd.log


# -- socket activation ---------------------------------------------------------------------


async def test_socket_activation(tmp_path: Path) -> None:
    web = tmp_path / "web.sock"
    from_config = tmp_path / "from-config.sock"
    config = write_config(tmp_path / "relayd.toml", f'[server]\nlisten = ["unix:{from_config}"]\n')
    notify_path = tmp_path / "notify.sock"
    # systemd-socket-activate (252) passes on only HOME/PATH/TERM and what -E names.
    command = [
        "systemd-socket-activate", "-l", str(web),
        "-E", f"NOTIFY_SOCKET={notify_path}",
        "-E", f"RELAYD_ADMIN_KEY={ADMIN_KEY}",
        "-E", f"RELAYD_STATE_DIR={tmp_path / 'state'}",
        "-E", f"PYTHONPATH={REPO}",
        *relayd_command(), "serve", "--config", str(config),
    ]  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        log = bytearray()
        listening = trio.Event()

        async def read_log() -> None:
            assert process.stderr is not None
            while chunk := await process.stderr.receive_some():
                log.extend(chunk)
                if b"Listening on" in log:
                    listening.set()
            listening.set()

        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_log)
                    await listening.wait()
                    transport = httpx.AsyncHTTPTransport(uds=str(web))
                    async with httpx.AsyncClient(
                        transport=transport, base_url="http://relayd", timeout=20
                    ) as client:
                        # The first connection is what makes systemd-socket-activate start
                        # relayd; it waits in the backlog until relayd accepts it.
                        health = await client.get("/health")
                        assert (health.status_code, health.text) == (200, "OK")
                        listing = await client.get(
                            "/api/connections", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
                        )
                        assert listing.status_code == 200, listing.text
                    ready = fields(await trio.to_thread.run_sync(datagram, notify, "READY=1"))
                    assert f"unix:{web}" in ready.get("STATUS", ""), ready
                    process.send_signal(signal.SIGTERM)
                    assert await process.wait() == 0, log.decode()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    text = log.decode(errors="replace")
    assert "socket activation" in text and "server.listen is ignored" in text, text
    assert not from_config.exists(), "relayd bound server.listen although socket-activated"
    assert "relayd stopped" in text and "Traceback" not in text, text


# -- journald ------------------------------------------------------------------------------


def start_under_journal(tmp_path: Path, config: Path) -> Relayd:
    """`tests.support.start_relayd` (not waiting for READY=1), but with stderr on a file that
    ``$JOURNAL_STREAM`` names, the way systemd connects a service's stderr to journald."""
    log_path = tmp_path / "journal.log"
    log_path.touch()
    stat = os.stat(log_path)
    return start_relayd(
        tmp_path,
        args=["--config", str(config)],
        env={"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"},
        wait_ready=False,
        log_path=log_path,
    )


async def test_journald_priorities_and_no_timestamps(tmp_path: Path) -> None:
    config = write_config(tmp_path / "relayd.toml", keys_config("some-agent-key-0123456789"))
    relayd = start_under_journal(tmp_path, config)
    try:
        with trio.fail_after(30):
            await notification(relayd, "READY=1")
            # A warning: an agent without a key, refused although on loopback.
            with pytest.raises(ConnectionRejected):
                await run_agent(relayd.agent_url, Gate())
            # An error: a reload with a broken config.
            write_config(config, "[agents]\nno_such_key = 1\n")
            assert "reload failed" in await reload(relayd)
            relayd.signal(signal.SIGTERM)
            assert await exit_code(relayd) == 0
    finally:
        stop_all([relayd])
    lines = relayd.log.splitlines()
    assert lines, "nothing logged"
    unprefixed = [line for line in lines if not re.match(r"<[0-7]>", line)]
    assert not unprefixed, relayd.log
    timestamped = [line for line in lines if re.search(r"\d\d:\d\d:\d\d", line)]
    assert not timestamped, relayd.log
    assert any(line.startswith("<4>") and "agent refused" in line for line in lines), relayd.log
    errors = [line for line in lines if "reload failed" in line]
    assert errors and all(line.startswith("<3>") for line in errors), relayd.log
    assert "agents.no_such_key" in errors[0]
    assert any(line.startswith("<6>") and "relayd stopped" in line for line in lines), relayd.log
