"""wide-dispatch's busy agents in their child process (relayd.bench.sinks), with a real relayd."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import trio

from relayd.bench import sinks as sinks_module
from relayd.bench.fleet import Tracker, content_for
from relayd.bench.httpclient import HttpClient
from relayd.bench.procs import read_cpu_seconds
from relayd.bench.sinks import SinkStartError, _lines, busy_agents
from tests.support import Relayd


@pytest.fixture(autouse=True)
def child_priority(monkeypatch: pytest.MonkeyPatch) -> int:
    """The nice value busy_agents gives its child here: one step below this process's,
    not the bench's LOWEST_PRIORITY (19). At nice 19 the child gets a sliver of a CPU
    whenever other processes keep the machine's CPUs busy (a weight of 15 against their
    1024), and its start alone can outlast the bench's start timeout; a test must not
    depend on the machine being otherwise idle. The renicing itself is still seen."""
    assert sinks_module.LOWEST_PRIORITY == 19
    priority = min(os.getpriority(os.PRIO_PROCESS, 0) + 1, 19)
    monkeypatch.setattr(sinks_module, "LOWEST_PRIORITY", priority)
    return priority


async def connections(relayd: Relayd) -> list[dict[str, object]]:
    auth = {"Authorization": f"Bearer {relayd.admin_key}"}
    async with HttpClient("127.0.0.1", relayd.port, headers=auth) as client:
        response = await client.request("GET", "/api/connections")
    assert response.status == 200
    listed = json.loads(response.body)["connections"]
    assert isinstance(listed, list)
    return listed


async def test_busy_agents_connect_report_requests_and_leave(
    relayd: Relayd, tmp_path: Path, child_priority: int
) -> None:
    tracker = Tracker()
    progress: list[tuple[int, int]] = []
    auth = {"Authorization": f"Bearer {relayd.admin_key}", "Content-Type": "application/json"}
    with trio.fail_after(60):
        async with busy_agents(
            relayd.agent_url,
            [],
            5,
            tracker,
            tmp_path / "sinks.log",
            on_progress=lambda done, total: progress.append((done, total)),
        ) as agents:
            assert (agents.connected, agents.failed, agents.failures) == (5, 0, [])
            assert progress[-1] == (5, 5)
            assert read_cpu_seconds(agents.pid) is not None  # a live child, not this process
            # Lowest priority: they must not take CPU from the clients being timed.
            assert os.getpriority(os.PRIO_PROCESS, agents.pid) == child_priority
            assert len(await connections(relayd)) == 5
            # A request reaching one of them is reported here, and never answered.
            reached = tracker.expect(7)
            async with (
                HttpClient("127.0.0.1", relayd.port, headers=auth) as client,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(
                    client.request,
                    "POST",
                    "/api/ask",
                    json.dumps({"content": content_for(7)}).encode(),
                )
                await reached.wait()
                nursery.cancel_scope.cancel()
            pid = agents.pid
        # Leaving the block disconnects them and ends the child.
        assert read_cpu_seconds(pid) is None
        for _ in range(200):  # relayd notices the closes within moments
            if not await connections(relayd):
                break
            await trio.sleep(0.05)
        else:
            raise AssertionError("the busy agents are still connected after their child ended")


async def test_agents_that_cannot_connect_are_counted_with_a_reason(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once closed
    with trio.fail_after(60):
        async with busy_agents(
            f"ws://127.0.0.1:{port}/client/register", [], 3, Tracker(), tmp_path / "sinks.log"
        ) as agents:
            assert (agents.connected, agents.failed) == (0, 3)
            assert agents.failures and all("Error" in reason for reason in agents.failures)


async def test_a_child_that_dies_before_connecting_is_an_error_with_its_log(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60), pytest.raises(SinkStartError) as caught:
        async with busy_agents("not a websocket url", [], 2, Tracker(), tmp_path / "sinks.log"):
            raise AssertionError("busy_agents yielded for agents that never existed")
    message = str(caught.value)
    assert "exited with status 1 before its agents were connected" in message
    assert "Traceback" in message  # the child's own stderr, from its log


async def test_lines_are_split_across_chunks_and_an_endless_line_is_refused() -> None:
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(b"ready 1")
    await send.send_all(b" 0\nreached 5\npartial")
    await send.aclose()
    assert [line async for line in _lines(receive)] == ["ready 1 0", "reached 5"]

    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(b"x" * (64 * 1024 + 1))
    with pytest.raises(ValueError, match="without an end"):
        async for _ in _lines(receive):
            pass


async def test_a_child_that_says_what_the_bench_cannot_read_is_stopped(tmp_path: Path) -> None:
    talker = "import time; print('hello there', flush=True); time.sleep(60)"
    with trio.fail_after(30), pytest.raises(SinkStartError, match="said 'hello there'"):
        async with busy_agents(
            "ws://127.0.0.1:1/",
            [],
            1,
            Tracker(),
            tmp_path / "sinks.log",
            command=[sys.executable, "-c", talker],
        ):
            raise AssertionError("busy_agents yielded for a child that is not one")
