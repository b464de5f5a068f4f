"""The OpenAI-compatible surface's pieces (relayd/openai_api.py), without sockets.

:func:`~relayd.openai_api.transcript`, the request checks (every rejected
feature names its ``param``, as OpenAI's errors do), the parameters passed
through, the ``chat.completion`` object and the ``chat.completion.chunk``
stream, :func:`~relayd.openai_api.openai_error` and
:func:`~relayd.openai_api.models_listing`.

:class:`~relayd.openai_api.ChatCompletionsEndpoint` runs on a fake state: a
dispatcher that records the :class:`~relayd.dispatch.Question` and answers as
the test says (whole, in pieces, or failing), and a sink that records what a
stream writes. Requests go through ``JsonEndpoint.answer`` with the credentials
already checked (``caller``), so a failure comes back as the :class:`HttpReply` the
client would get. Virtual time throughout (``autojump_clock``).

The same surface against a real relayd, real agents and the official ``openai``
SDK: tests/test_openai_sdk_e2e.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from relayd.ask import ClientGone, HttpReply
from relayd.config import Config, parse_config
from relayd.dispatch import Answer, Question
from relayd.errors import (
    AgentFailed,
    AgentTimeout,
    BadRequest,
    ConversationAgentGone,
    Forbidden,
    NoAgent,
    PayloadTooLarge,
    QueueFull,
    QueueTimeout,
    RateLimited,
    RelayError,
    RequestTimeout,
    ShuttingDown,
    StreamBroken,
    Unauthorized,
    UnknownModel,
)
from relayd.openai_api import (
    ChatCompletionsEndpoint,
    models_listing,
    openai_error,
    transcript,
)

LIMIT = 10  # virtual seconds: only a deadlock reaches it
USER = {"role": "user", "content": "Hello"}


# -- fakes -------------------------------------------------------------------------------


@dataclass
class FakeDispatcher:
    """Records each question; answers with ``answer`` after sending ``pieces``
    to ``on_piece`` (a streamed answer), or raises ``error`` (after the pieces)."""

    answer: Answer | None = None
    pieces: list[str] = field(default_factory=list)
    error: RelayError | None = None
    questions: list[Question] = field(default_factory=list)
    on_pieces: list[Callable[[str], Awaitable[None]] | None] = field(default_factory=list)

    async def ask(
        self, question: Question, on_piece: Callable[[str], Awaitable[None]] | None = None
    ) -> Answer:
        self.questions.append(question)
        self.on_pieces.append(on_piece)
        if on_piece is not None:
            for piece in self.pieces:
                await on_piece(piece)
        if self.error is not None:
            raise self.error
        assert self.answer is not None
        return self.answer


@dataclass
class FakeSink:
    """A :class:`~relayd.ask.StreamSink` that records; ``gone`` makes it say the
    client went away (at its start, or at its ``gone``-th write)."""

    gone_at_start: bool = False
    gone_at_write: int | None = None
    started: int = 0
    writes: list[bytes] = field(default_factory=list)
    ended: int = 0

    async def start(self) -> bool:
        self.started += 1
        return not self.gone_at_start

    async def write(self, data: bytes) -> bool:
        self.writes.append(data)
        return self.gone_at_write is None or len(self.writes) < self.gone_at_write

    async def end(self, last: bytes = b"") -> None:
        if last:  # the last bytes come with the end, in one write
            self.writes.append(last)
        self.ended += 1

    @property
    def events(self) -> list[str]:
        """The ``data:`` payloads written, in order (each event is one ``data:`` line)."""
        text = b"".join(self.writes).decode()
        assert text.endswith("\n\n"), text
        events = text[:-2].split("\n\n")
        assert all(event.startswith("data: ") and "\n" not in event for event in events), text
        return [event.removeprefix("data: ") for event in events]


def answer_of(
    content: str = "Hi!",
    *,
    streamed: bool = False,
    finish_reason: str | None = "stop",
    usage: dict[str, int] | None = None,
) -> Answer:
    return Answer(
        id="a1",
        response_id="r1",
        conversation_id="c1",
        content=content,
        agent_id="agent-1",
        attempts=1,
        queue_wait=0.0,
        streamed=streamed,
        finish_reason=finish_reason,
        usage=usage,
    )


def config_of(**sections: dict[str, Any]) -> Config:
    return parse_config(sections)


def endpoint_of(
    dispatcher: FakeDispatcher | None = None, config: Config | None = None
) -> tuple[ChatCompletionsEndpoint, FakeDispatcher]:
    dispatcher = dispatcher or FakeDispatcher(answer=answer_of())
    state = SimpleNamespace(config=config or config_of(), dispatcher=dispatcher)
    return ChatCompletionsEndpoint(state), dispatcher  # type: ignore[arg-type]


async def post(
    endpoint: ChatCompletionsEndpoint,
    document: dict[str, Any] | bytes,
    *,
    sink: FakeSink | None = None,
    event_stream: bool = False,
    user: object = None,
) -> HttpReply | None:
    """``document`` as a request body, the credentials already checked (the admin
    key unless ``user``): the HttpReply, or None once streamed into ``sink``."""
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    caller = (user, "admin" if user is None else "user-1")
    with trio.fail_after(LIMIT):
        return await endpoint.answer(
            None,
            "127.0.0.1",
            body,
            caller=caller,  # type: ignore[arg-type]
            event_stream=event_stream,
            sink=sink,
        )


def error_of(reply: HttpReply | None) -> tuple[int, dict[str, Any]]:
    assert reply is not None
    document = json.loads(reply.body)
    assert set(document) == {"error"}, document
    assert set(document["error"]) == {"message", "type", "param", "code"}, document
    return reply.status, document["error"]


# -- transcript() ------------------------------------------------------------------------


def test_transcript_of_one_user_message_is_its_text() -> None:
    assert transcript([{"role": "user", "content": "Hello there"}]) == "Hello there"
    assert transcript([{"role": "user", "content": ""}]) == ""
    assert transcript([{"role": "user", "content": "two\n\nparagraphs"}]) == "two\n\nparagraphs"


def test_transcript_of_a_history_is_role_blocks_separated_by_blank_lines_in_order() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "What is 2+2?", "name": "bob"},
    ]
    assert transcript(messages) == (
        "System: Be brief.\n\n"
        "User: Hi\n\n"
        "Assistant: Hello! How can I help?\n\n"
        "Developer: Answer in French.\n\n"
        "User: What is 2+2?"
    )


@pytest.mark.parametrize("role", ["system", "assistant", "developer"])
def test_transcript_of_one_message_that_is_not_the_users_keeps_its_role(role: str) -> None:
    assert transcript([{"role": role, "content": "x"}]) == f"{role.capitalize()}: x"


def test_transcript_of_two_user_messages_is_a_transcript() -> None:
    two = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    assert transcript(two) == "User: one\n\nUser: two"


# -- what reaches the dispatcher -----------------------------------------------------------


async def test_messages_and_parameters_pass_through_as_the_question(
    autojump_clock: trio.testing.MockClock,
) -> None:
    endpoint, dispatcher = endpoint_of()
    params = {
        "max_tokens": 7,
        "max_completion_tokens": 9,
        "temperature": 0.25,
        "top_p": 1,
        "stop": ["\n\n", "END"],
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -1.5,
        "user": "end-user-1",
    }
    document = {
        "model": "m1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Plain text."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
            },
            {"role": "assistant", "content": "Hi!", "name": "helper"},
            {"role": "user", "content": "Again", "name": 5},  # a name that is not a string: dropped
        ],
        **params,
        # Not OpenAI parameters relayd carries: dropped, not passed on.
        "metadata": {"k": "v"},
        "store": False,
        "n": 1,
        "response_format": {"type": "text"},
        "logprobs": False,
        "tools": [],
        "stream_options": None,
    }
    reply = await post(endpoint, document, user=SimpleNamespace(user_id="user-1"))
    assert reply is not None and reply.status == 200, reply
    (question,) = dispatcher.questions
    assert question.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Plain text."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!", "name": "helper"},
        {"role": "user", "content": "Again"},
    )
    assert question.params == params
    assert [type(question.params[name]) for name in params] == [type(v) for v in params.values()]
    assert question.model == "m1"
    assert question.user_id == "user-1"
    assert question.is_admin is False
    assert question.is_chat and question.v2_only
    assert question.v1_allowed is False
    assert question.content == transcript(list(question.messages))
    assert question.conversation_id is None
    assert dispatcher.on_pieces == [None]


async def test_parameters_given_as_null_are_not_given(
    autojump_clock: trio.testing.MockClock,
) -> None:
    endpoint, dispatcher = endpoint_of()
    nulls = dict.fromkeys(
        ["max_tokens", "temperature", "top_p", "stop", "seed", "user", "model"], None
    )
    reply = await post(endpoint, {"messages": [USER], **nulls})
    assert reply is not None and reply.status == 200, reply
    (question,) = dispatcher.questions
    assert question.params == {}
    assert question.model is None
    assert question.is_admin is True
    assert question.user_id == "admin"


@pytest.mark.parametrize(
    ("v1_model", "model", "v1_allowed", "named"),
    [
        (None, None, True, "relayd"),
        (None, "seed", False, "seed"),
        ("seed", None, True, "seed"),
        ("seed", "seed", True, "seed"),
        ("seed", "other", False, "other"),
    ],
)
async def test_a_v1_agent_may_take_a_chat_with_no_model_or_agents_v1_model(
    autojump_clock: trio.testing.MockClock,
    v1_model: str | None,
    model: str | None,
    v1_allowed: bool,
    named: str,
) -> None:
    agents = {} if v1_model is None else {"v1_model": v1_model}
    endpoint, dispatcher = endpoint_of(config=config_of(agents=agents))
    document: dict[str, Any] = {"messages": [USER]}
    if model is not None:
        document["model"] = model
    reply = await post(endpoint, document)
    assert reply is not None and reply.status == 200
    (question,) = dispatcher.questions
    assert question.v1_allowed is v1_allowed
    assert question.v2_only is (not v1_allowed)
    assert question.model == model
    # The completion names the model asked for, else agents.v1_model, else "relayd".
    assert json.loads(reply.body)["model"] == named


# -- what is refused, and the param each refusal names -----------------------------------

IMAGE_PART = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}

REFUSED: dict[str, tuple[dict[str, Any], str | None, str]] = {
    # id: (the request's fields beyond a valid one, param, message)
    "no-messages": ({"messages": None}, "messages", "messages must be a non-empty array"),
    "empty-messages": ({"messages": []}, "messages", "messages must be a non-empty array"),
    "messages-not-an-array": (
        {"messages": "Hello"},
        "messages",
        "messages must be a non-empty array",
    ),
    "message-not-an-object": (
        {"messages": [USER, "Hello"]},
        "messages[1]",
        "each message must be an object",
    ),
    "tool-message": (
        {"messages": [USER, {"role": "tool", "content": "42", "tool_call_id": "t1"}]},
        "messages[1]",
        "tools (function calling) are not supported",
    ),
    "tool-calls-in-history": (
        {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]}]},
        "messages[1]",
        "tools (function calling) are not supported",
    ),
    "function-call-in-history": (
        {"messages": [{"role": "assistant", "content": "", "function_call": {"name": "f"}}]},
        "messages[0]",
        "tools (function calling) are not supported",
    ),
    "unknown-role": (
        {"messages": [{"role": "wizard", "content": "Hi"}]},
        "messages[0].role",
        "role must be one of assistant, developer, system, user",
    ),
    "no-role": (
        {"messages": [{"content": "Hi"}]},
        "messages[0].role",
        "role must be one of assistant, developer, system, user",
    ),
    "image-part": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, IMAGE_PART]}]},
        "messages[0].content",
        "images are not supported",
    ),
    "input-image-part": (
        {"messages": [USER, {"role": "user", "content": [{"type": "input_image"}]}]},
        "messages[1].content",
        "images are not supported",
    ),
    "audio-part": (
        {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
        "messages[0].content",
        "audio input is not supported",
    ),
    "file-part": (
        {"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]},
        "messages[0].content",
        'a content part must be {"type": "text", "text": <string>}',
    ),
    "text-part-without-a-string": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        "messages[0].content",
        'a content part must be {"type": "text", "text": <string>}',
    ),
    "part-not-an-object": (
        {"messages": [{"role": "user", "content": ["Hello"]}]},
        "messages[0].content",
        'a content part must be {"type": "text", "text": <string>}',
    ),
    "null-content": (
        {"messages": [{"role": "user", "content": None}]},
        "messages[0].content",
        "a message needs its content",
    ),
    "no-content": (
        {"messages": [{"role": "user"}]},
        "messages[0].content",
        "a message needs its content",
    ),
    "content-a-number": (
        {"messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
        "content must be a string or an array of text parts",
    ),
    "content-an-object": (
        {"messages": [{"role": "user", "content": {"type": "text", "text": "Hi"}}]},
        "messages[0].content",
        "content must be a string or an array of text parts",
    ),
    "model-a-number": ({"model": 5}, "model", "model must be a non-empty string"),
    "model-empty": ({"model": ""}, "model", "model must be a non-empty string"),
    "stream-a-string": ({"stream": "yes"}, "stream", "stream must be true or false"),
    "stream-options-a-string": (
        {"stream": True, "stream_options": "usage"},
        "stream_options",
        "stream_options must be an object",
    ),
    "n-2": ({"n": 2}, "n", "only n = 1 is supported"),
    "n-0": ({"n": 0}, "n", "only n = 1 is supported"),
    "n-true": ({"n": True}, "n", "only n = 1 is supported"),
    "json-response-format": (
        {"response_format": {"type": "json_object"}},
        "response_format",
        "only the text response format is supported",
    ),
    "json-schema-response-format": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format",
        "only the text response format is supported",
    ),
    "tools": (
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        "tools",
        "tools (function calling) is not supported by relayd",
    ),
    "tool-choice": (
        {"tool_choice": "auto"},
        "tool_choice",
        "tools (function calling) is not supported by relayd",
    ),
    "functions": ({"functions": [{"name": "f"}]}, "functions", "function calling"),
    "function-call": ({"function_call": "auto"}, "function_call", "function calling"),
    "audio": ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio output"),
    "modalities": ({"modalities": ["text", "audio"]}, "modalities", "output modalities"),
    "logprobs": ({"logprobs": True}, "logprobs", "logprobs is not supported by relayd"),
    "top-logprobs": ({"top_logprobs": 3}, "top_logprobs", "logprobs is not supported by relayd"),
    "prediction": (
        {"prediction": {"type": "content", "content": "x"}},
        "prediction",
        "predicted outputs is not supported by relayd",
    ),
    "max-tokens-a-string": ({"max_tokens": "5"}, "max_tokens", "max_tokens has the wrong type"),
    "max-tokens-a-float": ({"max_tokens": 5.5}, "max_tokens", "max_tokens has the wrong type"),
    "max-tokens-a-boolean": ({"max_tokens": True}, "max_tokens", "max_tokens has the wrong type"),
    "max-completion-tokens-a-string": (
        {"max_completion_tokens": "5"},
        "max_completion_tokens",
        "max_completion_tokens has the wrong type",
    ),
    "temperature-a-string": (
        {"temperature": "hot"},
        "temperature",
        "temperature has the wrong type",
    ),
    "top-p-a-boolean": ({"top_p": False}, "top_p", "top_p has the wrong type"),
    "stop-a-number": ({"stop": 5}, "stop", "stop has the wrong type"),
    "stop-numbers": ({"stop": ["a", 5]}, "stop", "stop must be a string or an array of strings"),
    "seed-a-float": ({"seed": 1.5}, "seed", "seed has the wrong type"),
    "presence-penalty-a-string": (
        {"presence_penalty": "0"},
        "presence_penalty",
        "presence_penalty has the wrong type",
    ),
    "frequency-penalty-a-list": (
        {"frequency_penalty": [0]},
        "frequency_penalty",
        "frequency_penalty has the wrong type",
    ),
    "user-a-number": ({"user": 5}, "user", "user has the wrong type"),
}


@pytest.mark.parametrize(("fields", "param", "says"), REFUSED.values(), ids=REFUSED.keys())
async def test_a_refused_request_is_a_400_naming_its_param(
    autojump_clock: trio.testing.MockClock, fields: dict[str, Any], param: str, says: str
) -> None:
    endpoint, dispatcher = endpoint_of()
    document = {"model": "m1", "messages": [USER], **fields}
    if document["messages"] is None:
        del document["messages"]
    status, error = error_of(await post(endpoint, document))
    assert status == 400
    assert error["param"] == param
    assert says in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert error["code"] is None
    assert dispatcher.questions == []


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[]", b'"messages"', b"\xff{}"],
    ids=["empty", "not-json", "an-array", "a-string", "not-utf-8"],
)
async def test_a_body_that_is_not_a_json_object_is_an_openai_shaped_400(
    autojump_clock: trio.testing.MockClock, body: bytes
) -> None:
    endpoint, dispatcher = endpoint_of()
    status, error = error_of(await post(endpoint, body))
    assert status == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert error["message"]
    assert dispatcher.questions == []


async def test_modalities_text_only_is_accepted(autojump_clock: trio.testing.MockClock) -> None:
    """Text output only is what relayd gives (refused before 05c8f6f)."""
    endpoint, dispatcher = endpoint_of()
    reply = await post(endpoint, {"messages": [USER], "modalities": ["text"]})
    assert reply is not None
    assert reply.status == 200, reply.body
    assert len(dispatcher.questions) == 1
    assert dispatcher.questions[0].params == {}


@pytest.mark.parametrize(
    "name",
    # n and stream were refused as null before 05c8f6f.
    ["n", "stream", "stream_options", "response_format", "tools", "logprobs", "model"],
)
async def test_an_optional_field_given_as_null_is_not_given(
    autojump_clock: trio.testing.MockClock, name: str
) -> None:
    endpoint, dispatcher = endpoint_of()
    reply = await post(endpoint, {"messages": [USER], name: None})
    assert reply is not None
    assert reply.status == 200, reply.body
    assert len(dispatcher.questions) == 1


# -- requests.max_content ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("contents", "fits"),
    [
        (["x" * 64], True),
        (["x" * 65], False),
        (["x" * 32, "y" * 32], True),  # all messages count together
        (["x" * 32, "y" * 33], False),
        (["é" * 32], True),  # 64 bytes of UTF-8
        (["é" * 33], False),  # 66 bytes: bytes count, not characters
        (["€" * 21, "x"], True),  # 63 + 1 bytes
        (["€" * 22], False),  # 66 bytes
    ],
)
async def test_messages_over_requests_max_content_are_413(
    autojump_clock: trio.testing.MockClock, contents: list[str], fits: bool
) -> None:
    endpoint, dispatcher = endpoint_of(config=config_of(requests={"max_content": "64B"}))
    messages = [{"role": "user", "content": content} for content in contents]
    reply = await post(endpoint, {"messages": messages})
    if fits:
        assert reply is not None and reply.status == 200, reply
        return
    status, error = error_of(reply)
    assert status == 413
    assert error == {
        "message": "messages are larger than requests.max_content (64 bytes)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert dispatcher.questions == []


async def test_text_parts_count_towards_max_content_as_their_joined_text(
    autojump_clock: trio.testing.MockClock,
) -> None:
    endpoint, _ = endpoint_of(config=config_of(requests={"max_content": "64B"}))
    parts = [{"type": "text", "text": "x" * 40}, {"type": "text", "text": "y" * 25}]
    status, _error = error_of(
        await post(endpoint, {"messages": [{"role": "user", "content": parts}]})
    )
    assert status == 413


# -- the chat.completion object --------------------------------------------------------------


async def test_a_whole_completion_is_a_chat_completion_object(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answer = answer_of("Hello!", usage={"prompt_tokens": 12, "completion_tokens": 3})
    endpoint, _ = endpoint_of(FakeDispatcher(answer=answer))
    before = int(time.time())
    reply = await post(endpoint, {"model": "m1", "messages": [USER]})
    after = int(time.time())
    assert reply is not None
    assert (reply.status, reply.headers) == (200, [])
    document = json.loads(reply.body)
    assert document["id"].startswith("chatcmpl-")
    assert len(document["id"]) == len("chatcmpl-") + 32
    assert before <= document.pop("created") <= after
    del document["id"]
    assert document == {
        "object": "chat.completion",
        "model": "m1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }


@pytest.mark.parametrize(
    ("finish_reason", "usage", "says_finish", "says_usage"),
    [
        (None, None, "stop", None),
        ("length", {"completion_tokens": 4}, "length", (0, 4, 4)),
        ("stop", {"prompt_tokens": 5}, "stop", (5, 0, 5)),
        ("content_filter", {}, "content_filter", (0, 0, 0)),
    ],
)
async def test_finish_reason_and_usage_are_the_agents(
    autojump_clock: trio.testing.MockClock,
    finish_reason: str | None,
    usage: dict[str, int] | None,
    says_finish: str,
    says_usage: tuple[int, int, int] | None,
) -> None:
    answer = answer_of(finish_reason=finish_reason, usage=usage)
    endpoint, _ = endpoint_of(FakeDispatcher(answer=answer))
    reply = await post(endpoint, {"messages": [USER]})
    assert reply is not None
    document = json.loads(reply.body)
    assert document["choices"][0]["finish_reason"] == says_finish
    if says_usage is None:
        assert "usage" not in document
    else:
        prompt, completion, total = says_usage
        assert document["usage"] == {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
        }


async def test_ids_are_fresh_for_each_completion(autojump_clock: trio.testing.MockClock) -> None:
    endpoint, _ = endpoint_of()
    ids = set()
    for _ in range(5):
        reply = await post(endpoint, {"messages": [USER]})
        assert reply is not None
        ids.add(json.loads(reply.body)["id"])
    assert len(ids) == 5


# -- the chat.completion.chunk stream ------------------------------------------------------


def chunks_of(sink: FakeSink) -> tuple[list[dict[str, Any]], str]:
    """The chunks a stream wrote, and its last event (``[DONE]``)."""
    *events, last = sink.events
    return [json.loads(event) for event in events], last


def check_chunk_frame(chunks: list[dict[str, Any]], model: str) -> None:
    """Every chunk is a chat.completion.chunk of one completion (same id, time, model)."""
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert len({chunk["created"] for chunk in chunks}) == 1
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == model
        assert set(chunk) >= {"id", "object", "created", "model", "choices"}


async def test_a_streamed_completion_sends_each_piece_as_a_chunk_then_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dispatcher = FakeDispatcher(
        answer=answer_of("Hello, world", streamed=True), pieces=["Hel", "lo, ", "world"]
    )
    endpoint, _ = endpoint_of(dispatcher)
    sink = FakeSink()
    reply = await post(endpoint, {"model": "m1", "messages": [USER], "stream": True}, sink=sink)
    assert reply is None
    assert (sink.started, sink.ended) == (1, 1)
    # The head goes with the first piece: one write per piece, and one to close.
    assert len(sink.writes) == 4
    chunks, last = chunks_of(sink)
    assert last == "[DONE]"
    check_chunk_frame(chunks, "m1")
    assert [chunk["choices"] for chunk in chunks] == [
        [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        [{"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "lo, "}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "world"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
    ]
    assert all("usage" not in chunk for chunk in chunks)


async def test_the_usage_chunk_comes_last_with_include_usage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answer = answer_of(
        "Hi",
        streamed=True,
        finish_reason="length",
        usage={"prompt_tokens": 9, "completion_tokens": 2},
    )
    endpoint, _ = endpoint_of(FakeDispatcher(answer=answer, pieces=["Hi"]))
    sink = FakeSink()
    document = {
        "messages": [USER],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert await post(endpoint, document, sink=sink) is None
    chunks, last = chunks_of(sink)
    assert last == "[DONE]"
    check_chunk_frame(chunks, "relayd")
    *_, closing, usage = chunks
    assert closing["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert all("usage" not in chunk for chunk in chunks[:-1])


@pytest.mark.parametrize("include_usage", [False, "yes", 1])
async def test_no_usage_chunk_unless_include_usage_is_true(
    autojump_clock: trio.testing.MockClock, include_usage: object
) -> None:
    answer = answer_of("Hi", streamed=True, usage={"prompt_tokens": 1, "completion_tokens": 1})
    endpoint, _ = endpoint_of(FakeDispatcher(answer=answer, pieces=["Hi"]))
    sink = FakeSink()
    document = {
        "messages": [USER],
        "stream": True,
        "stream_options": {"include_usage": include_usage},
    }
    assert await post(endpoint, document, sink=sink) is None
    chunks, _last = chunks_of(sink)
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_the_usage_chunk_of_an_agent_that_gave_none_counts_zero(
    autojump_clock: trio.testing.MockClock,
) -> None:
    endpoint, _ = endpoint_of(FakeDispatcher(answer=answer_of("Hi", streamed=True), pieces=["Hi"]))
    sink = FakeSink()
    document = {"messages": [USER], "stream": True, "stream_options": {"include_usage": True}}
    assert await post(endpoint, document, sink=sink) is None
    chunks, _last = chunks_of(sink)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


async def test_an_answer_that_was_not_streamed_comes_as_one_chunk(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A v1 agent's answer (or a v2 agent's ``done`` with content and no deltas)."""
    endpoint, _ = endpoint_of(FakeDispatcher(answer=answer_of("All at once")))
    sink = FakeSink()
    assert await post(endpoint, {"messages": [USER], "stream": True}, sink=sink) is None
    chunks, last = chunks_of(sink)
    assert last == "[DONE]"
    assert [chunk["choices"][0]["delta"] for chunk in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "All at once"},
        {},
    ]
    assert sink.started == 1 and sink.ended == 1


