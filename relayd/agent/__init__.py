"""``relayd agent``: the reference agent, an OpenAI-compatible backend brought online at a relay.

The relay's side of agents is :mod:`relayd.agents`; this package is the other
end, built on :class:`relayd.agentkit.V2Agent`. Modules:
:mod:`~relayd.agent.cli` (command line, exit codes),
:mod:`~relayd.agent.config` (the ``[agent]`` settings and where keys come from),
:mod:`~relayd.agent.service` (the root nursery: the relay link, signals,
systemd, reload and drain), :mod:`~relayd.agent.handler` (one request's
answer), :mod:`~relayd.agent.backend` (the OpenAI SDK, the echo, errors) and
:mod:`~relayd.agent.history` (conversation trees in SQLite).

Importing this package is cheap: the agent (and the openai SDK) is loaded by
:func:`main`.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Run ``relayd agent`` with ``argv`` (the arguments after ``agent``); the exit code."""
    from relayd.agent.cli import main as cli_main

    return cli_main(argv)
