"""The daemon's reloadable state: immutable snapshots swapped in one step.

``RelayState`` holds the current :class:`~relayd.config.Config`, the user
table, the admin key and the accepted agent keys. Each field is an immutable
snapshot; a reload builds all the new snapshots first and then assigns them,
so a request sees either the old state or the new one, and a failed reload
leaves everything as it was. It also carries the services the routes share
(the dispatcher, the throttle, the idempotency store); the dispatcher is
built by the daemon (:func:`relayd.daemon.assemble`), which runs its
heartbeat, and handed in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from relayd.agents.auth import AgentKeys
from relayd.config import Config, read_keys_file
from relayd.dispatch import Dispatcher
from relayd.idempotency import IdempotencyStore
from relayd.locate import AdminKey
from relayd.proxies import TrustedProxies
from relayd.throttle import FailureThrottle
from relayd.users import UserStore, UserTable

__all__ = ["RelayState", "Snapshot", "load_agent_keys"]

log = logging.getLogger("relayd")


def load_agent_keys(config: Config) -> AgentKeys:
    """``agents.keys`` plus ``agents.keys_file``. Raises ConfigError for an unreadable file."""
    keys = config.agents.keys
    if config.agents.keys_file is not None:
        keys = keys + read_keys_file(config.agents.keys_file)
    return AgentKeys.of(keys, allow_loopback_without_key=config.agents.allow_loopback_without_key)


def throttle_settings(config: Config) -> dict[str, Any]:
    """The ``[auth]`` settings of the failed-authentication throttle."""
    auth = config.auth
    return {
        "burst": auth.failure_burst,
        "interval": auth.failure_interval,
        "prefix_burst": auth.prefix_failure_burst,
        "ipv4_prefix": auth.ipv4_prefix,
        "ipv6_prefix": auth.ipv6_prefix,
    }


@dataclass(frozen=True)
class Snapshot:
    """Everything a reload replaces, built before it is swapped in."""

    config: Config
    users: UserTable
    agent_keys: AgentKeys


@dataclass
class RelayState:
    """Shared by the API, the agent endpoint and the daemon. Not a global: passed in."""

    config: Config
    users: UserTable
    admin: AdminKey
    store: UserStore
    state_dir: Path
    dispatcher: Dispatcher
    config_path: Path | None = None
    store_lock: trio.Lock = field(default_factory=trio.Lock)
    reload_hooks: list[Callable[[Config], None]] = field(default_factory=list)

    throttle: FailureThrottle = field(init=False)
    proxies: TrustedProxies = field(init=False)  # server.trusted_proxies
    idempotency: IdempotencyStore = field(init=False)  # Idempotency-Key answers

    def __post_init__(self) -> None:
        self.throttle = FailureThrottle(**throttle_settings(self.config))
        self.proxies = TrustedProxies(self.config.server.trusted_proxies)
        requests = self.config.requests
        self.idempotency = IdempotencyStore(
            ttl=requests.idempotency_ttl, limit=requests.idempotency_max
        )

    @property
    def agent_keys(self) -> AgentKeys:
        """The accepted agent keys: the dispatcher's, which admits agents with them."""
        return self.dispatcher.agent_keys

    def apply(self, snapshot: Snapshot) -> None:
        """Swap in a reloaded snapshot (the dispatcher disconnects agents whose key is gone)."""
        self.config, self.users = snapshot.config, snapshot.users
        self.dispatcher.apply(snapshot.config, snapshot.agent_keys)
        self.throttle.configure(**throttle_settings(snapshot.config))
        self.proxies = TrustedProxies(snapshot.config.server.trusted_proxies)
        self.idempotency.configure(
            ttl=snapshot.config.requests.idempotency_ttl,
            limit=snapshot.config.requests.idempotency_max,
        )
        for hook in self.reload_hooks:
            hook(snapshot.config)

    def set_users(self, users: UserTable) -> None:
        self.users = users
