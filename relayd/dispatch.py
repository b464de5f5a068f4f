"""Getting one question answered by one agent.

The :class:`Dispatcher` owns:

* the choice of agent (through :class:`~relayd.agents.pool.AgentPool`) and
  conversation affinity (through :class:`~relayd.conversations.Conversations`);
* the wait queue: one FIFO when every agent is busy, bounded by
  ``requests.max_queue`` and ``requests.queue_timeout``. Waiters for a
  particular agent (a conversation's owner) queue separately per agent; when a
  slot frees, the earliest waiter that may use it gets it, so order is kept
  without scanning the queue;
* the one deadline of a request (``requests.timeout``) and retries on other
  agents for requests that are not part of a conversation;
* the :class:`~relayd.agents.session.SessionHost` side of sessions: admission
  (against the agent keys it is handed, so that a key revoked while an agent
  is mid-handshake cannot slip in), id reclaiming, and slot accounting.

It does not own the :class:`~relayd.agents.heartbeat.Heartbeat`: the daemon
builds and runs it and hands it in; the dispatcher gives it each session it
admits, and a reload's settings (:meth:`Dispatcher.apply`).

It knows nothing of sockets, HTTP status codes or authentication: failures are
the domain errors of :mod:`relayd.errors`.

Slots change hands without a checkpoint: when a slot frees, the waiter that
gets it has it taken on its behalf before it wakes; a waiter cancelled after
that hands the slot on. A slot is released only by the session it belongs to, once the
request is handed to it (:meth:`~relayd.agents.session.AgentSession.ask`).
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import count
from typing import Any

import trio

from relayd.agents.auth import AgentKeys
from relayd.agents.heartbeat import Heartbeat
from relayd.agents.pool import AgentPool, eligible
from relayd.agents.session import (
    AdmissionRefused,
    AgentSession,
    RequestTooLarge,
    SessionLost,
    SlowReader,
)
from relayd.config import AgentsConfig, Config, RequestsConfig
from relayd.conversations import Conversation, Conversations
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
    ShuttingDown,
    StreamBroken,
    UnknownConversation,
    UnknownModel,
)
from relayd.protocol import AgentError, CloseCode, Hello, Reply, Request, UnsendableText
from relayd.protocol.v2 import ChatRequest

__all__ = ["Answer", "Dispatcher", "Question", "new_uuid"]

log = logging.getLogger("relayd.dispatch")

# How far into the any-agent queue to look for a waiter that has not already
# tried an agent (retries exclude the agents that failed them).
_EXCLUSION_LOOKAHEAD = 32
# How many agent ids to remember, with the credential that held them, so that a
# reconnecting agent can reclaim its id (and its conversations).
_REMEMBERED_IDS = 100_000
MID_ANSWER_GONE = "the agent disconnected in the middle of its answer"


def new_uuid() -> str:
    """A random (version 4) UUID as text, at a third of ``str(uuid.uuid4())``'s cost.

    Three are made per request (its frame id, message id and parent id), the
    way the seed made them.
    """
    digits = os.urandom(16).hex()
    variant = "89ab"[int(digits[16], 16) & 3]
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{variant}{digits[17:20]}-{digits[20:]}"


@dataclass(frozen=True, slots=True)
class Question:
    """What a client asks. ``content`` for the seed's questions; ``messages``
    (and ``params``) for an OpenAI-style chat, which only v2 agents take."""

    content: str
    user_id: str
    conversation_id: str | None = None
    parent_id: str | None = None
    is_admin: bool = False
    model: str | None = None  # only agents that serve it (None: any agent)
    messages: tuple[dict[str, Any], ...] | None = None
    params: dict[str, Any] | None = None
    # A chat a v1 agent may serve too (as ``content``): no model, or agents.v1_model.
    v1_allowed: bool = False

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def v2_only(self) -> bool:
        return self.messages is not None and not self.v1_allowed


@dataclass(frozen=True, slots=True)
class Answer:
    id: str
    response_id: str
    conversation_id: str
    content: str
    agent_id: str
    attempts: int
    queue_wait: float
    streamed: bool = False  # its pieces went to on_piece as they came
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


class _Waiter:
    """A request waiting for a slot. ``session`` is set when it gets one."""

    __slots__ = ("event", "exclude", "model", "seq", "session", "target", "v2_only")

    def __init__(
        self,
        seq: int,
        target: str | None,
        exclude: frozenset[str],
        model: str | None = None,
        v2_only: bool = False,
    ) -> None:
        self.seq = seq
        self.target = target
        self.exclude = exclude
        self.model = model
        self.v2_only = v2_only
        self.event = trio.Event()
        self.session: AgentSession | None = None

    def accepts(self, session: AgentSession) -> bool:
        return eligible(session, self.exclude, self.model, self.v2_only)


class Dispatcher:
    """Routes questions to agents. One per daemon; see the module docstring."""

    def __init__(
        self,
        config: Config,
        *,
        agent_keys: AgentKeys,
        heartbeat: Heartbeat,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self._agent_keys = agent_keys
        self.pool = AgentPool()
        self.heartbeat = heartbeat  # watches each admitted session; its owner runs it
        self.conversations = Conversations(
            ttl=config.conversations.ttl, limit=config.conversations.max
        )
        self._clock = clock or trio.current_time
        self._seq = count()
        self._any: OrderedDict[int, _Waiter] = OrderedDict()
        self._targeted: dict[str, OrderedDict[int, _Waiter]] = {}
        self._queued = 0
        # Agent id → credential, oldest first; a plain dict (re-inserted on use)
        # costs less per entry than an OrderedDict.
        self._identities: dict[str, str] = {}
        # Changed identities since identity_journal() (None: forgotten); None:
        # nobody keeps them across restarts.
        self._identity_changes: dict[str, str | None] | None = None
        self._grace_until = -math.inf  # see begin_startup_grace()
        self._draining_relay = False  # see drain()
        self._agent_arrived = trio.Event()
        self._closing = False
        self._active: set[trio.CancelScope] = set()  # one per ask() under way
        self._aborted = False  # abort_all() was called
        self._idle = trio.Event()

    # -- configuration ---------------------------------------------------------

    def apply(self, config: Config, agent_keys: AgentKeys) -> None:
        """Take a reload: limits apply to the next decision, the heartbeat's
        settings from each session's next turn, and an agent whose key is gone
        is disconnected."""
        self.config = config
        self._agent_keys = agent_keys
        self.heartbeat.configure(config.agents)
        self.conversations.configure(ttl=config.conversations.ttl, limit=config.conversations.max)
        capacity = config.agents.max_inflight
        for session in self.pool:
            if not agent_keys.still_valid(session.credential):
                log.warning("agent key revoked, disconnecting: %s", session)
                session.request_close(CloseCode.POLICY_VIOLATION, "agent key revoked")
            elif session.version == 1 and session.capacity != capacity:
                self.pool.resize(session, capacity)
                self._offer(session)

    @property
    def agent_keys(self) -> AgentKeys:
        return self._agent_keys

    def agents_config(self) -> AgentsConfig:
        return self.config.agents

    @property
    def queued(self) -> int:
        return self._queued

    # -- SessionHost ---------------------------------------------------------------

    def admit(self, session: AgentSession, hello: Hello) -> None:
        """Register a session; let it reclaim an earlier id if it proves it may."""
        if self._closing or self._draining_relay:
            raise AdmissionRefused("relayd is shutting down", CloseCode.GOING_AWAY)
        if not self._agent_keys.still_valid(session.credential):
            raise AdmissionRefused("agent key revoked", CloseCode.POLICY_VIOLATION)
        replaces_itself = (
            hello.is_reclaim
            and hello.connection_id in self.pool
            and self._identities.get(hello.connection_id) == session.credential
        )
        if not replaces_itself and len(self.pool) >= self.config.agents.max_agents:
            log.warning(
                "agent refused: agents.max_agents=%d reached remote=%s",
                self.config.agents.max_agents,
                session.remote,
            )
            raise AdmissionRefused("too many agents connected", CloseCode.TRY_AGAIN_LATER)
        if hello.is_reclaim:
            self._reclaim(session, hello.connection_id)
        self._identities.pop(session.agent_id, None)
        self._identities[session.agent_id] = session.credential
        changes = self._identity_changes
        if changes is not None:
            changes[session.agent_id] = session.credential
        while len(self._identities) > _REMEMBERED_IDS:
            forgotten = next(iter(self._identities))
            del self._identities[forgotten]
            if changes is not None:
                changes[forgotten] = None
        self.pool.add(session)
        self.heartbeat.watch(session)
        self._agent_arrived.set()
        self._agent_arrived = trio.Event()
        self._offer(session)

    def _reclaim(self, session: AgentSession, wanted: str) -> None:
        holder = self._identities.get(wanted)
        if holder is None or holder != session.credential:
            log.info(
                "agent asked for id %s but may not reclaim it; keeping %s remote=%s",
                wanted[:8],
                session,
                session.remote,
            )
            return
        older = self.pool.get(wanted)
        if older is not None:
            self.pool.remove(older)
            older.request_close(CloseCode.NORMAL, "replaced by a newer connection with this id")
            log.info("agent reconnected, closing its older connection: %s", older)
        session.agent_id = wanted

    def slot_freed(self, session: AgentSession) -> None:
        self.pool.release(session)
        self._offer(session)

    def remove(self, session: AgentSession) -> None:
        self.pool.remove(session)

    def requests_config(self) -> RequestsConfig:
        return self.config.requests

    def capacity_changed(self, session: AgentSession, capacity: int) -> None:
        self.pool.resize(session, capacity)
        self._offer(session)

    def models_changed(self, session: AgentSession) -> None:
        self._offer(session)

    def draining(self, session: AgentSession) -> None:
        self.pool.set_draining(session)

    # -- restarts ---------------------------------------------------------------------

    def begin_startup_grace(self) -> None:
        """After a (re)start, agents need a moment to reconnect: for
        ``agents.startup_grace`` a request that finds no agent for it waits for
        one (within its deadline), and a conversation waits for its agent."""
        self._grace_until = trio.current_time() + self.config.agents.startup_grace

    def _grace_left(self) -> float:
        return max(0.0, self._grace_until - trio.current_time())

    def keep_identities(self, remembered: list[tuple[str, str]]) -> None:
        """Take the agent ids (and who held them) kept across a restart, oldest
        first, so that agents can reclaim their ids and conversations; and keep
        a journal of changes from now on (:meth:`identity_journal`)."""
        for agent_id, credential in remembered:
            self._identities.pop(agent_id, None)
            self._identities[agent_id] = credential
        while len(self._identities) > _REMEMBERED_IDS:
            del self._identities[next(iter(self._identities))]
        self._identity_changes = {}

    def identity_journal(self) -> dict[str, str | None]:
        changes, self._identity_changes = self._identity_changes or {}, {}
        return changes

    # -- asking ---------------------------------------------------------------------

    async def ask(
        self, question: Question, on_piece: Callable[[str], Awaitable[None]] | None = None
    ) -> Answer:
        """Get ``question`` answered within ``requests.timeout``.

        ``on_piece``, when given, is awaited with each piece of the answer as
        it comes from a v2 agent (a streamed answer). A request fails over to
        another agent only while nothing of it has reached ``on_piece``; after
        that a failure is :class:`~relayd.errors.StreamBroken`.

        Raises a :class:`~relayd.errors.RelayError`: UnknownConversation,
        UnknownModel, NoAgent, QueueFull, QueueTimeout, ConversationAgentGone,
        AgentFailed, StreamBroken, AgentTimeout, ShuttingDown, BadRequest,
        PayloadTooLarge.
        """
        if self._closing:
            raise ShuttingDown(retry_after=5)
        timeout = self.config.requests.timeout
        # One scope for both ends of a request's life: its deadline is the
        # request timeout, and abort_all() cancels it at the end of a drain.
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        self._active.add(scope)
        request = _Asking(question, on_piece, scope, self)
        try:
            with scope:
                if question.conversation_id:
                    return await self._continue(request)
                return await self._start(request)
            if self._aborted:
                raise ShuttingDown(retry_after=5)
            raise AgentTimeout(f"no answer within requests.timeout ({timeout:g}s)")
        finally:
            self._active.discard(scope)
            if not self._active:
                self._idle.set()

    async def _start(self, asking: _Asking) -> Answer:
        """A new conversation: any agent, retried on others if one fails (before
        any of its answer reached the client)."""
        question = asking.question
        limits = self.config.requests
        if question.parent_id:
            self._check_parent(question, None)
        tried: set[str] = set()
        agent_errors: list[str] = []
        waited = 0.0
        for attempt in range(1, limits.max_attempts + 1):
            if attempt > 1 and not self.pool.has_candidate(
                tried, question.model, v2_only=question.v2_only
            ):
                break
            started = self._clock()
            session = await self._acquire(
                None, frozenset(tried), question.model, v2_only=question.v2_only
            )
            waited += self._clock() - started
            tried.add(session.agent_id)
            try:
                outcome = await self._call(session, asking.request_for(session, None))
            except SessionLost:
                if asking.pieces:
                    raise StreamBroken(MID_ANSWER_GONE) from None
                log.info("agent gone before replying: %s attempt=%d", session, attempt)
                continue
            if isinstance(outcome, AgentError):
                log.info("agent error: %s text=%r attempt=%d", session, outcome.text[:200], attempt)
                if asking.pieces:
                    raise StreamBroken(f"the agent failed mid-answer: {outcome.text[:200]}")
                if not outcome.retryable:
                    raise AgentFailed(f"the agent failed ({outcome.code}): {outcome.text[:200]}")
                agent_errors.append(outcome.text[:200])
                continue
            return self._answered(asking, session, outcome, attempt, waited)
        if agent_errors:
            raise AgentFailed(f"the agent failed: {agent_errors[-1]}")
        raise NoAgent(
            "the agent disconnected before replying and no other agent was free", retry_after=1
        )

    async def _continue(self, asking: _Asking) -> Answer:
        """A turn of a known conversation: only its agent may answer."""
        question = asking.question
        assert question.conversation_id is not None
        entry = self.conversations.get(question.conversation_id, self._clock())
        if entry is None or (entry.user_id != question.user_id and not question.is_admin):
            raise UnknownConversation()
        if question.parent_id:
            self._check_parent(question, entry)
        started = self._clock()
        session = await self._acquire(entry.agent_id, frozenset())
        waited = self._clock() - started
        try:
            outcome = await self._call(session, asking.request_for(session, entry))
        except SessionLost:
            if asking.pieces:
                raise StreamBroken(MID_ANSWER_GONE) from None
            raise AgentFailed("the agent disconnected before replying") from None
        if isinstance(outcome, AgentError):
            if asking.pieces:
                raise StreamBroken(f"the agent failed mid-answer: {outcome.text[:200]}")
            raise AgentFailed(f"the agent failed: {outcome.text[:200]}")
        return self._answered(asking, session, outcome, 1, waited)

    def _check_parent(self, question: Question, conversation: Conversation | None) -> None:
        """Refuse a ``parent_id`` that relayd knows as a turn the asker may not continue from.

        A new conversation may branch only from the asker's own turns; a turn of
        a conversation must be one of that conversation's. Ids relayd does not
        know (never seen, or forgotten) pass, as in the seed.
        """
        assert question.parent_id is not None
        owner = self.conversations.turn(question.parent_id, self._clock())
        if owner is None:
            return
        if owner.user_id != question.user_id and not question.is_admin:
            raise Forbidden("parent_id is a turn of a conversation that is not yours")
        if conversation is not None and owner is not conversation:
            raise BadRequest("parent_id is a turn of another conversation")

    def _answered(
        self, asking: _Asking, session: AgentSession, reply: Reply, attempts: int, waited: float
    ) -> Answer:
        """The answer to ``question``, its conversation recorded.

        A reply that names a conversation or turn that is not the agent's to
        claim is still the client's answer, but moves nothing (see
        :mod:`relayd.conversations`); the agent is logged as misbehaving.
        """
        question = asking.question
        conversation_id = reply.conversation_id or question.conversation_id or ""
        if conversation_id and not question.is_chat:
            problem = self.conversations.record(
                conversation_id,
                agent_id=session.agent_id,
                user_id=question.user_id,
                response_id=reply.response_id,
                now=self._clock(),
                any_user=question.is_admin,
            )
            if problem is not None:
                log.warning(
                    "agent misbehaving: %s replied for user=%s: %s",
                    session,
                    question.user_id,
                    problem,
                )
        return Answer(
            id=reply.request_id,
            response_id=reply.response_id,
            conversation_id=conversation_id,
            content=reply.content,
            agent_id=session.agent_id,
            attempts=attempts,
            queue_wait=waited,
            streamed=asking.pieces > 0,
            finish_reason=reply.finish_reason,
            usage=reply.usage,
        )

    async def _call(self, session: AgentSession, asking: _Sending) -> Reply | AgentError:
        """Send on a slot we hold, handing it to the session (see AgentSession.ask)."""
        try:
            return await session.ask(
                asking.request, asking.on_piece, cancel_reason=asking.cancel_reason
            )
        except UnsendableText as error:
            # The front door refuses such text (a 400); this is the last line.
            raise BadRequest(str(error)) from None
        except RequestTooLarge as error:
            raise PayloadTooLarge(str(error)) from None
        except SlowReader:
            raise StreamBroken(
                "the client read the answer more slowly than the agent wrote it "
                "(requests.max_response); the request was cancelled"
            ) from None

    # -- the wait queue ----------------------------------------------------------------

    async def _acquire(
        self,
        target: str | None,
        exclude: frozenset[str],
        model: str | None = None,
        v2_only: bool = False,
    ) -> AgentSession:
        """A session with a slot taken for us: ``target``'s, or any not in
        ``exclude`` that serves ``model`` (and speaks v2, with ``v2_only``)."""
        limits = self.config.requests
        if target is None:
            if not self._any:
                session = self.pool.pick(exclude, model, v2_only=v2_only)
                if session is not None:
                    self.pool.take(session)
                    return session
            waiter = _Waiter(next(self._seq), None, exclude, model, v2_only)
            if not len(self.pool):
                wait = max(limits.wait_for_agent, self._grace_left())
                if wait <= 0:
                    raise NoAgent(retry_after=5)
                return await self._wait(waiter, wait, NoAgent(retry_after=5))
            if not self.pool.has_candidate(exclude, model, v2_only=v2_only):
                grace = self._grace_left()
                if grace > 0:  # its agent may not have reconnected yet
                    return await self._wait(
                        waiter, grace, self._no_candidate(exclude, model, v2_only)
                    )
                raise self._no_candidate(exclude, model, v2_only)
            return await self._wait(waiter, limits.queue_timeout, QueueTimeout(retry_after=5))
        waiter = _Waiter(next(self._seq), target, exclude)
        session = self.pool.get(target)
        if session is not None and not session.draining:
            if session.inflight < session.capacity and target not in self._targeted:
                self.pool.take(session)
                return session
            return await self._wait(waiter, limits.queue_timeout, QueueTimeout(retry_after=5))
        grace = max(self.config.agents.reconnect_grace, self._grace_left())
        return await self._wait(waiter, grace, ConversationAgentGone(retry_after=5))

    def _no_candidate(self, exclude: frozenset[str], model: str | None, v2_only: bool) -> Exception:
        """Why no connected agent could ever take a request: the error to raise."""
        if model is not None and self.pool.has_candidate(exclude):
            named, _ = self.pool.models()
            v1_model = self.config.agents.v1_model
            if v1_model and any(session.version == 1 for session in self.pool):
                named = sorted({*named, v1_model})
            served = ", ".join(named) if named else "none"
            return UnknownModel(
                f"no connected agent serves model {model!r}; models served: {served}"
            )
        if v2_only and self.pool.has_candidate(exclude):
            return NoAgent(
                "no connected agent speaks agent protocol v2, which chat requests need",
                retry_after=5,
            )
        return NoAgent("no other agent is connected", retry_after=5)

    async def _wait(self, waiter: _Waiter, patience: float, expired: Exception) -> AgentSession:
        """Queue ``waiter`` for a slot for ``patience`` seconds; raises ``expired``
        if none came."""
        if self._queued >= self.config.requests.max_queue:
            log.warning("queue full: requests.max_queue=%d", self.config.requests.max_queue)
            raise QueueFull(retry_after=5)
        target = waiter.target
        queue = self._any if target is None else self._targeted.setdefault(target, OrderedDict())
        queue[waiter.seq] = waiter
        self._queued += 1
        self._serve_free_agents(waiter)
        try:
            with trio.move_on_after(patience):
                await waiter.event.wait()
            if waiter.session is not None:
                # A cancel that came after the hand-over could not be delivered
                # while we slept; take it now, before the question is sent.
                await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            if waiter.session is not None:
                # We were handed a slot but are cancelled: pass it on.
                self.slot_freed(waiter.session)
            self._dequeue(waiter)
            raise
        self._dequeue(waiter)
        if waiter.session is not None:
            return waiter.session
        if self._closing:
            raise ShuttingDown(retry_after=5)
        if target is not None and target not in self.pool:
            raise ConversationAgentGone(retry_after=5)
        raise expired

    def _serve_free_agents(self, waiter: _Waiter) -> None:
        """Hand free slots to the queue, when a new waiter may use one that is free.

        Free slots normally go out as they free up; this covers a slot that was
        left free because every earlier waiter had excluded its agent.
        """
        for _ in range(_EXCLUSION_LOOKAHEAD):
            if waiter.session is not None:
                return
            if waiter.target is None:
                free = self.pool.pick(waiter.exclude, waiter.model, v2_only=waiter.v2_only)
            else:
                free = self.pool.get(waiter.target)
                if free is not None and (free.inflight >= free.capacity or free.draining):
                    free = None
            if free is None:
                return
            before = free.inflight
            self._offer(free)
            if free.inflight == before:
                return

    def _dequeue(self, waiter: _Waiter) -> None:
        queue = self._any if waiter.target is None else self._targeted.get(waiter.target)
        if queue is not None and queue.pop(waiter.seq, None) is not None:
            self._queued -= 1
            if waiter.target is not None and not queue:
                del self._targeted[waiter.target]

    def _offer(self, session: AgentSession) -> None:
        """Give ``session``'s free slots to the earliest waiters that may use them."""
        while session.inflight < session.capacity and self.pool.get(session.agent_id) is session:
            waiter = self._next_waiter(session)
            if waiter is None:
                return
            self._dequeue(waiter)
            self.pool.take(session)
            waiter.session = session
            waiter.event.set()

    def _next_waiter(self, session: AgentSession) -> _Waiter | None:
        if session.draining:
            return None
        best: _Waiter | None = None
        targeted = self._targeted.get(session.agent_id)
        if targeted:
            best = next(iter(targeted.values()))
        for looked, waiter in enumerate(self._any.values()):
            if looked >= _EXCLUSION_LOOKAHEAD or (best is not None and waiter.seq > best.seq):
                break
            if waiter.accepts(session):
                return waiter
        return best

    # -- shutdown ---------------------------------------------------------------------

    def drain(self) -> None:
        """The first step of a shutdown: admit no new agent (they would be closed
        in a moment), but go on answering: requests under way and queued ones
        are served by the agents still here, within the shutdown grace."""
        self._draining_relay = True

    def close(self) -> None:
        """Refuse new questions and wake every waiter with ShuttingDown."""
        self._closing = True
        for queue in (self._any, *self._targeted.values()):
            for waiter in list(queue.values()):
                waiter.event.set()

    async def wait_idle(self) -> None:
        """Return when no ask() is under way."""
        while self._active:
            self._idle = trio.Event()
            await self._idle.wait()

    def abort_all(self) -> int:
        """Answer every ask() still under way with ShuttingDown; how many there were."""
        self._aborted = True
        for scope in self._active:
            scope.cancel()
        return len(self._active)

    @property
    def closing(self) -> bool:
        return self._closing

    async def wait_for_agent(self) -> None:
        """Return when the next agent is admitted (for tests and the bench)."""
        await self._agent_arrived.wait()


