"""Tests for relayd.systemd against real sockets, never a running systemd.

A bound AF_UNIX datagram socket plays the service manager: what it receives is exactly what
systemd would. Socket activation is exercised for real once, under systemd-socket-activate.
Time is virtual (pytest-trio's ``autojump_clock``): no test sleeps.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
import trio
from trio.testing import MockClock

from relayd.systemd import ListenFd, Notifier, listen_fds, watchdog_interval, watchdog_loop

PID = 4242


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A fake $NOTIFY_SOCKET: a bound datagram socket and its address as systemd writes it."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)  # a guard against hanging if nothing was sent; never reached on success
        yield sock, path


def recv_fields(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def drain(sock: socket.socket) -> list[list[str]]:
    """Every datagram waiting in ``sock``, without blocking."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode().split("\n"))
    except BlockingIOError:
        return messages


def test_notify_sends_fields_joined_by_newlines(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        notifier.ready("listening on 127.0.0.1:8080")
        assert recv_fields(sock) == ["READY=1", "STATUS=listening on 127.0.0.1:8080"]
        notifier.notify("STATUS=a", "ERRNO=5")
        assert recv_fields(sock) == ["STATUS=a", "ERRNO=5"]


def test_convenience_methods(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    with Notifier(path) as notifier:
        notifier.ready()
        assert recv_fields(sock) == ["READY=1"]
        notifier.stopping()
        assert recv_fields(sock) == ["STOPPING=1"]
        notifier.watchdog()
        assert recv_fields(sock) == ["WATCHDOG=1"]
        # A newline in the text would start a bogus assignment; it is folded into one line.
        notifier.status("draining\n3 agents left")
        assert recv_fields(sock) == ["STATUS=draining 3 agents left"]


def test_reloading_sends_monotonic_timestamp(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    with Notifier(path) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, stamp = recv_fields(sock)
    assert reloading == "RELOADING=1"
    key, _, usec = stamp.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after


def test_abstract_namespace_socket() -> None:
    name = f"relayd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        with Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}) as notifier:
            notifier.status("abstract")
        assert recv_fields(sock) == ["STATUS=abstract"]


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_without_notify_socket_is_a_no_op(environ: dict[str, str]) -> None:
    notifier = Notifier.from_environ(environ)
    assert not notifier.enabled
    notifier.ready("x")
    notifier.reloading()
    notifier.close()


def test_relative_path_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "relative/notify"})
    assert not notifier.enabled
    assert "not an absolute path" in caplog.text


def test_dead_systemd_is_logged_at_debug_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="relayd.systemd")
    refused = str(tmp_path / "refused")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
        gone.bind(refused)  # the file stays after close, with nobody reading it
    with Notifier(refused) as a, Notifier(str(tmp_path / "missing")) as b:
        a.ready()  # ECONNREFUSED: the path exists, nobody reads it
        b.ready()  # ENOENT
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(messages) == 2
    assert "Connection refused" in messages[0]
    assert "No such file" in messages[1]


