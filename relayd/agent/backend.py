"""Where answers come from: an OpenAI-compatible backend, or the echo.

:class:`OpenAIBackend` speaks to any OpenAI-compatible ``/v1`` base URL
(Ollama, llama.cpp's server, vLLM, LM Studio, OpenAI itself) with the
official SDK, ``openai.AsyncOpenAI``, which runs under Trio. Every answer is
streamed from the backend and handed on piece by piece; the stream is opened
in ``async with``, so that a cancelled request (the relay's ``cancel``, or a
lost connection) closes it at once and the backend stops generating.

Failures become :class:`~relayd.agentkit.HandlerFailure` with a code, a
message a client can read, and whether another agent might do better
(``retryable``):

=====================================  ======================  =========
what happened                          code                    retryable
=====================================  ======================  =========
cannot connect                         ``backend_unavailable``  yes
no byte for ``backend_timeout``        ``timeout``             yes
5xx, an error inside the stream        ``backend_error``       yes
the stream broke off or ended early    ``backend_error``       yes
429 Too Many Requests                  ``overloaded``          yes
any other 4xx                          ``bad_request``         no
=====================================  ======================  =========

:class:`BackendHealth` logs a backend that stops working once, at warning
(later failures of the same kind at debug), and once more when it answers
again, so that an outage is two log lines, not one per request.

The SDK's own retries are off (``max_retries=0``): the relay already retries
a failed new conversation on another agent, and an agent that waits seconds
in back-off holds the client for nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import openai
import trio
from openai import AsyncOpenAI

from relayd.agent.config import Secret, display_url
from relayd.agentkit import Finish, HandlerFailure
from relayd.protocol.v2 import MAX_MODEL_ID, MAX_MODELS

__all__ = [
    "DROPPED_PARAMS",
    "Backend",
    "BackendHealth",
    "EchoBackend",
    "ModelListError",
    "OpenAIBackend",
    "failure_from",
]

log = logging.getLogger("relayd.agent.backend")

# Chat parameters the agent sets itself: it always streams, one choice.
DROPPED_PARAMS = frozenset({"model", "messages", "stream", "stream_options", "n"})
# Sent as the API key to a backend that needs none: the SDK insists on one.
NO_KEY = "no-key"
# How long closing a backend stream may take, when the request is already cancelled.
CLOSE_TIMEOUT = 2.0


class ModelListError(Exception):
    """The backend's model list could not be read; ``retryable`` as for requests."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class BackendHealth:
    """Logs a failing backend once per outage (and per kind of failure)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.problem: str | None = None  # the code of the current outage, if any

    def failed(self, failure: HandlerFailure) -> None:
        if self.problem != failure.code:
            log.warning(
                "%s (%s; until the backend recovers, more like this are logged at debug)",
                failure.message,
                failure.code,
            )
        else:
            log.debug("%s (%s)", failure.message, failure.code)
        self.problem = failure.code

    def ok(self) -> None:
        if self.problem is not None:
            log.info("backend %s answers again", self.name)
            self.problem = None


class Backend:
    """The interface of a backend. ``chat`` yields the answer's text in pieces,
    then one :class:`~relayd.agentkit.Finish` (without ids), or raises
    HandlerFailure. A backend in use is not closed under its requests:
    :meth:`retire` closes it when the last one ends."""

    name = "backend"
    discovers_models = False

    def __init__(self) -> None:
        self._users = 0
        self._retired = False
        self.health = BackendHealth(self.name)

    def chat(
        self, model: str | None, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]
    ) -> AsyncGenerator[str | Finish, None]:
        raise NotImplementedError

    async def list_models(self) -> tuple[str, ...]:
        """The backend's models; raises ModelListError."""
        raise NotImplementedError

    @asynccontextmanager
    async def use(self) -> AsyncIterator[None]:
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if self._retired and not self._users:
                with trio.CancelScope(shield=True):
                    await self.aclose()

    async def retire(self) -> None:
        """Close once unused (now, if nothing uses it)."""
        self._retired = True
        if not self._users:
            await self.aclose()

    async def aclose(self) -> None:
        """Release what the backend holds (its connections)."""


class EchoBackend(Backend):
    """No backend at all: answers ``echo:`` and the last message's text, word by
    word, ``delay`` seconds apart. For trying a relay out, and for tests."""

    name = "echo"

    def __init__(self, delay: float, prefix: str = "echo:") -> None:
        super().__init__()
        self.delay = delay
        self.prefix = prefix

    async def chat(
        self, model: str | None, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]
    ) -> AsyncGenerator[str | Finish, None]:
        last = messages[-1].get("content", "") if messages else ""
        text = self.prefix + (last if isinstance(last, str) else str(last))
        words = text.split(" ")
        for index, word in enumerate(words):
            if index and self.delay:
                await trio.sleep(self.delay)
            yield word if index == len(words) - 1 else word + " "
        yield Finish(finish_reason="stop")

    async def list_models(self) -> tuple[str, ...]:
        return ()


def _status_text(error: openai.APIStatusError) -> str:
    """The backend's own words for an HTTP error, short."""
    body = error.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("error")
        if isinstance(message, dict):
            message = message.get("message")
        if isinstance(message, str) and message:
            return message[:300]
    if isinstance(body, str) and body.strip():
        return body.strip()[:300]
    return error.response.reason_phrase or "no message"


