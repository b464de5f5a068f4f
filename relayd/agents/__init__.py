"""Agents: their sessions, the pool of live ones, the heartbeat, and who may
connect. Nothing here speaks HTTP: an agent's WebSocket reaches its session
through :mod:`relayd.front`, as a transport.

Import the modules themselves (``relayd.agents.session``, ``.pool``,
``.heartbeat``, ``.auth``): this package re-exports nothing.
"""
