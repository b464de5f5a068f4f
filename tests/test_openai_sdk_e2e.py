"""``/v1`` end to end: the official ``openai`` SDK against a real relayd and real agents.

relayd runs as a subprocess (tests/support.py) on 127.0.0.1; agents are
:class:`relayd.agentkit.V2Agent` (protocol v2) or ``run_agent`` (the seed's v1)
in this process; the client is the official ``openai`` Python SDK, sync (run in
a thread: ``trio.to_thread.run_sync``) and async (``AsyncOpenAI`` runs under
Trio as it is), streamed and not, with ``max_retries=0`` unless the test is
about the SDK's retries. Its HTTP client (``openai.DefaultHttpxClient``) has
event hooks that note every request, its answer and the client's own address:
with relayd's debug log that tells which loop served it (relayd's wire path or
Hypercorn's, see tests/test_ask_wire_e2e.py). Raw HTTP is used where the bytes
themselves are the point.

Every wait is bounded (``trio.fail_after``, SDK timeouts); nothing sleeps to
synchronise: tests poll what they can observe (the agents relayd lists, its
log) in bounded loops. The agents' own waits between pieces are the scenario.

Also here: a LangChain ``ChatOpenAI`` (skipped without ``langchain-openai``) and
the curl and Python examples of docs/api.md's ``/v1`` section, run as written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
import trio

from relayd.agentkit import AgentProfile, Finish, HandlerFailure, V2Agent, echo_stream_handler
from relayd.protocol import Request
from relayd.protocol.v2 import ChatRequest
from tests.support import Relayd
from tests.test_relay_e2e import client, recording, start_agent, wait_for_agents

HOST = "127.0.0.1"
MODEL = "m1"
SDK_TIMEOUT = 15.0  # each SDK request's own bound
DEBUG = ["--log-level", "debug"]  # relayd logs which loop served each connection
FLAVOURS = ["sync", "async"]
HEALTH = b"GET /health HTTP/1.1\r\nHost: relay.example\r\n\r\n"
DOCS_API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


# -- agents ------------------------------------------------------------------------------


class V2:
    """A V2Agent in its own cancel scope, so that a test can kill it."""

    def __init__(self, url: str, handler: Any, profile: AgentProfile) -> None:
        self.agent = V2Agent(url, handler, profile)
        self.scope = trio.CancelScope()
        self.id = ""

    @property
    def stats(self) -> Any:
        return self.agent.stats

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await self.agent.run(task_status=task_status)

    def kill(self) -> None:
        self.scope.cancel()


async def start_v2(
    nursery: trio.Nursery,
    relayd: Relayd,
    handler: Any,
    *,
    models: tuple[str, ...] = (MODEL,),
    capacity: int = 1,
) -> V2:
    """A v2 agent, connected and welcomed (relayd has admitted it: welcome comes after)."""
    agent = V2(relayd.agent_url, handler, AgentProfile(capacity=capacity, models=models))
    agent.id = await nursery.start(agent.run)
    return agent


@dataclass
class Script:
    """A v2 handler that records each request and answers with ``pieces``:
    ``delay`` seconds between them, then ``Finish(usage=usage)``. With ``hold``,
    it waits for that event before its first piece. ``sent`` is when each piece
    was handed to the agent to send; ``cancelled`` when a cancel reached it
    (``time.monotonic()``, the clock the clients use here)."""

    pieces: list[str] = field(default_factory=lambda: ["Hel", "lo"])
    delay: float = 0.0
    usage: dict[str, int] | None = None
    hold: trio.Event | None = None
    requests: list[Request | ChatRequest] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    cancelled: list[float] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)

    async def handle(self, request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
        self.requests.append(request)
        self.arrived.set()
        try:
            if self.hold is not None:
                await self.hold.wait()
            for index, piece in enumerate(self.pieces):
                if index and self.delay:
                    await trio.sleep(self.delay)  # the agent's pace: what the test is about
                self.sent.append(time.monotonic())
                yield piece
            yield Finish(usage=self.usage)
        except trio.Cancelled:
            self.cancelled.append(time.monotonic())
            raise


async def fails(request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
    """A v2 handler that fails at once, not retryable (relayd answers 502)."""
    raise HandlerFailure("backend_error", "the backend said no")
    yield ""  # pragma: no cover (makes this an async generator)


async def fails_mid_answer(request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
    yield "Hel"
    raise HandlerFailure("backend_error", "the backend broke off")


async def never_answers(request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
    await trio.sleep_forever()
    yield ""  # pragma: no cover


# -- the SDK -----------------------------------------------------------------------------


@dataclass
class Exchange:
    """One HTTP request the SDK sent, and its answer (``time.monotonic()``)."""

    method: str
    path: str
    sent_at: float
    status: int | None = None
    answered_at: float | None = None
    client: str | None = None  # the SDK's own address, as relayd logs it


class Sdk:
    """An ``openai.OpenAI`` (``"sync"``) or ``openai.AsyncOpenAI`` (``"async"``) for a
    relayd, whose HTTP client notes every exchange. ``one_connection``: a pool of
    one connection, so that every request goes on the same one."""

    def __init__(
        self,
        relayd: Relayd,
        flavour: str,
        *,
        api_key: str | None = None,
        max_retries: int = 0,
        one_connection: bool = False,
        transport: Any = None,
    ) -> None:
        self.flavour = flavour
        self.exchanges: list[Exchange] = []
        self._pending: list[tuple[Any, Exchange]] = []
        options: dict[str, Any] = {}
        if one_connection:
            options["limits"] = httpx2.Limits(max_connections=1, max_keepalive_connections=1)
        if transport is not None:
            options["transport"] = transport
        settings: dict[str, Any] = {
            "base_url": relayd.url + "/v1",
            "api_key": relayd.admin_key if api_key is None else api_key,
            "max_retries": max_retries,
            "timeout": SDK_TIMEOUT,
        }
        self.client: Any
        if flavour == "sync":
            hooks = {"request": [self._sent], "response": [self._answered]}
            http = openai.DefaultHttpxClient(event_hooks=hooks, **options)
            self.client = openai.OpenAI(http_client=http, **settings)
        else:

            async def sent(request: httpx2.Request) -> None:
                self._sent(request)

            async def answered(response: httpx2.Response) -> None:
                self._answered(response)

            hooks = {"request": [sent], "response": [answered]}
            http = openai.DefaultAsyncHttpxClient(event_hooks=hooks, **options)
            self.client = openai.AsyncOpenAI(http_client=http, **settings)

    def _sent(self, request: httpx2.Request) -> None:
        exchange = Exchange(request.method, request.url.path, time.monotonic())
        self.exchanges.append(exchange)
        self._pending.append((request, exchange))

    def _answered(self, response: httpx2.Response) -> None:
        for request, exchange in self._pending:
            if request is response.request:
                exchange.status = response.status_code
                exchange.answered_at = time.monotonic()
                stream = response.extensions.get("network_stream")
                if stream is not None:
                    host, port = stream.get_extra_info("client_addr")[:2]
                    exchange.client = f"{host}:{port}"
                return

    async def call(self, function: Callable[[Any], Any]) -> Any:
        """``function(client)``: in a worker thread for the sync client, awaited for
        the async one (the caller's ``fail_after`` bounds both)."""
        if self.flavour == "sync":
            return await trio.to_thread.run_sync(function, self.client, abandon_on_cancel=True)
        return await function(self.client)

    async def create(self, **request: Any) -> Any:
        request.setdefault("model", MODEL)
        return await self.call(lambda c: c.chat.completions.create(**request))

    async def stream(self, *, stop_after: int | None = None, **request: Any) -> Streamed:
        """A streamed completion: every chunk with when it came. ``stop_after``: break
        out after that many chunks with content, and close the stream."""
        request.setdefault("model", MODEL)
        request["stream"] = True
        streamed = Streamed()

        def took(chunk: Any) -> bool:
            streamed.chunks.append((time.monotonic(), chunk))
            return stop_after is not None and len(streamed.contents) >= stop_after

        if self.flavour == "sync":

            def consume(c: Any) -> None:
                stream = c.chat.completions.create(**request)
                try:
                    for chunk in stream:
                        if took(chunk):
                            streamed.closed_at = time.monotonic()
                            break
                finally:
                    stream.close()

            await trio.to_thread.run_sync(consume, self.client, abandon_on_cancel=True)
        else:
            stream = await self.client.chat.completions.create(**request)
            try:
                async for chunk in stream:
                    if took(chunk):
                        streamed.closed_at = time.monotonic()
                        break
            finally:
                await stream.close()
        return streamed

    async def models(self) -> list[Any]:
        page = await self.call(lambda c: c.models.list())
        return list(page.data)

    async def aclose(self) -> None:
        if self.flavour == "sync":
            await trio.to_thread.run_sync(self.client.close)
        else:
            await self.client.close()

    async def __aenter__(self) -> Sdk:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@dataclass
class Streamed:
    chunks: list[tuple[float, Any]] = field(default_factory=list)
    closed_at: float | None = None

    @property
    def contents(self) -> list[str]:
        """The text of each chunk that carries some, in order."""
        return [
            chunk.choices[0].delta.content
            for _, chunk in self.chunks
            if chunk.choices and chunk.choices[0].delta.content
        ]

    def first_content_at(self) -> float:
        return next(
            at for at, chunk in self.chunks if chunk.choices and chunk.choices[0].delta.content
        )


async def add_user(http: httpx.AsyncClient, relayd: Relayd) -> str:
    """A new user's token (admin API)."""
    response = await http.post(
        "/admin/users/add",
        content=b'{"name": "sdk"}',
        headers={"Authorization": f"Bearer {relayd.admin_key}"},
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


def served(relayd: Relayd, address: str | None) -> tuple[bool, bool]:
    """``(taken by the wire path, handed back to Hypercorn)`` for the connection from
    ``address``, from the log of a relayd started with :data:`DEBUG`."""
    assert address is not None
    log = relayd.log
    assert "log level debug" in log
    remote = f"remote={address}\n"
    return (
        f"connection served on the wire path: {remote}" in log,
        f"connection handed to Hypercorn: {remote}" in log,
    )


async def until(condition: Callable[[], object]) -> None:
    """Poll ``condition`` (something a test can observe but not wait on) until it
    holds; bounded by the caller's ``fail_after``."""
    while True:
        if condition():
            return
        await trio.sleep(0.005)


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}],
    },
    {"role": "assistant", "content": "Hi! What can I do?"},
    {"role": "user", "content": "Say hello back."},
]
# What the agent gets: every content as plain text (text parts joined), roles kept.
MESSAGES_AT_AGENT = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello, world"},
    {"role": "assistant", "content": "Hi! What can I do?"},
    {"role": "user", "content": "Say hello back."},
)
PARAMS = {
    "max_tokens": 64,
    "temperature": 0.25,
    "top_p": 0.5,
    "stop": ["\n\n", "END"],
    "seed": 1234,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
    "user": "end-user-7",
}


