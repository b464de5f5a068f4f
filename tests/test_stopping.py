"""The forced end of an overrunning drain (relayd/stopping.py), on a MockClock."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from relayd import stopping

LOG = logging.getLogger("relayd.test-stopping")


class Exited(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@pytest.fixture(autouse=True)
def no_real_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    def exit_now(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(stopping, "exit_now", exit_now)


async def signals_at(*moments: tuple[float, int]) -> AsyncIterator[int]:
    """Each signal at its moment (seconds from now), then silence for ever."""
    start = trio.current_time()
    for at, signum in moments:
        await trio.sleep_until(start + at)
        yield signum
    await trio.sleep_forever()


async def test_a_drain_that_overruns_ends_the_process_at_the_deadline(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    start = trio.current_time()
    with pytest.raises(Exited) as exited:
        await stopping.hard_stop_after(12.0, signals_at(), LOG)
    assert exited.value.code == 1
    assert trio.current_time() - start == pytest.approx(12.0)
    assert "drain did not finish within 12s: exiting now" in caplog.text
    assert caplog.records[-1].name == LOG.name  # the daemon's own logger


async def test_a_second_sigterm_ends_the_process_at_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    start = trio.current_time()
    with pytest.raises(Exited):
        await stopping.hard_stop_after(60.0, signals_at((3.0, signal.SIGTERM)), LOG)
    assert trio.current_time() - start == pytest.approx(3.0)
    assert "second SIGTERM: exiting now" in caplog.text


async def test_sighup_during_a_drain_is_not_a_second_stop(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    start = trio.current_time()
    with pytest.raises(Exited):
        moments = ((1.0, signal.SIGHUP), (2.0, signal.SIGHUP), (5.0, signal.SIGINT))
        await stopping.hard_stop_after(60.0, signals_at(*moments), LOG)
    assert trio.current_time() - start == pytest.approx(5.0)
    assert "second SIGINT" in caplog.text


async def test_a_drain_that_finishes_cancels_the_timer_without_exiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stopping.hard_stop_after, 10.0, signals_at(), LOG)
        await trio.sleep(9.0)  # the drain's work
        nursery.cancel_scope.cancel()


async def test_signals_that_end_before_the_deadline_end_the_timer_quietly(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def two_reloads() -> AsyncIterator[int]:
        yield signal.SIGHUP
        yield signal.SIGHUP

    await stopping.hard_stop_after(10.0, two_reloads(), LOG)
    assert "exiting now" not in caplog.text
