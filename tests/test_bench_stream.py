"""stream-32: the bench's chunked/SSE parsing, its frames, its per-delta figures and
targets, its client against a scripted server, and one short end-to-end run (slow)."""

from __future__ import annotations

import json
import time
from array import array
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from relayd.bench import main
from relayd.bench.frames import (
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    client_frame,
    parse_frame,
    server_frame,
)
from relayd.bench.httpclient import HttpError
from relayd.bench.model import ScenarioResult, Settings
from relayd.bench.procs import OpenFilesLimit
from relayd.bench.report import build_report, evaluate, format_table
from relayd.bench.scenarios import TOGETHER, batches, units_for
from relayd.bench.stream import (
    DELTAS,
    ChunkedDecoder,
    EventParser,
    StreamClient,
    StreamOutcome,
    StreamRecorder,
    stamp_of,
    stream_figures,
)
from relayd.front.http1 import chunk

# -- chunked bodies --------------------------------------------------------------------


def test_chunks_decode_whatever_the_reads_cut() -> None:
    body = chunk(b"event: delta\n") + chunk(b"data: x\n\n") + chunk(b"") + b"NEXT"
    for size in (1, 2, 3, 7, len(body)):
        decoder = ChunkedDecoder()
        out = b""
        for start in range(0, len(body), size):
            out += decoder.feed(body[start : start + size])
        assert out == b"event: delta\ndata: x\n\n", size
        assert decoder.finished
        assert decoder.rest == b"NEXT"  # what follows the body is the next answer's


def test_chunk_extensions_are_ignored_and_nothing_is_decoded_before_its_end() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"5;name=value\r\nhel") == b""
    assert decoder.feed(b"lo\r\n") == b"hello"
    assert not decoder.finished
    assert decoder.rest == b""


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nhello\r\n",  # not hexadecimal
        b"0x5\r\nhello\r\n",
        b"1_0\r\n",
        b"5\r\nhelloXY",  # no CRLF after the data
        b"0\r\nTrailer: x\r\n\r\n",  # trailers
        b"5" * 2000,  # a size line without an end
    ],
)
def test_malformed_chunks_are_errors(body: bytes) -> None:
    with pytest.raises(HttpError):
        ChunkedDecoder().feed(body)


# -- server-sent events ----------------------------------------------------------------


def test_events_are_complete_only_after_their_blank_line() -> None:
    parser = EventParser()
    assert parser.feed(b'event: delta\ndata: {"content": ') == []
    assert parser.feed(b'"ts=12"}\n') == []
    assert parser.feed(b"\nevent: done\ndata: {}\n\n: a comment\n\ndata: a\ndata: b\n\n") == [
        (b"delta", b'{"content": "ts=12"}'),
        (b"done", b"{}"),
        (b"message", b"a\nb"),  # unnamed; data lines joined; the comment is no event
    ]


def test_an_endless_event_is_an_error() -> None:
    with pytest.raises(HttpError):
        EventParser().feed(b"data: " + b"x" * (1024 * 1024 + 1))


def test_the_send_time_is_found_in_relayds_and_the_bare_loops_events() -> None:
    assert stamp_of(b'{"content": "ts=1234567890123"}') == 1234567890123  # relayd
    bare = b'{"type":"delta","id":"7","text":"ts=42"}'  # the agent's frame, copied
    assert stamp_of(bare) == 42
    assert stamp_of(b'{"content": "no stamp"}') is None


# -- frames ----------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536])
def test_frames_round_trip(length: int) -> None:
    payload = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
    for frame, masked in ((client_frame(payload), True), (server_frame(payload), False)):
        assert bool(frame[1] & 0x80) is masked
        assert parse_frame(frame) == (OP_TEXT, payload, len(frame))
        assert parse_frame(frame[:-1] if length else frame[:1]) is None  # incomplete
        # Several frames in one buffer, read from an offset.
        both = frame + frame
        first = parse_frame(both)
        assert first is not None
        assert parse_frame(both, first[2]) == (OP_TEXT, payload, len(both))


