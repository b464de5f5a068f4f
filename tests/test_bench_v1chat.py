"""v1-chat-32 and relay-32-tls: their requests, units, ratios and targets, the
bench's certificates and TLS client, a relayd set up for both, and one short
end-to-end run of each (slow).

Nothing here measures or asserts speed: the smoke runs check that every figure
is reported and that nothing failed, not what the figures are.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
from collections.abc import Awaitable, Callable
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import trio

from relayd.bench import baseline, main
from relayd.bench import tls as bench_tls
from relayd.bench.fleet import Fleet, Tracker, bench_handler
from relayd.bench.httpclient import HttpClient, HttpError
from relayd.bench.load import (
    ASK,
    CATCH_UP_LIMIT,
    TURN,
    V1_MODEL,
    Load,
    LoadPhase,
    chat_shape,
)
from relayd.bench.model import ScenarioResult, Settings
from relayd.bench.procs import OpenFilesLimit
from relayd.bench.report import build_report, evaluate, format_table
from relayd.bench.scenarios import REFERENCES, TOGETHER, batches, compare, units_for
from relayd.bench.servers import KEEP_ALIVE, Servers, Target, count_agents
from relayd.bench.tls import (
    BenchCertificate,
    TlsSetupError,
    available_methods,
    make_certificate,
    open_tls_stream,
)
from relayd.tls import TlsFiles, tls_context

FIELDS = {field.name for field in dataclasses.fields(ScenarioResult)}
METHODS = available_methods()

# -- what the clients ask ----------------------------------------------------------------


def test_chat_requests_are_openai_chats_of_the_same_content() -> None:
    shape = chat_shape()
    assert shape.path == "/v1/chat/completions"
    assert json.loads(shape.body(7)) == {
        "model": V1_MODEL,
        "messages": [{"role": "user", "content": "bench 7"}],
    }
    assert json.loads(shape.warm_up)["messages"] == [{"role": "user", "content": "warm-up"}]
    # Against --url: no model named.
    assert json.loads(chat_shape(None).body(7)) == {
        "messages": [{"role": "user", "content": "bench 7"}]
    }
    # relay-32's requests are what they were.
    assert ASK.path == "/api/ask"
    assert ASK.body(7) == b'{"content": "bench 7"}'
    assert ASK.warm_up == b'{"content": "warm-up"}'


# -- units, ratios, targets, report ------------------------------------------------------


def test_the_new_units_take_turns_with_relay_32() -> None:
    assert units_for(["v1-chat-32"]) == ["relay-32", "v1-chat-32"]
    assert units_for(["relay-32-tls"]) == ["relay-32", "relay-32-tls"]
    every = units_for(["all"])
    assert "v1-chat-32" in every and "relay-32-tls" in every
    assert REFERENCES["v1-chat-32"] == REFERENCES["relay-32-tls"] == "relay-32"
    group = next(group for group in TOGETHER if "relay-32" in group)
    assert {"v1-chat-32", "relay-32-tls"} <= set(group)
    asked = units_for(["relay-32", "v1-chat-32", "relay-32-tls", "stream-32"])
    assert batches(asked, in_turns=True) == [
        ["baseline-32", "relay-32", "v1-chat-32", "relay-32-tls"],
        ["bare-stream-32", "stream-32"],
    ]
    assert batches(asked, in_turns=False) == [[unit] for unit in asked]


def test_ratios_are_against_relay_32_of_the_same_run() -> None:
    results = {
        "relay-32": ScenarioResult("relay-32", req_per_s=5000.0, server_cpu_s_per_1000=0.2),
        "v1-chat-32": ScenarioResult("v1-chat-32", req_per_s=4500.0, server_cpu_s_per_1000=0.22),
        "relay-32-tls": ScenarioResult(
            "relay-32-tls", req_per_s=2500.0, server_cpu_s_per_1000=None
        ),
    }
    compare(results)
    chat, tls = results["v1-chat-32"], results["relay-32-tls"]
    assert chat.reference == tls.reference == "relay-32"
    assert chat.ratio == pytest.approx(0.9)
    assert chat.cpu_ratio == pytest.approx(1.1)
    assert tls.ratio == pytest.approx(0.5)
    assert tls.cpu_ratio is None  # not measured (against --url)
    # relay-32's own reference did not run: no ratio rather than a wrong one.
    assert results["relay-32"].reference is None and results["relay-32"].ratio is None
    alone = {"v1-chat-32": ScenarioResult("v1-chat-32", req_per_s=1.0)}
    compare(alone)
    assert alone["v1-chat-32"].ratio is None and alone["v1-chat-32"].cpu_ratio is None


def verdicts(**results: ScenarioResult) -> dict[tuple[str, str], bool | None]:
    return {(check.scenario, check.measure): check.passed for check in evaluate(results)}


def test_chat_may_cost_at_most_15_percent_more_relay_cpu() -> None:
    def chat(cpu_ratio: float | None, errors: int = 0) -> dict[tuple[str, str], bool | None]:
        result = ScenarioResult("v1-chat-32", cpu_ratio=cpu_ratio, error_count=errors)
        result.reference = "relay-32"
        return verdicts(**{"v1-chat-32": result})

    measure = ("v1-chat-32", "relay CPU per request vs relay-32")
    assert chat(1.15) == {measure: True, ("v1-chat-32", "errors"): True}
    assert chat(1.151)[measure] is False
    assert chat(0.9)[measure] is True  # cheaper is fine
    assert chat(None)[measure] is None  # not measured
    assert chat(1.0, errors=1)[("v1-chat-32", "errors")] is False
    value = next(c.value for c in evaluate({"v1-chat-32": ScenarioResult("x", cpu_ratio=1.1)}))
    assert value == pytest.approx(110.0)


def test_tls_is_checked_for_errors_and_its_cost_only_reported() -> None:
    tls = ScenarioResult("relay-32-tls", cpu_ratio=3.0, ratio=0.3, error_count=0)
    assert verdicts(**{"relay-32-tls": tls}) == {("relay-32-tls", "errors"): True}
    tls.error_count = 2
    assert verdicts(**{"relay-32-tls": tls}) == {("relay-32-tls", "errors"): False}


def test_the_report_names_the_new_units_and_their_comparison() -> None:
    results = {
        "relay-32": ScenarioResult(
            "relay-32", clients=32, agents=8, requests_sent=1, server_cpu_s_per_1000=0.2
        ),
        "v1-chat-32": ScenarioResult(
            "v1-chat-32",
            clients=32,
            agents=8,
            requests_sent=1,
            server_cpu_s_per_1000=0.22,
            req_per_s=4500.0,
            endpoint="POST /v1/chat/completions",
        ),
        "relay-32-tls": ScenarioResult(
            "relay-32-tls",
            clients=32,
            agents=8,
            requests_sent=1,
            server_cpu_s_per_1000=0.5,
            tls_certificate_by="openssl (OpenSSL 3)",
            tls_session="TLSv1.3 TLS_AES_256_GCM_SHA384",
        ),
    }
    results["relay-32"].req_per_s = 5000.0
    results["relay-32-tls"].req_per_s = 2000.0
    compare(results)
    report = build_report(Settings(), results, OpenFilesLimit(1024, 1024, 1024))
    for result in report["scenarios"].values():
        assert set(result) == FIELDS
    assert report["scenarios"]["relay-32-tls"]["tls_session"].startswith("TLSv1.3")
    table = format_table(report)
    assert "v1-chat-32: the server's CPU per request is 110.0 % of relay-32's" in table
    assert "(0.220 against 0.200 CPU s per 1,000 requests); req/s 90.0 % of its" in table
    assert "relay-32-tls: the server's CPU per request is 250.0 % of relay-32's" in table
    assert "relay CPU per request vs relay-32" in table
    assert "relay-32-tls  errors" in table


def test_reopened_connections_are_named_in_a_note(tmp_path: Path) -> None:
    phase = LoadPhase(Settings(), Tracker(), count(), lambda text: None)
    target = Target("127.0.0.1", 1, "token", None)
    clients = [HttpClient("127.0.0.1", 1) for _ in range(3)]
    for client in clients:
        client.connections = 1
    load = Load(ScenarioResult("relay-32-tls"), target, tracked=False, clients=clients, opened=3)
    phase.fill(load)
    assert not any("opened again" in note for note in load.result.notes)
    clients[0].connections = 3
    load = Load(ScenarioResult("relay-32-tls"), target, tracked=False, clients=clients, opened=3)
    phase.fill(load)
    assert any(note.startswith("2 connections were opened again") for note in load.result.notes)


def test_the_baseline_keeps_idle_connections_as_long_as_the_bench_relayds() -> None:
    assert baseline.KEEP_ALIVE == KEEP_ALIVE
    assert baseline.hypercorn_config("127.0.0.1:0").keep_alive_timeout == KEEP_ALIVE
    # Longer than a unit's clients wait while the four others of its group load
    # (wide-dispatch's busy agents catching up first): relayd's default, 10 s, is not.
    group = next(group for group in TOGETHER if "relay-32-tls" in group)
    idle = (len(group) - 1) * TURN + CATCH_UP_LIMIT
    assert 10 < idle < KEEP_ALIVE / 2


def test_tls_against_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--url", "http://127.0.0.1:9", "--key", "k", "--scenario", "relay-32-tls"])
    assert exited.value.code == 2
    assert "relay-32-tls starts a relayd of its own" in capsys.readouterr().err


# -- certificates and the TLS client ----------------------------------------------------


async def serve_tls(
    certificate: BenchCertificate,
    handler: Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int],
) -> None:
    """A TLS server with relayd's own server context for ``certificate``."""
    context = tls_context(TlsFiles(certificate.certificate, certificate.key, "the test"))
    listeners = await trio.open_ssl_over_tcp_listeners(0, context, host="127.0.0.1")
    task_status.started(listeners[0].transport_listener.socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def echo(stream: trio.SSLStream[trio.SocketStream]) -> None:
    try:
        while data := await stream.receive_some():
            await stream.send_all(data.upper())
    except trio.BrokenResourceError:
        pass


@pytest.mark.parametrize("method", bench_tls.METHODS)
async def test_certificates_made_either_way_serve_tls_to_the_bench_client(
    tmp_path: Path, method: str
) -> None:
    if method not in METHODS:
        pytest.skip(f"{method} is not installed here")
    certificate = make_certificate(tmp_path, method)
    assert certificate.made_with.startswith(method)
    assert certificate.key.stat().st_mode & 0o077 == 0  # the key is private
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_tls, certificate, echo)
            stream = await open_tls_stream("127.0.0.1", port, certificate.client_context())
            assert stream.session.startswith("TLSv1.")
            await stream.send_all(b"hello")
            assert await stream.receive_some(100) == b"HELLO"
            await stream.aclose()
            # A client that does not trust the bench's CA is refused a handshake.
            stranger = ssl.create_default_context()
            with pytest.raises(OSError, match="TLS handshake"):
                await open_tls_stream("127.0.0.1", port, stranger)
            nursery.cancel_scope.cancel()


