"""Liveness for every agent, from one task.

Each admitted session is pinged every ``agents.heartbeat_interval`` and
dropped once it has been silent (no frame of any kind) for
``agents.heartbeat_timeout``. One task does this for the whole relay, from a
schedule ordered by when each session next needs attention.

Why not a timer per session: an idle agent's task waits on its socket, and
the only way to make it send a ping at a given time is to cancel that wait
(a deadline), which costs an exception and a new cancel scope on every
agent at every interval. With thousands of agents that was most of the
relay's idle CPU. Here a session's task wakes only when its agent sends
something; the ping is written from this task, straight to the socket when
it takes the frame at once (the usual case), else by a short-lived task in
this task's nursery, so that one agent that stopped reading holds up no one.

Its owner (the daemon) runs :meth:`Heartbeat.run`; the dispatcher, which
admits sessions, hands each one to :meth:`Heartbeat.watch` and passes on a
reload's settings (:meth:`Heartbeat.configure`). A session whose entry comes
up is checked against the current settings, so a reload's new interval or
timeout applies from each session's next turn.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math

import trio

from relayd.agents.session import AgentSession
from relayd.config import AgentsConfig
from relayd.protocol import CloseCode

__all__ = ["Heartbeat"]

log = logging.getLogger("relayd.agents")


class Heartbeat:
    """Pings admitted sessions and drops silent ones; :meth:`run` is its task."""

    def __init__(self, settings: AgentsConfig) -> None:
        self._settings = settings
        # (when to look at the session next, tie-breaker, session)
        self._schedule: list[tuple[float, int, AgentSession]] = []
        self._order = itertools.count()
        self._sleep: trio.CancelScope | None = None

    def configure(self, settings: AgentsConfig) -> None:
        """A reload's ``[agents]`` settings: each session's next turn uses them."""
        self._settings = settings

    def watch(self, session: AgentSession) -> None:
        """Start the heartbeat of a session that has just been admitted."""
        settings = self._settings
        session.next_ping_at = session.heard_at + settings.heartbeat_interval
        due = self._push(session, settings)
        if self._sleep is not None and due < self._sleep.deadline:
            self._sleep.deadline = due

    async def run(self) -> None:
        """Run until cancelled."""
        try:
            async with trio.open_nursery() as slow_sends:
                while True:
                    with trio.CancelScope(deadline=self._beat(slow_sends)) as self._sleep:
                        await trio.sleep_forever()
        finally:
            self._sleep = None

    def _beat(self, slow_sends: trio.Nursery) -> float:
        """Attend to every session that is due; when the next one is.

        Pings due within the next :func:`batch_window` are sent now, a little
        early: sessions pinged together stay together, so the pings go out in
        a few batches per interval and their pongs come back in bursts, which
        the event loop handles many to a wake-up. A silent session is dropped
        exactly on time.
        """
        settings = self._settings
        now = trio.current_time()
        horizon = now + batch_window(settings.heartbeat_interval)
        schedule = self._schedule
        later: list[AgentSession] = []
        while schedule and schedule[0][0] <= horizon:
            session = heapq.heappop(schedule)[2]
            if not session.is_open:
                continue  # gone; forget it
            silent_until = session.heard_at + settings.heartbeat_timeout
            if now >= silent_until:
                log.warning(
                    "agent silent for %.1fs, dropping it: %s", settings.heartbeat_timeout, session
                )
                session.request_close(CloseCode.GOING_AWAY, "heartbeat timeout")
                continue
            if session.next_ping_at <= horizon:
                session.ping(slow_sends)
                session.next_ping_at = now + settings.heartbeat_interval
                self._push(session, settings)
            else:
                later.append(session)  # only its silence is due, and not yet
        for session in later:
            self._push(session, settings)
        return schedule[0][0] if schedule else math.inf

    def _push(self, session: AgentSession, settings: AgentsConfig) -> float:
        """Schedule ``session`` for its next ping or the end of its allowed silence."""
        due = min(session.next_ping_at, session.heard_at + settings.heartbeat_timeout)
        heapq.heappush(self._schedule, (due, next(self._order), session))
        return due


def batch_window(interval: float) -> float:
    """How early a ping may go, to join a batch: a tenth of the interval, at most 1 s."""
    return min(1.0, interval / 10)
