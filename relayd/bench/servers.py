"""The servers a unit talks to: a relayd or baseline started for it, or ``--url``.

:meth:`Servers.relayd` starts relayd with embedded defaults plus a config file
that sets only what the scenario needs (``agents.max_inflight`` = the agents'
capacity, the heartbeat, ``requests.max_queue`` >= the number of clients), a
fresh temporary state directory, an admin key in ``$RELAYD_ADMIN_KEY``, and a
user created through the admin API whose token the clients send. Both context
managers stop their server on exit, whatever happened.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import trio

from relayd.bench.httpclient import HttpClient, HttpError
from relayd.bench.model import Settings
from relayd.bench.procs import UNPINNED, CpuPlan, ServerProcess, start_server

__all__ = ["Servers", "Target", "count_agents", "create_user", "external_target"]

log = logging.getLogger("relayd.bench")


@dataclass
class Target:
    """Where load and agents go: a relayd (or baseline) the bench started, or ``--url``."""

    host: str
    port: int
    authorization: str  # what clients send as Authorization
    admin_key: str | None  # for /api/connections; None: not known
    server: ServerProcess | None = None

    @property
    def agent_url(self) -> str:
        return f"ws://{self.host}:{self.port}/client/register"

    def client_headers(self) -> dict[str, str]:
        return {"Authorization": self.authorization, "Content-Type": "application/json"}


@dataclass
class Servers:
    """Starts the servers of a run, each in its own directory under ``workdir``."""

    settings: Settings
    workdir: Path
    cpus: CpuPlan = UNPINNED

    @asynccontextmanager
    async def relayd(
        self, name: str, *, clients: int, heartbeat: float | None = None
    ) -> AsyncIterator[Target]:
        """A relayd for one unit (or the ``--url`` one), stopped afterwards."""
        settings = self.settings
        if settings.url is not None:
            yield external_target(settings.url, settings.key)
            return
        heartbeat = heartbeat or settings.heartbeat
        config = "\n".join(
            [
                "[agents]",
                f"max_inflight = {settings.capacity}",
                f'heartbeat_interval = "{round(heartbeat * 1000)}ms"',
                f'heartbeat_timeout = "{round(heartbeat * 3000)}ms"',
                "[requests]",
                f"max_queue = {max(1000, clients)}",
                "",
            ]
        )
        workdir = self.workdir / name
        workdir.mkdir()
        config_path = workdir / "relayd.toml"
        config_path.write_text(config)
        admin_key = secrets.token_urlsafe(24)
        arguments = ["relayd", "serve", "--listen", "fd://{fd}"]
        arguments += ["--config", str(config_path), "--state-dir", str(workdir / "state")]
        server = await start_server(
            name, arguments, workdir, env={"RELAYD_ADMIN_KEY": admin_key}, cpus=self.cpus
        )
        try:
            token = await create_user(server.port, admin_key)
            yield Target("127.0.0.1", server.port, token, admin_key, server)
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()

    @asynccontextmanager
    async def baseline(self, name: str) -> AsyncIterator[Target]:
        workdir = self.workdir / name
        workdir.mkdir()
        arguments = ["relayd.bench.baseline", "--listen", "fd://{fd}"]
        arguments += ["--server", self.settings.baseline_server]
        server = await start_server(name, arguments, workdir, cpus=self.cpus)
        try:
            yield Target("127.0.0.1", server.port, "bench", None, server)
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()

    @asynccontextmanager
    async def bare_loop(self, name: str) -> AsyncIterator[Target]:
        """stream-32's ceiling, :mod:`relayd.bench.bareloop`: agents and clients alike."""
        workdir = self.workdir / name
        workdir.mkdir()
        arguments = ["relayd.bench.bareloop", "--listen", "fd://{fd}"]
        server = await start_server(name, arguments, workdir, cpus=self.cpus)
        try:
            yield Target("127.0.0.1", server.port, "bench", None, server)
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()


def external_target(url: str, key: str | None) -> Target:
    """The ``--url`` relay. Raises ValueError for a URL the bench cannot use."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url must be http://host[:port], got {url!r}")
    if not key:
        raise ValueError("--url needs --key (a user token or the admin key)")
    return Target(parts.hostname, parts.port or 80, key, key)


async def create_user(port: int, admin_key: str) -> str:
    """A user token from a fresh relayd (``POST /admin/users/add``)."""
    async with HttpClient("127.0.0.1", port) as client:
        response = await client.request(
            "POST",
            "/admin/users/add",
            json.dumps({"name": "bench"}).encode(),
            {"Authorization": f"Bearer {admin_key}"},
        )
    if response.status != 200:
        raise HttpError(f"cannot create a bench user: {response.status} {response.body[:200]!r}")
    token = json.loads(response.body)["token"]
    assert isinstance(token, str)
    return token


async def count_agents(target: Target) -> tuple[int | None, int | None]:
    """(connected, busy) agents from ``GET /api/connections``; None if not allowed."""
    if target.admin_key is None:
        return None, None
    try:
        async with HttpClient(target.host, target.port) as client:
            response = await client.request(
                "GET", "/api/connections", headers={"Authorization": f"Bearer {target.admin_key}"}
            )
    except (OSError, trio.BrokenResourceError, HttpError) as error:
        log.warning("cannot count agents: %s", error)
        return None, None
    if response.status != 200:
        return None, None
    listing = json.loads(response.body)["connections"]
    busy = sum(1 for agent in listing if agent["inflight"] >= agent["capacity"])
    return len(listing), busy