def test_no_way_to_make_a_certificate_is_a_setup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_tls, "available_methods", lambda: [])
    with pytest.raises(TlsSetupError, match="cryptography package or the openssl command"):
        make_certificate(tmp_path)
    with pytest.raises(TlsSetupError, match="not installed"):
        make_certificate(tmp_path, "openssl")
    with pytest.raises(ValueError):
        make_certificate(tmp_path, "trustme")


async def test_the_http_client_keeps_alive_over_tls(tmp_path: Path) -> None:
    certificate = make_certificate(tmp_path)
    connections = 0

    async def answer(stream: trio.SSLStream[trio.SocketStream]) -> None:
        nonlocal connections
        connections += 1
        buffer = b""
        try:
            for number in range(2):
                while b"\r\n\r\n" not in buffer:
                    buffer += await stream.receive_some()
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(buffer) < length:
                    buffer += await stream.receive_some()
                body, buffer = buffer[:length], buffer[length:]
                answer = b'{"echo": "%s"}' % body
                response = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % len(answer)
                if number == 1:
                    response += b"connection: close\r\n"
                # The head and the body in two TLS records.
                await stream.send_all(response + b"\r\n")
                await stream.send_all(answer)
        except trio.BrokenResourceError:
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_tls, certificate, answer)
            context = certificate.client_context()
            async with HttpClient("127.0.0.1", port, ssl_context=context) as client:
                for number in range(4):
                    response = await client.request("POST", "/x", b"%d" % number)
                    assert response.status == 200
                    assert response.body == b'{"echo": "%d"}' % number
                    if number % 2 == 0:
                        assert client.tls_session is not None
                    else:  # closed after its second answer
                        assert client.tls_session is None
            assert client.connections == connections == 2
            nursery.cancel_scope.cancel()


