"""``relayd bench``: relayd's load benchmark.

Modules: :mod:`~relayd.bench.run` (command line), :mod:`~relayd.bench.scenarios`
(what each scenario does), :mod:`~relayd.bench.fleet` (simulated agents),
:mod:`~relayd.bench.httpclient` (the load generator's HTTP/1.1 client),
:mod:`~relayd.bench.procs` (the servers it starts, /proc figures),
:mod:`~relayd.bench.stats` (percentiles and ratios), :mod:`~relayd.bench.report`
(table, JSON, targets) and :mod:`~relayd.bench.baseline` (the bare ASGI server
the relay is compared with); for streamed answers (stream-32)
:mod:`~relayd.bench.stream` (lean v2 agents, the event-stream client, figures
per delta), :mod:`~relayd.bench.frames` (their WebSocket frames) and
:mod:`~relayd.bench.bareloop` (the bare forwarding loop it is compared with);
for relay-32-tls :mod:`~relayd.bench.tls` (its certificate, the clients' TLS).

Importing this package is cheap: the bench itself is loaded by :func:`main`.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Run ``relayd bench`` with ``argv`` (the arguments after ``bench``); the exit code."""
    from relayd.bench.run import main as run_main

    return run_main(argv)
