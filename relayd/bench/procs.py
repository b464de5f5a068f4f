"""Processes the bench starts and measures: relayd and the baseline server.

A server is started as systemd starts relayd, and as the tests do: on a
:class:`~relayd.bench.launch.Handover` (its socket as ``fd://N``, READY=1 on
``NOTIFY_SOCKET``). Every wait is bounded.

CPU and memory figures come from ``/proc/<pid>/stat`` (utime + stime) and
``/proc/<pid>/status`` (VmRSS, VmHWM); they exist only on Linux, and only for
a process the bench started.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from relayd.bench.launch import Handover, read_log_tail, says

__all__ = [
    "UNPINNED",
    "CpuPlan",
    "Memory",
    "OpenFilesLimit",
    "ServerProcess",
    "ServerStartError",
    "raise_open_files_limit",
    "read_cpu_seconds",
    "read_cpu_wait_seconds",
    "read_memory",
    "read_system_busy_seconds",
    "start_server",
]

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ServerStartError(Exception):
    """A server did not come up; the message carries the end of its log."""


@dataclass(frozen=True)
class Memory:
    rss: int  # bytes resident now (VmRSS)
    peak: int  # bytes resident at most so far (VmHWM)


@dataclass(frozen=True)
class OpenFilesLimit:
    before: int  # the soft limit we started with
    soft: int  # the soft limit now (children inherit it)
    hard: int

    @property
    def raised(self) -> bool:
        return self.soft > self.before


def raise_open_files_limit() -> OpenFilesLimit:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit, as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    return OpenFilesLimit(before=soft, soft=max(soft, target), hard=hard)


def read_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far; None if it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    fields = text.rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def read_cpu_wait_seconds(pid: int) -> float | None:
    """Seconds ``pid`` (its main thread) was runnable but waiting for a CPU, from
    ``/proc/<pid>/schedstat``: how much other processes got in its way."""
    try:
        fields = Path(f"/proc/{pid}/schedstat").read_text().split()
    except OSError:
        return None
    return int(fields[1]) / 1e9 if len(fields) >= 2 else None


def read_system_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all CPUs, all processes)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    ticks = [int(value) for value in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS


def read_memory(pid: int) -> Memory | None:
    """Resident and peak resident memory of ``pid``; None if it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024  # reported in kB (KiB)
    if len(values) != 2:
        return None
    return Memory(rss=values["VmRSS"], peak=values["VmHWM"])


@dataclass
class ServerProcess:
    """A child server listening on ``127.0.0.1:port``. :meth:`stop` ends it."""

    name: str
    process: trio.Process
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float | None:
        return read_cpu_seconds(self.pid)

    def memory(self) -> Memory | None:
        return read_memory(self.pid)

    def cpu_wait_seconds(self) -> float | None:
        return read_cpu_wait_seconds(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        return read_log_tail(self.log_path, lines)

    async def stop(self, grace: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                return await self.process.wait()
            self.process.kill()
        return await self.process.wait()


@dataclass(frozen=True)
class CpuPlan:
    """Which CPUs the servers run on, and which the bench (clients, agents) runs on.

    The servers share one CPU and the bench keeps the others: on a shared
    machine whose CPUs change speed under neighbours' load independently, two
    servers on two different CPUs would be compared on two different machines.
    Empty sets: no pinning (one CPU, ``--no-pin``, or affinity not allowed).
    """

    servers: frozenset[int] = frozenset()
    bench: frozenset[int] = frozenset()

    @classmethod
    @contextlib.contextmanager
    def pinned(cls, pin: bool) -> Iterator[CpuPlan]:
        """Servers on the highest-numbered CPU this process may use, the bench on the
        rest: this process is moved there (its children inherit it) until the end."""
        available = os.sched_getaffinity(0) if pin and hasattr(os, "sched_setaffinity") else set()
        plan = cls()
        if len(available) >= 2:
            servers = frozenset({max(available)})
            bench = frozenset(available - servers)
            with contextlib.suppress(OSError):  # not allowed here: no pinning
                os.sched_setaffinity(0, bench)
                plan = cls(servers, bench)
        try:
            yield plan
        finally:
            if plan.servers:
                os.sched_setaffinity(0, available)

    def place_server(self, pid: int) -> None:
        if self.servers:
            with contextlib.suppress(OSError):  # it exited already: its start reports that
                os.sched_setaffinity(pid, self.servers)


UNPINNED = CpuPlan()


async def start_server(
    name: str,
    arguments: Sequence[str],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    ready_within: float = START_TIMEOUT,
    cpus: CpuPlan = UNPINNED,
) -> ServerProcess:
    """Run ``python -m <arguments>`` on a :class:`~relayd.bench.launch.Handover` and
    wait for its READY=1.

    ``{fd}`` in ``arguments`` is replaced by the listening socket's number.
    Raises ServerStartError if the child exits or is not ready within ``ready_within``
    seconds.
    """
    handover = Handover.open(workdir, name)
    notify = trio.socket.from_stdlib_socket(handover.notify)
    try:
        descriptor = str(handover.listener.fileno())
        command = [sys.executable, "-m"]
        command += [argument.replace("{fd}", descriptor) for argument in arguments]
        log_path = workdir / f"{name}.log"
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=handover.environment(env),
                pass_fds=handover.pass_fds,
            )
        handover.started()
        cpus.place_server(process.pid)
        server = ServerProcess(name, process, handover.port, log_path)
        ready = False
        with trio.move_on_after(ready_within):
            ready = await _wait_ready(notify, process)
        if not ready:
            if process.returncode is None:
                process.kill()
            status = await process.wait()
            raise ServerStartError(
                f"{name} was not ready within {ready_within:g}s (exit status {status}); "
                f"its log ends:\n{server.log_tail()}"
            )
        return server
    finally:
        notify.close()
        handover.close()


async def _wait_ready(notify: trio.socket.SocketType, process: trio.Process) -> bool:
    """True once the child sends READY=1; False if it exits first."""
    ready = False
    async with trio.open_nursery() as nursery:

        async def watch_exit() -> None:
            await process.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_exit)
        while not ready:
            ready = says((await notify.recv(65536)).decode(errors="replace"), "READY=1")
        nursery.cancel_scope.cancel()
    return ready
