"""LeanLock: mutual exclusion, progress, and cancellation while waiting."""

from __future__ import annotations

import random

import trio
import trio.testing

from relayd.sync import LeanLock


async def test_one_holder_at_a_time_and_everyone_gets_a_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lock = LeanLock()
    holders = 0
    most = 0
    turns: list[int] = []

    async def worker(n: int) -> None:
        nonlocal holders, most
        for _ in range(5):
            async with lock:
                holders += 1
                most = max(most, holders)
                await trio.sleep(0.01)
                holders -= 1
                turns.append(n)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(worker, n)
    assert most == 1
    assert sorted(turns) == sorted(list(range(20)) * 5)
    assert not lock.locked


async def test_a_waiter_cancelled_when_woken_passes_the_wake_up_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Random cancellations of waiters never strand the others (no lost wake-up)."""
    lock = LeanLock()
    rng = random.Random(7)
    done = 0

    async def worker() -> None:
        nonlocal done
        with trio.move_on_after(rng.choice([0.005, 0.01, 0.02, 1.0])):
            async with lock:
                await trio.sleep(0.01)
        done += 1

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(worker)
    assert done == 200
    assert not lock.locked
    # The lock still works after all that.
    with trio.fail_after(1):
        async with lock:
            assert lock.locked


async def test_uncontended_use_makes_no_parking_lot() -> None:
    lock = LeanLock()
    for _ in range(3):
        async with lock:
            pass
    assert lock._lot is None