class _Sending:
    """One request as it goes to one agent: the frame's event and how its pieces
    reach the asker."""

    __slots__ = ("cancel_reason", "on_piece", "request")

    def __init__(
        self,
        request: Request | ChatRequest,
        on_piece: Callable[[str], Awaitable[None]] | None,
        cancel_reason: Callable[[], str],
    ) -> None:
        self.request = request
        self.on_piece = on_piece
        self.cancel_reason = cancel_reason


class _Asking:
    """A question being asked: what each attempt sends, and how much of the
    answer has reached the asker (after that, no failover)."""

    __slots__ = ("_deliver", "_dispatcher", "on_piece", "pieces", "question", "scope")

    def __init__(
        self,
        question: Question,
        on_piece: Callable[[str], Awaitable[None]] | None,
        scope: trio.CancelScope,
        dispatcher: Dispatcher,
    ) -> None:
        self.question = question
        self.on_piece = on_piece
        self.scope = scope
        self.pieces = 0
        self._dispatcher = dispatcher

    async def _counted(self, piece: str) -> None:
        assert self.on_piece is not None
        self.pieces += 1
        await self.on_piece(piece)

    def cancel_reason(self) -> str:
        if self._dispatcher._aborted:
            return "relayd is shutting down"
        if trio.current_time() >= self.scope.deadline:
            return "requests.timeout passed"
        return "the client went away"

    def request_for(self, session: AgentSession, conversation: Conversation | None) -> _Sending:
        """The frame's event for one attempt on ``session`` (fresh ids each time).
        A chat goes to a v1 agent as one ``content`` (the question's)."""
        question = self.question
        request: Request | ChatRequest
        if question.messages is not None and session.version == 2:
            request = ChatRequest(
                new_uuid(), question.model or "", question.messages, question.params or {}
            )
        else:
            parent = question.parent_id or (
                conversation.last_response_id if conversation is not None else new_uuid()
            )
            request = Request(
                request_id=new_uuid(),
                message_id=new_uuid(),
                conversation_id=question.conversation_id or "",
                parent_id=parent,
                content=question.content,
                model=None if question.is_chat else question.model,
            )
        on_piece = self._counted if self.on_piece is not None else None
        return _Sending(request, on_piece, self.cancel_reason)
