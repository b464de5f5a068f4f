"""Shared fixtures. See tests/support.py for how a real relayd is run.

Testing policy (after trio-websocket's): unit tests run in virtual time
(``trio.testing.MockClock(autojump_threshold=0)``) and in-memory transports, so
they never sleep for real; end-to-end tests talk to a real relayd subprocess on
127.0.0.1 with real WebSocket agents and an HTTP client, every wait bounded by
``trio.fail_after``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio.testing

from tests.support import Relayd, start_relayd, stop_all


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio uses a fixture of this name as the run's clock."""
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def relayd_factory(tmp_path: Path) -> Iterator[Callable[..., Relayd]]:
    """``relayd_factory(config=..., args=..., env=...)`` starts a relayd and waits for READY."""
    started: list[Relayd] = []

    def factory(**kwargs: Any) -> Relayd:
        relayd = start_relayd(tmp_path, **kwargs)
        started.append(relayd)
        return relayd

    yield factory
    stop_all(started)


@pytest.fixture
def relayd(relayd_factory: Callable[..., Relayd]) -> Relayd:
    """A relayd on embedded defaults (admin key from $RELAYD_ADMIN_KEY)."""
    return relayd_factory()