# -- a relayd set up for both ------------------------------------------------------------


async def test_a_relayd_for_chats_over_tls(tmp_path: Path) -> None:
    """What v1-chat-32 and relay-32-tls need of their relayd, in one: v1 agents
    serve chats naming the v1 model, and everything speaks TLS."""
    servers = Servers(Settings(), tmp_path)
    tracker = Tracker()
    with trio.fail_after(30):
        async with (
            servers.relayd("both", clients=1, v1_model=V1_MODEL, tls=True) as target,
            trio.open_nursery() as agents,
        ):
            config = (tmp_path / "both" / "relayd.toml").read_text()
            assert f'idle_timeout = "{KEEP_ALIVE}s"' in config
            assert 'v1_model = "bench"' in config and "tls_certificate = " in config
            assert target.agent_url.startswith("wss://")
            assert target.certificate is not None and target.ssl_context is not None
            fleet = Fleet(
                target.agent_url,
                bench_handler(tracker),
                inline=True,
                ssl_context=target.ssl_context,
            )
            await fleet.start(agents, 2)
            assert fleet.failed == 0, fleet.failures
            shape = chat_shape()
            async with HttpClient(
                target.host,
                target.port,
                headers=target.client_headers(),
                ssl_context=target.ssl_context,
            ) as client:
                tracker.sent(12, trio.current_time())
                response = await client.request("POST", shape.path, shape.body(12))
                assert response.status == 200, response.body
                completion = json.loads(response.body)
                assert completion["object"] == "chat.completion"
                assert completion["model"] == V1_MODEL
                assert completion["choices"][0]["message"] == {
                    "role": "assistant",
                    "content": "echo:bench 12",  # the v1 agent got the message as content
                }
                assert tracker.finish(12) is not None  # and it was timed
                response = await client.request("POST", ASK.path, ASK.body(13))
                assert response.status == 200
                assert json.loads(response.body)["content"] == "echo:bench 13"
                assert client.connections == 1
            assert await count_agents(target) == (2, 0)
            # Plain HTTP is not served.
            with pytest.raises((OSError, trio.BrokenResourceError, HttpError)):
                async with HttpClient(target.host, target.port) as plain:
                    await plain.request("POST", ASK.path, ASK.body(14))
            agents.cancel_scope.cancel()