async def test_an_empty_answer_streams_the_head_and_the_end_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    endpoint, _ = endpoint_of(FakeDispatcher(answer=answer_of("")))
    sink = FakeSink()
    assert await post(endpoint, {"messages": [USER], "stream": True}, sink=sink) is None
    chunks, last = chunks_of(sink)
    assert last == "[DONE]"
    assert [chunk["choices"][0]["delta"] for chunk in chunks] == [
        {"role": "assistant", "content": ""},
        {},
    ]


@pytest.mark.parametrize(
    ("document", "event_stream", "streams"),
    [
        ({"stream": True}, False, True),
        ({"stream": False}, False, False),
        ({}, False, False),
        ({}, True, True),  # Accept: text/event-stream, and no "stream" field
        ({"stream": False}, True, False),
        ({"stream": True}, True, True),
        ({"stream": None}, False, False),  # null: not given
        ({"stream": None}, True, True),
    ],
)
async def test_stream_or_not(
    autojump_clock: trio.testing.MockClock,
    document: dict[str, Any],
    event_stream: bool,
    streams: bool,
) -> None:
    endpoint, dispatcher = endpoint_of()
    sink = FakeSink()
    reply = await post(
        endpoint, {"messages": [USER], **document}, sink=sink, event_stream=event_stream
    )
    if streams:
        assert reply is None
        assert sink.events[-1] == "[DONE]"
        assert dispatcher.on_pieces[0] is not None
    else:
        assert reply is not None and reply.status == 200
        assert json.loads(reply.body)["object"] == "chat.completion"
        assert sink.writes == [] and sink.started == 0
        assert dispatcher.on_pieces == [None]


