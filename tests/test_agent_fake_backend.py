"""A small OpenAI-compatible backend for the agent's tests, and proof that it is honest.

:class:`FakeBackend` is a bare ASGI app on Hypercorn, on 127.0.0.1: ``POST
/v1/chat/completions`` (streamed or not), ``GET /v1/models``, and on demand
an HTTP error, a response that never starts, a stream that hangs, a stream
cut off mid-way, or one that ends without a finish reason. It records every
request's body and headers, and when each stream's client went away.

The tests in this file talk to it with the official ``openai`` SDK, so the
fake cannot drift from what the SDK (and so the agent) expects of a real
backend. Every wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Plan:
    """What the backend does with one chat request.

    ``answer`` (the default), ``status`` (an HTTP error ``status`` with
    ``message``), ``hang`` (never answers), ``hang_stream`` (``after`` chunks,
    then nothing), ``cut`` (``after`` chunks, then the connection drops),
    ``no_finish`` (the whole text, then ``[DONE]`` without a finish reason).
    """

    kind: str = "answer"
    status: int = 500
    message: str = "boom"
    after: int = 2


@dataclass
class StreamRecord:
    """One streamed answer, from the backend's side."""

    body: dict[str, Any]
    started: float
    finished: bool = False  # every chunk and [DONE] written
    closed_at: float | None = None  # when the client went away before the end
    closed: trio.Event = field(default_factory=trio.Event)


def default_answer(messages: list[dict[str, Any]]) -> str:
    last = messages[-1].get("content", "") if messages else ""
    return f"I heard: {last}"


class FakeBackend:
    def __init__(self, models: tuple[str, ...] = ("fake-1",)) -> None:
        self.models = list(models)
        self.models_status: int | None = None  # answer /v1/models with this error
        self.plans: deque[Plan] = deque()  # one per chat request, then answers
        self.default_plan = Plan()
        self.chunk_delay = 0.0
        self.answer: Callable[[list[dict[str, Any]]], str] = default_answer
        self.requests: list[dict[str, Any]] = []  # chat request bodies, in order
        self.headers: list[dict[str, str]] = []  # their headers
        self.model_lists = 0
        self.streams: list[StreamRecord] = []
        self._stream_send, self.stream_starts = trio.open_memory_channel[StreamRecord](math.inf)
        self.url = ""
        self._scope = trio.CancelScope()

    # -- running ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = logging.getLogger("fake-backend")
        config.graceful_timeout = 0.1

        with self._scope:
            async with trio.open_nursery() as nursery:
                bound: list[str] = await nursery.start(_serve, self.app, config)
                self.url = bound[0] + "/v1"
                task_status.started(self.url)

    def stop(self) -> None:
        self._scope.cancel()

    # -- the ASGI app ----------------------------------------------------------------------

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        if path == "/v1/models" and method == "GET":
            self.model_lists += 1
            if self.models_status is not None:
                await self._error(send, self.models_status, "no models here")
                return
            data = [
                {"id": model, "object": "model", "created": 0, "owned_by": "fake"}
                for model in self.models
            ]
            await self._json(send, 200, {"object": "list", "data": data})
            return
        if path != "/v1/chat/completions" or method != "POST":
            await self._error(send, 404, f"no route {path}")
            return
        request = json.loads(body)
        self.requests.append(request)
        self.headers.append(
            {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        )
        plan = self.plans.popleft() if self.plans else self.default_plan
        if plan.kind == "status":
            await self._error(send, plan.status, plan.message)
            return
        if plan.kind == "hang":
            await receive()  # until the client goes away
            return
        words, finish = self._words(request)
        if not request.get("stream"):
            content = "".join(words)
            completion = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": finish,
                    }
                ],
                "usage": self._usage(request, words),
            }
            await self._json(send, 200, completion)
            return
        await self._stream(request, words, finish, plan, receive, send)

    def _words(self, request: dict[str, Any]) -> tuple[list[str], str]:
        text = self.answer(request["messages"])
        pieces = text.split(" ")
        words = [w + " " for w in pieces[:-1]] + [pieces[-1]]
        limit = request.get("max_tokens")
        if isinstance(limit, int) and limit < len(words):
            return words[:limit], "length"
        return words, "stop"

    def _usage(self, request: dict[str, Any], words: list[str]) -> dict[str, int]:
        prompt = sum(len(str(m.get("content", "")).split()) for m in request["messages"])
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(words),
            "total_tokens": prompt + len(words),
        }

    async def _stream(
        self,
        request: dict[str, Any],
        words: list[str],
        finish: str,
        plan: Plan,
        receive: Receive,
        send: Send,
    ) -> None:
        record = StreamRecord(request, trio.current_time())
        self.streams.append(record)
        self._stream_send.send_nowait(record)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )

        async def watch() -> None:
            message = await receive()
            if message["type"] == "http.disconnect" and not record.finished:
                record.closed_at = trio.current_time()
                record.closed.set()

        def chunk(delta: dict[str, Any], reason: str | None, **extra: Any) -> bytes:
            document = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": request["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
                **extra,
            }
            return b"data: " + json.dumps(document).encode() + b"\n\n"

        async def write(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await write(chunk({"role": "assistant", "content": ""}, None))
            for index, word in enumerate(words):
                if plan.kind in ("hang_stream", "cut") and index == plan.after:
                    if plan.kind == "cut":
                        raise ConnectionAbortedError("the fake backend cuts the stream")
                    await record.closed.wait()
                    return
                if index and self.chunk_delay:
                    await trio.sleep(self.chunk_delay)
                await write(chunk({"content": word}, None))
            if plan.kind != "no_finish":
                await write(chunk({}, finish))
                options = request.get("stream_options") or {}
                if options.get("include_usage"):
                    usage = self._usage(request, words)
                    document = {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": request["model"],
                        "choices": [],
                        "usage": usage,
                    }
                    await write(b"data: " + json.dumps(document).encode() + b"\n\n")
            record.finished = True
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            nursery.cancel_scope.cancel()

    async def _json(self, send: Send, status: int, document: dict[str, Any]) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(document).encode()})

    async def _error(self, send: Send, status: int, message: str) -> None:
        await self._json(
            send, status, {"error": {"message": message, "type": "fake_error", "code": None}}
        )


