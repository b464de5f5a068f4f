"""The relay end to end: a real relayd subprocess, real WebSocket agents, real HTTP.

Agents are ``relayd.agentkit.run_agent`` (trio-websocket) or, where the test is
about what a foreign agent does on the wire, raw trio-websocket code; clients
are httpx. Everything runs in real time on 127.0.0.1, so every wait is bounded
by ``trio.fail_after`` and the timeouts configured here are short.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from relayd.agentkit import AgentStats, HandlerError, echo_handler, run_agent
from relayd.protocol import Request
from tests.support import Relayd

Handler = Callable[[Request], Awaitable[tuple[str, str, str]]]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


class Agent:
    """A run_agent in its own cancel scope, so a test can kill it."""

    def __init__(
        self,
        url: str,
        handler: Handler,
        *,
        reclaim_id: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.url = url
        self.handler = handler
        self.reclaim_id = reclaim_id
        self.headers = headers
        self.stats = AgentStats()
        self.scope = trio.CancelScope()
        self.finished = trio.Event()
        self.id = ""

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                await run_agent(
                    self.url,
                    self.handler,
                    reclaim_id=self.reclaim_id,
                    headers=self.headers,
                    stats=self.stats,
                    task_status=task_status,
                )
        finally:
            self.finished.set()

    def kill(self) -> None:
        self.scope.cancel()


async def start_agent(nursery: trio.Nursery, url: str, handler: Handler, **kwargs: Any) -> Agent:
    agent = Agent(url, handler, **kwargs)
    agent.id = await nursery.start(agent.run)
    return agent


async def start_admitted(
    nursery: trio.Nursery, http: httpx.AsyncClient, relayd: Relayd, handler: Handler
) -> Agent:
    """`start_agent`, then wait until relayd lists exactly that agent."""
    agent = await start_agent(nursery, relayd.agent_url, handler)
    await wait_for_agents(http, relayd, ids={agent.id})
    return agent


def admin(relayd: Relayd) -> dict[str, str]:
    return {"Authorization": relayd.admin_key}


async def connections(client: httpx.AsyncClient, relayd: Relayd) -> list[dict[str, Any]]:
    response = await client.get("/api/connections", headers=admin(relayd))
    assert response.status_code == 200, response.text
    listing: list[dict[str, Any]] = response.json()["connections"]
    return listing


async def wait_for_agents(
    client: httpx.AsyncClient, relayd: Relayd, ids: set[str] | None = None, count: int | None = None
) -> list[dict[str, Any]]:
    """Poll /api/connections (bounded by the caller's fail_after) until the
    agents are registered: the only signal a subprocess gives."""
    while True:
        listing = await connections(client, relayd)
        present = {entry["Id"] for entry in listing}
        if (ids is None or ids == present) and (count is None or len(listing) == count):
            return listing
        await trio.sleep(0.02)


async def ask(client: httpx.AsyncClient, relayd: Relayd, **body: Any) -> httpx.Response:
    """The seed's curl shape: raw Authorization, JSON body, no Content-Type."""
    return await client.post("/api/ask", content=json.dumps(body).encode(), headers=admin(relayd))


def recording(log: list[Request], delay: float = 0.0) -> Handler:
    """Echo, keeping the conversation, and remember every request."""
    echo = echo_handler(delay)

    async def handle(request: Request) -> tuple[str, str, str]:
        log.append(request)
        return await echo(request)

    return handle


def client(relayd: Relayd) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=relayd.url, timeout=30)


# -- load and fairness ----------------------------------------------------------------


async def test_400_concurrent_asks_over_8_agents_of_capacity_1(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config="[agents]\nmax_inflight = 1\n")
    agents: list[Agent] = []
    answers: dict[str, str] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            for _ in range(8):
                agents.append(await start_agent(nursery, relayd.agent_url, echo_handler(0.005)))
            await wait_for_agents(http, relayd, count=8)

            async def one_client(index: int) -> None:
                async with httpx.AsyncClient(base_url=relayd.url, timeout=30) as own:
                    for n in range(index, 400, 64):
                        prompt = f"client {index} ask {n} {uuid.uuid4()}"
                        response = await ask(own, relayd, content=prompt)
                        assert response.status_code == 200, response.text
                        body = response.json()
                        assert body["error"] == ""
                        answers[prompt] = body["content"]

            async with trio.open_nursery() as clients:
                for index in range(64):
                    clients.start_soon(one_client, index)
            listing = await connections(http, relayd)
            assert [entry["inflight"] for entry in listing] == [0] * 8
            nursery.cancel_scope.cancel()
    assert len(answers) == 400
    assert all(content == "echo:" + prompt for prompt, content in answers.items())
    assert all(agent.stats.max_inflight <= 1 for agent in agents)
    assert sum(agent.stats.requests for agent in agents) == 400  # no retries, no losses
    assert all(agent.stats.requests > 0 for agent in agents)
    assert sorted(c for agent in agents for c in agent.stats.contents) == sorted(answers)