async def test_a_failure_before_the_first_piece_keeps_its_status(
    autojump_clock: trio.testing.MockClock,
) -> None:
    endpoint, _ = endpoint_of(FakeDispatcher(error=NoAgent(retry_after=5)))
    sink = FakeSink()
    reply = await post(endpoint, {"messages": [USER], "stream": True}, sink=sink)
    status, error = error_of(reply)
    assert status == 503
    assert reply is not None and reply.headers == [(b"retry-after", b"5")]
    assert error == {
        "message": "no agent connected",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert sink.writes == [] and sink.started == 0


async def test_a_failure_mid_stream_ends_it_with_an_error_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dispatcher = FakeDispatcher(
        pieces=["Hel"], error=StreamBroken("the agent failed mid-answer: boom")
    )
    endpoint, _ = endpoint_of(dispatcher)
    sink = FakeSink()
    assert await post(endpoint, {"messages": [USER], "stream": True}, sink=sink) is None
    *events, failure = sink.events
    assert [json.loads(event)["choices"][0]["delta"] for event in events] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
    ]
    assert json.loads(failure) == {
        "error": {
            "message": "the agent failed mid-answer: boom",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert "[DONE]" not in sink.events
    assert sink.ended == 1


async def test_a_client_gone_at_the_start_or_mid_stream_is_client_gone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for sink in (FakeSink(gone_at_start=True), FakeSink(gone_at_write=2)):
        dispatcher = FakeDispatcher(answer=answer_of("ab", streamed=True), pieces=["a", "b"])
        endpoint, _ = endpoint_of(dispatcher)
        with pytest.raises(ClientGone):
            await post(endpoint, {"messages": [USER], "stream": True}, sink=sink)
        assert sink.ended == 0


# -- errors in OpenAI's shape ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (408, "timeout_error"),
        (413, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "server_error"),
        (504, "timeout_error"),
        (418, "server_error"),  # any other
    ],
)
def test_openai_error_shape(status: int, kind: str) -> None:
    assert json.loads(openai_error("what went wrong", status)) == {
        "error": {"message": "what went wrong", "type": kind, "param": None, "code": None}
    }


