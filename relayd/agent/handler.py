"""The answer to one request: what :class:`~relayd.agentkit.V2Agent` runs for each.

A chat request (``kind: "chat"``) goes to the backend as it came: its model,
its messages, its parameters. A seed-style question (``kind: "ask"``) is
turned into a chat: the conversation's path up to ``parent_id``, from the
:class:`~relayd.agent.history.ConversationStore`, then the new question; the
answer is recorded as a new turn under a fresh ``response_id`` before
``done`` goes out, so the client's next turn always finds it.

This is an isolation boundary (one request): a failure is a
:class:`~relayd.agentkit.HandlerFailure` that ends this request alone, and
anything unexpected is logged with its traceback and sent as ``internal``.
Cancellation (the relay's ``cancel``) is never caught here.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from relayd.agent.backend import Backend
from relayd.agent.history import ConversationStore, StoreError, UnknownTurn
from relayd.agentkit import Finish, HandlerFailure
from relayd.protocol import Request
from relayd.protocol.v2 import ChatRequest

__all__ = ["Answerer"]

log = logging.getLogger("relayd.agent")


class Answerer:
    """Answers requests with the current backend; the service swaps
    :attr:`backend` on a reload (requests under way keep theirs)."""

    def __init__(
        self,
        backend: Backend,
        store: ConversationStore,
        default_model: Callable[[], str | None],
    ) -> None:
        self.backend = backend
        self.store = store
        self.default_model = default_model

    def __call__(self, request: Request | ChatRequest) -> AsyncGenerator[str | Finish, None]:
        return self.answer(request)

    async def answer(self, request: Request | ChatRequest) -> AsyncGenerator[str | Finish, None]:
        backend = self.backend
        try:
            async with backend.use():
                if isinstance(request, ChatRequest):
                    pieces = backend.chat(
                        request.model or self.default_model(), request.messages, request.params
                    )
                else:
                    pieces = self._ask(request, backend)
                # aclosing: a request cancelled between two pieces closes the inner
                # generators (and the backend's stream) now, not when collected.
                async with aclosing(pieces):
                    async for item in pieces:
                        yield item
        except HandlerFailure as failure:
            if not failure.retryable:
                log.info("request %s: %s (%s)", request.request_id, failure.message, failure.code)
            raise
        except StoreError as error:
            log.error("request %s: %s", request.request_id, error)
            raise HandlerFailure(
                "internal", "the agent cannot read or write its conversations"
            ) from None
        except Exception:
            log.exception("request %s failed", request.request_id)
            raise HandlerFailure("internal", "the agent failed; see its log") from None

    async def _ask(self, request: Request, backend: Backend) -> AsyncGenerator[str | Finish, None]:
        conversation_id = request.conversation_id
        parent_id: str | None = None
        turns: tuple[tuple[str, str], ...] = ()
        model = request.model
        if conversation_id:
            try:
                history = await self.store.history(conversation_id, request.parent_id)
            except UnknownTurn:
                raise HandlerFailure(
                    "bad_request",
                    f"parent_id {request.parent_id} is not a turn of conversation "
                    f"{conversation_id} on this agent",
                ) from None
            if history is None:
                raise HandlerFailure(
                    "bad_request",
                    f"this agent does not know conversation {conversation_id} "
                    "(forgotten: agent.conversations_ttl or agent.conversations_max)",
                )
            turns, parent_id = history.turns, history.parent_id
            model = model or history.model
        else:
            conversation_id = str(uuid.uuid4())
        model = model or self.default_model()
        messages: list[dict[str, Any]] = []
        for question, answer in turns:
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": request.content})
        log.debug(
            "request %s: conversation %s, %d earlier turns, model %s",
            request.request_id,
            conversation_id,
            len(turns),
            model,
        )
        pieces: list[str] = []
        finish = Finish()
        chat = backend.chat(model, messages, {})
        async with aclosing(chat):
            async for item in chat:
                if isinstance(item, Finish):
                    finish = item
                else:
                    pieces.append(item)
                    yield item
        response_id = await self.store.add_turn(
            conversation_id, parent_id, request.content, "".join(pieces), model
        )
        yield Finish(
            response_id=response_id,
            conversation_id=conversation_id,
            finish_reason=finish.finish_reason,
            usage=finish.usage,
        )