# -- a completion ------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_completion_with_messages_and_parameters_passed_through(
    relayd: Relayd, flavour: str
) -> None:
    script = Script(pieces=["Hello ", "back."], usage={"prompt_tokens": 21, "completion_tokens": 2})
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            token = await add_user(http, relayd)
            agent = await start_v2(nursery, relayd, script.handle)
            async with Sdk(relayd, flavour, api_key=token) as sdk:
                completion = await sdk.create(messages=MESSAGES, **PARAMS)
            nursery.cancel_scope.cancel()
    (request,) = script.requests
    assert isinstance(request, ChatRequest)
    assert request.model == MODEL
    assert request.messages == MESSAGES_AT_AGENT
    assert request.params == PARAMS  # untouched: same names, values and JSON types
    assert [type(request.params[name]) for name in PARAMS] == [type(v) for v in PARAMS.values()]
    assert agent.stats.replies == 1
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert abs(completion.created - time.time()) < 60
    (choice,) = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello back."
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 21,
        "completion_tokens": 2,
        "total_tokens": 23,
    }


async def test_a_completion_without_usage_from_the_agent_has_none(relayd: Relayd) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start_v2(nursery, relayd, echo_stream_handler())
            async with Sdk(relayd, "async") as sdk:
                completion = await sdk.create(messages=[{"role": "user", "content": "hi there"}])
            nursery.cancel_scope.cancel()
    assert completion.choices[0].message.content == "echo:hi there"
    assert completion.usage is None


# -- a streamed completion ---------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_streamed_completion_arrives_piece_by_piece_as_the_agent_sends(
    relayd: Relayd, flavour: str
) -> None:
    """The agent waits 0.5 s between pieces: each piece reaches the client as one
    chunk, soon after the agent sent it, the first long before the last is sent."""
    script = Script(pieces=["One ", "two ", "three."], delay=0.5)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start_v2(nursery, relayd, script.handle)
            async with Sdk(relayd, flavour) as sdk:
                streamed = await sdk.stream(messages=[{"role": "user", "content": "Count"}])
            nursery.cancel_scope.cancel()
    assert streamed.contents == script.pieces  # one chunk per piece, in order, unmerged
    first_sent, *_, last_sent = script.sent
    assert last_sent - first_sent >= 1.0
    first_came = streamed.first_content_at()
    assert first_came - first_sent < 0.3
    assert first_came < last_sent - 0.6, "the first chunk waited for the answer's end"
    content_times = [
        at for at, chunk in streamed.chunks if chunk.choices and chunk.choices[0].delta.content
    ]
    for sent, came in zip(script.sent, content_times, strict=True):
        assert 0 <= came - sent < 0.3
    chunks = [chunk for _, chunk in streamed.chunks]
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {MODEL}
    head, *middle, end = chunks
    assert head.choices[0].delta.role == "assistant"
    assert head.choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in middle] == script.pieces
    assert all(c.choices[0].finish_reason is None for c in [head, *middle])
    assert end.choices[0].finish_reason == "stop"
    assert end.choices[0].delta.content is None
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_the_usage_chunk_carries_the_agents_usage(relayd: Relayd, flavour: str) -> None:
    script = Script(pieces=["Hi", "!"], usage={"prompt_tokens": 8, "completion_tokens": 2})
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start_v2(nursery, relayd, script.handle)
            async with Sdk(relayd, flavour) as sdk:
                streamed = await sdk.stream(
                    messages=[{"role": "user", "content": "Hi"}],
                    stream_options={"include_usage": True},
                )
                # Without an agent's usage, the chunk still comes, counting zero.
                script.usage = None
                zero = await sdk.stream(
                    messages=[{"role": "user", "content": "Hi"}],
                    stream_options={"include_usage": True},
                )
            nursery.cancel_scope.cancel()
    assert streamed.contents == ["Hi", "!"]
    *_, finish, usage = [chunk for _, chunk in streamed.chunks]
    assert finish.choices[0].finish_reason == "stop" and finish.usage is None
    assert usage.choices == []
    assert usage.usage is not None
    assert usage.usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 8,
        "completion_tokens": 2,
        "total_tokens": 10,
    }
    *_, last = [chunk for _, chunk in zero.chunks]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (0, 0)


