"""Agents: their sessions, the pool of live ones, and who may connect."""

from relayd.agents.auth import AgentKeys, AgentRefusal
from relayd.agents.pool import AgentPool, PoolStatistics
from relayd.agents.session import (
    AdmissionRefused,
    AgentSession,
    Call,
    SessionHost,
    SessionLost,
    Transport,
)

__all__ = [
    "AdmissionRefused",
    "AgentKeys",
    "AgentPool",
    "AgentRefusal",
    "AgentSession",
    "Call",
    "PoolStatistics",
    "SessionHost",
    "SessionLost",
    "Transport",
]