async def _serve(
    app: Any, config: HypercornConfig, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    await serve(app, config, task_status=task_status)


async def start_backend(nursery: trio.Nursery, **kwargs: Any) -> FakeBackend:
    backend = FakeBackend(**kwargs)
    await nursery.start(backend.serve)
    return backend


# -- the fake, checked with the official SDK ------------------------------------------------


def sdk(backend: FakeBackend, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=backend.url, api_key="sk-test", max_retries=0, **kwargs)


async def test_the_sdk_reads_a_completion_and_the_model_list() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            backend = await start_backend(nursery, models=("m-a", "m-b"))
            client = sdk(backend)
            completion = await client.chat.completions.create(
                model="m-a", messages=[{"role": "user", "content": "hi there"}], seed=7
            )
            assert completion.choices[0].message.content == "I heard: hi there"
            assert completion.choices[0].finish_reason == "stop"
            assert completion.usage is not None and completion.usage.completion_tokens == 4
            assert backend.requests[0]["seed"] == 7
            assert backend.headers[0]["authorization"] == "Bearer sk-test"
            page = await client.models.list()
            assert [model.id async for model in page] == ["m-a", "m-b"]
            await client.close()
            nursery.cancel_scope.cancel()


async def test_the_sdk_reads_a_stream_with_usage_and_a_length_finish() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            backend = await start_backend(nursery)
            client = sdk(backend)
            stream = await client.chat.completions.create(
                model="fake-1",
                messages=[{"role": "user", "content": "one two three four"}],
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=3,
            )
            pieces, reasons, usage = [], [], None
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        pieces.append(choice.delta.content or "")
                        reasons.append(choice.finish_reason)
            assert "".join(pieces) == "I heard: one "
            assert reasons[-1] == "length"
            assert usage is not None and usage.completion_tokens == 3
            assert backend.streams[0].finished and backend.streams[0].closed_at is None
            await client.close()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, openai.BadRequestError),
        (404, openai.NotFoundError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
async def test_errors_on_demand_are_the_sdk_errors(
    status: int, exception: type[openai.APIStatusError]
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            backend = await start_backend(nursery)
            backend.plans.append(Plan("status", status=status, message="on purpose"))
            client = sdk(backend)
            with pytest.raises(exception) as raised:
                await client.chat.completions.create(
                    model="fake-1", messages=[{"role": "user", "content": "x"}]
                )
            assert raised.value.status_code == status
            assert isinstance(raised.value.body, dict)
            assert raised.value.body["message"] == "on purpose"
            await client.close()
            nursery.cancel_scope.cancel()


async def test_a_cut_stream_is_a_connection_error_and_a_hang_a_timeout() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            backend = await start_backend(nursery)
            client = sdk(backend, timeout=openai.Timeout(0.3, connect=1))
            backend.plans.extend([Plan("cut", after=2), Plan("hang_stream", after=1), Plan("hang")])
            messages: Any = [{"role": "user", "content": "a b c d e"}]
            got: list[str] = []
            with pytest.raises(openai.APIConnectionError) as raised:
                stream = await client.chat.completions.create(
                    model="fake-1", messages=messages, stream=True
                )
                async for chunk in stream:
                    got.extend(c.delta.content or "" for c in chunk.choices)
            assert not isinstance(raised.value, openai.APITimeoutError)
            assert "".join(got) == "I heard: "
            with pytest.raises(openai.APITimeoutError):
                stream = await client.chat.completions.create(
                    model="fake-1", messages=messages, stream=True
                )
                async for _ in stream:
                    pass
            with pytest.raises(openai.APITimeoutError):
                await client.chat.completions.create(model="fake-1", messages=messages)
            await client.close()
            nursery.cancel_scope.cancel()


async def test_the_fake_sees_a_closed_stream_at_once() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            backend = await start_backend(nursery)
            backend.chunk_delay = 0.05
            backend.answer = lambda messages: " ".join(["word"] * 200)
            client = sdk(backend)
            stream = await client.chat.completions.create(
                model="fake-1", messages=[{"role": "user", "content": "x"}], stream=True
            )
            async with stream:
                async for _ in stream:
                    break
            closed_by_us = trio.current_time()
            record = backend.streams[0]
            await record.closed.wait()
            assert record.closed_at is not None
            assert record.closed_at - closed_by_us < 0.1
            assert not record.finished
            await client.close()
            nursery.cancel_scope.cancel()
