"""The OpenAI-compatible surface: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Pointing an OpenAI client's ``base_url`` at ``http://relay:8080/v1`` must just
work: the official SDKs, LangChain, editors' plugins, curl scripts. So the
shapes here are OpenAI's, to the field: a ``chat.completion`` object, or
``chat.completion.chunk`` server-sent events ending with ``data: [DONE]``,
and errors as ``{"error": {"message", "type", "param", "code"}}`` with the
statuses the SDKs map to their exception classes.

Everything else is ``/api/ask``'s: the same tokens and lockout rule
(:class:`~relayd.web.Gate`), the same queue, deadline, failover and limits
(:class:`~relayd.dispatch.Dispatcher`), the same two ways in (relayd's wire
path and Hypercorn's), the same streaming machinery (:class:`~relayd.ask.StreamSink`).

A chat goes to v2 agents as a ``chat`` request, messages and parameters
passed through. A v1 (seed) agent can serve one only when the request names
no model or the model in ``agents.v1_model``; it then gets the conversation as
one ``content`` (see :func:`transcript`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from relayd.ask import AnswerStream, Asked, HttpReply, JsonEndpoint, StreamSink
from relayd.dispatch import Answer, Question, new_uuid
from relayd.errors import BadRequest, PayloadTooLarge, RelayError, UnknownModel
from relayd.web import status_of

__all__ = ["ChatCompletionsEndpoint", "models_listing", "openai_error", "transcript"]

log = logging.getLogger("relayd.api")

# Parameters passed through to the agent, with the JSON types each may have.
_PARAMETERS: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "stop": (str, list),
    "seed": (int,),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "user": (str,),
}
# Features relayd does not carry: a clear 400 rather than a silent drop.
_UNSUPPORTED = {
    "tools": "tools (function calling)",
    "tool_choice": "tools (function calling)",
    "functions": "function calling",
    "function_call": "function calling",
    "audio": "audio output",
    "modalities": "output modalities other than text",
    "logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "prediction": "predicted outputs",
}
_ROLES = frozenset({"system", "developer", "user", "assistant"})
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "server_error",
    504: "timeout_error",
}


def openai_error(
    message: str, status: int, *, param: str | None = None, code: str | None = None
) -> bytes:
    """An error body in OpenAI's shape."""
    document = {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }
    return json.dumps(document).encode()


class _Invalid(BadRequest):
    """A 400 that names the parameter at fault (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def transcript(messages: list[dict[str, Any]]) -> str:
    """The single ``content`` a v1 (seed) agent gets for a chat.

    One user message alone is its text. A longer history is a transcript: each
    message as ``Role: text``, blank lines between, in order, so that an agent
    driving a chat web page sees the whole exchange in one question.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return str(messages[0]["content"])
    return "\n\n".join(
        f"{message['role'].capitalize()}: {message['content']}" for message in messages
    )


