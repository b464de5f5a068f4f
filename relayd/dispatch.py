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
* the :class:`~relayd.agents.session.SessionHost` side of sessions: admission,
  id reclaiming, and slot accounting.

It knows nothing of sockets, HTTP status codes or authentication: failures are
the domain errors of :mod:`relayd.errors`.

Slots change hands without a checkpoint: when a slot frees, the waiter that
gets it has it taken on its behalf before it wakes; a waiter cancelled after
that hands the slot on. A slot is released only by the session it belongs to, once the
request is handed to it (:meth:`~relayd.agents.session.AgentSession.ask`).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

import trio

from relayd.agents.heartbeat import Heartbeat
from relayd.agents.pool import AgentPool
from relayd.agents.session import (
    AdmissionRefused,
    AgentSession,
    RequestTooLarge,
    SessionLost,
)
from relayd.config import AgentsConfig, Config
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
    UnknownConversation,
)
from relayd.protocol import AgentError, CloseCode, Hello, Reply, Request, UnsendableText

__all__ = ["Answer", "Dispatcher", "Question", "new_uuid"]

log = logging.getLogger("relayd.dispatch")

# How far into the any-agent queue to look for a waiter that has not already
# tried an agent (retries exclude the agents that failed them).
_EXCLUSION_LOOKAHEAD = 32
# How many agent ids to remember, with the credential that held them, so that a
# reconnecting agent can reclaim its id (and its conversations).
_REMEMBERED_IDS = 100_000


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
    content: str
    user_id: str
    conversation_id: str | None = None
    parent_id: str | None = None
    is_admin: bool = False


@dataclass(frozen=True, slots=True)
class Answer:
    id: str
    response_id: str
    conversation_id: str
    content: str
    agent_id: str
    attempts: int
    queue_wait: float


class _Waiter:
    """A request waiting for a slot. ``session`` is set when it gets one."""

    __slots__ = ("event", "exclude", "seq", "session", "target")

    def __init__(self, seq: int, target: str | None, exclude: frozenset[str]) -> None:
        self.seq = seq
        self.target = target
        self.exclude = exclude
        self.event = trio.Event()
        self.session: AgentSession | None = None


