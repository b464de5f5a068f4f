"""A bounded soak: steady load and agent churn against a real relayd, memory watched.

About 45 s of: 16 clients asking in a loop (each its own keep-alive connection),
and 8 agents on average, one leaving every ~0.5 s and a new one joining (every
other leaver vanishes without a close frame). relayd's RSS (``VmRSS`` of
``/proc/<pid>/status``) is read after a 10 s warm-up and at the end, load still
running; the end value must be within **+25 % or +20 MiB of the warm-up value,
whichever is larger**. ``conversations.max`` is 1,000 so the conversation table
(bounded by design) is full before the warm-up ends and does not count as growth.

Errors are counted: a client may get 503 or 502 when the agent it was given
leaves (retries exhausted), nothing else: no 500, no 504, no 4xx, no connection
error, no wrong answer. Requests must succeed in the thousands. At the end every
agent leaves, relayd must list none, still serve, and stop cleanly.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, wrap_client_stream

from relayd.agentkit import AgentStats, echo_handler, serve_agent
from tests.support import Relayd

DURATION = 45.0
WARM_UP = 10.0
CLIENTS = 16
AGENTS = 8
CHURN_EVERY = 0.5
RSS_FACTOR = 1.25
RSS_SLACK_KIB = 20 * 1024

SOAK_CONFIG = """
[conversations]
max = 1000
[requests]
wait_for_agent = "2s"
"""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Agent:
    """One churned agent, with its own cancel scope so that it can be made to leave:
    politely (a close frame) or abruptly (a TCP reset, no close frame)."""

    def __init__(self, port: int, abrupt: bool) -> None:
        self.port = port
        self.abrupt = abrupt
        self.scope = trio.CancelScope()
        self.stats = AgentStats()
        self.stream: trio.SocketStream | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            try:
                async with trio.open_nursery() as nursery:
                    self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                    ws = await wrap_client_stream(
                        nursery, self.stream, "127.0.0.1", "/client/register"
                    )
                    async with ws:
                        await serve_agent(
                            ws, echo_handler(0.002), stats=self.stats, task_status=task_status
                        )
            except (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError):
                pass

    def leave(self) -> None:
        if self.abrupt and self.stream is not None:
            self.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.stream.socket.close()
        self.scope.cancel()


@pytest.mark.slow
async def test_soak_load_with_agent_churn(relayd_factory: Callable[..., Relayd]) -> None:
    relayd = relayd_factory(config=SOAK_CONFIG)
    pid = relayd.process.pid
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    rss: dict[str, int] = {}
    joined = left = 0
    rng = random.Random(1)

    async def client_loop(number: int, stop: trio.Event) -> None:
        async with httpx.AsyncClient(base_url=relayd.url, timeout=15) as client:
            while not stop.is_set():
                content = f"c{number}-{uuid.uuid4().hex[:12]}"
                try:
                    response = await client.post(
                        "/api/ask",
                        content=json.dumps({"content": content}),
                        headers={"Authorization": relayd.admin_key},
                    )
                except httpx.HTTPError as error:
                    errors.append(f"client {number}: {type(error).__name__}: {error}")
                    await trio.sleep(0.1)
                    continue
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    if response.json().get("content") != "echo:" + content:
                        errors.append(f"wrong answer: {response.text[:200]}")
                elif response.status_code in (502, 503):
                    await trio.sleep(0.01)
                else:
                    errors.append(f"status {response.status_code}: {response.text[:200]}")

    agents: list[Agent] = []

    async def churn(nursery: trio.Nursery, stop: trio.Event) -> None:
        nonlocal joined, left
        while not stop.is_set():
            await trio.sleep(CHURN_EVERY)
            leaver = agents.pop(rng.randrange(len(agents)))
            leaver.leave()
            left += 1
            newcomer = Agent(relayd.port, abrupt=left % 2 == 0)
            await nursery.start(newcomer.run)
            agents.append(newcomer)
            joined += 1

    async with httpx.AsyncClient(base_url=relayd.url, timeout=10) as admin:

        async def connected() -> int:
            response = await admin.get(
                "/api/connections", headers={"Authorization": relayd.admin_key}
            )
            assert response.status_code == 200, response.text
            return len(response.json()["connections"])

        with trio.fail_after(DURATION + 60):
            async with trio.open_nursery() as agent_nursery:
                for _ in range(AGENTS):
                    agent = Agent(relayd.port, abrupt=False)
                    await agent_nursery.start(agent.run)
                    agents.append(agent)
                stop = trio.Event()
                started = time.monotonic()
                async with trio.open_nursery() as load:
                    for number in range(CLIENTS):
                        load.start_soon(client_loop, number, stop)
                    load.start_soon(churn, agent_nursery, stop)
                    await trio.sleep(WARM_UP)
                    rss["warm"] = rss_kib(pid)
                    served_at_warm_up = statuses[200]
                    await trio.sleep(DURATION - WARM_UP)
                    rss["end"] = rss_kib(pid)
                    stop.set()
                elapsed = time.monotonic() - started
                # Everyone leaves; relayd must forget every one of them.
                for agent in agents:
                    agent.leave()
            with trio.fail_after(10):
                while True:  # relayd's state, seen from outside: poll it, bounded
                    if not await connected():
                        break
                    await trio.sleep(0.1)
            assert relayd.process.poll() is None, relayd.log
            health = await admin.get("/health")
            assert health.status_code == 200

    report = (
        f"{statuses[200]} answered in {elapsed:.0f}s ({statuses[200] / elapsed:.0f}/s), "
        f"statuses {dict(statuses)}, {joined} agents joined and {left} left, "
        f"RSS warm {rss['warm']} KiB, end {rss['end']} KiB"
    )
    print(report)
    assert not errors, f"{len(errors)} errors, first: {errors[:5]}\n{report}"
    assert statuses[200] >= 2000, report
    assert statuses[200] - served_at_warm_up >= 1000, report
    assert set(statuses) <= {200, 502, 503}, report
    assert statuses[502] + statuses[503] < statuses[200] / 20, report
    assert joined >= (DURATION / CHURN_EVERY) * 0.5, report
    limit = max(rss["warm"] * RSS_FACTOR, rss["warm"] + RSS_SLACK_KIB)
    assert rss["end"] <= limit, report
    assert "Traceback" not in relayd.log, relayd.log[-5000:]
    assert relayd.stop() == 0, relayd.log[-3000:]