def test_openai_error_with_param_and_code() -> None:
    body = openai_error("only n = 1 is supported", 400, param="n", code="bad_n")
    assert json.loads(body) == {
        "error": {
            "message": "only n = 1 is supported",
            "type": "invalid_request_error",
            "param": "n",
            "code": "bad_n",
        }
    }
    assert isinstance(body, bytes)
    # Non-ASCII text stays JSON (escaped), whatever it says.
    assert json.loads(openai_error("modèle « x » inconnu", 404))["error"]["message"] == (
        "modèle « x » inconnu"
    )


@pytest.mark.parametrize(
    ("error", "status", "kind", "code", "retry_after"),
    [
        (BadRequest("bad"), 400, "invalid_request_error", None, None),
        (Unauthorized("invalid token"), 401, "authentication_error", "invalid_api_key", None),
        (Forbidden("no"), 403, "permission_error", None, None),
        (UnknownModel("no model x"), 404, "not_found_error", "model_not_found", None),
        (RequestTimeout("slow body"), 408, "timeout_error", None, None),
        (PayloadTooLarge("big"), 413, "invalid_request_error", None, None),
        (RateLimited(retry_after=1.2), 429, "rate_limit_error", "rate_limit_exceeded", b"2"),
        (AgentFailed("the agent failed: x"), 502, "server_error", None, None),
        (StreamBroken("broke"), 502, "server_error", None, None),
        (NoAgent(retry_after=5), 503, "server_error", None, b"5"),
        (QueueFull(retry_after=5), 503, "server_error", None, b"5"),
        (QueueTimeout(retry_after=5), 503, "server_error", None, b"5"),
        (ConversationAgentGone(retry_after=5), 503, "server_error", None, b"5"),
        (ShuttingDown(retry_after=5), 503, "server_error", None, b"5"),
        (AgentTimeout("no answer within requests.timeout (1s)"), 504, "timeout_error", None, None),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, RelayError) else None,
)
def test_each_failure_is_its_status_and_openai_type_and_code(
    error: RelayError, status: int, kind: str, code: str | None, retry_after: bytes | None
) -> None:
    endpoint, _ = endpoint_of()
    reply = endpoint.failure(error, "user-1")
    got_status, body = error_of(reply)
    assert got_status == status
    assert body == {"message": error.message, "type": kind, "param": None, "code": code}
    expected_headers = [] if retry_after is None else [(b"retry-after", retry_after)]
    assert reply.headers == expected_headers


