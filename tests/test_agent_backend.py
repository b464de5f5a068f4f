"""The agent's backend client (relayd.agent.backend) against the fake OpenAI backend.

Each failure of a backend becomes one v2 error with the right code and
retryable flag; an outage is logged once, and once more when it ends; a
cancelled answer closes the backend's stream at once, whether it was waiting
for the backend or handing a piece on. Real sockets on 127.0.0.1, every wait
bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
import logging
import socket
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from relayd.agent.backend import EchoBackend, ModelListError, OpenAIBackend
from relayd.agent.handler import Answerer
from relayd.agent.history import ConversationStore, Limits
from relayd.agent.service import ReferenceAgent
from relayd.agentkit import AgentProfile, Finish, HandlerFailure
from relayd.protocol.v2 import AgentConnectionV2, AgentHello, ChatRequest
from tests.test_agent_fake_backend import Plan, start_backend

MESSAGES = [{"role": "user", "content": "one two three"}]


def client_for(url: str, timeout: float = 5.0) -> OpenAIBackend:
    return OpenAIBackend(url, None, timeout=timeout, connect_timeout=2.0)


async def collect(pieces: AsyncIterator[str | Finish]) -> tuple[str, Finish | None]:
    text, finish = [], None
    async for item in pieces:
        if isinstance(item, Finish):
            finish = item
        else:
            text.append(item)
    return "".join(text), finish


async def failure_of(backend: OpenAIBackend, **params: Any) -> HandlerFailure:
    with pytest.raises(HandlerFailure) as raised:
        await collect(backend.chat("fake-1", MESSAGES, params))
    return raised.value


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_a_stream_becomes_pieces_then_finish_with_usage_and_params_pass_through() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fake = await start_backend(nursery)
            backend = client_for(fake.url)
            params = {
                "max_tokens": 3,
                "temperature": 0.2,
                "top_p": 0.9,
                "stop": ["\n\n"],
                "seed": 7,
                "presence_penalty": 0.1,
                "frequency_penalty": 0.3,
                "user": "u-1",
                "logit_bias": {"50256": -100},
                # The agent streams one choice, whatever the client asked.
                "stream": False,
                "n": 3,
            }
            pieces = []
            finish = None
            async for item in backend.chat("fake-1", MESSAGES, params):
                if isinstance(item, Finish):
                    finish = item
                else:
                    pieces.append(item)
            assert pieces == ["I ", "heard: ", "one "]
            assert finish == Finish(
                finish_reason="length", usage={"prompt_tokens": 3, "completion_tokens": 3}
            )
            sent = fake.requests[0]
            for name, value in params.items():
                if name not in ("stream", "n"):
                    assert sent[name] == value, name
            assert sent["stream"] is True and "n" not in sent
            assert sent["stream_options"] == {"include_usage": True}
            assert sent["model"] == "fake-1" and sent["messages"] == MESSAGES
            assert "authorization" in fake.headers[0]  # the SDK's placeholder, no real key
            await backend.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("plan", "code", "retryable", "words"),
    [
        (Plan("status", status=500, message="CUDA out of memory"), "backend_error", True,
         ["(500)", "CUDA out of memory"]),
        (Plan("status", status=503, message="loading"), "backend_error", True, ["(503)"]),
        (Plan("status", status=429, message="slow down"), "overloaded", True, ["(429)"]),
        (Plan("status", status=400, message="context too long"), "bad_request", False,
         ["(400)", "context too long"]),
        (Plan("status", status=404, message="model 'x' not found"), "bad_request", False,
         ["(404)", "not found"]),
        (Plan("hang"), "timeout", True, ["sent nothing for 0.3s"]),
        (Plan("hang_stream", after=2), "timeout", True, ["after 9 characters"]),
        (Plan("cut", after=2), "backend_error", True, ["broke off", "after 9 characters"]),
        (Plan("no_finish"), "backend_error", True, ["ended before the answer did"]),
    ],
)  # fmt: skip
async def test_each_backend_failure_is_one_error_with_the_right_retryable_flag(
    plan: Plan, code: str, retryable: bool, words: list[str]
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fake = await start_backend(nursery)
            fake.plans.append(plan)
            backend = client_for(fake.url, timeout=0.3)
            failure = await failure_of(backend)
            assert (failure.code, failure.retryable) == (code, retryable)
            for word in words:
                assert word in failure.message
            assert fake.url.split("/v1")[0] in failure.message  # names the backend
            # The backend works again: the same client answers.
            text, finish = await collect(backend.chat("fake-1", MESSAGES, {}))
            assert text == "I heard: one two three" and finish is not None
            await backend.aclose()
            nursery.cancel_scope.cancel()


async def test_a_backend_that_is_down_is_unavailable_and_retryable() -> None:
    with trio.fail_after(10):
        backend = client_for(f"http://127.0.0.1:{closed_port()}/v1")
        failure = await failure_of(backend)
        assert failure.code == "backend_unavailable" and failure.retryable
        assert "cannot reach the backend http://127.0.0.1:" in failure.message
        with pytest.raises(ModelListError) as raised:
            await backend.list_models()
        assert raised.value.retryable
        await backend.aclose()


async def test_an_outage_is_logged_once_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relayd.agent.backend")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fake = await start_backend(nursery)
            fake.plans.extend([Plan("status", status=500)] * 5)
            backend = client_for(fake.url)
            for _ in range(5):
                await failure_of(backend)
            await collect(backend.chat("fake-1", MESSAGES, {}))
            fake.plans.extend([Plan("status", status=400)] * 3)  # the client's fault
            for _ in range(3):
                await failure_of(backend)
            await backend.aclose()
            nursery.cancel_scope.cancel()
    ours = [r for r in caplog.records if r.name == "relayd.agent.backend"]
    warnings_ = [r.getMessage() for r in ours if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    assert len(warnings_) == 1 and "(500)" in warnings_[0], warnings_
    assert len([r for r in ours if r.levelno == logging.DEBUG]) == 4
    assert len(infos) == 1 and "answers again" in infos[0]


async def test_model_lists() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fake = await start_backend(nursery, models=("llama3.1:8b", "qwen2.5:7b", "x" * 300))
            backend = client_for(fake.url)
            assert await backend.list_models() == ("llama3.1:8b", "qwen2.5:7b")
            fake.models_status = 404
            with pytest.raises(ModelListError) as raised:
                await backend.list_models()
            assert not raised.value.retryable
            assert "name its models with --model" in str(raised.value)
            fake.models_status = 502
            with pytest.raises(ModelListError) as raised:
                await backend.list_models()
            assert raised.value.retryable
            await backend.aclose()
            nursery.cancel_scope.cancel()


async def test_cancelling_while_waiting_for_the_backend_closes_its_stream_at_once() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fake = await start_backend(nursery)
            fake.chunk_delay = 0.5
            fake.answer = lambda messages: " ".join(["word"] * 100)
            backend = client_for(fake.url)
            with trio.CancelScope() as scope:
                async for item in backend.chat("fake-1", MESSAGES, {}):
                    assert item == "word "
                    scope.cancel()  # the next wait for the backend is cancelled
            cancelled = trio.current_time()
            record = fake.streams[0]
            await record.closed.wait()
            assert record.closed_at is not None and record.closed_at - cancelled < 0.1
            await backend.aclose()
            nursery.cancel_scope.cancel()


async def test_cancelling_while_a_piece_is_being_sent_closes_the_stream_at_once(
    tmp_path: Any,
) -> None:
    """The request is cancelled while V2Agent hands a piece to the relay, so the
    answer's generator is suspended at a ``yield``, holding the backend's
    stream: ReferenceAgent closes it then and there (no garbage collector)."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fake = await start_backend(nursery)
            fake.chunk_delay = 0.01
            fake.answer = lambda messages: " ".join(["word"] * 1000)
            backend = client_for(fake.url)
            store = await ConversationStore.open(tmp_path, Limits(10, 1 << 20, 3600))
            agent = ReferenceAgent(
                "ws://127.0.0.1:9/client/register",
                Answerer(backend, store, lambda: "fake-1"),
                AgentProfile(),
                headers=[],
                on_change=lambda: None,
            )
            connection = AgentConnectionV2()
            connection.hello(AgentHello("t", "t", 1, ()))
            connection.receive_text(
                json.dumps({"type": "welcome", "agent_id": "a", "heartbeat": 9})
            )
            request = connection.receive_text(
                json.dumps(
                    {"type": "request", "id": "r1", "kind": "chat", "model": "fake-1",
                     "messages": MESSAGES, "params": {}}
                )
            )  # fmt: skip
            assert isinstance(request, ChatRequest)
            agent._connection = connection
            sending = trio.Event()

            async def stuck_send(text: str) -> None:
                sending.set()
                await trio.sleep_forever()  # a relay that does not read

            agent._send = stuck_send  # type: ignore[method-assign]
            scope = trio.CancelScope()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                async with trio.open_nursery() as work:
                    work.start_soon(agent._work, request, scope)
                    await sending.wait()
                    scope.cancel()
                    cancelled = trio.current_time()
                    record = fake.streams[0]
                    await record.closed.wait()
            assert record.closed_at is not None and record.closed_at - cancelled < 0.1
            # None of relayd's generators was left to the garbage collector. (The
            # SDK's own layers of generators are: AsyncStream.close() closes the
            # response, which is what the backend sees, not the generators.)
            abandoned = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
            assert not [text for text in abandoned if "'relayd." in text], abandoned
            await store.aclose()
            await backend.aclose()
            nursery.cancel_scope.cancel()


async def test_the_echo_answers_word_by_word() -> None:
    with trio.fail_after(5):
        echo = EchoBackend(0.0)
        pieces = [
            item async for item in echo.chat(None, [{"role": "user", "content": "a b c"}], {})
        ]
        assert pieces == ["echo:a ", "b ", "c", Finish(finish_reason="stop")]