# -- /v1/models ----------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_models_list_names_what_the_connected_agents_serve(
    relayd: Relayd, flavour: str
) -> None:
    held = Script(hold=trio.Event())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            async with Sdk(relayd, flavour) as sdk, Sdk(relayd, "async") as other:
                assert await sdk.models() == []
                await start_v2(nursery, relayd, held.handle, models=("alpha", "beta"), capacity=3)
                await start_v2(nursery, relayd, echo_stream_handler(), models=("beta",))
                await wait_for_agents(http, relayd, count=2)
                before = await sdk.models()
                # One request in flight on the first agent: one slot fewer.
                answered: list[Any] = []

                async def ask() -> None:
                    request = {"model": "alpha", "messages": [{"role": "user", "content": "x"}]}
                    answered.append(await other.create(**request))

                nursery.start_soon(ask)
                await held.arrived.wait()
                during = await sdk.models()
                assert held.hold is not None
                held.hold.set()
                await until(lambda: answered)
                after = await sdk.models()
            nursery.cancel_scope.cancel()
    assert [(m.id, m.object, m.owned_by) for m in before] == [
        ("alpha", "model", "relayd"),
        ("beta", "model", "relayd"),
    ]
    assert all(
        isinstance(m, openai.types.Model) and abs(m.created - time.time()) < 60 for m in before
    )
    assert {m.id: (m.agents, m.free_slots) for m in before} == {"alpha": (1, 3), "beta": (2, 4)}
    assert {m.id: (m.agents, m.free_slots) for m in during} == {"alpha": (1, 2), "beta": (2, 3)}
    assert {m.id: (m.agents, m.free_slots) for m in after} == {"alpha": (1, 3), "beta": (2, 4)}
    assert answered[0].choices[0].message.content == "Hello"


# -- errors: each status is the SDK's own exception class ----------------------------------


def check_error(
    error: openai.APIStatusError,
    cls: type[openai.APIStatusError],
    status: int,
    kind: str,
    *,
    says: str,
    param: str | None = None,
    code: str | None = None,
) -> None:
    assert type(error) is cls, f"{type(error).__name__}, not {cls.__name__}"
    assert error.status_code == status
    assert error.body == {
        "message": error.body["message"],
        "type": kind,
        "param": param,
        "code": code,
    }  # type: ignore[index]
    assert says in error.body["message"], error.body  # type: ignore[index]
    assert (error.type, error.param, error.code) == (kind, param, code)
    assert error.response.headers["content-type"] == "application/json"


BAD_REQUESTS: dict[str, tuple[dict[str, Any], str, str]] = {
    "n-2": ({"n": 2}, "n", "only n = 1 is supported"),
    "tools": (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        "tools",
        "tools (function calling) is not supported by relayd",
    ),
    "image": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    ],
                }
            ]
        },
        "messages[0].content",
        "images are not supported",
    ),
    "temperature-a-string": (
        {"temperature": "hot"},
        "temperature",
        "temperature has the wrong type",
    ),
    "content-a-number": (
        {"messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
        "content must be a string or an array of text parts",
    ),
    "json-mode": (
        {"response_format": {"type": "json_object"}},
        "response_format",
        "only the text response format is supported",
    ),
    "logprobs": ({"logprobs": True}, "logprobs", "logprobs is not supported by relayd"),
    "tool-message": (
        {"messages": [{"role": "tool", "content": "42", "tool_call_id": "call_1"}]},
        "messages[0]",
        "tools (function calling) are not supported",
    ),
}


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_400_is_bad_request_error_naming_the_param(relayd: Relayd, flavour: str) -> None:
    errors = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agent = await start_v2(nursery, relayd, echo_stream_handler())
            async with Sdk(relayd, flavour) as sdk:
                for name, (fields, _param, _says) in BAD_REQUESTS.items():
                    request = {"messages": [{"role": "user", "content": "Hi"}], **fields}
                    with pytest.raises(openai.BadRequestError) as raised:
                        await sdk.create(**request)
                    errors[name] = raised.value
                    with pytest.raises(openai.BadRequestError):
                        await sdk.stream(**request)
            nursery.cancel_scope.cancel()
    for name, (_fields, param, says) in BAD_REQUESTS.items():
        check_error(
            errors[name],
            openai.BadRequestError,
            400,
            "invalid_request_error",
            says=says,
            param=param,
        )
    assert agent.stats.requests == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_401_is_authentication_error(relayd: Relayd, flavour: str) -> None:
    with trio.fail_after(30):
        async with Sdk(relayd, flavour, api_key="not-a-token") as sdk:
            with pytest.raises(openai.AuthenticationError) as chat:
                await sdk.create(messages=[{"role": "user", "content": "Hi"}])
            with pytest.raises(openai.AuthenticationError) as streamed:
                await sdk.stream(messages=[{"role": "user", "content": "Hi"}])
    for raised in (chat, streamed):
        check_error(
            raised.value,
            openai.AuthenticationError,
            401,
            "authentication_error",
            says="invalid token",
            code="invalid_api_key",
        )


async def test_401_on_models_is_authentication_error(relayd: Relayd) -> None:
    with trio.fail_after(30):
        async with Sdk(relayd, "async", api_key="not-a-token") as sdk:
            with pytest.raises(openai.AuthenticationError) as raised:
                await sdk.models()
    error = raised.value
    assert error.status_code == 401
    assert error.body is not None
    assert error.body["type"] == "authentication_error"  # type: ignore[index]
    assert error.body["message"] == "invalid token"  # type: ignore[index]


async def test_401_has_the_same_body_on_both_v1_routes(relayd: Relayd) -> None:
    with trio.fail_after(30):
        async with Sdk(relayd, "async", api_key="not-a-token") as sdk:
            with pytest.raises(openai.AuthenticationError) as models:
                await sdk.models()
            with pytest.raises(openai.AuthenticationError) as chat:
                await sdk.create(messages=[{"role": "user", "content": "Hi"}])
    assert models.value.body == chat.value.body


