"""``relayd bench``: its arithmetic, its HTTP client, and a smoke run of every scenario.

The statistics are checked on known data (so the figures the bench prints can be
trusted); the HTTP client against a tiny Trio server that misbehaves on purpose
and against a real relayd; the scenarios end to end at a tiny scale. Nothing
here measures or asserts speed: the smoke runs check that every figure is
reported, not what it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from relayd.agentkit import AgentStats, echo_handler, run_agent
from relayd.bench import main, sinks
from relayd.bench.fleet import Tracker, content_for, number_of
from relayd.bench.httpclient import HttpClient, HttpError, parse_head
from relayd.bench.model import ScenarioResult, Settings
from relayd.bench.procs import (
    OpenFilesLimit,
    raise_open_files_limit,
    read_cpu_seconds,
    read_cpu_wait_seconds,
    read_memory,
    read_system_busy_seconds,
)
from relayd.bench.report import evaluate
from relayd.bench.scenarios import Bench, units_for
from relayd.bench.stats import (
    Distribution,
    LoadRecorder,
    per_thousand,
    percent,
    percentile,
    rate,
    ratio,
)
from tests.support import Relayd

# -- statistics ----------------------------------------------------------------------


def test_percentile_of_nothing_is_unknown() -> None:
    assert percentile([], 50) is None
    assert Distribution.of([]) == Distribution(0, None, None, None, None)


def test_percentile_of_one_value_is_that_value() -> None:
    for p in (0, 1, 50, 99, 100):
        assert percentile([0.25], p) == 0.25


def test_nearest_rank_percentiles_of_one_to_a_hundred() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0) == 1
    assert percentile(values, 1) == 1
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 99.5) == 100
    assert percentile(values, 100) == 100


def test_nearest_rank_is_always_a_measured_value() -> None:
    # Four values: p50 is the 2nd (rank ceil(2.0)), p51 the 3rd, p75 the 3rd, p76 the 4th.
    values = [10.0, 20.0, 30.0, 40.0]
    assert [percentile(values, p) for p in (25, 26, 50, 51, 75, 76)] == [10, 20, 20, 30, 30, 40]


def test_percentile_out_of_range_is_a_bug() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


def test_distribution_sorts_and_reports_milliseconds() -> None:
    summary = Distribution.of([0.003, 0.001, 0.002, 0.0105])
    assert summary == Distribution(4, 0.002, 0.0105, 0.0105, 0.0105)
    assert summary.as_ms() == {
        "count": 4,
        "p50_ms": 2.0,
        "p90_ms": 10.5,
        "p99_ms": 10.5,
        "max_ms": 10.5,
    }


def test_ratios_and_percentages() -> None:
    assert ratio(30.0, 40.0) == 0.75
    assert percent(30.0, 40.0) == 75.0
    # Nothing to compare with: unknown, never a division error.
    assert ratio(30.0, 0.0) is None
    assert ratio(None, 40.0) is None
    assert ratio(30.0, None) is None
    assert percent(1.0, 0) is None


def test_cost_per_thousand_requests() -> None:
    assert per_thousand(2.5, 5000) == 0.5
    assert per_thousand(0.0, 10) == 0.0
    assert per_thousand(1.0, 0) is None
    assert per_thousand(None, 10) is None


def test_rate() -> None:
    assert rate(500, 2.0) == 250.0
    assert rate(5, 0.0) is None


def test_load_recorder_counts_successes_errors_and_time() -> None:
    recorder = LoadRecorder()
    assert recorder.requests_per_second() is None
    recorder.request_sent(10.0)
    recorder.request_sent(10.5)
    recorder.request_sent(11.0)
    recorder.request_done(11.0, 200, 1.0)
    recorder.request_done(12.0, 503, 1.5)
    recorder.request_done(11.5, None, 0.5)  # ends earlier than the last: finished stays 12
    recorder.queue_wait(0.25)
    assert recorder.sent == 3
    assert recorder.ok == 1
    assert recorder.failed == 2
    assert dict(recorder.errors) == {"503": 1, "connection": 1}
    assert recorder.latencies == [1.0]  # only successful requests are timed
    assert recorder.queue_waits == [0.25]
    assert recorder.elapsed == 2.0
    assert recorder.requests_per_second() == 0.5


def test_tracker_times_requests_from_send_to_agent() -> None:
    tracker = Tracker()
    tracker.sent(7, 100.0)
    tracker.reached(content_for(7), 100.25)
    tracker.reached("warm-up", 100.5)  # not a bench request: ignored
    assert tracker.finish(7) == 0.25
    assert tracker.finish(7) is None  # forgotten once finished
    tracker.sent(8, 1.0)
    assert tracker.finish(8) is None  # never reached an agent
    assert number_of(content_for(12345)) == 12345
    assert number_of("bench x") is None
    assert number_of("echo:bench 1") is None


async def test_tracker_wakes_whoever_expects_a_request() -> None:
    tracker = Tracker()
    event = tracker.expect(3)
    assert not event.is_set()
    tracker.reached(content_for(3), 0.0)
    assert event.is_set()


def result_with(**figures: object) -> ScenarioResult:
    result = ScenarioResult("x")
    for name, value in figures.items():
        setattr(result, name, value)
    return result


def test_targets_pass_fail_and_unmeasured() -> None:
    results = {
        "relay-1": result_with(name="relay-1", ratio=0.6, error_count=0, reference="baseline-1"),
        "relay-32": result_with(name="relay-32", ratio=0.59, error_count=2),
        "pool-1000": result_with(name="pool-1000", percent_of_limit=None, error_count=0),
        "idle-10000": result_with(
            name="idle-10000", rss_per_agent_bytes=25 * 1024, cpu_percent_at_15s=5.01
        ),
        "wide-dispatch": result_with(name="wide-dispatch", ratio=0.9),
    }
    verdicts = {(c.scenario, c.measure): c.passed for c in evaluate(results)}
    assert verdicts == {
        ("relay-1", "req/s vs baseline-1"): True,
        ("relay-1", "errors"): True,
        ("relay-32", "req/s vs baseline"): False,
        ("relay-32", "errors"): False,
        ("pool-1000", "req/s vs agent-bound limit"): None,  # not measured
        ("pool-1000", "errors"): True,
        ("idle-10000", "RSS per idle agent"): True,
        ("idle-10000", "heartbeat CPU at 15 s"): False,
        ("wide-dispatch", "req/s vs relay-32"): True,
    }


def test_scenarios_bring_the_units_they_are_compared_with() -> None:
    assert units_for(["relay-32"]) == ["baseline-32", "relay-32"]
    assert units_for(["wide-dispatch"]) == ["baseline-32", "relay-32", "wide-dispatch"]
    assert units_for(["relay-1", "baseline"]) == ["baseline-1", "baseline-32", "relay-1"]
    assert units_for(["all"])[-1] == "wide-dispatch"
    assert units_for(["idle-10000"]) == ["idle-10000"]
    with pytest.raises(ValueError, match="unknown scenario"):
        units_for(["relay-2"])


def test_scale_multiplies_counts_but_keeps_one() -> None:
    settings = Settings(scale=0.01)
    assert settings.scaled(10_000, None) == 100
    assert settings.scaled(32, None) == 1
    assert settings.scaled(8, 300) == 3  # an explicit count is scaled too


def test_a_low_open_files_limit_caps_a_scenario_and_says_so(tmp_path: Path) -> None:
    bench = Bench(Settings(), tmp_path, OpenFilesLimit(before=1024, soft=1024, hard=1024))
    result = ScenarioResult("idle-10000")
    assert bench.fit(result, {"clients": 100}) == {"clients": 100}
    assert result.notes == []
    fitted = bench.fit(result, {"idle_agents": 10_000})
    assert fitted["idle_agents"] <= 1024 - 200
    assert "open-files limit (1024" in result.notes[0]


# -- /proc figures -------------------------------------------------------------------


def test_proc_figures_of_this_process() -> None:
    cpu = read_cpu_seconds(os.getpid())
    assert cpu is not None and cpu >= 0
    memory = read_memory(os.getpid())
    assert memory is not None and 0 < memory.rss <= memory.peak
    assert (read_cpu_wait_seconds(os.getpid()) or 0.0) >= 0
    assert (read_system_busy_seconds() or 0.0) >= 0


def test_proc_figures_of_no_process_are_unknown() -> None:
    # Beyond the largest pid Linux allows (4194304), so certainly not running.
    assert read_cpu_seconds(2**23) is None
    assert read_memory(2**23) is None


def test_open_files_limit_goes_no_higher_than_allowed() -> None:
    files = raise_open_files_limit()
    assert files.before <= files.soft <= files.hard


# -- the HTTP client against a tiny server -------------------------------------------

Script = Callable[[bytes, trio.SocketStream], Awaitable[bool]]


@dataclasses.dataclass
class TinyServer:
    port: int
    connections: int = 0


@asynccontextmanager
async def tiny_server(script: Script) -> AsyncIterator[TinyServer]:
    """A server on 127.0.0.1 that reads each request and lets ``script`` answer it.

    ``script(request, stream)`` returns False to close the connection.
    """
    server = TinyServer(0)

    async def handle(stream: trio.SocketStream) -> None:
        server.connections += 1
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                request, buffer = head + b"\r\n\r\n" + buffer[:length], buffer[length:]
                if not await script(request, stream):
                    return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


def answer(status: str, body: bytes, *extra: str) -> bytes:
    headers = "".join(f"{line}\r\n" for line in extra)
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


async def test_keep_alive_requests_share_one_connection() -> None:
    seen: list[bytes] = []

    async def echo(request: bytes, stream: trio.SocketStream) -> bool:
        seen.append(request)
        body = request.partition(b"\r\n\r\n")[2]
        # The body arrives in two writes: the client must wait for all of it.
        response = answer("200 OK", b"got:" + body, "Content-Type: application/json")
        await stream.send_all(response[:-3])
        await trio.sleep(0.01)
        await stream.send_all(response[-3:])
        return True

    with trio.fail_after(10):
        async with tiny_server(echo) as server:
            async with HttpClient("127.0.0.1", server.port, headers={"X-Test": "1"}) as client:
                first = await client.request("POST", "/api/ask", b'{"content": "a"}')
                second = await client.request("POST", "/api/ask", b"")
            assert first.status == 200 and first.reason == "OK"
            assert first.body == b'got:{"content": "a"}'
            assert first.headers["content-type"] == "application/json"
            assert second.body == b"got:"
            assert server.connections == 1
            assert client.connections == 1
    head = seen[0].partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /api/ask HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in head
    assert b"X-Test: 1" in head
    assert b"Content-Length: 16" in head
    assert b"Content-Length: 0" in seen[1]  # a POST always says how long its body is


async def test_connection_close_and_a_stale_connection_are_reopened() -> None:
    count = 0

    async def close_after_each(request: bytes, stream: trio.SocketStream) -> bool:
        nonlocal count
        count += 1
        if count == 1:
            await stream.send_all(answer("200 OK", b"1", "Connection: close"))
            return False
        # The second answer does not say "close" but the server closes anyway.
        await stream.send_all(answer("201 Created", b"2"))
        return False

    with trio.fail_after(10):
        async with tiny_server(close_after_each) as server:
            async with HttpClient("127.0.0.1", server.port) as client:
                assert (await client.request("GET", "/")).body == b"1"
                assert (await client.request("GET", "/")).status == 201
                # The server closed the kept-alive connection: the next request
                # finds it stale (EOF before any byte) and retries on a fresh one.
                await trio.sleep(0.05)
                response = await client.request("POST", "/api/ask", b"{}")
            assert response.status == 201
            assert client.connections == 3
            assert count == 3


@pytest.mark.parametrize(
    "raw",
    [
        b"SPDY/3 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n",
    ],
)
async def test_answers_it_does_not_understand_are_errors(raw: bytes) -> None:
    async def misbehave(request: bytes, stream: trio.SocketStream) -> bool:
        await stream.send_all(raw)
        return True

    with trio.fail_after(10):
        async with tiny_server(misbehave) as server:
            client = HttpClient("127.0.0.1", server.port)
            with pytest.raises(HttpError):
                await client.request("GET", "/")
            await client.aclose()


async def test_a_connection_lost_mid_answer_is_an_error_not_a_retry() -> None:
    async def hang_up(request: bytes, stream: trio.SocketStream) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        return False

    with trio.fail_after(10):
        async with tiny_server(hang_up) as server:
            async with HttpClient("127.0.0.1", server.port) as client:
                with pytest.raises(trio.BrokenResourceError):
                    await client.request("GET", "/")
            assert server.connections == 1


async def test_no_server_is_an_os_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        client = HttpClient("127.0.0.1", port)
        with trio.fail_after(10), pytest.raises(OSError):
            await client.request("GET", "/")


def test_parse_head() -> None:
    status, reason, headers = parse_head(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\ncontent-length: 2"
    )
    assert (status, reason) == (503, "Service Unavailable")
    assert headers == {"retry-after": "5", "content-length": "2"}


# -- the HTTP client against a real relayd -------------------------------------------


async def test_client_against_relayd(relayd: Relayd) -> None:
    auth = {"Authorization": f"Bearer {relayd.admin_key}"}
    with trio.fail_after(20):
        async with HttpClient("127.0.0.1", relayd.port, headers=auth) as client:
            # No agent yet: relayd's 503 is an answer, not an error of the client.
            refused = await client.request("POST", "/api/ask", b'{"content": "hi"}')
            assert refused.status == 503
            assert "error" in json.loads(refused.body)
            stats = AgentStats()
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: run_agent(
                        relayd.agent_url, echo_handler(), stats=stats, task_status=task_status
                    )
                )
                answers = [
                    await client.request("POST", "/api/ask", b'{"content": "n%d"}' % n)
                    for n in range(3)
                ]
                nursery.cancel_scope.cancel()
            assert [a.status for a in answers] == [200, 200, 200]
            assert [json.loads(a.body)["content"] for a in answers] == [
                "echo:n0",
                "echo:n1",
                "echo:n2",
            ]
            assert client.connections == 1  # kept alive across relayd's answers
        async with HttpClient("127.0.0.1", relayd.port) as anonymous:
            assert (await anonymous.request("POST", "/api/ask", b'{"content": "x"}')).status == 401
    assert stats.requests == 3


# -- smoke runs ----------------------------------------------------------------------

FIELDS = {field.name for field in dataclasses.fields(ScenarioResult)}


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert isinstance(report, dict)
    return report


@pytest.mark.slow
def test_smoke_every_scenario(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # wide-dispatch's busy agents run at nice 19 (relayd.bench.sinks). While other processes
    # keep the machine's CPUs busy, that is a sliver of a CPU: they miss the 0.5 s heartbeat
    # and relayd drops them. Here they run one step below this process instead.
    priority = min(os.getpriority(os.PRIO_PROCESS, 0) + 1, 19)
    monkeypatch.setattr(sinks, "LOWEST_PRIORITY", priority)
    report = run_json(
        capsys, "--scenario", "all", "--scale", "0.005", "--duration", "1", "--heartbeat", "0.5"
    )
    scenarios = report["scenarios"]
    assert isinstance(scenarios, dict)
    assert list(scenarios) == list(units_for(["all"]))
    for name, result in scenarios.items():
        assert set(result) == FIELDS, name
        assert result["notes"] is not None
    relay_1 = scenarios["relay-1"]
    assert relay_1["error_count"] == 0 and relay_1["errors"] == {}
    assert relay_1["requests_ok"] > 0
    assert relay_1["ratio"] is not None and relay_1["reference"] == "baseline-1"
    assert relay_1["agents_connected"] == 1
    loads = ("baseline-1", "baseline-32", "relay-1", "relay-32", "v1-chat-32", "relay-32-tls")
    for name in (*loads, "pool-1000", "wide-dispatch"):
        result = scenarios[name]
        assert result["requests_ok"] > 0, name
        assert result["req_per_s"] > 0, name
        assert result["latency"]["count"] == result["requests_ok"], name
        assert result["latency"]["p50_ms"] <= result["latency"]["max_ms"], name
        assert result["server_cpu_s_per_1000"] is not None, name
        assert result["bench_cpu_s_per_1000"] is not None, name
        assert result["server_peak_rss_bytes"] > 0, name
    for name in ("relay-1", "relay-32", "v1-chat-32", "relay-32-tls", "pool-1000", "wide-dispatch"):
        assert scenarios[name]["queue_wait"]["count"] > 0, name  # agents saw the requests
    pool = scenarios["pool-1000"]
    assert pool["limit_req_per_s"] == pool["agents"] / 2.0
    assert pool["percent_of_limit"] is not None
    idle = scenarios["idle-10000"]
    assert idle["agents_connected"] == idle["idle_agents"] == 50
    assert idle["rss_per_agent_bytes"] is not None
    assert idle["cpu_percent_at_15s"] is not None
    wide = scenarios["wide-dispatch"]
    assert wide["reference"] == "relay-32" and wide["ratio"] is not None
    # Every extra agent is connected and has its slot taken.
    assert wide["agents_connected"] == wide["agents"] + wide["idle_agents"]
    assert wide["agents_busy"] >= wide["idle_agents"]
    targets = report["targets"]
    assert isinstance(targets, list)
    assert {target["scenario"] for target in targets} == {
        "relay-1",
        "relay-32",
        "pool-1000",
        "idle-10000",
        "wide-dispatch",
        "v1-chat-32",
        "relay-32-tls",
        "stream-32",
        "v1-stream-32",
    }
    for name in ("bare-stream-32", "stream-32", "v1-stream-32"):  # (test_bench_stream.py: more)
        assert scenarios[name]["error_count"] == 0, name
        assert scenarios[name]["deltas_per_s"] > 0, name
    assert scenarios["stream-32"]["ratio"] is not None
    v1_stream = scenarios["v1-stream-32"]
    assert v1_stream["reference"] == "bare-stream-32" and v1_stream["ratio"] is not None
    assert v1_stream["requests_ok"] > 0 and v1_stream["deltas_per_answer"] == 256


def test_smoke_one_scenario_alone_with_a_request_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = run_json(capsys, "--scenario", "relay-1", "--requests", "40", "--duration", "30")
    scenarios = report["scenarios"]
    assert isinstance(scenarios, dict)
    assert list(scenarios) == ["baseline-1", "relay-1"]
    for result in scenarios.values():
        assert result["requests_sent"] == 40
    assert scenarios["relay-1"]["error_count"] == 0


def test_the_table_names_every_scenario_and_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--scenario", "baseline-1", "--requests", "5"]) == 0
    out = capsys.readouterr().out
    assert "baseline-1" in out and "req/s" in out


def test_baseline_on_relayds_patched_server(capsys: pytest.CaptureFixture[str]) -> None:
    report = run_json(
        capsys, "--scenario", "baseline-1", "--requests", "5", "--baseline-server", "guarded"
    )
    scenarios = report["scenarios"]
    assert isinstance(scenarios, dict)
    assert scenarios["baseline-1"]["requests_ok"] == 5
    with pytest.raises(SystemExit) as exited:
        main(["--scenario", "nonsense"])
    assert exited.value.code == 2