def test_a_masked_frame_is_unmasked_and_control_frames_keep_their_opcode() -> None:
    key = b"\x01\x02\x03\x04"
    payload = b"hello, relay"
    masked = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
    frame = bytes((0x81, 0x80 | len(payload))) + key + masked
    assert parse_frame(frame) == (OP_TEXT, payload, len(frame))
    assert parse_frame(client_frame(b"x", OP_PONG)) == (OP_PONG, b"x", 7)
    assert parse_frame(server_frame(b"", OP_PING)) == (OP_PING, b"", 2)


def test_a_fragment_is_refused() -> None:
    with pytest.raises(FrameError):
        parse_frame(b"\x01\x03abc")  # FIN unset


# -- figures and targets ---------------------------------------------------------------


def test_the_recorder_counts_deltas_answers_and_errors() -> None:
    recorder = StreamRecorder()
    recorder.request_sent(10.0)
    recorder.request_sent(10.0)
    recorder.request_sent(10.0)
    recorder.request_sent(10.0)
    recorder.delta_latencies.extend([1_000_000, 2_000_000, 3_000_000])
    recorder.stream_done(11.0, StreamOutcome(200, deltas=3, done=True), 1.0)
    recorder.stream_done(11.5, StreamOutcome(200, deltas=2, problem="2 deltas, 3 expected"), 1.5)
    recorder.stream_done(11.2, StreamOutcome(503, problem="status 503"), 1.2)
    recorder.stream_done(12.0, StreamOutcome(None, problem="OSError: reset"), 2.0)
    assert recorder.ok == 1
    assert recorder.deltas == 5  # every delta received counts, whole answer or not
    assert dict(recorder.errors) == {"incomplete stream": 1, "503": 1, "connection": 1}
    assert recorder.latencies == [1.0]
    assert recorder.elapsed == 2.0

    result = ScenarioResult("stream-32", server_cpu_s=0.5, bench_cpu_s=0.25)
    stream_figures(result, recorder)
    assert result.deltas == 5
    assert result.deltas_per_answer == DELTAS
    assert result.deltas_per_s == 2.5
    assert result.server_cpu_us_per_delta == pytest.approx(100_000)
    assert result.bench_cpu_us_per_delta == pytest.approx(50_000)
    assert result.delta_latency == {
        "count": 3,
        "p50_ms": 2.0,
        "p90_ms": 3.0,
        "p99_ms": 3.0,
        "max_ms": 3.0,
    }
    # Little's law: 2 ms on average times 2.5 deltas/s.
    assert any(note.startswith("0 deltas in flight on average") for note in result.notes)


def test_a_backlog_is_named_in_a_note() -> None:
    recorder = StreamRecorder()
    recorder.request_sent(0.0)
    recorder.delta_latencies.extend([100_000_000] * DELTAS)  # 100 ms each
    recorder.stream_done(0.1, StreamOutcome(200, deltas=DELTAS, done=True), 0.1)
    result = ScenarioResult("stream-32", clients=1)
    stream_figures(result, recorder)
    assert result.deltas_per_s == DELTAS * 10
    (note,) = result.notes
    assert note.startswith("256 deltas in flight on average")
    assert "faster than the server forwards" in note


def test_an_outcome_is_ok_only_whole() -> None:
    assert StreamOutcome(200, deltas=3, done=True).ok
    assert not StreamOutcome(200, deltas=3, done=False).ok
    assert not StreamOutcome(200, deltas=3, done=True, problem="error event").ok
    assert not StreamOutcome(None).ok


def stream_result(**figures: object) -> ScenarioResult:
    result = ScenarioResult("stream-32", reference="bare-stream-32", deltas_per_answer=DELTAS)
    for name, value in figures.items():
        setattr(result, name, value)
    return result


def latency(p99_ms: float | None) -> dict[str, float | int | None]:
    return {"count": 1, "p50_ms": p99_ms, "p90_ms": p99_ms, "p99_ms": p99_ms, "max_ms": p99_ms}