def test_full_socket_buffer_does_not_block_or_raise(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="relayd.systemd")
    sock, path = receiver

    def blocked(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("sendto blocked")

    # Nobody reads: the receive queue (net.unix.max_dgram_qlen, 512 by default) fills up and a
    # blocking sendto would hang here forever; the alarm turns that into a failure.
    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(10)
    try:
        with Notifier(path) as notifier:
            for _ in range(5000):
                notifier.watchdog()
                if caplog.records:
                    break
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert caplog.records, "the queue never filled"
    assert "Resource temporarily unavailable" in caplog.records[0].getMessage()
    assert drain(sock)[0] == ["WATCHDOG=1"]


@pytest.mark.parametrize("field", ["READY", "STATUS=a\nREADY=1"])
def test_malformed_field_is_a_caller_bug(field: str) -> None:
    with pytest.raises(ValueError, match="malformed"):
        Notifier(None).notify(field)


def test_close_is_idempotent_and_later_sends_are_no_ops(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    notifier = Notifier(path)
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    notifier.ready()
    assert drain(sock) == []


def test_unset_environment_is_explicit(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with Notifier.from_environ() as kept:
        assert kept.enabled
    assert os.environ["NOTIFY_SOCKET"] == path
    with Notifier.from_environ(unset_environment=True) as notifier:
        assert notifier.enabled  # still usable by this process...
    assert "NOTIFY_SOCKET" not in os.environ  # ...but not inherited by its children


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID)}, 15.0),
        ({"WATCHDOG_USEC": "1"}, 0.0000005),
        ({}, None),
        ({"WATCHDOG_PID": str(PID)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "3_0"}, None),  # int() would accept it
        ({"WATCHDOG_USEC": " 30"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, PID) == expected


def test_watchdog_interval_warns_about_garbage(caplog: pytest.LogCaptureFixture) -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "lots"}, PID) is None
    assert "WATCHDOG_USEC='lots'" in caplog.text


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1"}, [ListenFd(3, "unknown")]),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"},
            [ListenFd(3, "web"), ListenFd(4, "admin")],
        ),
        # The names do not match the fds: the fds are still real, the names are not trusted.
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"},
            [ListenFd(3, "unknown"), ListenFd(4, "unknown")],
        ),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "0"}, []),
        ({"LISTEN_FDS": "1"}, []),  # no LISTEN_PID: not for us
        ({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, []),  # inherited from a parent
        ({"LISTEN_PID": "pid", "LISTEN_FDS": "1"}, []),
        ({"LISTEN_PID": str(PID)}, []),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"}, []),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "two"}, []),
        ({}, []),
    ],
)
def test_listen_fds_parsing(environ: dict[str, str], expected: list[ListenFd]) -> None:
    assert listen_fds(environ, PID, unset_environment=False) == expected


def test_listen_fds_garbage_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "x"}
    assert listen_fds(environ, PID, unset_environment=False) == []
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_listen_fd_bind_string() -> None:
    assert ListenFd(3, "web").bind == "fd://3"


def test_listen_fds_unset_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert listen_fds(os.environ, os.getpid(), unset_environment=False) == [ListenFd(3, "web")]
    assert all(name in os.environ for name in env)
    assert listen_fds(os.environ, os.getpid(), unset_environment=True) == [ListenFd(3, "web")]
    assert not any(name in os.environ for name in env)


# The child: what relayd's daemon will do with inherited sockets, reported as JSON.
CHILD = """
import json, os, socket
from hypercorn.config import Config
from relayd.systemd import listen_fds

fds = listen_fds(os.environ, os.getpid(), unset_environment=True)
config = Config()
config.bind = [fd.bind for fd in fds]
sockets = config.create_sockets()  # proves Hypercorn accepts the fd:// strings
print(json.dumps({
    "fds": [[fd.fd, fd.name, fd.bind] for fd in fds],
    "addresses": [s.getsockname() for s in sockets.insecure_sockets],
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}))
"""


def test_listen_fds_under_real_socket_activation(tmp_path: Path) -> None:
    web, admin = str(tmp_path / "web.sock"), str(tmp_path / "admin.sock")
    # systemd-socket-activate (252) cannot listen on port 0, so two unix sockets stand in for
    # TCP ones; it passes only HOME/PATH/TERM on, hence -E PYTHONPATH.
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            web,
            "-l",
            admin,
            "--fdname=web:admin",
            "-E",
            f"PYTHONPATH={Path(__file__).resolve().parents[1]}",
            sys.executable,
            "-c",
            CHILD,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        # It execs the child on the first connection; wait until both sockets are listening.
        seen = [proc.stderr.readline() for _ in range(2)]
        assert seen == [f"Listening on {web} as 3.\n", f"Listening on {admin} as 4.\n"]
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(web)
            out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert json.loads(out) == {
        "fds": [[3, "web", "fd://3"], [4, "admin", "fd://4"]],
        "addresses": [web, admin],
        "env_left": [],
    }


class RecordingNotifier(Notifier):
    """A real notifier that also records the (virtual) time of each watchdog ping."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.pings: list[float] = []

    def watchdog(self) -> None:
        self.pings.append(trio.current_time())
        super().watchdog()


async def test_watchdog_loop_pings_every_interval(
    receiver: tuple[socket.socket, str], autojump_clock: MockClock
) -> None:
    sock, path = receiver
    with RecordingNotifier(path) as notifier:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog_loop, notifier, 10.0)
            await trio.sleep(35)
            nursery.cancel_scope.cancel()
    assert [t - start for t in notifier.pings] == [0.0, 10.0, 20.0, 30.0]
    assert drain(sock) == [["WATCHDOG=1"]] * 4
