"""Agents: their sessions, the pool of live ones, and who may connect.

Import the modules themselves (``relayd.agents.session``, ``.pool``,
``.auth``, ``.upgrade``): this package re-exports nothing, so that importing
the sans-I/O upgrade parser loads neither Trio nor the session machinery.
"""