def test_stream_targets() -> None:
    def verdicts(result: ScenarioResult) -> dict[str, bool | None]:
        return {c.measure: c.passed for c in evaluate({"stream-32": result})}

    assert verdicts(
        stream_result(ratio=0.5, deltas_per_s=20_000.0, delta_latency=latency(5.0))
    ) == {
        "deltas/s vs bare-stream-32": True,
        "deltas/s": True,
        "added latency p99": True,
        "errors": True,
    }
    assert verdicts(
        stream_result(
            ratio=0.49, deltas_per_s=19_999.0, delta_latency=latency(5.001), error_count=1
        )
    ) == {
        "deltas/s vs bare-stream-32": False,
        "deltas/s": False,
        "added latency p99": False,
        "errors": False,
    }
    unmeasured = verdicts(stream_result(delta_latency=latency(None)))
    assert unmeasured["deltas/s"] is None and unmeasured["added latency p99"] is None
    # The bare loop alone has no targets.
    assert evaluate({"bare-stream-32": stream_result(name="bare-stream-32")}) == []


def test_stream_units_run_together_and_have_their_own_table() -> None:
    assert units_for(["stream-32"]) == ["bare-stream-32", "stream-32"]
    assert "stream-32" in units_for(["all"])
    assert ("bare-stream-32", "stream-32", "v1-stream-32") in TOGETHER
    assert units_for(["v1-stream-32"]) == ["bare-stream-32", "stream-32", "v1-stream-32"]
    assert batches(["relay-1", "bare-stream-32", "stream-32"], in_turns=True) == [
        ["relay-1"],
        ["bare-stream-32", "stream-32"],
    ]
    results = {
        "bare-stream-32": stream_result(name="bare-stream-32", deltas_per_s=80_000.0),
        "stream-32": stream_result(ratio=0.5, deltas_per_s=40_000.0, server_cpu_us_per_delta=21.5),
    }
    report = build_report(Settings(), results, OpenFilesLimit(1024, 1024, 1024))
    table = format_table(report)
    assert "deltas/s" in table and "srv CPU µs/delta" in table
    assert "40,000" in table and "50%" in table and "21.5" in table
    assert "req/s" in table  # the explanations; no request table without its units
    assert "queue p50/p99" not in table


# -- the client against a scripted server ----------------------------------------------


Script = Callable[[trio.SocketStream], Awaitable[None]]


async def serve_script(script: Script, *, task_status: trio.TaskStatus[int]) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(script, listeners)


