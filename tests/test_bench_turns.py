"""The bench's turn-taking and CPU placement: windows in the recorder, CPU totals,
batches of units, pinning, and stopping a unit's helper processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from relayd.bench import load as load_module
from relayd.bench import main
from relayd.bench.load import CpuSnapshot, CpuTotals, _caught_up, _signal
from relayd.bench.model import ScenarioResult
from relayd.bench.procs import CpuPlan
from relayd.bench.scenarios import TOGETHER, batches, units_for
from relayd.bench.stats import LoadRecorder

# -- windows and totals ----------------------------------------------------------------


def test_recorder_windows_add_up_and_the_gaps_between_them_do_not_count() -> None:
    recorder = LoadRecorder()
    recorder.request_sent(10.0)
    recorder.request_done(11.5, 200, 1.5)
    recorder.end_window()
    assert recorder.elapsed == 1.5
    recorder.end_window()  # a window in which nothing was sent adds nothing
    assert recorder.elapsed == 1.5
    recorder.request_sent(20.0)  # 8.5 s later: another unit's turn in between
    recorder.request_done(21.0, 200, 1.0)
    recorder.request_done(21.0, 503, 1.0)
    assert recorder.elapsed == 2.5
    assert recorder.requests_per_second() == 2 / 2.5
    recorder.end_window()
    assert recorder.elapsed == 2.5


def snapshot(
    server: float | None, wait: float | None, bench: float, machine: float | None, at: float
) -> CpuSnapshot:
    return CpuSnapshot(server, wait, bench, machine, at)


def test_cpu_totals_sum_windows_and_say_when_the_machine_was_busy() -> None:
    totals = CpuTotals()
    totals.add(snapshot(1.0, 0.0, 5.0, 10.0, 100.0), snapshot(2.8, 0.01, 5.5, 12.5, 102.0))
    totals.add(snapshot(4.0, 0.02, 7.0, 20.0, 110.0), snapshot(5.9, 0.03, 7.6, 22.6, 112.0))
    result = ScenarioResult("relay-32")
    totals.fill(result)
    assert result.server_cpu_s == pytest.approx(3.7)
    assert result.server_cpu_wait_s == pytest.approx(0.02)
    assert result.bench_cpu_s == pytest.approx(1.1)
    assert result.other_cpu_s == pytest.approx(5.1 - 1.1 - 3.7)
    assert totals.elapsed == pytest.approx(4.0)
    assert result.notes == []

    busy = CpuTotals()
    busy.add(snapshot(0.0, 0.0, 0.0, 0.0, 0.0), snapshot(1.0, 0.5, 0.5, 4.0, 2.0))
    noted = ScenarioResult("relay-32")
    busy.fill(noted)
    assert len(noted.notes) == 1
    assert "other processes used 2.5 CPU s in 2.0s" in noted.notes[0]
    assert "the server waited 0.5 s for a CPU" in noted.notes[0]


def test_cpu_totals_without_a_server_have_no_server_figures() -> None:
    totals = CpuTotals()
    totals.add(snapshot(None, None, 1.0, None, 0.0), snapshot(None, None, 2.0, None, 1.0))
    result = ScenarioResult("relay-32", server="external")
    totals.fill(result)
    assert (result.server_cpu_s, result.server_cpu_wait_s, result.other_cpu_s) == (None, None, None)
    assert result.bench_cpu_s == 1.0


# -- batches ---------------------------------------------------------------------------


def test_units_of_a_group_run_together_and_others_alone() -> None:
    every = units_for(["all"])
    assert batches(every, in_turns=True) == [
        ["baseline-1", "relay-1"],
        ["baseline-32", "relay-32", "v1-chat-32", "relay-32-tls", "wide-dispatch"],
        ["bare-stream-32", "stream-32", "v1-stream-32"],
        ["pool-1000"],
        ["idle-10000"],
    ]
    assert batches(every, in_turns=False) == [[unit] for unit in every]
    assert batches(units_for(["relay-32"]), in_turns=True) == [["baseline-32", "relay-32"]]
    assert batches(["pool-1000"], in_turns=True) == [["pool-1000"]]
    # Every unit runs exactly once, whatever is asked for.
    for names in (["relay-1", "idle-10000"], ["wide-dispatch"], ["baseline-1", "relay-32"]):
        units = units_for(names)
        ran = [unit for batch in batches(units, in_turns=True) for unit in batch]
        assert sorted(ran) == sorted(units)
    # The busiest unit of a group starts last, while the others sit idle.
    assert all(group[-1].startswith(("relay", "wide", "stream", "v1-stream")) for group in TOGETHER)


# -- CPU placement ---------------------------------------------------------------------


def test_pinning_splits_the_cpus_and_gives_them_back() -> None:
    available = os.sched_getaffinity(0)
    with CpuPlan.pinned(True) as plan:
        if len(available) >= 2:
            assert plan.servers == frozenset({max(available)})
            assert plan.bench == frozenset(available) - plan.servers
            assert os.sched_getaffinity(0) == set(plan.bench)
        else:
            assert plan == CpuPlan()
    assert os.sched_getaffinity(0) == available
    with CpuPlan.pinned(False) as plan:
        assert plan == CpuPlan()
        assert os.sched_getaffinity(0) == available


def test_pinning_on_one_cpu_pins_nothing() -> None:
    available = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(available)})
    try:
        with CpuPlan.pinned(True) as plan:
            assert plan == CpuPlan()
    finally:
        os.sched_setaffinity(0, available)


def test_a_server_is_placed_on_the_servers_cpu() -> None:
    available = os.sched_getaffinity(0)
    child = subprocess.Popen(SLEEPER)
    try:
        plan = CpuPlan(frozenset({min(available)}), frozenset(available))
        plan.place_server(child.pid)
        assert os.sched_getaffinity(child.pid) == {min(available)}
    finally:
        child.kill()
        child.wait()
    CpuPlan(frozenset({0}), frozenset()).place_server(child.pid)  # gone: no error


# -- helpers stopped while other units load -------------------------------------------


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def wait_for_state(pid: int, wanted: Callable[[str], bool]) -> None:
    """Poll /proc (bounded) until ``pid``'s state is ``wanted``."""
    with trio.fail_after(10):
        while True:
            if wanted(state_of(pid)):
                return
            await trio.sleep(0.01)


SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]


async def test_helpers_are_stopped_and_resumed() -> None:
    child = await trio.lowlevel.open_process(SLEEPER)
    try:
        _signal([child.pid], load_module.signal.SIGSTOP)
        await wait_for_state(child.pid, lambda state: state == "T")
        _signal([child.pid], load_module.signal.SIGCONT)
        await wait_for_state(child.pid, lambda state: state != "T")
    finally:
        child.kill()
        await child.wait()
    _signal([child.pid], load_module.signal.SIGCONT)  # gone: no error


async def test_catching_up_waits_for_a_busy_helper_and_not_for_an_idle_one(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """``_caught_up`` in virtual time, with a stand-in for the CPU meter: how much CPU a
    real busy child gets depends on how busy the machine is (under load it can stay
    under CAUGHT_UP, and looks caught up), so real processes cannot show this reliably.
    """
    monkeypatch.setattr(load_module, "CATCH_UP_LIMIT", 1.0)
    step, share = load_module.CATCH_UP_STEP, load_module.CAUGHT_UP
    start = 0.0  # when the call being measured began
    # CPU seconds used by each pretend pid, as a function of (virtual) time.
    meters = {
        1: lambda now: 7.0,  # idle
        2: lambda now: 0.9 * now,  # busy all along
        3: lambda now: 0.9 * min(now, start + 0.45) + 0.5 * share * now,  # quiet from 0.45 s
        4: lambda now: 0.5 * share * now,  # a trickle, under the threshold
    }
    monkeypatch.setattr(
        load_module,
        "cpu_seconds_of",
        lambda pids: sum(meters[pid](trio.current_time()) for pid in pids),
    )

    async def took(pids: list[int]) -> float:
        nonlocal start
        start = trio.current_time()
        await _caught_up(pids)
        return trio.current_time() - start

    assert await took([1]) == pytest.approx(step)  # idle at once: one step
    assert await took([4]) == pytest.approx(step)
    assert await took([2]) == pytest.approx(1.0)  # never caught up: the limit ends it
    assert await took([1, 2]) == pytest.approx(1.0)  # all of them together must be quiet
    assert await took([3]) == pytest.approx(0.5 + step)  # the first quiet step after 0.45 s


async def test_catching_up_reads_real_processes() -> None:
    """The same with the real meter: a child that sleeps is caught up at the first step,
    and one that is gone counts as idle. (Generous bounds: a busy machine may run this
    process late, but nowhere near CATCH_UP_LIMIT.)"""
    idle = await trio.lowlevel.open_process(SLEEPER)
    try:
        started = time.monotonic()
        await _caught_up([idle.pid])
        assert time.monotonic() - started < load_module.CATCH_UP_LIMIT / 2
    finally:
        idle.kill()
        await idle.wait()
    started = time.monotonic()
    await _caught_up([idle.pid])
    assert time.monotonic() - started < load_module.CATCH_UP_LIMIT / 2


# -- end to end ------------------------------------------------------------------------


@pytest.mark.slow
def test_units_of_a_group_take_turns_or_run_one_at_a_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--scenario", "relay-32", "--scale", "0.02", "--duration", "4", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    scenarios = report["scenarios"]
    for name, other in (("baseline-32", "relay-32"), ("relay-32", "baseline-32")):
        result = scenarios[name]
        assert any(f"turns with {other}" in note for note in result["notes"]), name
        # Two windows of 2 s each: the time between them is not counted.
        assert 3.0 < result["duration_s"] < 5.0, name
        assert result["requests_ok"] > 0 and result["error_count"] == 0, name
    assert scenarios["relay-32"]["ratio"] is not None
    if len(os.sched_getaffinity(0)) >= 2:
        assert report["environment"]["server_cpus"] and report["environment"]["bench_cpus"]

    assert main([*argv, "--one-at-a-time", "--no-pin"]) == 0
    report = json.loads(capsys.readouterr().out)
    for result in report["scenarios"].values():
        assert not any("turns" in note for note in result["notes"])
        assert 3.0 < result["duration_s"] < 5.0
    assert report["environment"]["server_cpus"] == []