# -- end to end ----------------------------------------------------------------------------


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert isinstance(report, dict)
    return report


SMOKE = ("--duration", "1", "--clients", "4", "--agents", "2")


def assert_loaded(name: str, result: dict[str, Any]) -> None:
    assert set(result) == FIELDS, name
    assert result["error_count"] == 0 and result["errors"] == {}, name
    assert result["requests_ok"] > 0, name
    assert result["clients"] == 4 and result["agents"] == result["agents_connected"] == 2, name
    assert result["server_cpu_s_per_1000"] is not None, name
    assert result["queue_wait"]["count"] > 0, name
    assert not any("opened again" in note for note in result["notes"]), name


@pytest.mark.slow
def test_smoke_v1_chat_32(capsys: pytest.CaptureFixture[str]) -> None:
    report = run_json(capsys, "--scenario", "v1-chat-32", *SMOKE)
    scenarios = report["scenarios"]
    assert list(scenarios) == ["relay-32", "v1-chat-32"]
    for name, result in scenarios.items():
        assert_loaded(name, result)
    chat = scenarios["v1-chat-32"]
    assert chat["endpoint"] == "POST /v1/chat/completions"
    assert scenarios["relay-32"]["endpoint"] == "POST /api/ask"
    assert chat["reference"] == "relay-32"
    assert chat["ratio"] is not None and chat["cpu_ratio"] is not None
    checks = {(t["scenario"], t["measure"]): t for t in report["targets"]}
    cpu = checks[("v1-chat-32", "relay CPU per request vs relay-32")]
    assert cpu["value"] == pytest.approx(chat["cpu_ratio"] * 100)
    assert cpu["passed"] is not None
    assert checks[("v1-chat-32", "errors")]["passed"] is True


@pytest.mark.slow
def test_smoke_relay_32_tls(capsys: pytest.CaptureFixture[str]) -> None:
    report = run_json(capsys, "--scenario", "relay-32-tls", *SMOKE)
    scenarios = report["scenarios"]
    assert list(scenarios) == ["relay-32", "relay-32-tls"]
    for name, result in scenarios.items():
        assert_loaded(name, result)
    tls = scenarios["relay-32-tls"]
    assert tls["reference"] == "relay-32"
    assert tls["ratio"] is not None and tls["cpu_ratio"] is not None
    assert str(tls["tls_session"]).startswith("TLSv1.3 ")
    assert str(tls["tls_certificate_by"]).startswith(METHODS[0])
    assert scenarios["relay-32"]["tls_session"] is None
    checks = {(t["scenario"], t["measure"]): t["passed"] for t in report["targets"]}
    assert checks[("relay-32-tls", "errors")] is True