# -- conversations ------------------------------------------------------------------------


async def test_conversation_affinity_over_several_turns(relayd: Relayd) -> None:
    logs: list[list[Request]] = [[] for _ in range(3)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            for log in logs:
                await start_agent(nursery, relayd.agent_url, recording(log))
            await wait_for_agents(http, relayd, count=3)
            first = (await ask(http, relayd, content="turn 1")).json()
            assert first["content"] == "echo:turn 1"
            conversation = first["conversation_id"]
            second = (
                await ask(
                    http,
                    relayd,
                    content="turn 2",
                    conversation_id=conversation,
                    parent_id=first["response_id"],
                )
            ).json()
            # parent_id omitted: relayd continues from the last response.
            third = (await ask(http, relayd, content="turn 3", conversation_id=conversation)).json()
            fourth_response = await ask(
                http, relayd, content="turn 4", conversation_id=conversation, parent_id=""
            )
            assert fourth_response.status_code == 200, fourth_response.text
            # Meanwhile other conversations spread over the other agents.
            for n in range(4):
                assert (await ask(http, relayd, content=f"other {n}")).status_code == 200
            nursery.cancel_scope.cancel()
    owner = next(log for log in logs if log and log[0].content == "turn 1")
    turns = [r for r in owner if r.content.startswith("turn")]
    assert [r.content for r in turns] == ["turn 1", "turn 2", "turn 3", "turn 4"]
    assert [r.conversation_id for r in turns] == ["", conversation, conversation, conversation]
    assert turns[1].parent_id == first["response_id"]
    assert turns[2].parent_id == second["response_id"]
    assert turns[3].parent_id == third["response_id"]
    for answer in (second, third):
        assert answer["conversation_id"] == conversation
    others = [r for log in logs if log is not owner for r in log]
    assert all(not r.content.startswith("turn") for r in others)


async def test_an_agent_reconnects_and_reclaims_its_id_and_conversation(relayd: Relayd) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            first_agent = await start_admitted(nursery, http, relayd, echo_handler())
            first = (await ask(http, relayd, content="turn 1")).json()
            first_agent.kill()
            await first_agent.finished.wait()
            await wait_for_agents(http, relayd, count=0)
            # A turn asked while the agent is away waits for it (agents.reconnect_grace).
            turn: dict[str, httpx.Response] = {}
            turn_done = trio.Event()

            async def turn_two() -> None:
                turn["response"] = await ask(
                    http, relayd, content="turn 2", conversation_id=first["conversation_id"]
                )
                turn_done.set()

            nursery.start_soon(turn_two)
            await trio.sleep(0.2)
            assert "response" not in turn
            back = await start_agent(
                nursery, relayd.agent_url, echo_handler(), reclaim_id=first_agent.id
            )
            listing = await wait_for_agents(http, relayd, count=1)
            assert listing[0]["Id"] == first_agent.id
            await turn_done.wait()
            third = await ask(
                http, relayd, content="turn 3", conversation_id=first["conversation_id"]
            )
            listing = await connections(http, relayd)
            nursery.cancel_scope.cancel()
    assert back.id == first_agent.id
    assert turn["response"].status_code == 200, turn["response"].text
    assert turn["response"].json()["content"] == "echo:turn 2"
    assert third.status_code == 200
    assert back.stats.contents == ["turn 2", "turn 3"]
    assert listing[0]["conversations"] == 1


# -- failures ------------------------------------------------------------------------------


async def test_an_agent_killed_mid_request_fails_over_to_another(relayd: Relayd) -> None:
    agents: list[Agent] = []
    killed: list[Agent] = []
    echo = echo_handler()

    def handler_for(index: int) -> Handler:
        async def handle(request: Request) -> tuple[str, str, str]:
            if not killed:
                killed.append(agents[index])
                agents[index].kill()
                await trio.sleep_forever()
            return await echo(request)

        return handle

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            for index in range(2):
                agents.append(await start_agent(nursery, relayd.agent_url, handler_for(index)))
            await wait_for_agents(http, relayd, count=2)
            response = await ask(http, relayd, content="survive this")
            listing = await wait_for_agents(http, relayd, count=1)
            nursery.cancel_scope.cancel()
    assert response.status_code == 200, response.text
    assert response.json()["content"] == "echo:survive this"
    (dead,) = killed
    (survivor,) = [agent for agent in agents if agent is not dead]
    assert dead.stats.contents == ["survive this"]
    assert survivor.stats.contents == ["survive this"]
    assert listing[0]["Id"] == survivor.id


async def raw_handshake(ws: WebSocketConnection, reclaim: str | None = None) -> str:
    greeting = json.loads(await ws.get_message())
    assert greeting["message"] == "Connection id"
    assert greeting["data"] == ""
    agent_id = reclaim or greeting["id"]
    await ws.send_message(f'{{"id":"{agent_id}","message":"Connection id","data":""}}')
    return str(greeting["id"])


async def test_a_silent_agent_is_dropped_by_the_heartbeat(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(
        config='[agents]\nheartbeat_interval = "200ms"\nheartbeat_timeout = "600ms"\n'
    )
    pings: list[str] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            alive = await start_agent(nursery, relayd.agent_url, echo_handler())
            async with open_websocket_url(relayd.agent_url) as ws:
                silent_id = await raw_handshake(ws)
                start = trio.current_time()
                await wait_for_agents(http, relayd, ids={alive.id, silent_id})
                with pytest.raises(ConnectionClosed) as info:
                    while True:  # read the pings, never answer them
                        frame = json.loads(await ws.get_message())
                        pings.append(frame["message"])
                elapsed = trio.current_time() - start
            listing = await connections(http, relayd)
            await trio.sleep(0.7)  # past another heartbeat timeout: the good agent stays
            still = await connections(http, relayd)
            response = await ask(http, relayd, content="still here?")
            nursery.cancel_scope.cancel()
    reason = info.value.reason
    assert reason.code == 1001
    assert reason.reason == "heartbeat timeout"
    assert 0.5 <= elapsed < 3.0
    assert pings and set(pings) == {"ping"}
    assert [entry["Id"] for entry in listing] == [alive.id]
    assert [entry["Id"] for entry in still] == [alive.id]
    assert response.status_code == 200
    assert alive.stats.pings >= 3
    assert "heartbeat" in relayd.log


async def test_queue_overflow_is_503_with_retry_after(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config="[requests]\nmax_queue = 1\n")
    received = trio.Event()
    release = trio.Event()

    async def slow(request: Request) -> tuple[str, str, str]:
        received.set()
        await release.wait()
        return str(uuid.uuid4()), str(uuid.uuid4()), "echo:" + request.content

    results: dict[str, httpx.Response] = {}
    rejected = trio.Event()

    async def asking(http: httpx.AsyncClient, content: str) -> None:
        results[content] = response = await ask(http, relayd, content=content)
        if response.status_code == 503:
            rejected.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_agent(nursery, relayd.agent_url, slow)
            await wait_for_agents(http, relayd, count=1)
            async with trio.open_nursery() as clients:
                clients.start_soon(asking, http, "first")
                await received.wait()
                # One of these two queues (max_queue = 1); the other is turned away at once.
                clients.start_soon(asking, http, "second")
                clients.start_soon(asking, http, "third")
                await rejected.wait()
                release.set()
            nursery.cancel_scope.cancel()
    statuses = sorted(response.status_code for response in results.values())
    assert statuses == [200, 200, 503]
    (turned_away,) = [r for r in results.values() if r.status_code == 503]
    assert int(turned_away.headers["Retry-After"]) >= 1
    assert turned_away.headers["content-type"].startswith("application/json")
    assert "queue is full" in turned_away.json()["error"]
    assert agent.stats.requests == 2
    assert agent.stats.max_inflight == 1


async def test_garbage_and_oversized_frames(relayd_factory: Callable[..., Relayd]) -> None:
    relayd = relayd_factory(config='[agents]\nmax_message = "1KiB"\n')
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            async with open_websocket_url(relayd.agent_url) as ws:
                agent_id = await raw_handshake(ws)
                await wait_for_agents(http, relayd, ids={agent_id})
                for garbage in (
                    "garbage",
                    "[1, 2, 3]",
                    b"\x00\x01binary",
                    '{"id":"nobody","message":"ChatGptResponse","data":"{}"}',
                    '{"id":"x","message":"launch","data":""}',
                ):
                    await ws.send_message(garbage)
                # Dropped, not fatal: the agent still gets and answers work.
                pending: dict[str, httpx.Response] = {}
                answered = trio.Event()

                async def asking() -> None:
                    pending["response"] = await ask(http, relayd, content="after garbage")
                    answered.set()

                nursery.start_soon(asking)
                while True:
                    frame = json.loads(await ws.get_message())
                    if frame["message"] == "ChatGptRequest":
                        break
                data = json.loads(frame["data"])
                reply = json.dumps(
                    {
                        "response_id": "r1",
                        "conversation_id": "c1",
                        "content": "ok:" + data["content"],
                    },
                    separators=(",", ":"),
                )
                await ws.send_message(
                    json.dumps(
                        {"id": frame["id"], "message": "ChatGptResponse", "data": reply},
                        separators=(",", ":"),
                    )
                )
                await answered.wait()
                # Now a frame over agents.max_message: the socket is closed with 1009.
                await ws.send_message(
                    json.dumps({"id": "p", "message": "pong", "data": "x" * 2048})
                )
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await ws.get_message()
            await wait_for_agents(http, relayd, count=0)
            # The daemon still serves: a new agent gets the next question.
            await start_admitted(nursery, http, relayd, echo_handler())
            response = await ask(http, relayd, content="still serving")
            health = await http.get("/health")
            nursery.cancel_scope.cancel()
    assert pending["response"].status_code == 200
    assert pending["response"].json()["content"] == "ok:after garbage"
    assert info.value.reason.code == 1009
    assert response.status_code == 200
    assert response.json()["content"] == "echo:still serving"
    assert health.text == "OK"


# -- agent authentication ----------------------------------------------------------------


async def rejected_status(
    url: str, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, Any]:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, extra_headers=headers or []):
            pass
    body = json.loads(info.value.body or b"null")
    return info.value.status_code, body


async def test_agent_keys(relayd_factory: Callable[..., Relayd]) -> None:
    relayd = relayd_factory(config='[agents]\nkeys = ["k1"]\nallow_loopback_without_key = false\n')
    base = f"ws://127.0.0.1:{relayd.port}"
    with trio.fail_after(30):
        # Refused before the upgrade, with an HTTP status and a JSON error.
        status, body = await rejected_status(f"{base}/client/register?key=bad")
        assert (status, body) == (403, {"error": "invalid agent key"})
        assert (await rejected_status(f"{base}/agent/bad/client/register"))[0] == 403
        assert (
            await rejected_status(f"{base}/client/register", [(b"Authorization", b"Bearer bad")])
        )[0] == 403
        status, body = await rejected_status(f"{base}/client/register")
        assert status == 401
        assert "agent key is required" in body["error"]
        # The three ways to present a good key.
        ways: list[tuple[str, list[tuple[bytes, bytes]] | None]] = [
            (f"{base}/agent/k1/client/register", None),
            (f"{base}/client/register", [(b"Authorization", b"Bearer k1")]),
            (f"{base}/client/register?key=k1", None),
        ]
        async with client(relayd) as http:
            for url, headers in ways:
                async with trio.open_nursery() as nursery:
                    agent = await start_agent(nursery, url, echo_handler(), headers=headers)
                    await wait_for_agents(http, relayd, ids={agent.id})
                    response = await ask(http, relayd, content=url)
                    assert response.status_code == 200, (url, response.text)
                    assert agent.stats.contents == [url]
                    agent.kill()
                await wait_for_agents(http, relayd, count=0)
    log = relayd.log
    for leak in ("/agent/k1/", "key=k1", "Bearer k1"):
        assert leak not in log  # agent keys are never logged
    assert "agent refused" in log


async def test_a_wrong_key_is_403_even_from_loopback(relayd_factory: Callable[..., Relayd]) -> None:
    relayd = relayd_factory(config='[agents]\nkeys = ["k1"]\n')
    with trio.fail_after(20):
        status, _ = await rejected_status(f"{relayd.agent_url}?key=bad")
        assert status == 403
        # Without a key, loopback is still allowed by default.
        async with trio.open_nursery() as nursery, client(relayd) as http:
            await start_admitted(nursery, http, relayd, echo_handler())
            nursery.cancel_scope.cancel()


# -- the admin listing ---------------------------------------------------------------------


async def test_api_connections(relayd: Relayd) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_admitted(nursery, http, relayd, echo_handler())
            assert (await ask(http, relayd, content="hello")).status_code == 200
            raw = await http.get("/api/connections", headers={"Authorization": relayd.admin_key})
            bearer = await http.get(
                "/api/connections", headers={"Authorization": f"Bearer {relayd.admin_key}"}
            )
            query = await http.get("/api/connections", params={"admin_key": relayd.admin_key})
            anonymous = await http.get("/api/connections")
            wrong = await http.get("/api/connections", headers={"Authorization": "not-the-key"})
            nursery.cancel_scope.cancel()
    assert raw.status_code == bearer.status_code == query.status_code == 200
    assert anonymous.status_code == 401
    assert "error" in anonymous.json()
    assert wrong.status_code == 401
    assert relayd.admin_key not in wrong.text
    (entry,) = raw.json()["connections"]
    assert set(entry) == {
        "Ws",
        "Id",
        "Heartbeat",
        "LastMessageTime",
        "inflight",
        "capacity",
        "remote",
        "connected_at",
        "conversations",
        "protocol",
        "name",
        "software",
        "models",
        "draining",
    }
    assert (entry["protocol"], entry["name"], entry["models"], entry["draining"]) == (
        1,
        "",
        [],
        False,
    )
    assert entry["Ws"] == {}
    assert entry["Id"] == agent.id
    for key in ("Heartbeat", "LastMessageTime", "connected_at"):
        assert RFC3339.match(entry[key]), (key, entry[key])
    assert entry["LastMessageTime"] >= entry["connected_at"]
    assert entry["inflight"] == 0
    assert entry["capacity"] == 1
    assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["remote"])
    assert entry["conversations"] == 1


