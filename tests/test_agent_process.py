"""``relayd agent`` as a real process, as systemd runs it: signals, notifications, keys, a restart.

The agent is the installed ``relayd agent`` command in a subprocess, with a
real ``NOTIFY_SOCKET`` (read here with a Trio socket, so that the fake
backend in this process keeps answering while the test waits); the relay is a
real relayd subprocess. Every wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support import Relayd, console_script, service_environment
from tests.test_agent_e2e import admin, ask, connections, stream_events, wait_listing
from tests.test_agent_fake_backend import start_backend

ROOT = Path(__file__).resolve().parents[1]
AGENT_KEY = "agent-key-" + "k" * 32
BACKEND_KEY = "sk-backend-" + "b" * 32


class AgentProcess:
    """``relayd agent ...`` in a subprocess, its log in a file, its sd_notify
    datagrams on a socket of ours."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        self.tmp_path = tmp_path
        self.log_path = tmp_path / f"{name}.log"
        self.notify_path = tmp_path / f"{name}.notify"
        self.notifications: list[str] = []
        self._cursor = 0
        self.terminated = False
        self.process: trio.Process | None = None
        # A plain socket, read through Trio's wait_readable, so that the sync
        # fixture teardown can close it.
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.setblocking(False)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def start(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.notify_path.unlink(missing_ok=True)
        self.notify.bind(str(self.notify_path))
        environment = service_environment()
        environment.update({"NOTIFY_SOCKET": str(self.notify_path), "NO_COLOR": "1"})
        environment.update(env or {})
        with self.log_path.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                [console_script(), "agent", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
            )

    async def wait_notification(self, pattern: str, *, after: int | None = None) -> str:
        """The first datagram with a line matching ``pattern`` (a regex) among
        those after the last one matched (or after index ``after``), waiting
        for more as needed; the caller's fail_after bounds the wait."""
        index = self._cursor if after is None else after
        while True:
            while index < len(self.notifications):
                message = self.notifications[index]
                index += 1
                if any(re.search(pattern, line) for line in message.splitlines()):
                    self._cursor = index
                    return message
            await trio.lowlevel.wait_readable(self.notify)
            try:
                self.notifications.append(self.notify.recv(65536).decode())
            except BlockingIOError:
                continue

    async def connected(self) -> str:
        """Wait for the STATUS= of a connection; the agent id in it."""
        message = await self.wait_notification(r"^STATUS=connected to ")
        found = re.search(r"as ([0-9a-f-]{36});", message)
        assert found, message
        return found[1]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.terminated |= signum == signal.SIGTERM
        self.process.send_signal(signum)

    async def stop(self) -> int:
        """SIGTERM (unless sent already: a second one means "now"), then the exit code."""
        assert self.process is not None
        if not self.terminated:
            self.signal(signal.SIGTERM)
        return await self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
        self.notify.close()


@pytest.fixture
def agents(tmp_path: Path) -> Any:
    started: list[AgentProcess] = []

    def factory(name: str = "agent") -> AgentProcess:
        agent = AgentProcess(tmp_path, name)
        started.append(agent)
        return agent

    yield factory
    for agent in started:
        agent.kill()


def client(relayd: Relayd) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=relayd.url, timeout=30)