def _cause(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__
    text = str(cause) if cause is not None else ""
    return text[:300] or type(cause or error).__name__


def failure_from(
    error: openai.OpenAIError, *, name: str, sent: int, timeout: float
) -> HandlerFailure:
    """The v2 error for an SDK exception; ``sent``: characters of the answer
    already handed on (a failure after some is a stream that broke off)."""
    midway = f" after {sent} characters of the answer" if sent else ""
    if isinstance(error, openai.APITimeoutError):
        return HandlerFailure(
            "timeout",
            f"the backend {name} sent nothing for {timeout:g}s{midway} (agent.backend_timeout)",
            retryable=True,
        )
    if isinstance(error, openai.APIConnectionError):
        if sent:
            return HandlerFailure(
                "backend_error",
                f"the backend {name} broke off{midway}: {_cause(error)}",
                retryable=True,
            )
        return HandlerFailure(
            "backend_unavailable",
            f"cannot reach the backend {name}: {_cause(error)}",
            retryable=True,
        )
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        text = _status_text(error)
        if status == 429:
            return HandlerFailure(
                "overloaded", f"the backend {name} is overloaded (429): {text}", retryable=True
            )
        if status >= 500:
            return HandlerFailure(
                "backend_error", f"the backend {name} failed ({status}): {text}", retryable=True
            )
        return HandlerFailure(
            "bad_request", f"the backend {name} refused the request ({status}): {text}"
        )
    if isinstance(error, openai.APIError):
        return HandlerFailure(
            "backend_error",
            f"the backend {name} reported an error{midway}: {error.message[:300]}",
            retryable=True,
        )
    return HandlerFailure("backend_error", f"the backend {name}: {str(error)[:300]}")


def _usage(chunk: Any) -> dict[str, int] | None:
    usage = getattr(chunk, "usage", None)
    if usage is None:
        return None
    counts = {}
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(usage, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            counts[name] = value
    return counts or None


class OpenAIBackend(Backend):
    """An OpenAI-compatible backend at ``url`` (its ``/v1`` base)."""

    discovers_models = True

    def __init__(
        self, url: str, key: Secret | None, *, timeout: float, connect_timeout: float
    ) -> None:
        self.url = url
        self.name = display_url(url)
        super().__init__()
        self.timeout = timeout
        self.client = AsyncOpenAI(
            base_url=url,
            api_key=key.value if key is not None else NO_KEY,
            max_retries=0,
            timeout=openai.Timeout(timeout, connect=connect_timeout),
        )

    async def aclose(self) -> None:
        await self.client.close()

    async def list_models(self) -> tuple[str, ...]:
        try:
            page = await self.client.models.list()
            found = [model.id async for model in page]
        except openai.OpenAIError as error:
            failure = failure_from(error, name=self.name, sent=0, timeout=self.timeout)
            retryable = failure.retryable
            if isinstance(error, openai.APIStatusError) and error.status_code in (404, 405):
                message = (
                    f"the backend {self.name} has no model list ({error.status_code} for "
                    "/models): name its models with --model or agent.models"
                )
                raise ModelListError(message, retryable=False) from None
            raise ModelListError(failure.message, retryable=retryable) from None
        models = [m for m in dict.fromkeys(found) if m and len(m) <= MAX_MODEL_ID]
        if len(models) < len(found):
            log.debug(
                "backend %s: ignored %d unusable model ids", self.name, len(found) - len(models)
            )
        return tuple(models[:MAX_MODELS])

    async def chat(
        self, model: str | None, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]
    ) -> AsyncGenerator[str | Finish, None]:
        if not model:
            raise HandlerFailure(
                "bad_request", "no model named, and this agent has no default model"
            )
        extra = {name: value for name, value in params.items() if name not in DROPPED_PARAMS}
        sent = 0
        finish_reason: str | None = None
        usage: dict[str, int] | None = None
        try:
            stream = await self.client.chat.completions.create(
                model=model,
                messages=cast(Any, list(messages)),
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra or None,
            )
            try:
                async for chunk in stream:
                    usage = _usage(chunk) or usage
                    for choice in chunk.choices[:1] if chunk.choices else ():
                        text = choice.delta.content if choice.delta is not None else None
                        if choice.finish_reason is not None:
                            finish_reason = str(choice.finish_reason)
                        if text:
                            sent += len(text)
                            yield text
            finally:
                # A cancelled request gets here cancelled: close in a shield, bounded.
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await stream.close()
        except openai.OpenAIError as error:
            failure = failure_from(error, name=self.name, sent=sent, timeout=self.timeout)
            if failure.retryable:
                self.health.failed(failure)
            raise failure from None
        if finish_reason is None:
            failure = HandlerFailure(
                "backend_error",
                f"the backend {self.name}'s stream ended before the answer did"
                + (f", after {sent} characters" if sent else ""),
                retryable=True,
            )
            self.health.failed(failure)
            raise failure
        self.health.ok()
        yield Finish(finish_reason=finish_reason, usage=usage)
