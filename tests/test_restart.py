"""A restart loses nothing: conversations and agent ids survive it, agents get a
startup grace to come back, and Idempotency-Key answers are kept (issue 18).

Real relayd subprocesses that share a state directory and a listening socket
held by the test, as systemd's socket unit holds it across restarts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from relayd.agentkit import AgentProfile, V2Agent, echo_handler, echo_stream_handler, run_agent
from relayd.protocol import Request
from tests.support import ADMIN_KEY, Relayd, start_relayd, stop_all

ADMIN = {"Authorization": ADMIN_KEY}

pytestmark = pytest.mark.slow


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Callable[..., Relayd]]:
    """``relay(config=...)`` starts a relayd on one held socket and one state
    directory; calling it again (after stopping the last) is a restart."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", 0))
    held.listen(128)
    started: list[Relayd] = []

    def start(**kwargs: object) -> Relayd:
        relayd = start_relayd(tmp_path, listener=held, **kwargs)  # type: ignore[arg-type]
        started.append(relayd)
        return relayd

    yield start
    stop_all(started)
    held.close()


def http(relayd: Relayd) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=relayd.url, timeout=30)


async def ask(client: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await client.post("/api/ask", content=json.dumps(body).encode(), headers=ADMIN)


async def wait_connected(client: httpx.AsyncClient, count: int = 1) -> list[dict[str, object]]:
    while True:
        response = await client.get("/api/connections", headers=ADMIN)
        listing: list[dict[str, object]] = response.json()["connections"]
        if len(listing) == count:
            return listing
        await trio.sleep(0.05)


async def restart(relayd: Relayd, start: Callable[..., Relayd], **kwargs: object) -> Relayd:
    """SIGTERM, wait for the exit, start the next generation on the same socket."""
    relayd.signal(signal.SIGTERM)
    await trio.to_thread.run_sync(relayd.process.wait, 30)
    return start(**kwargs)


async def test_a_v2_conversation_continues_on_its_agent_after_a_restart(
    relay: Callable[..., Relayd],
) -> None:
    relayd = relay()
    seen: list[str] = []
    handler = echo_stream_handler()

    async def recording(request: object):  # type: ignore[no-untyped-def]
        assert isinstance(request, Request)
        seen.append(f"{request.conversation_id}:{request.content}")
        async for piece in handler(request):
            yield piece

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, http(relayd) as client:
            agent = V2Agent(
                f"ws://127.0.0.1:{relayd.port}/client/register",
                recording,
                AgentProfile(name="restarted"),
                backoff_first=0.1,
            )
            agent_id = await nursery.start(agent.run)
            await wait_connected(client)
            turns = []
            for number in range(3):
                body: dict[str, object] = {"content": f"turn {number}"}
                if turns:
                    body |= {"conversation_id": turns[-1]["conversation_id"]}
                response = await ask(client, **body)
                assert response.status_code == 200, response.text
                turns.append(response.json())
            await trio.sleep(1.5)  # the state file's flush window (relayd.persist)
            relayd = await restart(relayd, relay)
            async with http(relayd) as after:
                # Asked at once: the startup grace waits for the agent to come back.
                response = await ask(
                    after, content="turn 3", conversation_id=turns[-1]["conversation_id"]
                )
                assert response.status_code == 200, response.text
                assert response.json()["conversation_id"] == turns[-1]["conversation_id"]
                (entry,) = await wait_connected(after)
                assert entry["Id"] == agent_id  # the id was resumed
            nursery.cancel_scope.cancel()
    conversation = turns[0]["conversation_id"]
    assert seen == [":turn 0"] + [f"{conversation}:turn {n}" for n in (1, 2, 3)]
    assert "(reclaimed its id)" in relayd.log
    assert "1 conversation, 1 agent id kept from the last run" in relayd.log


async def test_a_v1_agent_that_reclaims_its_id_keeps_its_conversation(
    relay: Callable[..., Relayd],
) -> None:
    relayd = relay()
    with trio.fail_after(60):
        async with http(relayd) as client:
            async with trio.open_nursery() as nursery:
                url = f"ws://127.0.0.1:{relayd.port}/client/register"
                agent_id = await nursery.start(
                    lambda task_status: run_agent(url, echo_handler(), task_status=task_status)
                )
                await wait_connected(client)
                first = (await ask(client, content="hello")).json()
                await trio.sleep(1.5)
                nursery.cancel_scope.cancel()
            relayd = await restart(relayd, relay)
        async with http(relayd) as client, trio.open_nursery() as nursery:
            url = f"ws://127.0.0.1:{relayd.port}/client/register"
            reclaimed = await nursery.start(
                lambda task_status: run_agent(
                    url, echo_handler(), reclaim_id=agent_id, task_status=task_status
                )
            )
            assert reclaimed == agent_id
            await wait_connected(client)
            response = await ask(client, content="again", conversation_id=first["conversation_id"])
            assert response.status_code == 200, response.text
            assert response.json()["content"] == "echo:again"
            (entry,) = await wait_connected(client)
            assert entry["Id"] == agent_id
            nursery.cancel_scope.cancel()


async def test_without_agents_before_there_is_no_grace(relay: Callable[..., Relayd]) -> None:
    relayd = relay()
    with trio.fail_after(10):
        async with http(relayd) as client:
            response = await ask(client, content="nobody")
    assert response.status_code == 503


async def test_the_startup_grace_waits_for_an_agent_and_then_ends(
    relay: Callable[..., Relayd],
) -> None:
    config = '[agents]\nstartup_grace = "2s"\n'
    relayd = relay(config=config)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, http(relayd) as client:
            url = f"ws://127.0.0.1:{relayd.port}/client/register"
            scope = trio.CancelScope()

            async def agent(task_status: trio.TaskStatus[str]) -> None:
                with scope:
                    await run_agent(url, echo_handler(), task_status=task_status)

            await nursery.start(agent)
            await wait_connected(client)
            await trio.sleep(1.5)  # flushed: the agent's id is in the state file
            scope.cancel()
        relayd = await restart(relayd, relay, config=config)
        async with http(relayd) as client:
            started = trio.current_time()
            response = await ask(client, content="waits, then gives up")
            waited = trio.current_time() - started
    assert response.status_code == 503
    assert 1.0 <= waited <= 5.0, waited  # about the 2 s grace, not at once


async def test_a_killed_relayd_starts_again_and_a_damaged_file_is_set_aside(
    relay: Callable[..., Relayd], tmp_path: Path
) -> None:
    relayd = relay()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, http(relayd) as client:
            url = f"ws://127.0.0.1:{relayd.port}/client/register"
            await nursery.start(
                lambda task_status: run_agent(url, echo_handler(), task_status=task_status)
            )
            await wait_connected(client)
            for number in range(40):
                assert (await ask(client, content=f"q{number}")).status_code == 200
            await trio.sleep(1.5)
            for number in range(40):  # more, in the window a kill -9 loses
                assert (await ask(client, content=f"late{number}")).status_code == 200
            os.kill(relayd.process.pid, signal.SIGKILL)
            await trio.to_thread.run_sync(relayd.process.wait, 10)
            nursery.cancel_scope.cancel()
    state = tmp_path / "state" / "relay.sqlite3"
    with sqlite3.connect(state) as db:  # whole, and holding what was flushed
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM conversations").fetchone()[0] >= 40
    relayd = relay()
    assert "kept from the last run" in relayd.log
    relayd.signal(signal.SIGTERM)
    await trio.to_thread.run_sync(relayd.process.wait, 30)
    damage(state)
    relayd = relay()
    log = relayd.log
    assert "cannot be read" in log and "moved it to" in log
    assert list(state.parent.glob("relay.sqlite3.damaged-*"))
    async with http(relayd) as client:
        assert (await client.get("/health")).status_code == 200


def damage(state: Path) -> None:
    """Replace the state file (and its WAL) with bytes that are not SQLite."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(state) + suffix).unlink(missing_ok=True)
    state.write_bytes(b"this is not a database" * 100)


# -- Idempotency-Key ---------------------------------------------------------------------


async def test_a_client_cut_off_before_its_answer_retries_and_the_agent_runs_it_once(
    relay: Callable[..., Relayd],
) -> None:
    relayd = relay()
    asked: list[str] = []
    release = trio.Event()
    reached = trio.Event()

    async def slow(request: Request) -> tuple[str, str, str]:
        asked.append(request.content)
        reached.set()
        await release.wait()
        return "r1", "c1", "answer:" + request.content

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, http(relayd) as client:
            url = f"ws://127.0.0.1:{relayd.port}/client/register"
            await nursery.start(lambda task_status: run_agent(url, slow, task_status=task_status))
            await wait_connected(client)
            body = json.dumps({"content": "pay once"}).encode()
            headers = {**ADMIN, "Idempotency-Key": "order-7"}
            # The first try: the client gives up (its socket closes) before the answer.
            with trio.move_on_after(0.5):
                await client.post("/api/ask", content=body, headers=headers)
            await reached.wait()
            # The retry waits for the first run, which the agent now finishes.
            async with http(relayd) as retry_client:
                release.set()
                retried = await retry_client.post("/api/ask", content=body, headers=headers)
            assert retried.status_code in (200, 503), retried.text
            # Whatever the first run's fate, a later retry is answered from the store
            # or runs once more: the agent never sees it more than twice, and from
            # now on never again.
            again = await client.post("/api/ask", content=body, headers=headers)
            assert again.status_code == 200, again.text
            assert again.json()["content"] == "answer:pay once"
            count = len(asked)
            third = await client.post("/api/ask", content=body, headers=headers)
            assert third.json() == again.json()
            assert len(asked) == count
            # The same key with another body is refused; another user's key is theirs.
            other = await client.post(
                "/api/ask", content=json.dumps({"content": "other"}).encode(), headers=headers
            )
            assert other.status_code == 422
            assert "different request body" in other.json()["error"]
            nursery.cancel_scope.cancel()


async def test_an_answer_is_replayed_after_a_restart_and_streams_replay_as_streams(
    relay: Callable[..., Relayd],
) -> None:
    relayd = relay()
    seen: list[str] = []

    async def handler(request: object):  # type: ignore[no-untyped-def]
        assert isinstance(request, Request)
        seen.append(request.content)
        for word in ("one ", "two"):
            yield word

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, http(relayd) as client:
            agent = V2Agent(f"ws://127.0.0.1:{relayd.port}/client/register", handler)
            await nursery.start(agent.run)
            await wait_connected(client)
            headers = {**ADMIN, "Idempotency-Key": "k-stream"}
            body = json.dumps({"content": "s", "stream": True}).encode()
            first = await client.post("/api/ask", content=body, headers=headers)
            second = await client.post("/api/ask", content=body, headers=headers)
            assert first.status_code == second.status_code == 200
            assert first.text == second.text
            assert "event: done" in first.text
            plain = await client.post(
                "/api/ask",
                content=json.dumps({"content": "p"}).encode(),
                headers={**ADMIN, "Idempotency-Key": "k-plain"},
            )
            await trio.sleep(1.5)
            relayd = await restart(relayd, relay)
            async with http(relayd) as after:
                replay = await after.post(
                    "/api/ask",
                    content=json.dumps({"content": "p"}).encode(),
                    headers={**ADMIN, "Idempotency-Key": "k-plain"},
                )
                streamed = await after.post("/api/ask", content=body, headers=headers)
            assert replay.json() == plain.json()
            assert streamed.text == first.text
            nursery.cancel_scope.cancel()
    assert seen == ["s", "p"]