# -- the seed's own agent and client ---------------------------------------------------------


def compact(document: dict[str, str]) -> str:
    return json.dumps(document, separators=(",", ":"))


async def firefox_agent(url: str, seen: list[dict[str, str]], *, task_status: Any) -> None:
    """What the seed's Firefox content script does on the wire (see
    tests/fixtures/firefox-agent-frames.json): compact JSON, echo the
    connection id, pong on ping, double-encoded ChatGptResponse, and on failure
    ``{"id":...,"message":"error","data":"Unknown error","error":{}}``."""
    async with open_websocket_url(url) as ws:
        task_status.started()
        while True:
            try:
                frame = json.loads(await ws.get_message())
            except ConnectionClosed:
                return
            kind, frame_id = frame["message"], frame["id"]
            if kind == "Connection id":
                await ws.send_message(compact({"id": frame_id, "message": kind, "data": ""}))
            elif kind == "ping":
                await ws.send_message(compact({"id": frame_id, "message": "pong", "data": ""}))
            elif kind == "ChatGptRequest":
                data = json.loads(frame["data"])
                seen.append(data)
                if data["content"] == "FAIL":
                    await ws.send_message(
                        '{"id":"' + frame_id + '","message":"error",'
                        '"data":"Unknown error","error":{}}'
                    )
                    continue
                conversation = data["conversation_id"] or str(uuid.uuid4())
                echoed = "echo:" + data["content"]
                content = "|".join(
                    ["A", conversation, data["parent_id"], data["message_id"], echoed]
                )
                response_id = str(uuid.uuid4())
                reply = compact(
                    {
                        "response_id": response_id,
                        "conversation_id": conversation,
                        "content": content,
                    }
                )
                await ws.send_message(
                    compact({"id": frame_id, "message": "ChatGptResponse", "data": reply})
                )