# -- models_listing() --------------------------------------------------------------------------


def session(
    version: int = 2,
    models: tuple[str, ...] = (),
    capacity: int = 1,
    inflight: int = 0,
    draining: bool = False,
) -> SimpleNamespace:
    return SimpleNamespace(
        version=version, models=models, capacity=capacity, inflight=inflight, draining=draining
    )


def listing(*sessions: SimpleNamespace, v1_model: str | None = None) -> dict[str, Any]:
    agents = {} if v1_model is None else {"v1_model": v1_model}
    state = SimpleNamespace(
        config=config_of(agents=agents), dispatcher=SimpleNamespace(pool=list(sessions))
    )
    return models_listing(state)


def counts(document: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {entry["id"]: (entry["agents"], entry["free_slots"]) for entry in document["data"]}


def test_models_listing_with_no_agents_is_an_empty_list() -> None:
    assert listing() == {"object": "list", "data": []}
    assert listing(v1_model="seed") == {"object": "list", "data": []}


def test_models_listing_entries_are_openai_model_objects() -> None:
    before = int(time.time())
    document = listing(session(models=("b-model", "a-model")))
    after = int(time.time())
    assert document["object"] == "list"
    assert [entry["id"] for entry in document["data"]] == ["a-model", "b-model"]  # sorted
    for entry in document["data"]:
        assert before <= entry.pop("created") <= after
        assert entry == {
            "id": entry["id"],
            "object": "model",
            "owned_by": "relayd",
            "agents": 1,
            "free_slots": 1,
        }


def test_models_listing_counts_agents_and_free_slots() -> None:
    document = listing(
        session(models=("a", "b"), capacity=4, inflight=1),
        session(models=("b",), capacity=2, inflight=2),
        session(models=("c",), capacity=1, inflight=3),  # over capacity: no free slot, not fewer
        session(models=("a",), capacity=5, draining=True),  # draining: not listed
    )
    assert counts(document) == {"a": (1, 3), "b": (2, 3), "c": (1, 0)}


def test_an_agent_that_serves_any_model_counts_for_every_named_model() -> None:
    any_model = session(models=(), capacity=3, inflight=1)
    assert counts(
        listing(any_model, session(models=("a",)), session(models=("b",), inflight=1))
    ) == {
        "a": (2, 3),
        "b": (2, 2),
    }
    # Alone it names nothing to list.
    assert listing(any_model) == {"object": "list", "data": []}


def test_v1_agents_are_listed_under_agents_v1_model_only() -> None:
    v1 = session(version=1, capacity=1)
    busy_v1 = session(version=1, capacity=1, inflight=1)
    assert listing(v1, busy_v1) == {"object": "list", "data": []}
    assert counts(listing(v1, busy_v1, v1_model="seed")) == {"seed": (2, 1)}
    # A v2 agent that serves any model may take "seed" too; one that names models may not.
    assert counts(listing(v1, session(models=()), session(models=("m",)), v1_model="seed")) == {
        "m": (2, 2),
        "seed": (2, 2),
    }
    # A v2 agent naming the v1 model adds to it.
    assert counts(listing(v1, session(models=("seed",), capacity=2), v1_model="seed")) == {
        "seed": (2, 3)
    }
    assert counts(listing(session(version=1, draining=True), v1_model="seed")) == {}