async def read_request(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive_some()
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += await stream.receive_some()
    buffer[:] = rest[length:]
    return rest[:length]


def sse(kind: str, document: object) -> bytes:
    return chunk(f"event: {kind}\ndata: {json.dumps(document)}\n\n".encode())


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


async def test_the_client_times_every_delta_and_keeps_its_connection() -> None:
    bodies: list[bytes] = []
    connections = 0

    async def script(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        buffer = bytearray()
        for _ in range(2):
            bodies.append(await read_request(stream, buffer))
            sent = time.monotonic_ns() - 1_000_000  # "sent" 1 ms ago
            answer = STREAM_HEAD
            answer += b"".join(sse("delta", {"content": f"ts={sent}"}) for _ in range(3))
            answer += sse("done", {"content": "ts=1ts=2ts=3"}) + chunk(b"")
            # In awkward pieces: the client must reassemble chunks and events.
            for start in range(0, len(answer), 17):
                await stream.send_all(answer[start : start + 17])
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_script, script)
        with trio.fail_after(10):
            async with StreamClient("127.0.0.1", port) as client:
                client.expected = 3
                latencies: array[int] = array("q")
                for _ in range(2):
                    outcome = await client.stream(b'{"stream": true}', latencies)
                    assert outcome == StreamOutcome(200, deltas=3, done=True)
                    assert outcome.ok
        nursery.cancel_scope.cancel()
    assert bodies == [b'{"stream": true}'] * 2
    assert connections == 1
    assert len(latencies) == 6
    assert all(1_000_000 <= value < 5_000_000_000 for value in latencies)


@pytest.mark.parametrize(
    ("answer", "status", "problem"),
    [
        (
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}",
            503,
            "status 503",
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", 200, "not an event stream"),
        (STREAM_HEAD + sse("delta", {"content": "ts=1"}) + chunk(b""), 200, "no done event"),
        (
            STREAM_HEAD + sse("error", {"error": "agent gone"}) + chunk(b""),
            200,
            "error event",
        ),
        (STREAM_HEAD + sse("delta", {"content": "ts=1"}), 200, "BrokenResourceError"),
        (STREAM_HEAD + sse("delta", {"content": "x"}) + chunk(b""), 200, "HttpError"),
    ],
)
async def test_what_is_not_a_whole_stream_is_an_outcome_not_an_exception(
    answer: bytes, status: int, problem: str
) -> None:
    async def script(stream: trio.SocketStream) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(answer)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_script, script)
        with trio.fail_after(10):
            async with StreamClient("127.0.0.1", port) as client:
                client.expected = 1
                outcome = await client.stream(b"{}", array("q"))
        nursery.cancel_scope.cancel()
    assert outcome.status == status
    assert not outcome.ok
    assert outcome.problem is not None and outcome.problem.startswith(problem), outcome


async def test_a_refused_connection_is_an_outcome() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    client = StreamClient("127.0.0.1", port)
    outcome = await client.stream(b"{}", array("q"))
    assert outcome.status is None and outcome.problem is not None


# -- end to end ------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_stream_32(capsys: pytest.CaptureFixture[str]) -> None:
    run = partial(main, ["--scenario", "stream-32", "--duration", "1", "--clients", "4", "--json"])
    assert run() == 0
    report = json.loads(capsys.readouterr().out)
    scenarios = report["scenarios"]
    assert list(scenarios) == ["bare-stream-32", "stream-32"]
    for name, result in scenarios.items():
        assert result["error_count"] == 0 and result["errors"] == {}, name
        assert result["clients"] == result["agents"] == 4, name
        assert result["agents_connected"] == 4, name
        assert result["requests_ok"] > 0, name
        assert result["deltas"] == result["requests_ok"] * DELTAS, name
        assert result["deltas_per_s"] > 0, name
        assert result["delta_latency"]["count"] == result["deltas"], name
        assert 0 <= result["delta_latency"]["p50_ms"] <= result["delta_latency"]["p99_ms"], name
        assert result["server_cpu_us_per_delta"] > 0, name
        assert result["bench_cpu_us_per_delta"] > 0, name
    stream = scenarios["stream-32"]
    assert stream["reference"] == "bare-stream-32" and stream["ratio"] > 0
    measures = {t["measure"]: t["passed"] for t in report["targets"]}
    assert measures["errors"] is True
    assert set(measures) == {
        "deltas/s vs bare-stream-32",
        "deltas/s",
        "added latency p99",
        "errors",
    }


def test_openai_chunks_count_as_deltas_only_with_the_agents_time_stamp() -> None:
    """v1-stream-32 reads /v1's chunks: the role chunk and the finish chunk carry
    no content, [DONE] ends the answer, an error chunk is an error."""
    from relayd.bench.stream import _openai_kind

    role = b'{"id":"c","choices":[{"index":0,"delta":{"role":"assistant"}}]}'
    piece = b'{"id":"c","choices":[{"index":0,"delta":{"content":"ts=123456789"}}]}'
    finish = b'{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    error = b'{"error":{"message":"the agent failed","type":"server_error"}}'
    assert _openai_kind(role) == b"other"
    assert _openai_kind(piece) == b"delta" and stamp_of(piece) == 123456789
    assert _openai_kind(finish) == b"other"
    assert _openai_kind(b"[DONE]") == b"done"
    assert _openai_kind(error) == b"error"