async def test_the_seed_firefox_agent_and_curl_client(relayd: Relayd) -> None:
    seen: list[dict[str, str]] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(firefox_agent, relayd.agent_url, seen)
            async with httpx.AsyncClient(base_url=relayd.url, timeout=30) as http:
                await wait_for_agents(http, relayd, count=1)
                # curl -H "Authorization: <key>" -d '{...}' : form content type, raw token.
                first = await http.post(
                    "/api/ask",
                    content=b'{"content": "Hello world"}',
                    headers={
                        "Authorization": relayd.admin_key,
                        "Content-Type": "application/x-www-form-urlencoded",
                    },
                )
                assert first.status_code == 200, first.text
                turn1 = first.json()
                second = await http.post(
                    "/api/ask",
                    content=json.dumps(
                        {
                            "content": "second turn",
                            "conversation_id": turn1["conversation_id"],
                            "parent_id": turn1["response_id"],
                        }
                    ).encode(),
                    headers={"Authorization": relayd.admin_key},
                )
                failed = await http.post(
                    "/api/ask",
                    content=b'{"content": "FAIL"}',
                    headers={"Authorization": relayd.admin_key},
                )
                nursery.cancel_scope.cancel()
    assert set(turn1) == {"id", "response_id", "conversation_id", "content", "error"}
    assert turn1["error"] == ""
    _, conversation, parent, message_id, echoed = turn1["content"].split("|")
    assert conversation == turn1["conversation_id"]
    assert echoed == "echo:Hello world"
    assert seen[0]["conversation_id"] == ""
    assert seen[0]["message_id"] == message_id and parent == seen[0]["parent_id"]
    assert second.status_code == 200, second.text
    turn2 = second.json()
    assert turn2["conversation_id"] == turn1["conversation_id"]
    assert turn2["content"].split("|")[1:3] == [turn1["conversation_id"], turn1["response_id"]]
    assert turn2["content"].endswith("|echo:second turn")
    assert failed.status_code == 502, failed.text
    assert failed.headers["content-type"].startswith("application/json")
    assert "Unknown error" in failed.json()["error"]
    # Only agent: retrying never sends the question to the agent that failed it again.
    assert [data["content"] for data in seen] == ["Hello world", "second turn", "FAIL"]