class Dispatcher:
    """Routes questions to agents. One per daemon; see the module docstring."""

    def __init__(self, config: Config, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.pool = AgentPool()
        self.heartbeat = Heartbeat(self.agents_config)  # its owner runs heartbeat.run()
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
        self._agent_arrived = trio.Event()
        self._closing = False
        # Whether an agent credential is still accepted; the state sets it so that
        # a key revoked while an agent is mid-handshake cannot slip in.
        self.credential_valid: Callable[[str], bool] = lambda credential: True
        self._active: set[trio.CancelScope] = set()  # one per ask() under way
        self._aborted = False  # abort_all() was called
        self._idle = trio.Event()

    # -- configuration ---------------------------------------------------------

    def apply_config(self, config: Config) -> None:
        """Take a reloaded configuration: limits apply to the next decision."""
        self.config = config
        self.conversations.configure(ttl=config.conversations.ttl, limit=config.conversations.max)
        capacity = config.agents.max_inflight
        for session in self.pool:
            if session.capacity != capacity:
                self.pool.resize(session, capacity)
                self._offer(session)

    def agents_config(self) -> AgentsConfig:
        return self.config.agents

    @property
    def queued(self) -> int:
        return self._queued

    # -- SessionHost ---------------------------------------------------------------

    def admit(self, session: AgentSession, hello: Hello) -> None:
        """Register a session; let it reclaim an earlier id if it proves it may."""
        if self._closing:
            raise AdmissionRefused("relayd is shutting down", CloseCode.GOING_AWAY)
        if not self.credential_valid(session.credential):
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
        while len(self._identities) > _REMEMBERED_IDS:
            del self._identities[next(iter(self._identities))]
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

    # -- asking ---------------------------------------------------------------------

    async def ask(self, question: Question) -> Answer:
        """Get ``question`` answered within ``requests.timeout``.

        Raises a :class:`~relayd.errors.RelayError`: UnknownConversation,
        NoAgent, QueueFull, QueueTimeout, ConversationAgentGone, AgentFailed,
        AgentTimeout, ShuttingDown.
        """
        if self._closing:
            raise ShuttingDown(retry_after=5)
        timeout = self.config.requests.timeout
        # One scope for both ends of a request's life: its deadline is the
        # request timeout, and abort_all() cancels it at the end of a drain.
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        self._active.add(scope)
        try:
            with scope:
                if question.conversation_id:
                    return await self._continue(question)
                return await self._start(question)
            if self._aborted:
                raise ShuttingDown(retry_after=5)
            raise AgentTimeout(f"no answer within requests.timeout ({timeout:g}s)")
        finally:
            self._active.discard(scope)
            if not self._active:
                self._idle.set()

    async def _start(self, question: Question) -> Answer:
        """A new conversation: any agent, retried on others if one fails."""
        limits = self.config.requests
        if question.parent_id:
            self._check_parent(question, None)
        tried: set[str] = set()
        agent_errors: list[str] = []
        waited = 0.0
        for attempt in range(1, limits.max_attempts + 1):
            if attempt > 1 and not self.pool.has_candidate(tried):
                break
            started = self._clock()
            session = await self._acquire(None, frozenset(tried))
            waited += self._clock() - started
            request = Request(
                request_id=new_uuid(),
                message_id=new_uuid(),
                conversation_id="",
                parent_id=question.parent_id or new_uuid(),
                content=question.content,
            )
            tried.add(session.agent_id)
            try:
                outcome = await self._call(session, request)
            except SessionLost:
                log.info("agent gone before replying: %s attempt=%d", session, attempt)
                continue
            if isinstance(outcome, AgentError):
                log.info("agent error: %s text=%r attempt=%d", session, outcome.text[:200], attempt)
                agent_errors.append(outcome.text[:200])
                continue
            return self._answered(question, session, outcome, attempt, waited)
        if agent_errors:
            raise AgentFailed(f"the agent failed: {agent_errors[-1]}")
        raise NoAgent(
            "the agent disconnected before replying and no other agent was free", retry_after=1
        )

    async def _continue(self, question: Question) -> Answer:
        """A turn of a known conversation: only its agent may answer."""
        assert question.conversation_id is not None
        entry = self.conversations.get(question.conversation_id, self._clock())
        if entry is None or (entry.user_id != question.user_id and not question.is_admin):
            raise UnknownConversation()
        if question.parent_id:
            self._check_parent(question, entry)
        started = self._clock()
        session = await self._acquire(entry.agent_id, frozenset())
        waited = self._clock() - started
        request = Request(
            request_id=new_uuid(),
            message_id=new_uuid(),
            conversation_id=question.conversation_id,
            parent_id=question.parent_id or entry.last_response_id,
            content=question.content,
        )
        try:
            outcome = await self._call(session, request)
        except SessionLost:
            raise AgentFailed("the agent disconnected before replying") from None
        if isinstance(outcome, AgentError):
            raise AgentFailed(f"the agent failed: {outcome.text[:200]}")
        return self._answered(question, session, outcome, 1, waited)

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
        self, question: Question, session: AgentSession, reply: Reply, attempts: int, waited: float
    ) -> Answer:
        """The answer to ``question``, its conversation recorded.

        A reply that names a conversation or turn that is not the agent's to
        claim is still the client's answer, but moves nothing (see
        :mod:`relayd.conversations`); the agent is logged as misbehaving.
        """
        conversation_id = reply.conversation_id or question.conversation_id or ""
        if conversation_id:
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
        )

    async def _call(self, session: AgentSession, request: Request) -> Reply | AgentError:
        """Send on a slot we hold, handing it to the session (see AgentSession.ask)."""
        try:
            return await session.ask(request)
        except UnsendableText as error:
            # The front door refuses such text (a 400); this is the last line.
            raise BadRequest(str(error)) from None
        except RequestTooLarge as error:
            raise PayloadTooLarge(str(error)) from None

    # -- the wait queue ----------------------------------------------------------------

    async def _acquire(self, target: str | None, exclude: frozenset[str]) -> AgentSession:
        """A session with a slot taken for us: ``target``'s, or any not in ``exclude``."""
        limits = self.config.requests
        if target is None:
            if not self._any:
                session = self.pool.pick(exclude)
                if session is not None:
                    self.pool.take(session)
                    return session
            if not len(self.pool):
                wait = limits.wait_for_agent
                if wait <= 0:
                    raise NoAgent(retry_after=5)
                return await self._wait(target, exclude, wait, NoAgent(retry_after=5))
            if not self.pool.has_candidate(exclude):
                raise NoAgent("no other agent is connected", retry_after=5)
            return await self._wait(
                target, exclude, limits.queue_timeout, QueueTimeout(retry_after=5)
            )
        session = self.pool.get(target)
        if session is not None:
            if session.inflight < session.capacity and target not in self._targeted:
                self.pool.take(session)
                return session
            return await self._wait(
                target, exclude, limits.queue_timeout, QueueTimeout(retry_after=5)
            )
        grace = self.config.agents.reconnect_grace
        return await self._wait(target, exclude, grace, ConversationAgentGone(retry_after=5))

    async def _wait(
        self, target: str | None, exclude: frozenset[str], patience: float, expired: Exception
    ) -> AgentSession:
        """Queue for a slot for ``patience`` seconds; raises ``expired`` if none came."""
        if self._queued >= self.config.requests.max_queue:
            log.warning("queue full: requests.max_queue=%d", self.config.requests.max_queue)
            raise QueueFull(retry_after=5)
        waiter = _Waiter(next(self._seq), target, exclude)
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
                free = self.pool.pick(waiter.exclude)
            else:
                free = self.pool.get(waiter.target)
                if free is not None and free.inflight >= free.capacity:
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
        best: _Waiter | None = None
        targeted = self._targeted.get(session.agent_id)
        if targeted:
            best = next(iter(targeted.values()))
        for looked, waiter in enumerate(self._any.values()):
            if looked >= _EXCLUSION_LOOKAHEAD or (best is not None and waiter.seq > best.seq):
                break
            if session.agent_id not in waiter.exclude:
                return waiter
        return best

    # -- shutdown ---------------------------------------------------------------------

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