async def test_404_unknown_model_is_not_found_error(relayd: Relayd) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start_v2(nursery, relayd, echo_stream_handler(), models=("alpha", "beta"))
            async with Sdk(relayd, "async") as sdk:
                with pytest.raises(openai.NotFoundError) as chat:
                    await sdk.create(model="gamma", messages=[{"role": "user", "content": "Hi"}])
                with pytest.raises(openai.NotFoundError) as streamed:
                    await sdk.stream(model="gamma", messages=[{"role": "user", "content": "Hi"}])
            nursery.cancel_scope.cancel()
    for raised in (chat, streamed):
        check_error(
            raised.value,
            openai.NotFoundError,
            404,
            "not_found_error",
            says="no connected agent serves model 'gamma'; models served: alpha, beta",
            code="model_not_found",
        )


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_404_unknown_v1_route_is_not_found_error_in_openais_shape(
    relayd: Relayd, flavour: str
) -> None:
    with trio.fail_after(30):
        async with Sdk(relayd, flavour) as sdk:
            with pytest.raises(openai.NotFoundError) as raised:
                await sdk.call(lambda c: c.embeddings.create(model=MODEL, input="Hi"))
    error = raised.value
    assert error.status_code == 404
    assert error.body is not None
    assert set(error.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    assert error.body["type"] == "not_found_error"  # type: ignore[index]
    assert "/v1/embeddings" in error.body["message"]  # type: ignore[index]


async def test_405_wrong_method_is_openai_shaped(relayd: Relayd) -> None:
    with trio.fail_after(30):
        async with client(relayd) as http:
            auth = {"Authorization": f"Bearer {relayd.admin_key}"}
            chat = await http.get("/v1/chat/completions", headers=auth)
            models = await http.post("/v1/models", headers=auth, content=b"{}")
    for response in (chat, models):
        assert response.status_code == 405, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
    assert chat.headers["allow"] == "POST"
    assert chat.json()["error"]["message"] == "method GET not allowed on /v1/chat/completions"
    assert "GET" in models.headers["allow"]


async def test_413_is_an_api_status_error(relayd_factory: Callable[..., Relayd]) -> None:
    relayd = relayd_factory(config='[requests]\nmax_content = "64B"\n')
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agent = await start_v2(nursery, relayd, echo_stream_handler())
            async with Sdk(relayd, "async") as sdk:
                fits = await sdk.create(messages=[{"role": "user", "content": "x" * 64}])
                with pytest.raises(openai.APIStatusError) as raised:
                    await sdk.create(
                        messages=[
                            {"role": "system", "content": "y" * 32},
                            {"role": "user", "content": "x" * 33},
                        ]
                    )
            nursery.cancel_scope.cancel()
    assert fits.choices[0].message.content == "echo:" + "x" * 64
    check_error(
        raised.value,
        openai.APIStatusError,
        413,
        "invalid_request_error",
        says="messages are larger than requests.max_content (64 bytes)",
    )
    assert agent.stats.requests == 1


async def test_413_over_max_body_is_an_api_status_error(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config='[server]\nmax_body = "2KiB"\n')
    with trio.fail_after(30):
        async with Sdk(relayd, "async") as sdk:
            with pytest.raises(openai.APIStatusError) as raised:
                await sdk.create(messages=[{"role": "user", "content": "x" * 4096}])
    error = raised.value
    assert type(error) is openai.APIStatusError
    assert error.status_code == 413
    assert error.body is not None
    assert error.body["type"] == "invalid_request_error"  # type: ignore[index]


async def test_429_is_rate_limit_error_and_a_user_token_still_works(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config='[auth]\nfailure_burst = 1\nfailure_interval = "60s"\n')
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            token = await add_user(http, relayd)
            await start_v2(nursery, relayd, echo_stream_handler())
            await wait_for_agents(http, relayd, count=1)
            async with Sdk(relayd, "async", api_key="not-a-token") as wrong:
                with pytest.raises(openai.AuthenticationError):
                    await wrong.create(messages=[{"role": "user", "content": "Hi"}])
            # The address is locked now: the admin key is refused before it is compared.
            async with Sdk(relayd, "sync") as admin:
                with pytest.raises(openai.RateLimitError) as raised:
                    await admin.create(messages=[{"role": "user", "content": "Hi"}])
            async with Sdk(relayd, "async", api_key=token) as user:
                completion = await user.create(messages=[{"role": "user", "content": "Hi"}])
            nursery.cancel_scope.cancel()
    check_error(
        raised.value,
        openai.RateLimitError,
        429,
        "rate_limit_error",
        says="too many failed attempts",
        code="rate_limit_exceeded",
    )
    assert 1 <= int(raised.value.response.headers["retry-after"]) <= 60
    assert completion.choices[0].message.content == "echo:Hi"


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_502_agent_error_is_internal_server_error(relayd: Relayd, flavour: str) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agent = await start_v2(nursery, relayd, fails)
            async with Sdk(relayd, flavour) as sdk:
                with pytest.raises(openai.InternalServerError) as chat:
                    await sdk.create(messages=[{"role": "user", "content": "Hi"}])
                with pytest.raises(openai.InternalServerError) as streamed:
                    await sdk.stream(messages=[{"role": "user", "content": "Hi"}])
            nursery.cancel_scope.cancel()
    for raised in (chat, streamed):
        check_error(
            raised.value,
            openai.InternalServerError,
            502,
            "server_error",
            says="the agent failed (backend_error): the backend said no",
        )
    assert agent.stats.errors == 2  # not retryable: no second attempt


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_failure_mid_stream_is_an_api_error_from_the_stream(
    relayd: Relayd, flavour: str
) -> None:
    """After the first chunk the status is sent: the stream ends with an error event,
    which the SDK raises as :class:`openai.APIError` while iterating."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start_v2(nursery, relayd, fails_mid_answer)
            async with Sdk(relayd, flavour) as sdk:
                got: list[str] = []

                def collect(c: Any) -> None:
                    for chunk in c.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
                    ):
                        got.append(chunk.choices[0].delta.content)

                async def acollect(c: Any) -> None:
                    stream = await c.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
                    )
                    async for chunk in stream:
                        got.append(chunk.choices[0].delta.content)

                with pytest.raises(openai.APIError) as raised:
                    await sdk.call(collect if flavour == "sync" else acollect)
            nursery.cancel_scope.cancel()
    error = raised.value
    assert not isinstance(error, openai.APIStatusError)
    assert got == ["", "Hel"]
    assert error.message == "the agent failed mid-answer: the backend broke off"
    assert error.body == {
        "message": "the agent failed mid-answer: the backend broke off",
        "type": "server_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_503_no_agent_is_internal_server_error_with_retry_after(
    relayd: Relayd, flavour: str
) -> None:
    with trio.fail_after(30):
        async with Sdk(relayd, flavour) as sdk:
            with pytest.raises(openai.InternalServerError) as chat:
                await sdk.create(messages=[{"role": "user", "content": "Hi"}])
            with pytest.raises(openai.InternalServerError) as streamed:
                await sdk.stream(messages=[{"role": "user", "content": "Hi"}])
    for raised in (chat, streamed):
        check_error(
            raised.value, openai.InternalServerError, 503, "server_error", says="no agent connected"
        )
        assert raised.value.response.headers["retry-after"] == "5"


async def test_503_queue_full_is_internal_server_error(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config="[requests]\nmax_queue = 0\n")
    held = Script(hold=trio.Event())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start_v2(nursery, relayd, held.handle)
            async with Sdk(relayd, "async") as first, Sdk(relayd, "sync") as second:
                answered: list[Any] = []

                async def busy() -> None:
                    request = {"messages": [{"role": "user", "content": "busy"}]}
                    answered.append(await first.create(**request))

                nursery.start_soon(busy)
                await held.arrived.wait()
                with pytest.raises(openai.InternalServerError) as raised:
                    await second.create(messages=[{"role": "user", "content": "Hi"}])
                assert held.hold is not None
                held.hold.set()
                await until(lambda: answered)
            nursery.cancel_scope.cancel()
    assert answered[0].choices[0].message.content == "Hello"
    check_error(
        raised.value,
        openai.InternalServerError,
        503,
        "server_error",
        says="all agents are busy and the wait queue is full",
    )
    assert raised.value.response.headers["retry-after"] == "5"


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_504_requests_timeout_is_internal_server_error(
    relayd_factory: Callable[..., Relayd], flavour: str
) -> None:
    relayd = relayd_factory(config='[requests]\ntimeout = "0.5s"\n')
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agent = await start_v2(nursery, relayd, never_answers)
            async with Sdk(relayd, flavour) as sdk:
                with pytest.raises(openai.InternalServerError) as chat:
                    await sdk.create(messages=[{"role": "user", "content": "Hi"}])
                with pytest.raises(openai.InternalServerError) as streamed:
                    await sdk.stream(messages=[{"role": "user", "content": "Hi"}])
            await until(lambda: len(agent.stats.cancels) >= 2)
            nursery.cancel_scope.cancel()
    for raised in (chat, streamed):
        check_error(
            raised.value,
            openai.InternalServerError,
            504,
            "timeout_error",
            says="no answer within requests.timeout (0.5s)",
        )


class StallingTransport(httpx2.HTTPTransport):
    """Sends the first bytes of each request body, then nothing until relayd has
    answered 408 (seen in its log), then the rest: a client whose body stalled."""

    def __init__(self, relayd: Relayd) -> None:
        super().__init__()
        self.relayd = relayd

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        relayd = self.relayd

        class Stalling(httpx2.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                yield body[:10]
                deadline = time.monotonic() + 10
                while "request failed: status=408" not in relayd.log:
                    assert time.monotonic() < deadline, "no 408 within 10 s"
                    time.sleep(0.02)  # a poll of relayd's log, bounded above
                yield body[10:]

        request.stream = Stalling()
        return super().handle_request(request)


async def test_408_a_stalled_body_is_an_api_status_error(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config='[server]\nidle_timeout = "0.5s"\n')
    with trio.fail_after(30):
        async with Sdk(relayd, "sync", transport=StallingTransport(relayd)) as sdk:
            with pytest.raises(openai.APIStatusError) as raised:
                await sdk.create(messages=[{"role": "user", "content": "Hi"}])
    check_error(
        raised.value,
        openai.APIStatusError,
        408,
        "timeout_error",
        says="the request body stopped arriving for server.idle_timeout (0.5 s)",
    )


# -- the SDK's retries honour Retry-After ------------------------------------------------------


async def test_the_sdk_retries_a_429_after_retry_after_and_then_succeeds(
    relayd_factory: Callable[..., Relayd],
) -> None:
    """The address is locked for a second (failure_interval): the admin key gets 429
    with Retry-After 1; the SDK waits that long, asks again and is answered."""
    relayd = relayd_factory(config='[auth]\nfailure_burst = 1\nfailure_interval = "1s"\n')
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            await start_v2(nursery, relayd, echo_stream_handler())
            await wait_for_agents(http, relayd, count=1)
            async with Sdk(relayd, "sync", max_retries=2) as sdk:
                # One wrong token locks the address for up to a second.
                refused = await http.post("/v1/chat/completions", headers={"Authorization": "x"})
                assert refused.status_code == 401
                completion = await sdk.create(messages=[{"role": "user", "content": "Hi"}])
            nursery.cancel_scope.cancel()
    assert completion.choices[0].message.content == "echo:Hi"
    first, second = sdk.exchanges
    assert (first.status, second.status) == (429, 200)
    assert first.answered_at is not None
    waited = second.sent_at - first.answered_at
    assert 0.95 <= waited < 1.6, waited  # Retry-After: 1


async def test_the_sdk_retries_a_503_after_retry_after_and_another_agent_answers(
    relayd: Relayd,
) -> None:
    """The only agent goes away with the request (503, Retry-After 1); another
    connects while the SDK waits; the SDK's retry gets its answer."""
    doomed = Script(hold=trio.Event())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            first = await start_v2(nursery, relayd, doomed.handle)
            async with Sdk(relayd, "async", max_retries=2) as sdk:
                answers: list[Any] = []

                async def ask() -> None:
                    answers.append(await sdk.create(messages=[{"role": "user", "content": "Hi"}]))

                nursery.start_soon(ask)
                await doomed.arrived.wait()
                first.kill()
                await until(lambda: sdk.exchanges and sdk.exchanges[0].status == 503)
                second = await start_v2(nursery, relayd, echo_stream_handler())
                await until(lambda: answers)
            nursery.cancel_scope.cancel()
    assert answers[0].choices[0].message.content == "echo:Hi"
    refused, retried = sdk.exchanges
    assert (refused.status, retried.status) == (503, 200)
    assert refused.answered_at is not None
    assert 0.95 <= retried.sent_at - refused.answered_at < 1.6
    assert second.stats.replies == 1
    log = relayd.log
    assert "reason=the agent disconnected before replying and no other agent was free" in log


@pytest.mark.slow
async def test_the_sdk_waits_the_5_s_of_a_503_no_agent_and_an_agent_that_came_answers(
    relayd: Relayd,
) -> None:
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            async with Sdk(relayd, "async", max_retries=2) as sdk:
                answers: list[Any] = []

                async def ask() -> None:
                    answers.append(await sdk.create(messages=[{"role": "user", "content": "Hi"}]))

                nursery.start_soon(ask)
                await until(lambda: sdk.exchanges and sdk.exchanges[0].status == 503)
                await start_v2(nursery, relayd, echo_stream_handler())
                await until(lambda: answers)
            nursery.cancel_scope.cancel()
    refused, retried = sdk.exchanges
    assert (refused.status, retried.status) == (503, 200)
    assert refused.answered_at is not None
    assert 4.9 <= retried.sent_at - refused.answered_at < 5.6
    assert answers[0].choices[0].message.content == "echo:Hi"


# -- a client that leaves --------------------------------------------------------------------


@pytest.mark.parametrize("way", ["wire", "hypercorn"])
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_closing_a_stream_early_cancels_the_request_at_the_agent(
    relayd_factory: Callable[..., Relayd], flavour: str, way: str
) -> None:
    relayd = relayd_factory(args=DEBUG)
    script = Script(pieces=["one ", "two ", "three ", "four"], delay=1.0)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agent = await start_v2(nursery, relayd, script.handle)
            async with Sdk(relayd, flavour, one_connection=True) as sdk:
                if way == "hypercorn":
                    await sdk.models()  # the connection's first request: Hypercorn's from now on
                streamed = await sdk.stream(
                    messages=[{"role": "user", "content": "Count"}], stop_after=1
                )
                await until(lambda: script.cancelled)
            nursery.cancel_scope.cancel()
    assert streamed.contents == ["one "]
    assert streamed.closed_at is not None
    waited = script.cancelled[0] - streamed.closed_at
    assert waited < 0.1, f"the cancel reached the agent {waited:.3f} s after the client left"
    (request,) = script.requests
    assert agent.stats.cancels == [request.request_id]
    assert len(script.sent) == 1  # nothing more was asked of it
    address = sdk.exchanges[-1].client
    assert served(relayd, address) == ((True, False) if way == "wire" else (False, False))
    assert "request cancelled" in relayd.log and "reason=the client went away" in relayd.log


# -- both HTTP paths -------------------------------------------------------------------------


@pytest.mark.parametrize("way", ["wire", "hypercorn"])
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_completion_and_stream_on_each_http_path(
    relayd_factory: Callable[..., Relayd], flavour: str, way: str
) -> None:
    """A connection whose first request is the ``POST`` is relayd's wire path's; one
    whose first request is ``GET /v1/models`` is Hypercorn's, for good. (The SDK
    may drop a connection after a stream, without reading its last bytes: so for
    Hypercorn's path each ``POST`` comes after a ``GET`` on its connection.)"""
    relayd = relayd_factory(args=DEBUG)
    script = Script(
        pieces=["a", "b", "c"], delay=0.2, usage={"prompt_tokens": 1, "completion_tokens": 3}
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start_v2(nursery, relayd, script.handle)
            async with Sdk(relayd, flavour, one_connection=True) as sdk:
                if way == "hypercorn":
                    assert [m.id for m in await sdk.models()] == [MODEL]
                completion = await sdk.create(messages=[{"role": "user", "content": "abc"}])
                if way == "hypercorn":
                    assert [m.id for m in await sdk.models()] == [MODEL]
                streamed = await sdk.stream(
                    messages=[{"role": "user", "content": "abc"}],
                    stream_options={"include_usage": True},
                )
            nursery.cancel_scope.cancel()
    assert completion.choices[0].message.content == "abc"
    assert streamed.contents == ["a", "b", "c"]
    assert streamed.first_content_at() < script.sent[-1] - 0.2
    assert streamed.chunks[-1][1].usage.total_tokens == 4
    exchanges = sdk.exchanges
    assert all(e.status == 200 for e in exchanges), exchanges
    posts = [e for e in exchanges if e.method == "POST"]
    assert len(posts) == 2
    for index, exchange in enumerate(exchanges):
        if exchange.method != "POST":
            continue
        if way == "wire":
            assert served(relayd, exchange.client) == (True, False), exchange
        else:
            assert served(relayd, exchange.client) == (False, False), exchange
            before = exchanges[index - 1]
            assert (before.path, before.client) == ("/v1/models", exchange.client)


# Raw HTTP: the same bytes from both loops (apart from ids, times and the date).


def chat_request(relayd: Relayd, document: dict[str, Any], *, token: str | None = None) -> bytes:
    raw = json.dumps(document).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay.example\r\n"
        b"Authorization: Bearer " + (token or relayd.admin_key).encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(raw) + raw
    )


@dataclass
class RawAnswer:
    status_line: bytes
    headers: dict[bytes, bytes]
    body: bytes
    pieces: list[tuple[float, bytes]]  # a streamed body's chunks, with when each came

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ")[1])

    def events(self) -> list[str]:
        text = self.body.decode()
        assert text.endswith("\n\n"), text
        return [event.removeprefix("data: ") for event in text[:-2].split("\n\n")]


class RawConnection:
    """A loopback socket that reads responses framed by Content-Length or chunked."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        host, port = stream.socket.getsockname()[:2]
        self.local = f"{host}:{port}"

    @classmethod
    async def open(cls, relayd: Relayd) -> RawConnection:
        return cls(await trio.open_tcp_stream(HOST, relayd.port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            data = await self.stream.receive_some(65536)
            assert data, f"the connection ended; unparsed: {self.buffer!r}"
            self.buffer += data
        line, self.buffer = self.buffer.split(marker, 1)
        return line

    async def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = await self.stream.receive_some(65536)
            assert data, f"the connection ended; unparsed: {self.buffer!r}"
            self.buffer += data
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def response(self) -> RawAnswer:
        status_line, *lines = (await self._until(b"\r\n\r\n")).split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await self._exactly(int(headers[b"content-length"]))
            return RawAnswer(status_line, headers, body, [])
        assert headers.get(b"transfer-encoding") == b"chunked", headers
        pieces = []
        while True:
            size = int((await self._until(b"\r\n")).split(b";")[0], 16)
            data = await self._exactly(size)
            assert await self._exactly(2) == b"\r\n"
            if not size:
                break
            pieces.append((time.monotonic(), data))
        return RawAnswer(status_line, headers, b"".join(data for _, data in pieces), pieces)

    async def aclose(self) -> None:
        await self.stream.aclose()


def normalised(document: dict[str, Any]) -> dict[str, Any]:
    """A completion or chunk without what differs each time."""
    assert document["id"].startswith("chatcmpl-")
    assert isinstance(document["created"], int)
    return {key: value for key, value in document.items() if key not in ("id", "created")}


async def exchange_on(relayd: Relayd, way: str, request: bytes) -> tuple[RawAnswer, RawConnection]:
    connection = await RawConnection.open(relayd)
    if way == "hypercorn":
        await connection.send(HEALTH + request)
        health = await connection.response()
        assert (health.status, health.body) == (200, b"OK")
    else:
        await connection.send(request)
    answer = await connection.response()
    await connection.aclose()
    return answer, connection


async def test_the_same_completion_and_stream_bytes_from_both_loops(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(args=DEBUG)
    script = Script(
        pieces=["Hel", "lo ", "there"],
        delay=0.3,
        usage={"prompt_tokens": 2, "completion_tokens": 3},
    )
    whole = chat_request(relayd, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    streamed = chat_request(
        relayd,
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    answers: dict[str, dict[str, RawAnswer]] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start_v2(nursery, relayd, script.handle)
            for way in ("wire", "hypercorn"):
                sent_before = len(script.sent)
                plain, plain_connection = await exchange_on(relayd, way, whole)
                stream, stream_connection = await exchange_on(relayd, way, streamed)
                # The first piece reached the client long before the agent sent its last.
                first_piece_at = stream.pieces[0][0]
                assert first_piece_at < script.sent[sent_before + 5] - 0.3
                for connection in (plain_connection, stream_connection):
                    expected = (True, False) if way == "wire" else (False, False)
                    assert served(relayd, connection.local) == expected, way
                answers[way] = {"plain": plain, "stream": stream}
            nursery.cancel_scope.cancel()
    wire, hypercorn = answers["wire"], answers["hypercorn"]
    for kind in ("plain", "stream"):
        assert wire[kind].status == hypercorn[kind].status == 200
    # Whole: the same object.
    assert normalised(json.loads(wire["plain"].body)) == normalised(
        json.loads(hypercorn["plain"].body)
    )
    assert normalised(json.loads(wire["plain"].body)) == {
        "object": "chat.completion",
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
    }
    assert wire["plain"].headers[b"content-type"] == b"application/json"
    assert hypercorn["plain"].headers[b"content-type"] == b"application/json"
    # Streamed: server-sent events, one data: line each, ending in [DONE].
    for answers_of in (wire, hypercorn):
        stream = answers_of["stream"]
        assert stream.headers[b"content-type"] == b"text/event-stream; charset=utf-8"
        assert stream.headers[b"cache-control"] == b"no-cache"
        # The head goes with the first piece, then one chunk per piece, then the end.
        assert len(stream.pieces) == 4
    wire_events, hypercorn_events = wire["stream"].events(), hypercorn["stream"].events()
    assert wire_events[-1] == hypercorn_events[-1] == "[DONE]"
    wire_chunks = [normalised(json.loads(event)) for event in wire_events[:-1]]
    hypercorn_chunks = [normalised(json.loads(event)) for event in hypercorn_events[:-1]]
    assert wire_chunks == hypercorn_chunks
    assert [chunk["choices"] for chunk in wire_chunks] == [
        [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        [{"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "lo "}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "there"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
        [],
    ]
    assert wire_chunks[-1]["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
    }


SAME_CONFIG = '[requests]\nmax_content = "16B"\n'
SAME_CASES: dict[str, tuple[dict[str, Any] | bytes, str | None]] = {
    "no-agent": ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}, None),
    "invalid-token": ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}, "nope"),
    "n-2": ({"messages": [{"role": "user", "content": "Hi"}], "n": 2}, None),
    "image": (BAD_REQUESTS["image"][0], None),
    "over-max-content": ({"messages": [{"role": "user", "content": "x" * 17}]}, None),
    "not-json": (b'{"messages": ', None),
    "empty-body": (b"", None),
}


@pytest.mark.parametrize(("body", "token"), SAME_CASES.values(), ids=SAME_CASES.keys())
async def test_errors_are_the_same_from_both_loops(
    relayd_factory: Callable[..., Relayd], body: dict[str, Any] | bytes, token: str | None
) -> None:
    relayd = relayd_factory(config=SAME_CONFIG, args=DEBUG)
    if isinstance(body, bytes):
        request = chat_request(relayd, {}, token=token)
        request = (
            request[: request.index(b"Content-Length")]
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
    else:
        request = chat_request(relayd, body, token=token)
    with trio.fail_after(20):
        on_wire, wire = await exchange_on(relayd, "wire", request)
        through_hypercorn, hypercorn = await exchange_on(relayd, "hypercorn", request)
    assert served(relayd, wire.local) == (True, False)
    assert served(relayd, hypercorn.local) == (False, False)
    assert on_wire.status == through_hypercorn.status
    assert 400 <= on_wire.status < 600
    assert on_wire.body == through_hypercorn.body
    error = json.loads(on_wire.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert set(on_wire.headers) - {b"date", b"server"} == set(through_hypercorn.headers) - {
        b"date",
        b"server",
    }
    assert on_wire.headers.get(b"retry-after") == through_hypercorn.headers.get(b"retry-after")


# -- v1 (seed) agents and agents.v1_model -------------------------------------------------------

V1_CONFIG = '[agents]\nv1_model = "seed"\n'


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_v1_agent_gets_a_chat_for_agents_v1_model_as_one_content(
    relayd_factory: Callable[..., Relayd], flavour: str
) -> None:
    relayd = relayd_factory(config=V1_CONFIG)
    seen: list[Request] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_agent(nursery, relayd.agent_url, recording(seen))
            await wait_for_agents(http, relayd, ids={agent.id})
            async with Sdk(relayd, flavour) as sdk:
                alone = await sdk.create(
                    model="seed", messages=[{"role": "user", "content": "Hello there"}]
                )
                history = await sdk.create(model="seed", messages=MESSAGES, **PARAMS)
                streamed = await sdk.stream(
                    model="seed",
                    messages=[{"role": "user", "content": "Hello, stream"}],
                    stream_options={"include_usage": True},
                )
                models = await sdk.models()
            nursery.cancel_scope.cancel()
    transcript = (
        "System: Be brief.\n\n"
        "User: Hello, world\n\n"
        "Assistant: Hi! What can I do?\n\n"
        "User: Say hello back."
    )
    assert agent.stats.contents == ["Hello there", transcript, "Hello, stream"]
    assert all(request.model is None for request in seen)  # a v1 frame names no model
    assert alone.choices[0].message.content == "echo:Hello there"
    assert alone.model == "seed"
    assert alone.usage is None
    assert history.choices[0].message.content == "echo:" + transcript
    # A v1 answer comes whole: one chunk with all of it.
    assert streamed.contents == ["echo:Hello, stream"]
    assert streamed.chunks[-1][1].usage.total_tokens == 0
    assert [(m.id, m.agents, m.free_slots) for m in models] == [("seed", 1, 1)]


async def test_a_chat_naming_no_model_may_go_to_a_v1_agent(
    relayd_factory: Callable[..., Relayd],
) -> None:
    """The SDK always names a model; raw HTTP need not. The completion then names
    agents.v1_model (or "relayd" without one)."""
    for config, named in ((V1_CONFIG, "seed"), (None, "relayd")):
        relayd = relayd_factory(config=config)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery, client(relayd) as http:
                agent = await start_agent(nursery, relayd.agent_url, recording([]))
                await wait_for_agents(http, relayd, ids={agent.id})
                response = await http.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "Hi"}]},
                    headers={"Authorization": f"Bearer {relayd.admin_key}"},
                )
                nursery.cancel_scope.cancel()
        assert response.status_code == 200, response.text
        assert response.json()["model"] == named
        assert response.json()["choices"][0]["message"]["content"] == "echo:Hi"
        assert agent.stats.contents == ["Hi"]


@pytest.mark.parametrize(
    ("config", "model", "served"),
    [(V1_CONFIG, "other", "seed"), (None, "seed", "none")],
    ids=["another-model", "no-v1-model-configured"],
)
async def test_a_model_only_v1_agents_could_serve_is_404(
    relayd_factory: Callable[..., Relayd], config: str | None, model: str, served: str
) -> None:
    """Only v1 agents connected, and a model they do not serve as agents.v1_model:
    404 at once, naming what is served (a 503 made the SDK retry a typo twice)."""
    relayd = relayd_factory(config=config)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_agent(nursery, relayd.agent_url, recording([]))
            await wait_for_agents(http, relayd, ids={agent.id})
            async with Sdk(relayd, "async") as sdk:
                with pytest.raises(openai.NotFoundError) as raised:
                    await sdk.create(model=model, messages=[{"role": "user", "content": "Hi"}])
            nursery.cancel_scope.cancel()
    check_error(
        raised.value,
        openai.NotFoundError,
        404,
        "not_found_error",
        says=f"no connected agent serves model {model!r}; models served: {served}",
        code="model_not_found",
    )
    assert agent.stats.requests == 0


async def test_with_v1_and_v2_agents_each_model_goes_where_it_is_served(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config=V1_CONFIG)
    script = Script(pieces=["from v2"])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            v1 = await start_agent(nursery, relayd.agent_url, recording([]))
            v2 = await start_v2(nursery, relayd, script.handle, models=(MODEL,))
            await wait_for_agents(http, relayd, ids={v1.id, v2.id})
            async with Sdk(relayd, "async") as sdk:
                seed = await sdk.create(model="seed", messages=[{"role": "user", "content": "a"}])
                m1 = await sdk.create(model=MODEL, messages=[{"role": "user", "content": "b"}])
                models = await sdk.models()
                with pytest.raises(openai.NotFoundError) as raised:
                    await sdk.create(model="other", messages=[{"role": "user", "content": "c"}])
            nursery.cancel_scope.cancel()
    assert seed.choices[0].message.content == "echo:a"
    assert m1.choices[0].message.content == "from v2"
    assert v1.stats.contents == ["a"]
    assert [r.messages for r in script.requests] == [({"role": "user", "content": "b"},)]  # type: ignore[union-attr]
    assert sorted(m.id for m in models) == [MODEL, "seed"]
    assert raised.value.code == "model_not_found"
    assert "no connected agent serves model 'other'" in raised.value.message


async def test_the_404_for_an_unknown_model_names_agents_v1_model_too(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config=V1_CONFIG)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            v1 = await start_agent(nursery, relayd.agent_url, recording([]))
            v2 = await start_v2(nursery, relayd, echo_stream_handler(), models=(MODEL,))
            await wait_for_agents(http, relayd, ids={v1.id, v2.id})
            async with Sdk(relayd, "async") as sdk:
                with pytest.raises(openai.NotFoundError) as raised:
                    await sdk.create(model="other", messages=[{"role": "user", "content": "c"}])
            nursery.cancel_scope.cancel()
    assert raised.value.message.endswith("models served: m1, seed"), raised.value.message


# -- another OpenAI client: LangChain --------------------------------------------------------


async def test_langchain_chat_openai(relayd: Relayd) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    script = Script(
        pieces=["Hello ", "from ", "relayd"], usage={"prompt_tokens": 3, "completion_tokens": 3}
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            token = await add_user(http, relayd)
            await start_v2(nursery, relayd, script.handle)
            chat = langchain_openai.ChatOpenAI(
                base_url=relayd.url + "/v1",
                api_key=token,
                model=MODEL,
                temperature=0.5,
                max_tokens=32,
                max_retries=0,
                timeout=SDK_TIMEOUT,
            )
            message = await trio.to_thread.run_sync(chat.invoke, "Hi", abandon_on_cancel=True)
            pieces = await trio.to_thread.run_sync(
                lambda: [chunk.content for chunk in chat.stream("Hi again")],
                abandon_on_cancel=True,
            )
            nursery.cancel_scope.cancel()
    assert message.content == "Hello from relayd"
    assert message.usage_metadata is not None
    assert message.usage_metadata["total_tokens"] == 6
    assert "".join(pieces) == "Hello from relayd"
    assert [p for p in pieces if p] == script.pieces
    first, second = script.requests
    assert isinstance(first, ChatRequest) and isinstance(second, ChatRequest)
    assert first.messages == ({"role": "user", "content": "Hi"},)
    assert second.messages == ({"role": "user", "content": "Hi again"},)
    assert first.params["temperature"] == 0.5
    assert first.params.get("max_tokens", first.params.get("max_completion_tokens")) == 32


# -- docs/api.md's /v1 section, run as written ---------------------------------------------------

DOCS_MODEL = "llama3.1:8b"


def no_proxy_environment() -> dict[str, str]:
    """This environment without proxy settings (curl and httpx would obey them)."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def v1_section() -> str:
    text = DOCS_API.read_text(encoding="utf-8")
    start = text.index("\n## /v1 (OpenAI-compatible)\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


@dataclass
class Example:
    """A curl command of the docs and the output documented below it."""

    command: str
    output: list[str]


def curl_examples() -> list[Example]:
    examples: list[Example] = []
    for block in code_blocks(v1_section(), "sh"):
        lines = block.splitlines()
        index = 0
        while index < len(lines):
            line = lines[index]
            index += 1
            if not line.startswith("curl "):
                continue
            command = [line]
            while command[-1].endswith("\\"):
                command.append(lines[index])
                index += 1
            output = []
            while index < len(lines) and lines[index].startswith("#"):
                output.append(lines[index].removeprefix("#").removeprefix(" "))
                index += 1
            examples.append(Example("\n".join(command), output))
    return examples


def shape(value: Any) -> Any:
    """A JSON value's shape: its keys, recursively, and the types of its scalars."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value[:1]]
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def chunk_kind(chunk: dict[str, Any]) -> str:
    if not chunk["choices"]:
        return "usage"
    choice = chunk["choices"][0]
    if choice["finish_reason"] is not None:
        return "finish"
    return "head" if "role" in choice["delta"] else "content"


def check_documented_stream(documented: list[str], actual: str) -> None:
    """The documented events and the actual ones: the same kinds in the same order
    (content chunks, however many, as one), each of the documented shape."""
    shown = [line.removeprefix("data: ") for line in documented if line.startswith("data: ")]
    assert all(line == "" or line.startswith("data: ") for line in documented), documented
    got = [event.removeprefix("data: ") for event in actual.strip().split("\n\n")]
    assert shown[-1] == got[-1] == "[DONE]"
    shown_chunks = [json.loads(event) for event in shown[:-1]]
    got_chunks = [json.loads(event) for event in got[:-1]]

    def kinds(chunks: list[dict[str, Any]]) -> list[str]:
        out: list[str] = []
        for chunk in chunks:
            kind = chunk_kind(chunk)
            if not (out and out[-1] == kind == "content"):
                out.append(kind)
        return out

    assert kinds(shown_chunks) == kinds(got_chunks)
    shapes = {chunk_kind(chunk): shape(chunk) for chunk in got_chunks}
    for chunk in shown_chunks:
        assert shape(chunk) == shapes[chunk_kind(chunk)], chunk


async def test_the_docs_curl_examples_work_as_documented(
    relayd_factory: Callable[..., Relayd],
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("no curl on PATH")
    examples = curl_examples()
    commands = [example.command for example in examples]
    assert len(examples) >= 3
    assert any("curl -N" in command and '"stream": true' in command for command in commands)
    assert any("/v1/models" in command for command in commands)
    assert all(example.output for example in examples), "each example shows its output"
    relayd = relayd_factory()
    script = Script(pieces=["Hi", "!"], usage={"prompt_tokens": 9, "completion_tokens": 2})
    outputs = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            token = await add_user(http, relayd)
            await start_v2(nursery, relayd, script.handle, models=(DOCS_MODEL,), capacity=2)
            for example in examples:
                command = example.command.replace("localhost:8080", f"{HOST}:{relayd.port}")
                assert f"{HOST}:{relayd.port}" in command
                result = await trio.run_process(
                    ["bash", "-c", "set -euo pipefail\n" + command + " --fail-with-body"],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env={**no_proxy_environment(), "TOKEN": token},
                )
                assert result.returncode == 0, (command, result.stdout, result.stderr)
                outputs.append(result.stdout.decode())
            nursery.cancel_scope.cancel()
    assert len(script.requests) == sum("/chat/completions" in c for c in commands)
    for example, output in zip(examples, outputs, strict=True):
        if '"stream": true' in example.command:
            check_documented_stream(example.output, output)
            continue
        documented = json.loads(" ".join(example.output))
        got = json.loads(output)
        assert shape(documented) == shape(got), (example.command, output)
        if got.get("object") == "chat.completion":
            assert got["choices"][0]["message"]["content"] == "Hi!"
            assert got["model"] == documented["model"] == DOCS_MODEL
        else:
            assert [entry["id"] for entry in got["data"]] == [DOCS_MODEL]


async def test_the_docs_python_examples_work_as_documented(
    relayd_factory: Callable[..., Relayd],
) -> None:
    blocks = code_blocks(v1_section(), "python")
    assert len(blocks) >= 2
    assert any("stream=True" in block for block in blocks)
    relayd = relayd_factory()
    script = Script(pieces=["Hi", "!"])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            token = await add_user(http, relayd)
            await start_v2(nursery, relayd, script.handle, models=(DOCS_MODEL,), capacity=2)
            for block in blocks:
                assert "http://localhost:8080/v1" in block and '"Qm9…"' in block, block
                code = block.replace("localhost:8080", f"{HOST}:{relayd.port}").replace(
                    '"Qm9…"', json.dumps(token)
                )
                result = await trio.run_process(
                    [sys.executable, "-c", code],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=no_proxy_environment(),
                )
                assert result.returncode == 0, (block, result.stderr.decode())
                assert "Hi!" in result.stdout.decode(), result.stdout
            nursery.cancel_scope.cancel()
    assert len(script.requests) == len(blocks)


def test_the_v1_section_names_every_refused_parameter() -> None:
    """What is not supported, as the docs say it, is what relayd refuses."""
    from relayd import openai_api

    section = v1_section()
    for name in [*openai_api._UNSUPPORTED, "n", "response_format"]:
        assert f"`{name}`" in section, name
    for name in openai_api._PARAMETERS:
        assert f"`{name}`" in section, name


# -- a defect of relayd.agentkit found here ---------------------------------------------------


async def test_a_v2_agent_survives_a_piece_its_handler_yields_after_a_cancel(
    relayd: Relayd,
) -> None:
    release = trio.Event()
    arrived = trio.Event()

    async def shielded(request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
        if isinstance(request, ChatRequest) and request.messages[-1]["content"] == "leave":
            arrived.set()
            with trio.CancelScope(shield=True):
                await release.wait()  # work the handler does not let a cancel interrupt
        yield "piece"

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agent = await start_v2(nursery, relayd, shielded)
            async with Sdk(relayd, "async") as sdk:
                async with trio.open_nursery() as client_side:
                    client_side.start_soon(
                        lambda: sdk.stream(messages=[{"role": "user", "content": "leave"}])
                    )
                    await arrived.wait()
                    client_side.cancel_scope.cancel()  # the client leaves
                await until(lambda: agent.stats.cancels)
                release.set()
                # The agent carries on: it answers the next request.
                streamed = await sdk.stream(messages=[{"role": "user", "content": "again"}])
            nursery.cancel_scope.cancel()
    assert streamed.contents == ["piece"]
    assert agent.stats.connections == 1