def _text_of(content: Any, index: int) -> str:
    """A message's content as text: a string, or the array-of-text-parts form."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "input_image", "image"):
                raise _Invalid("images are not supported", f"messages[{index}].content")
            elif kind in ("input_audio", "audio"):
                raise _Invalid("audio input is not supported", f"messages[{index}].content")
            else:
                raise _Invalid(
                    'a content part must be {"type": "text", "text": <string>}',
                    f"messages[{index}].content",
                )
        return "".join(texts)
    if content is None:
        raise _Invalid("a message needs its content", f"messages[{index}].content")
    raise _Invalid(
        "content must be a string or an array of text parts", f"messages[{index}].content"
    )


def _messages(document: dict[str, Any], max_content: int) -> tuple[dict[str, Any], ...]:
    raw = document.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _Invalid("messages must be a non-empty array", "messages")
    messages = []
    size = 0
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _Invalid("each message must be an object", f"messages[{index}]")
        role = message.get("role")
        if role == "tool" or message.get("tool_calls") or message.get("function_call"):
            raise _Invalid("tools (function calling) are not supported", f"messages[{index}]")
        if role not in _ROLES:
            raise _Invalid(
                f"role must be one of {', '.join(sorted(_ROLES))}", f"messages[{index}].role"
            )
        text = _text_of(message.get("content"), index)
        size += len(text)
        entry: dict[str, Any] = {"role": role, "content": text}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        messages.append(entry)
    if (
        size * 4 > max_content
        and sum(len(m["content"].encode("utf-8")) for m in messages) > max_content
    ):
        raise PayloadTooLarge(
            f"messages are larger than requests.max_content ({max_content} bytes)"
        )
    return tuple(messages)


def _parameters(document: dict[str, Any]) -> dict[str, Any]:
    for name, feature in _UNSUPPORTED.items():
        value = document.get(name)
        if name == "modalities" and value == ["text"]:
            continue  # text output only: what relayd gives
        if value not in (None, False, [], {}):
            raise _Invalid(f"{feature} is not supported by relayd", name)
    n = document.get("n")
    if n is None:  # OpenAI's null: not given
        n = 1
    if n != 1 or isinstance(n, bool):
        raise _Invalid("only n = 1 is supported", "n")
    response_format = document.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise _Invalid("only the text response format is supported", "response_format")
    params: dict[str, Any] = {}
    for name, types in _PARAMETERS.items():
        value = document.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise _Invalid(f"{name} has the wrong type", name)
        if (
            name == "stop"
            and isinstance(value, list)
            and not all(isinstance(v, str) for v in value)
        ):
            raise _Invalid("stop must be a string or an array of strings", name)
        params[name] = value
    return params


class ChatCompletionsEndpoint(JsonEndpoint):
    """``POST /v1/chat/completions`` (see the module docstring)."""

    path = "/v1/chat/completions"

    def error_body(self, error: RelayError, status: int) -> bytes:
        code: str | None = None
        if isinstance(error, UnknownModel):
            code = "model_not_found"
        elif status == 401:
            code = "invalid_api_key"
        elif status == 429:
            code = "rate_limit_exceeded"
        param = error.param if isinstance(error, _Invalid) else None
        return openai_error(error.message, status, param=param, code=code)

    async def respond(
        self,
        document: dict[str, Any],
        asked: Asked,
        *,
        event_stream: bool,
        sink: StreamSink | None,
    ) -> HttpReply | None:
        config = self._state.config
        model = document.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise _Invalid("model must be a non-empty string", "model")
        messages = _messages(document, config.requests.max_content)
        params = _parameters(document)
        stream = document.get("stream")
        if stream is None:  # OpenAI's null: not given
            stream = False
        if not isinstance(stream, bool):
            raise _Invalid("stream must be true or false", "stream")
        options = document.get("stream_options") or {}
        if not isinstance(options, dict):
            raise _Invalid("stream_options must be an object", "stream_options")
        include_usage = options.get("include_usage") is True
        v1_model = config.agents.v1_model
        question = Question(
            content=transcript(list(messages)),
            user_id=asked.user_id,
            is_admin=asked.user is None,
            model=model,
            messages=messages,
            params=params,
            v1_allowed=model is None or model == v1_model,
        )
        completion = _Completion(model or v1_model or "relayd")
        if sink is None or not (stream or (event_stream and document.get("stream") is None)):
            answer = await self._state.dispatcher.ask(question)
            return HttpReply(200, json.dumps(completion.whole(answer)).encode(), [])
        chunks = _ChunkStream(sink, completion, self.error_body)
        streamed = await self.ask_streaming(question, chunks, asked)
        if streamed is not None:
            await chunks.finish(streamed, include_usage)
        return None


class _Completion:
    """The id, model and time shared by a completion's object or chunks."""

    __slots__ = ("created", "id", "model")

    def __init__(self, model: str) -> None:
        self.id = "chatcmpl-" + new_uuid().replace("-", "")
        self.model = model
        self.created = int(time.time())

    def whole(self, answer: Answer) -> dict[str, Any]:
        document: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.content},
                    "logprobs": None,
                    "finish_reason": answer.finish_reason or "stop",
                }
            ],
        }
        usage = _usage(answer)
        if usage is not None:
            document["usage"] = usage
        return document

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }


def _usage(answer: Answer) -> dict[str, int] | None:
    if answer.usage is None:
        return None
    prompt = answer.usage.get("prompt_tokens", 0)
    completion = answer.usage.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _data(document: object) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


class _ChunkStream(AnswerStream):
    """A completion as OpenAI's server-sent chunks (the role first, then
    content deltas, the finish reason, usage, ``[DONE]``), or an error event."""

    __slots__ = ("_completion", "_render")

    def __init__(
        self,
        sink: StreamSink,
        completion: _Completion,
        render: Callable[[RelayError, int], bytes],
    ) -> None:
        super().__init__(sink)
        self._completion = completion
        self._render = render  # the endpoint's error body

    def opening(self) -> bytes:
        return _data(self._completion.chunk({"role": "assistant", "content": ""}))

    def piece_bytes(self, text: str) -> bytes:
        return _data(self._completion.chunk({"content": text}))

    def error_bytes(self, error: RelayError) -> bytes:
        return b"data: " + self._render(error, status_of(error)) + b"\n\n"

    async def finish(self, answer: Answer, include_usage: bool) -> None:
        if not answer.streamed and answer.content:
            await self.piece(answer.content)
        closing = _data(self._completion.chunk({}, answer.finish_reason or "stop"))
        if include_usage:
            document = self._completion.chunk({})
            document["choices"] = []
            document["usage"] = _usage(answer) or {
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
            }
            closing += _data(document)
        await self.end(closing + b"data: [DONE]\n\n")


def models_listing(state: Any) -> dict[str, Any]:
    """``GET /v1/models``: every model a connected agent serves, with the
    number of agents serving it and their free slots."""
    served: dict[str, list[int]] = {}  # model → [agents, free slots]
    any_model: list[int] = [0, 0]
    v1_model = state.config.agents.v1_model
    for session in state.dispatcher.pool:
        if session.draining:
            continue
        free = max(0, session.capacity - session.inflight)
        if session.version == 1:
            names: tuple[str, ...] = (v1_model,) if v1_model else ()
        else:
            names = session.models
        if not names and session.version == 2:
            any_model[0] += 1
            any_model[1] += free
        for name in names:
            entry = served.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += free
    created = int(time.time())
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "relayd",
            "agents": counts[0] + any_model[0],
            "free_slots": counts[1] + any_model[1],
        }
        for name, counts in sorted(served.items())
    ]
    return {"object": "list", "data": data}