async def test_handler_errors_are_retried_on_other_agents(relayd: Relayd) -> None:
    failing = 0

    async def fail(request: Request) -> tuple[str, str, str]:
        nonlocal failing
        failing += 1
        raise HandlerError("backend down")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            bad = [await start_agent(nursery, relayd.agent_url, fail) for _ in range(2)]
            good = await start_agent(nursery, relayd.agent_url, echo_handler())
            await wait_for_agents(http, relayd, count=3)
            response = await ask(http, relayd, content="hello")
            await wait_for_agents(http, relayd, count=3)
            for agent in bad:
                agent.kill()
            await wait_for_agents(http, relayd, ids={good.id})
            # The good agent gets it; errors from the others were retried (at most 3 attempts).
            nursery.cancel_scope.cancel()
    assert response.status_code == 200, response.text
    assert response.json()["content"] == "echo:hello"
    assert good.stats.contents == ["hello"]
    assert all(agent.stats.requests <= 1 for agent in bad)
    assert failing == sum(agent.stats.errors for agent in bad)


async def test_shutdown_closes_agents_with_going_away(relayd: Relayd) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_admitted(nursery, http, relayd, echo_handler())
            assert (await ask(http, relayd, content="before")).status_code == 200
            code = await trio.to_thread.run_sync(relayd.stop)
            await agent.finished.wait()
    assert code == 0
    assert agent.stats.close_code == 1001


