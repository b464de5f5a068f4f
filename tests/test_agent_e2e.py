"""``relayd agent`` end to end: a real relayd, the agent in this process, the fake backend.

The agent runs through its async entry point (:class:`AgentService`, signals
sent with ``send_signal``); clients are httpx on /api/ask. Where the agent's
socket must drop, it reaches the relay through a TCP proxy this test can cut.
Everything is on 127.0.0.1 in real time, so every wait is bounded by
``trio.fail_after``; waits for a connection are on the agent's own welcome
events, and for the relay's view on /api/connections.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from relayd.agent.config import build_settings
from relayd.agent.service import AgentService
from relayd.systemd import Notifier
from tests.support import Relayd
from tests.test_agent_fake_backend import Plan, start_backend


class Proxy:
    """A TCP forwarder to ``target``'s port, whose connections a test can cut."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._scopes: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                server = await trio.open_tcp_stream("127.0.0.1", self.target)
                async with client, server, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, server, nursery.cancel_scope)
                    nursery.start_soon(self._pipe, server, client, nursery.cancel_scope)
            except OSError:
                pass  # the relay is not there (yet): the agent sees its socket close
            finally:
                self._scopes.discard(scope)

    @staticmethod
    async def _pipe(
        source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    def cut(self) -> None:
        """Drop every connection now, without a WebSocket close."""
        for scope in list(self._scopes):
            scope.cancel()


@asynccontextmanager
async def running_agent(path: Path, relay: str, **overrides: Any) -> AsyncIterator[AgentService]:
    """An agent (AgentService) connected to ``relay``; stopped on exit."""
    settings = build_settings(
        None, overrides={"relay": relay, "state_dir": str(path), "name": path.name, **overrides}
    )
    await trio.Path(path).mkdir(parents=True, exist_ok=True)
    service = AgentService(
        settings, path, lambda: settings, Notifier(None), {}, handle_signals=False
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        assert service.agent is not None
        await service.agent.wait_welcomed()
        yield service
        nursery.cancel_scope.cancel()


def admin(relayd: Relayd) -> dict[str, str]:
    return {"Authorization": relayd.admin_key}


async def ask(http: httpx.AsyncClient, relayd: Relayd, **body: Any) -> httpx.Response:
    return await http.post("/api/ask", content=json.dumps(body).encode(), headers=admin(relayd))


async def connections(http: httpx.AsyncClient, relayd: Relayd) -> list[dict[str, Any]]:
    response = await http.get("/api/connections", headers=admin(relayd))
    assert response.status_code == 200, response.text
    listing: list[dict[str, Any]] = response.json()["connections"]
    return listing


async def wait_listing(
    http: httpx.AsyncClient, relayd: Relayd, ready: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Poll /api/connections (bounded by the caller's fail_after) until ``ready``."""
    while True:
        listing = await connections(http, relayd)
        if ready(listing):
            return listing
        await trio.sleep(0.02)


async def stream_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    event = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: ") :])


def client(relayd: Relayd) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=relayd.url, timeout=30)


async def test_a_streamed_answer_through_api_ask(relayd: Relayd, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            fake = await start_backend(nursery, models=("fake-1", "fake-2"))
            base = f"ws://127.0.0.1:{relayd.port}"  # the agent adds /client/register
            async with running_agent(tmp_path / "gpu-box", base, backend=fake.url, capacity=3):
                listing = await connections(http, relayd)
                assert len(listing) == 1
                entry = listing[0]
                assert (entry["protocol"], entry["name"], entry["capacity"]) == (2, "gpu-box", 3)
                assert entry["models"] == ["fake-1", "fake-2"]  # from GET /v1/models
                assert entry["software"].startswith("relayd-agent")
                body = {"content": "Hello there, relay", "stream": True}
                events = []
                async with http.stream(
                    "POST", "/api/ask", content=json.dumps(body).encode(), headers=admin(relayd)
                ) as response:
                    assert response.status_code == 200
                    assert response.headers["content-type"].startswith("text/event-stream")
                    async for event in stream_events(response):
                        events.append(event)
                deltas = [data["content"] for kind, data in events if kind == "delta"]
                assert deltas == ["I ", "heard: ", "Hello ", "there, ", "relay"]
                kind, done = events[-1]
                assert kind == "done" and done["content"] == "I heard: Hello there, relay"
                assert done["error"] == "" and done["response_id"] and done["conversation_id"]
                assert fake.requests[0]["model"] == "fake-1"  # the first model is the default
                assert fake.requests[0]["messages"] == [
                    {"role": "user", "content": "Hello there, relay"}
                ]
                # A model named by the client goes to the backend as named.
                answer = (await ask(http, relayd, content="x", model="fake-2")).json()
                assert answer["content"] == "I heard: x" and fake.requests[1]["model"] == "fake-2"
            nursery.cancel_scope.cancel()


async def test_three_turns_send_the_whole_history_and_an_older_parent_branches(
    relayd: Relayd, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            fake = await start_backend(nursery)
            async with running_agent(tmp_path / "a", relayd.agent_url, backend=fake.url):
                first = (await ask(http, relayd, content="turn 1")).json()
                conversation = first["conversation_id"]
                second = (
                    await ask(http, relayd, content="turn 2", conversation_id=conversation,
                              parent_id=first["response_id"])
                ).json()  # fmt: skip
                third = await ask(http, relayd, content="turn 3", conversation_id=conversation)
                assert third.status_code == 200, third.text
                assert third.json()["conversation_id"] == conversation
                assert fake.requests[2]["messages"] == [
                    {"role": "user", "content": "turn 1"},
                    {"role": "assistant", "content": "I heard: turn 1"},
                    {"role": "user", "content": "turn 2"},
                    {"role": "assistant", "content": "I heard: turn 2"},
                    {"role": "user", "content": "turn 3"},
                ]
                # Asking again from turn 1 branches: turns 2 and 3 are not in it.
                branch = await ask(
                    http,
                    relayd,
                    content="turn 2, again",
                    conversation_id=conversation,
                    parent_id=first["response_id"],
                )
                assert branch.status_code == 200, branch.text
                assert fake.requests[3]["messages"] == [
                    {"role": "user", "content": "turn 1"},
                    {"role": "assistant", "content": "I heard: turn 1"},
                    {"role": "user", "content": "turn 2, again"},
                ]
                # The first branch goes on where it was.
                fourth = await ask(http, relayd, content="turn 4", conversation_id=conversation,
                                   parent_id=third.json()["response_id"])  # fmt: skip
                assert fourth.status_code == 200, fourth.text
                assert [m["content"] for m in fake.requests[4]["messages"]] == [
                    "turn 1", "I heard: turn 1", "turn 2", "I heard: turn 2", "turn 3",
                    "I heard: turn 3", "turn 4",
                ]  # fmt: skip
                assert second["response_id"] != third.json()["response_id"]
            nursery.cancel_scope.cancel()


async def test_a_client_leaving_mid_stream_closes_the_backend_stream_within_100ms(
    relayd: Relayd, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            fake = await start_backend(nursery)
            fake.chunk_delay = 0.02
            fake.answer = lambda messages: " ".join(["word"] * 2000)  # 40 s of answer
            async with running_agent(tmp_path / "a", relayd.agent_url, backend=fake.url) as agent:
                body = json.dumps({"content": "talk", "stream": True}).encode()
                seen = 0
                async with http.stream(
                    "POST", "/api/ask", content=body, headers=admin(relayd)
                ) as r:
                    async for kind, _ in stream_events(r):
                        seen += kind == "delta"
                        if seen == 5:
                            break
                left = trio.current_time()  # the response (and its connection) closed
                record = fake.streams[0]
                await record.closed.wait()
                assert record.closed_at is not None
                assert record.closed_at - left < 0.1, record.closed_at - left
                assert not record.finished
                assert agent.agent is not None
                assert len(agent.agent.stats.cancels) == 1  # the relay's cancel did it
                listing = await connections(http, relayd)
                assert listing[0]["inflight"] == 0
            nursery.cancel_scope.cancel()


async def test_the_agent_reconnects_when_its_socket_drops_and_the_conversation_goes_on(
    relayd: Relayd, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            fake = await start_backend(nursery)
            proxy = Proxy(relayd.port)
            await nursery.start(proxy.serve)
            async with running_agent(tmp_path / "a", f"ws://127.0.0.1:{proxy.port}",
                                     backend=fake.url) as service:  # fmt: skip
                agent = service.agent
                assert agent is not None
                first = (await ask(http, relayd, content="before")).json()
                agent_id = agent.agent_id
                proxy.cut()
                await agent.wait_welcomed(2)
                assert agent.agent_id == agent_id  # resumed
                await wait_listing(http, relayd, lambda ls: [e["Id"] for e in ls] == [agent_id])
                second = await ask(http, relayd, content="after",
                                   conversation_id=first["conversation_id"])  # fmt: skip
                assert second.status_code == 200, second.text
                assert [m["content"] for m in fake.requests[-1]["messages"]] == [
                    "before", "I heard: before", "after"
                ]  # fmt: skip
            nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_after_a_relay_restart_the_agent_resumes_and_the_conversation_goes_on(
    relayd_factory: Callable[..., Relayd], tmp_path: Path
) -> None:
    # The test holds the listening socket across the two relayd generations, as
    # systemd's socket unit does: the agent reconnects to the same address.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    first_relay = relayd_factory(listener=listener)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            fake = await start_backend(nursery)
            async with running_agent(tmp_path / "a", first_relay.agent_url,
                                     backend=fake.url) as service:  # fmt: skip
                agent = service.agent
                assert agent is not None
                agent_id = agent.agent_id
                async with client(first_relay) as http:
                    first = (await ask(http, first_relay, content="before the restart")).json()
                # In threads: the agent goes on while relayd stops (it says goodbye) and starts.
                assert await trio.to_thread.run_sync(first_relay.stop) == 0
                second_relay = await trio.to_thread.run_sync(
                    lambda: relayd_factory(listener=listener)
                )
                await agent.wait_welcomed(2)
                assert agent.agent_id == agent_id  # the new relayd knew it: resumed
                async with client(second_relay) as http:
                    answer = await ask(http, second_relay, content="after the restart",
                                       conversation_id=first["conversation_id"])  # fmt: skip
                    assert answer.status_code == 200, answer.text
                assert [m["content"] for m in fake.requests[-1]["messages"]] == [
                    "before the restart", "I heard: before the restart", "after the restart"
                ]  # fmt: skip
            nursery.cancel_scope.cancel()
    listener.close()


async def test_backend_failures_are_errors_and_the_agent_stays_connected(
    relayd: Relayd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="relayd.agent")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            fake = await start_backend(nursery)
            async with running_agent(tmp_path / "a", relayd.agent_url, backend=fake.url,
                                     backend_timeout="300ms") as service:  # fmt: skip
                agent = service.agent
                assert agent is not None
                cases = [
                    (Plan("status", status=500, message="CUDA out of memory"), "(500)"),
                    (Plan("status", status=500, message="CUDA out of memory"), "(500)"),
                    (Plan("status", status=400, message="context too long"), "(400)"),
                    (Plan("hang"), "sent nothing for 0.3s"),
                    (Plan("cut", after=2), "broke off"),
                ]
                for plan, words in cases:
                    fake.plans.append(plan)
                    response = await ask(http, relayd, content="one two three")
                    assert response.status_code == 502, response.text
                    assert words in response.json()["error"]
                # Cut in the middle of a streamed answer: the client's stream ends in an error.
                fake.plans.append(Plan("cut", after=2))
                body = json.dumps({"content": "a b c", "stream": True}).encode()
                async with http.stream(
                    "POST", "/api/ask", content=body, headers=admin(relayd)
                ) as r:
                    events = [event async for event in stream_events(r)]
                assert [kind for kind, _ in events] == ["delta", "delta", "error"]
                assert "broke off after 9 characters" in events[-1][1]["error"]
                # The backend goes away altogether.
                fake.stop()
                response = await ask(http, relayd, content="anyone?")
                assert response.status_code in (502, 503), response.text
                assert "cannot reach the backend" in response.json()["error"]
                assert agent.welcomes == 1 and agent.connected  # never dropped
                assert [e["Id"] for e in await connections(http, relayd)] == [agent.agent_id]
            nursery.cancel_scope.cancel()
    warned = [r.getMessage() for r in caplog.records
              if r.name == "relayd.agent.backend" and r.levelno == logging.WARNING]  # fmt: skip
    # One line per outage: 500 (twice in a row: once), timeout, cut, cut, unreachable.
    assert len([w for w in warned if "(500)" in w]) == 1, warned
    refused = [r.getMessage() for r in caplog.records if "(400)" in r.getMessage()]
    assert len(refused) == 1 and "context too long" in refused[0]


async def test_several_agents_serve_different_models(relayd: Relayd, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            llama = await start_backend(nursery, models=("llama3.1:8b",))
            qwen = await start_backend(nursery, models=("qwen2.5:7b", "qwen2.5:14b"))
            async with (
                running_agent(tmp_path / "llama", relayd.agent_url, backend=llama.url),
                running_agent(tmp_path / "qwen", relayd.agent_url, backend=qwen.url),
            ):
                listing = await connections(http, relayd)
                assert sorted(tuple(e["models"]) for e in listing) == [
                    ("llama3.1:8b",), ("qwen2.5:7b", "qwen2.5:14b")
                ]  # fmt: skip
                for n in range(3):
                    for model, backend in (("llama3.1:8b", llama), ("qwen2.5:14b", qwen)):
                        response = await ask(http, relayd, content=f"q{n}", model=model)
                        assert response.status_code == 200, response.text
                        assert backend.requests[-1]["model"] == model
                assert (len(llama.requests), len(qwen.requests)) == (3, 3)
                missing = await ask(http, relayd, content="x", model="mistral")
                assert missing.status_code == 404
                assert "llama3.1:8b" in missing.json()["error"]
            nursery.cancel_scope.cancel()


async def test_new_backend_models_are_announced(relayd: Relayd, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            fake = await start_backend(nursery, models=("small",))
            async with running_agent(tmp_path / "a", relayd.agent_url, backend=fake.url) as service:
                fake.models.append("large")
                service.send_signal(signal.SIGHUP)  # a reload reads the model list now
                listing = await wait_listing(
                    http, relayd, lambda ls: ls[0]["models"] == ["small", "large"]
                )
                assert listing[0]["models"] == ["small", "large"]
                response = await ask(http, relayd, content="x", model="large")
                assert response.status_code == 200 and fake.requests[-1]["model"] == "large"
            nursery.cancel_scope.cancel()


async def test_echo_agents_need_no_backend(relayd: Relayd, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with client(relayd) as http, running_agent(tmp_path / "echo", relayd.agent_url,
                                                         echo=True, echo_delay="0s"):  # fmt: skip
            first = (await ask(http, relayd, content="Hello world")).json()
            assert first["content"] == "echo:Hello world"
            again = await ask(http, relayd, content="again",
                              conversation_id=first["conversation_id"])  # fmt: skip
            assert again.json()["content"] == "echo:again"
            assert (await connections(http, relayd))[0]["models"] == []  # any model


async def test_an_openai_client_reaches_the_backend_through_relay_and_agent(
    relayd: Relayd, tmp_path: Path
) -> None:
    """The official SDK at both ends: a client on relayd's /v1/chat/completions,
    the agent's chat request to the backend, parameters passed through, the
    finish reason and the token counts carried back."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            fake = await start_backend(nursery, models=("llama3.1:8b",))
            async with running_agent(tmp_path / "a", relayd.agent_url, backend=fake.url):
                sdk = openai.AsyncOpenAI(
                    base_url=relayd.url + "/v1", api_key=relayd.admin_key, max_retries=0
                )
                models = await sdk.models.list()
                assert [model.id async for model in models] == ["llama3.1:8b"]
                messages: Any = [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "count to five"},
                ]
                stream = await sdk.chat.completions.create(
                    model="llama3.1:8b",
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    max_tokens=4,
                    temperature=0.2,
                    seed=11,
                    stop=["\n\n"],
                )
                pieces, reasons, usage = [], [], None
                async with stream:
                    async for chunk in stream:
                        usage = chunk.usage or usage
                        for choice in chunk.choices:
                            pieces.append(choice.delta.content or "")
                            reasons.append(choice.finish_reason)
                assert "".join(pieces) == "I heard: count to "
                assert [r for r in reasons if r] == ["length"]
                assert usage is not None and usage.completion_tokens == 4
                sent = fake.requests[-1]
                assert sent["messages"] == messages  # the whole chat, as the client sent it
                assert (sent["max_tokens"], sent["temperature"], sent["seed"], sent["stop"]) == (
                    4, 0.2, 11, ["\n\n"]
                )  # fmt: skip
                completion = await sdk.chat.completions.create(
                    model="llama3.1:8b", messages=[{"role": "user", "content": "once more"}]
                )
                assert completion.choices[0].message.content == "I heard: once more"
                assert completion.choices[0].finish_reason == "stop"
                await sdk.close()
            nursery.cancel_scope.cancel()
