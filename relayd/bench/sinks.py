"""wide-dispatch's busy agents, in a child process of their own.

wide-dispatch measures relay-32's clients and agents beside 10,000 more
agents. Those agents do nothing but answer relayd's pings, 667 a second at the
default 15 s heartbeat, and relayd sends its pings in batches, so they arrive
hundreds at a time. In the bench's own event loop each batch queued in front of
the 32 clients and 8 answering agents being timed, and relayd sat idle for
4-6 % of the load waiting for the bench: the load generator, not the relay,
set part of the figure. In a process of their own they are the operating
system's to schedule, and the measuring loop holds only what relay-32's holds.
They run at the lowest priority (nice 19): on a machine whose CPUs are all
taken by relayd and the bench, their pongs would otherwise take CPU from the
clients and agents being timed (with the bench's cost per request now close to
relayd's, that alone cost wide-dispatch several percent). The bench's CPU is
not all taken, so they still answer every ping in the same window, and their
CPU still counts as the bench's.

They are the same agents as before (:func:`relayd.agentkit.run_agent`,
trio-websocket, the seed protocol), run by a :class:`~relayd.bench.fleet.Fleet`.
The parent needs one thing from them: to know when a request has reached one
(:meth:`relayd.bench.scenarios.Bench.occupy` waits for that). The child says so
on its stdout, one line per event:

* ``progress <done> <total>`` while connecting,
* ``failed <reason>`` for the first few agents that could not connect,
* ``ready <connected> <failed>`` once every handshake is done or has failed,
* ``reached <number>`` when bench request ``<number>`` reaches an agent.

The parent writes the spec (JSON: url, headers, count) as the first line of the
child's stdin, and closes stdin to stop it: the agents then disconnect and the
child exits. If the parent dies, stdin closes all the same.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from relayd.bench.fleet import Fleet, Tracker, bench_handler, content_for, number_of
from relayd.bench.launch import read_log_tail, service_environment
from relayd.bench.load import YOUNG_THRESHOLD

__all__ = ["BusyAgents", "SinkStartError", "busy_agents", "main"]

log = logging.getLogger("relayd.bench")

# How long the child may take to connect each batch of agents before the bench gives up.
START_TIMEOUT_PER_AGENT = 0.05
START_TIMEOUT_MIN = 60.0
STOP_TIMEOUT = 10.0
MAX_LINE = 64 * 1024
LOWEST_PRIORITY = 19  # nice value


class SinkStartError(Exception):
    """The busy agents' process exited or said something the bench cannot read."""


@dataclass
class BusyAgents:
    """The parent's view of the child: how many agents connected, and why others did not."""

    number: int
    pid: int = 0
    connected: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)


# -- the parent's side -----------------------------------------------------------------


@asynccontextmanager
async def busy_agents(
    url: str,
    headers: list[tuple[bytes, bytes]],
    number: int,
    tracker: Tracker,
    log_path: Path,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    command: Sequence[str] = (sys.executable, "-m", "relayd.bench.sinks"),
) -> AsyncIterator[BusyAgents]:
    """Run ``number`` never-answering agents connected to ``url`` in a child process.

    Yields once every handshake is done or has failed; requests reaching the
    agents are reported to ``tracker`` from then on (and before). On exit the
    agents disconnect and the child is waited for (killed if it lingers).
    ``command`` runs the child (tests replace it).
    """
    agents = BusyAgents(number)
    spec = {
        "url": url,
        "number": number,
        "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers],
    }
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=service_environment(),
        )
    assert process.stdin is not None and process.stdout is not None  # both are pipes
    agents.pid = process.pid
    # They share the bench's CPU with the clients and agents being timed, and
    # must not slow them: at the lowest priority they run when those wait.
    os.setpriority(os.PRIO_PROCESS, process.pid, LOWEST_PRIORITY)
    stdin, stdout = process.stdin, process.stdout

    problem: list[str] = []  # why the child cannot be used, once it is known
    settled = trio.Event()  # ready, or never will be

    def heard(line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "reached" and rest.isdigit():
            tracker.reached(content_for(int(rest)), trio.current_time())
        elif word == "progress":
            done, total = (int(part) for part in rest.split())
            if on_progress is not None:
                on_progress(done, total)
        elif word == "failed":
            agents.failures.append(rest)
        elif word == "ready":
            agents.connected, agents.failed = (int(part) for part in rest.split())
            settled.set()
        else:
            raise ValueError(line)

    async def listen() -> None:
        try:
            async for line in _lines(stdout):
                heard(line)
        except ValueError as error:
            problem.append(f"the busy agents' process said {str(error)[:200]!r}")
            process.kill()
        if not settled.is_set():
            status = await process.wait()
            problem.append(
                f"the busy agents' process exited with status {status} before its agents "
                f"were connected; its log ends:\n{read_log_tail(log_path)}"
            )
        settled.set()

    timeout = max(START_TIMEOUT_MIN, number * START_TIMEOUT_PER_AGENT)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            await stdin.send_all(json.dumps(spec).encode() + b"\n")
            with trio.move_on_after(timeout):
                await settled.wait()
            if not settled.is_set():
                problem.append(f"the busy agents were not connected within {timeout:g}s")
            if problem:
                nursery.cancel_scope.cancel()
            else:
                try:
                    yield agents
                finally:
                    await stdin.aclose()  # the child's signal to disconnect its agents
                    with trio.move_on_after(STOP_TIMEOUT) as waited:
                        await process.wait()
                    if waited.cancelled_caught:
                        log.warning("the busy agents' process lingered; killing it")
                    nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
    if problem:
        raise SinkStartError(problem[0])


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buffer = b""
    while chunk := await stream.receive_some():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        if len(buffer) > MAX_LINE:
            raise ValueError("a line without an end")
        for line in lines:
            yield line.decode(errors="replace")


# -- the child's side ------------------------------------------------------------------


class _ReachReporter(Tracker):
    """A tracker that tells the parent, rather than keeping, when a request arrived."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__()
        self._say = say

    def reached(self, content: str, now: float) -> None:
        number = number_of(content)
        if number is not None:
            self._say(f"reached {number}")


def _say(line: str) -> None:
    # A blocking write: lines are short and the parent reads them at once, and
    # the order of lines must hold, which one synchronous writer guarantees.
    os.write(sys.stdout.fileno(), line.replace("\n", " ").encode() + b"\n")


async def _serve(say: Callable[[str], None]) -> None:
    lines = _lines(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))
    first = await anext(lines, None)
    if first is None:
        return  # the parent went away before saying what to do
    spec = json.loads(first)
    number = int(spec["number"])
    fleet = Fleet(spec["url"], bench_handler(_ReachReporter(say), answer=False))
    fleet.headers = [
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in spec["headers"]
    ]

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            say(f"progress {done} {total}")

    async with trio.open_nursery() as nursery:
        await fleet.start(nursery, number, on_progress=progress)
        for reason in fleet.failures:
            say(f"failed {reason}")
        say(f"ready {len(fleet.stats)} {fleet.failed}")
        # What exists now lives until the end: keep collections short (see GcWatch).
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_THRESHOLD)
        async for _ in lines:  # nothing more comes: stdin's end is the signal to stop
            pass
        nursery.cancel_scope.cancel()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    trio.run(_serve, _say)


if __name__ == "__main__":
    main()