@pytest.mark.slow
async def test_sigterm_drains_the_answer_under_way_then_exits_0(
    relayd: Relayd, agents: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent = agents()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            fake = await start_backend(nursery)
            fake.chunk_delay = 0.05
            fake.answer = lambda messages: " ".join(f"w{n}" for n in range(30))  # 1.5 s
            await agent.start(
                "--relay", f"ws://127.0.0.1:{relayd.port}", "--backend", fake.url,
                "--state-dir", str(tmp_path / "state"), "--name", "drainer",
                env={"WATCHDOG_USEC": "2000000"},
            )  # fmt: skip
            await agent.wait_notification(r"^READY=1$")
            await agent.connected()
            await agent.wait_notification(r"^WATCHDOG=1$", after=0)
            first_delta = trio.Event()
            events: list[tuple[str, dict[str, Any]]] = []

            async def streamed_ask() -> None:
                body = json.dumps({"content": "go", "stream": True}).encode()
                async with http.stream(
                    "POST", "/api/ask", content=body, headers=admin(relayd)
                ) as r:
                    async for event in stream_events(r):
                        events.append(event)
                        first_delta.set()

            nursery.start_soon(streamed_ask)
            await first_delta.wait()
            agent.signal(signal.SIGTERM)
            await agent.wait_notification(r"^STOPPING=1$")
            listing = await wait_listing(http, relayd, lambda ls: not ls or ls[0]["draining"])
            assert listing and listing[0]["draining"]  # the relay sends it nothing new
            assert await agent.stop() == 0
            kind, done = events[-1]
            assert kind == "done" and done["content"] == fake.answer([])
            assert fake.streams[0].finished  # the backend's answer was not cut
            await wait_listing(http, relayd, lambda ls: ls == [])
            nursery.cancel_scope.cancel()
    log = agent.log
    assert "received SIGTERM, draining" in log and "relayd agent stopped" in log
    assert "systemd watchdog: pinging every 1.0s" in log


@pytest.mark.slow
async def test_a_restarted_agent_resumes_its_id_and_its_conversations(
    relayd: Relayd, agents: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            fake = await start_backend(nursery)
            args = ("--relay", f"ws://127.0.0.1:{relayd.port}", "--backend", fake.url,
                    "--state-dir", str(state))  # fmt: skip
            first = agents("first")
            await first.start(*args)
            agent_id = await first.connected()
            turn = (await ask(http, relayd, content="remember me")).json()
            assert await first.stop() == 0
            second = agents("second")
            await second.start(*args)
            assert await second.connected() == agent_id  # the saved id, granted again
            await wait_listing(http, relayd, lambda ls: [e["Id"] for e in ls] == [agent_id])
            again = await ask(http, relayd, content="and now?",
                              conversation_id=turn["conversation_id"])  # fmt: skip
            assert again.status_code == 200, again.text
            assert [m["content"] for m in fake.requests[-1]["messages"]] == [
                "remember me", "I heard: remember me", "and now?"
            ]  # fmt: skip
            # A second agent on the same state directory is refused, by name.
            intruder = agents("intruder")
            await intruder.start(*args)
            assert intruder.process is not None
            assert await intruder.process.wait() == 1
            assert "another relayd agent uses this state directory" in intruder.log
            assert await second.stop() == 0
            nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_no_key_in_any_log_line(
    relayd_factory: Callable[..., Relayd], agents: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    relayd = relayd_factory(
        config=f'[agents]\nkeys = ["{AGENT_KEY}"]\nallow_loopback_without_key = false\n',
        args=["--log-level", "debug"],
    )
    key_file = tmp_path / "agent_key"
    key_file.write_text(AGENT_KEY + "\n")
    wrong_file = tmp_path / "wrong_key"
    wrong = "wrong-key-" + "w" * 32
    wrong_file.write_text(wrong)
    agent, stranger = agents("agent"), agents("stranger")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            fake = await start_backend(nursery)
            relay = f"ws://127.0.0.1:{relayd.port}"
            await agent.start(
                "--relay", relay, "--backend", fake.url, "--key-file", str(key_file),
                "--state-dir", str(tmp_path / "a"), "--log-level", "debug",
                env={"RELAYD_BACKEND_KEY": BACKEND_KEY},
            )  # fmt: skip
            await agent.connected()
            answer = await ask(http, relayd, content="secret stuff")
            assert answer.status_code == 200, answer.text
            body = json.dumps({"content": "more", "stream": True}).encode()
            async with http.stream("POST", "/api/ask", content=body, headers=admin(relayd)) as r:
                assert [kind async for kind, _ in stream_events(r)][-1] == "done"
            assert fake.headers[0]["authorization"] == f"Bearer {BACKEND_KEY}"
            agent.signal(signal.SIGHUP)
            await agent.wait_notification(r"^READY=1$")
            await stranger.start(
                "--relay", relay, "--echo", "--state-dir", str(tmp_path / "s"),
                "--log-level", "debug", env={"RELAYD_AGENT_KEY": wrong},
            )  # fmt: skip
            await stranger.wait_notification(r"^STATUS=not connected .*refused by the relay \(403")
            assert await stranger.stop() == 0
            assert await agent.stop() == 0
            nursery.cancel_scope.cancel()
    assert "agent key: " + str(key_file) in agent.log
    assert "backend key: $RELAYD_BACKEND_KEY" in agent.log
    assert "agent key: $RELAYD_AGENT_KEY" in stranger.log
    assert stranger.log.count("refused the agent (403") == 1  # once, not per retry
    for log in (agent.log, stranger.log, relayd.log):
        for secret in (AGENT_KEY, BACKEND_KEY, wrong):
            assert secret not in log


@pytest.mark.slow
async def test_sighup_reloads_the_config_file(
    relayd: Relayd, agents: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    config = tmp_path / "agent.toml"

    def write(capacity: Any, models: list[str]) -> None:
        config.write_text(
            "[agent]\n"
            f'relay = "ws://127.0.0.1:{relayd.port}"\n'
            f'backend = "{fake.url}"\n'
            f"capacity = {json.dumps(capacity)}\n"
            f"models = {json.dumps(models)}\n"
            f'state_dir = "{tmp_path / "state"}"\n'
        )

    agent = agents()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            fake = await start_backend(nursery, models=("fake-1", "fake-2"))
            write(1, ["fake-1"])
            await agent.start("--config", str(config))
            await agent.connected()
            listing = await connections(http, relayd)
            assert (listing[0]["capacity"], listing[0]["models"]) == (1, ["fake-1"])
            write(3, ["fake-1", "fake-2"])
            agent.signal(signal.SIGHUP)
            await agent.wait_notification(r"^RELOADING=1$")
            await agent.wait_notification(r"^READY=1$")
            await wait_listing(
                http, relayd,
                lambda ls: (ls[0]["capacity"], ls[0]["models"]) == (3, ["fake-1", "fake-2"]),
            )  # fmt: skip
            write("three", ["fake-1"])  # a mistake: nothing changes
            agent.signal(signal.SIGHUP)
            message = await agent.wait_notification(r"^READY=1$")
            assert "reload failed" in message and "agent.capacity" in message
            listing = await connections(http, relayd)
            assert listing[0]["capacity"] == 3
            response = await ask(http, relayd, content="still here", model="fake-2")
            assert response.status_code == 200, response.text
            assert await agent.stop() == 0
            nursery.cancel_scope.cancel()
    assert f"{config}: agent.capacity: expected an integer, got a string" in agent.log


@pytest.mark.slow
async def test_the_readme_quick_start_reaches_a_first_answer(
    relayd: Relayd, agents: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """The README's agent command, as written (its port aside), answers."""
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in lines if line.startswith(".venv/bin/relayd agent ")]
    assert len(commands) == 1, commands
    args = commands[0].split()[2:]
    args = [arg.replace(":8080", f":{relayd.port}") for arg in args]
    agent = agents()
    with trio.fail_after(30):
        await agent.start(*args, env={"XDG_STATE_HOME": str(tmp_path / "xdg")})
        await agent.connected()
        async with client(relayd) as http:
            answer = (await ask(http, relayd, content="Hello")).json()
        assert answer["content"] == "echo:Hello"
        assert await agent.stop() == 0
    assert (tmp_path / "xdg" / "relayd-agent" / "conversations.sqlite3").exists()
    assert os.stat(tmp_path / "xdg" / "relayd-agent").st_mode & 0o077 == 0
