"""The servers a unit talks to: a relayd or baseline started for it, or ``--url``.

:meth:`Servers.relayd` starts relayd with embedded defaults plus a config file
that sets only what the scenario needs (``agents.max_inflight`` = the agents'
capacity, the heartbeat, ``requests.max_queue`` >= the number of clients,
``server.idle_timeout`` = :data:`KEEP_ALIVE`; ``agents.v1_model`` for
v1-chat-32, a certificate and key for relay-32-tls), a fresh temporary state
directory, an admin key in ``$RELAYD_ADMIN_KEY``, and a user created through
the admin API whose token the clients send. Both context managers stop their
server on exit, whatever happened.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import trio

from relayd.bench.httpclient import HttpClient, HttpError
from relayd.bench.model import Settings
from relayd.bench.procs import UNPINNED, CpuPlan, ServerProcess, start_server
from relayd.bench.tls import BenchCertificate, make_certificate

__all__ = [
    "KEEP_ALIVE",
    "Servers",
    "Target",
    "count_agents",
    "create_user",
    "external_target",
]

log = logging.getLogger("relayd.bench")

# Seconds an idle keep-alive connection stays open (relayd's server.idle_timeout;
# the baseline's keep_alive_timeout is the same). Units that take turns leave
# their clients idle during the others' windows: five units in a group, 2 s
# windows and wide-dispatch's catching up (up to 5 s) are over relayd's default
# of 10 s, and a reconnection in a window would be timed (a TLS handshake, for
# relay-32-tls). The value changes nothing while requests come.
KEEP_ALIVE = 120


@dataclass
class Target:
    """Where load and agents go: a relayd (or baseline) the bench started, or ``--url``."""

    host: str
    port: int
    authorization: str  # what clients send as Authorization
    admin_key: str | None  # for /api/connections; None: not known
    server: ServerProcess | None = None
    # TLS (relay-32-tls): the clients' and agents' context, and the certificate.
    ssl_context: ssl.SSLContext | None = None
    certificate: BenchCertificate | None = None

    @property
    def agent_url(self) -> str:
        scheme = "ws" if self.ssl_context is None else "wss"
        return f"{scheme}://{self.host}:{self.port}/client/register"

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
        self,
        name: str,
        *,
        clients: int,
        heartbeat: float | None = None,
        v1_model: str | None = None,
        tls: bool = False,
    ) -> AsyncIterator[Target]:
        """A relayd for one unit (or the ``--url`` one), stopped afterwards.

        ``v1_model``: its ``agents.v1_model``. ``tls``: it serves https and wss
        with a certificate made now (:func:`relayd.bench.tls.make_certificate`).
        """
        settings = self.settings
        if settings.url is not None:
            yield external_target(settings.url, settings.key)
            return
        heartbeat = heartbeat or settings.heartbeat
        workdir = self.workdir / name
        workdir.mkdir()
        certificate = None
        server_lines = ["[server]", f'idle_timeout = "{KEEP_ALIVE}s"']
        if tls:
            certificate = await trio.to_thread.run_sync(make_certificate, workdir / "tls")
            server_lines.append(f"tls_certificate = {json.dumps(str(certificate.certificate))}")
            server_lines.append(f"tls_key = {json.dumps(str(certificate.key))}")
        agent_lines = ["[agents]"]
        if v1_model is not None:
            agent_lines.append(f"v1_model = {json.dumps(v1_model)}")
        config = "\n".join(
            [
                *server_lines,
                *agent_lines,
                f"max_inflight = {settings.capacity}",
                f'heartbeat_interval = "{round(heartbeat * 1000)}ms"',
                f'heartbeat_timeout = "{round(heartbeat * 3000)}ms"',
                "[requests]",
                f"max_queue = {max(1000, clients)}",
                "",
            ]
        )
        config_path = workdir / "relayd.toml"
        config_path.write_text(config)
        context = None if certificate is None else certificate.client_context()
        admin_key = secrets.token_urlsafe(24)
        arguments = ["relayd", "serve", "--listen", "fd://{fd}"]
        arguments += ["--config", str(config_path), "--state-dir", str(workdir / "state")]
        server = await start_server(
            name, arguments, workdir, env={"RELAYD_ADMIN_KEY": admin_key}, cpus=self.cpus
        )
        try:
            token = await create_user(server.port, admin_key, context)
            yield Target("127.0.0.1", server.port, token, admin_key, server, context, certificate)
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


async def create_user(port: int, admin_key: str, context: ssl.SSLContext | None = None) -> str:
    """A user token from a fresh relayd (``POST /admin/users/add``; over TLS with ``context``)."""
    async with HttpClient("127.0.0.1", port, ssl_context=context) as client:
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
        async with HttpClient(target.host, target.port, ssl_context=target.ssl_context) as client:
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
