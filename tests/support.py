"""Running a real relayd for tests: a subprocess on a loopback socket.

It is started as the bench starts its servers, on a
:class:`relayd.bench.launch.Handover`: the test binds the listening socket
itself (127.0.0.1, port 0) and hands it to relayd as ``--listen fd://N``, so
there is no race for a free port; relayd says it is ready through a real
``NOTIFY_SOCKET`` datagram socket, exactly as it tells systemd, so no test
polls for readiness.

Every wait here is bounded: a relayd that does not come up within
``START_TIMEOUT`` fails the test with its log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relayd.bench.launch import Handover, says, service_environment

__all__ = [
    "ADMIN_KEY",
    "Relayd",
    "console_script",
    "relayd_command",
    "run_relayd",
    "service_environment",
    "start_relayd",
    "stop_all",
]

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
ADMIN_KEY = "test-admin-key-0123456789"


@dataclass
class Relayd:
    """A running relayd subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    log_path: Path
    notify: socket.socket
    admin_key: str = ADMIN_KEY
    notifications: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def agent_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/client/register"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_notification(self, prefix: str, timeout: float = START_TIMEOUT) -> str:
        """The next datagram containing a line that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {prefix!r} notification within {timeout}s; got {self.notifications}\n"
                    f"relayd log:\n{self.log}"
                )
            self.notify.settimeout(remaining)
            try:
                message = self.notify.recv(65536).decode()
            except TimeoutError:
                continue
            self.notifications.append(message)
            if says(message, prefix):
                return message

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"relayd did not stop within {timeout}s:\n{self.log}"
                ) from None
        return self.process.returncode


def relayd_command() -> list[str]:
    return [sys.executable, "-m", "relayd"]


def console_script() -> str:
    """The ``relayd`` console script installed with the interpreter running the tests (the
    venv's ``bin/``, wherever that venv is), else the first one on ``PATH``."""
    sibling = Path(sys.executable).parent / "relayd"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which("relayd")
    assert found is not None, (
        f"no relayd console script beside {sys.executable} or on PATH: "
        "install the project into this environment first (pip install -e '.[test]')"
    )
    return found


def start_relayd(
    tmp_path: Path,
    *,
    config: str | None = None,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    admin_key: str | None = ADMIN_KEY,
    wait_ready: bool = True,
    log_path: Path | None = None,
    listener: socket.socket | None = None,
) -> Relayd:
    """Start ``relayd serve`` on a fresh loopback socket; wait for READY=1 (unless not
    ``wait_ready``). Its stdout and stderr are appended to ``log_path`` (a fresh file by
    default); ``env`` is added to a clean environment."""
    state_dir = tmp_path / "state"
    if log_path is None:
        log_path = tmp_path / f"relayd-{time.monotonic_ns()}.log"
    handover = Handover.open(tmp_path, "relayd", listener=listener)
    command = [*relayd_command(), "serve", "--listen", handover.listen_url]
    command += ["--state-dir", str(state_dir)]
    if config is not None:
        config_path = tmp_path / f"relayd-{time.monotonic_ns()}.toml"
        config_path.write_text(config)
        command += ["--config", str(config_path)]
    command += list(args)
    environment = handover.environment()
    if config is not None:
        environment["RELAYD_CONFIG"] = ""
    if admin_key is not None:
        environment["RELAYD_ADMIN_KEY"] = admin_key
    environment.update(env or {})
    return run_relayd(
        command, handover, state_dir, log_path, environment, admin_key or "", wait_ready=wait_ready
    )


def run_relayd(
    command: Sequence[str],
    handover: Handover,
    state_dir: Path,
    log_path: Path,
    environment: dict[str, str],
    admin_key: str = ADMIN_KEY,
    *,
    wait_ready: bool = True,
) -> Relayd:
    """Run ``command`` (a relayd, however started) on ``handover``; its output is
    appended to ``log_path``; wait for READY=1 unless not ``wait_ready``."""
    try:
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=environment,
                pass_fds=handover.pass_fds,
            )
    except BaseException:
        handover.close()
        raise
    handover.started()  # a caller's listener stays open, as systemd keeps it
    relayd = Relayd(process, handover.port, state_dir, log_path, handover.notify, admin_key)
    if wait_ready:
        try:
            relayd.wait_notification("READY=1")
        except AssertionError:
            process.kill()
            process.wait()
            raise
    return relayd


def stop_all(started: list[Relayd]) -> None:
    """Fixture teardown: kill whatever a test left running."""
    for relayd in started:
        if relayd.process.poll() is None:
            relayd.process.kill()
            relayd.process.wait()
        relayd.notify.close()