async def test_a_queued_request_is_abandoned_when_its_client_goes(
    relayd_factory: Callable[..., Relayd],
) -> None:
    """A request waiting for a busy agent leaves the queue as soon as its client
    disconnects: the queue place (max_queue = 1) is free again within moments,
    long before requests.queue_timeout (60 s), and the agent never sees it."""
    relayd = relayd_factory(
        config='[requests]\nmax_queue = 1\nqueue_timeout = "60s"\n',
        args=["--log-level", "debug"],  # to see the request abandoned
    )
    received = trio.Event()
    release = trio.Event()

    async def slow(request: Request) -> tuple[str, str, str]:
        received.set()
        await release.wait()
        return str(uuid.uuid4()), str(uuid.uuid4()), "echo:" + request.content

    results: dict[str, httpx.Response] = {}

    async def asking(http: httpx.AsyncClient, content: str) -> None:
        results[content] = await ask(http, relayd, content=content)

    async def keep_asking(http: httpx.AsyncClient) -> None:
        # 503 "queue is full" while "gone" still holds the place; then it queues.
        for _ in range(40):
            results["kept"] = response = await ask(http, relayd, content="kept")
            if response.status_code != 503:
                return
            await trio.sleep(0.1)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_agent(nursery, relayd.agent_url, slow)
            await wait_for_agents(http, relayd, count=1)
            async with trio.open_nursery() as clients:
                clients.start_soon(asking, http, "first")
                await received.wait()
                # "gone" takes the only queue place, then its client hangs up.
                async with client(relayd) as leaving:
                    with trio.move_on_after(1):
                        await ask(leaving, relayd, content="gone")
                clients.start_soon(keep_asking, http)
                # relayd has dropped "gone": its place is free before the agent is.
                while True:
                    if "client went away, request abandoned" in relayd.log:
                        break
                    await trio.sleep(0.02)
                release.set()
            nursery.cancel_scope.cancel()
    assert results["first"].status_code == 200
    assert results["kept"].status_code == 200, results["kept"].text
    assert "gone" not in agent.stats.contents
