"""A real relayd subprocess, driven over HTTP the way the seed's users drive it.

The seed's README uses ``curl -d '{...}'``: a JSON body sent as
``application/x-www-form-urlencoded``, and the token as a raw
``Authorization: <token>`` header. Scripts using httpx's ``content=`` send no
Content-Type at all. Both shapes must work unchanged (docs: compat.md).
No agent runs here, so a valid ``/api/ask`` ends in 503 "no agent connected".
"""

from __future__ import annotations

import json
import signal
import stat
import tomllib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio

from tests.support import Relayd

CONTENT_TYPES = [None, "application/x-www-form-urlencoded"]


def headers_for(content_type: str | None, **extra: str) -> dict[str, str]:
    headers = dict(extra)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


def body(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def assert_content_type_sent(response: httpx.Response, content_type: str | None) -> None:
    assert response.request.headers.get("Content-Type") == content_type


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
async def test_seed_curl_session(relayd: Relayd, content_type: str | None) -> None:
    key = relayd.admin_key
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relayd.url) as client:
            # curl -X POST .../admin/users/add -d '{"admin_key": "..."}'
            added = await client.post(
                "/admin/users/add",
                content=body({"admin_key": key}),
                headers=headers_for(content_type),
            )
            assert_content_type_sent(added, content_type)
            assert added.status_code == 200, added.text
            assert added.headers["Content-Type"].startswith("application/json")
            user_id, token = added.json()["user_id"], added.json()["token"]
            assert isinstance(user_id, str) and user_id
            assert isinstance(token, str) and len(token) >= 32

            # curl -X POST .../api/ask -H "Authorization: <token>" -d '{"content": "..."}'
            asked = await client.post(
                "/api/ask",
                content=body({"content": "Hello, world"}),
                headers=headers_for(content_type, Authorization=token),
            )
            assert asked.status_code == 503, asked.text
            assert asked.json() == {"error": "no agent connected"}
            assert int(asked.headers["Retry-After"]) >= 1

            # curl ".../admin/users?admin_key=..."
            listed = await client.get("/admin/users", params={"admin_key": key})
            assert listed.status_code == 200, listed.text
            users = listed.json()["users"]
            assert [user["user_id"] for user in users] == [user_id]
            assert token not in listed.text
            assert "token" not in users[0]

            # curl -X POST .../admin/users/delete -d '{"admin_key": "...", "user_id": "..."}'
            deleted = await client.post(
                "/admin/users/delete",
                content=body({"admin_key": key, "user_id": user_id}),
                headers=headers_for(content_type),
            )
            assert deleted.status_code == 200, deleted.text
            assert deleted.json() == {"message": "User deleted"}

            refused = await client.post(
                "/api/ask",
                content=body({"content": "Hello again"}),
                headers=headers_for(content_type, Authorization=token),
            )
            assert refused.status_code == 401, refused.text
            assert "error" in refused.json()

            listed = await client.get("/admin/users", params={"admin_key": key})
            assert listed.json() == {"users": []}
    assert relayd.stop() == 0


async def test_wrong_admin_key_never_answers_with_the_key(relayd: Relayd) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relayd.url) as client:
            for response in [
                await client.get("/admin/users", params={"admin_key": "guess"}),
                await client.get("/admin/users"),
                await client.post("/admin/users/add", content=b'{"admin_key": "guess"}'),
                await client.get("/api/connections"),
                await client.get("/api/connections", headers={"Authorization": "guess"}),
            ]:
                assert response.status_code == 401, response.text
                assert set(response.json()) == {"error"}
                assert relayd.admin_key not in response.text
                assert relayd.admin_key not in str(response.headers)
    assert not (relayd.state_dir / "users.toml").exists()


async def test_connections_needs_the_admin_key(relayd: Relayd) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relayd.url) as client:
            response = await client.get(
                "/api/connections", headers={"Authorization": f"Bearer {relayd.admin_key}"}
            )
            assert response.status_code == 200
            assert response.json() == {"connections": []}


async def test_health_and_unknown_routes(relayd: Relayd) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relayd.url) as client:
            health = await client.get("/health")
            assert (health.status_code, health.text) == (200, "OK")
            missing = await client.get("/v2/nothing")
            assert missing.status_code == 404
            assert missing.json() == {"error": "no route /v2/nothing"}
            wrong = await client.get("/api/ask")
            assert wrong.status_code == 405
            assert wrong.json() == {"error": "method GET not allowed on /api/ask"}


async def test_fifty_concurrent_adds(relayd: Relayd) -> None:
    results: list[dict[str, Any]] = []
    statuses: list[int] = []

    async def add(client: httpx.AsyncClient, index: int) -> None:
        response = await client.post(
            "/admin/users/add",
            content=body({"admin_key": relayd.admin_key, "name": f"user-{index}"}),
        )
        statuses.append(response.status_code)
        if response.status_code == 200:
            results.append(response.json())

    limits = httpx.Limits(max_connections=50)
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=relayd.url, limits=limits, timeout=20) as client:
            async with trio.open_nursery() as nursery:
                for index in range(50):
                    nursery.start_soon(add, client, index)
            assert statuses == [200] * 50
            assert len({result["user_id"] for result in results}) == 50
            assert len({result["token"] for result in results}) == 50

            listed = await client.get("/admin/users", params={"admin_key": relayd.admin_key})
            users = listed.json()["users"]
            assert {user["user_id"] for user in users} == {r["user_id"] for r in results}
            assert sorted(user["name"] for user in users) == sorted(f"user-{i}" for i in range(50))

            # Every token works (503: no agent, rather than 401).
            for result in results[:10]:
                asked = await client.post(
                    "/api/ask",
                    content=b'{"content": "hi"}',
                    headers={"Authorization": result["token"]},
                )
                assert asked.status_code == 503, asked.text

    users_file = relayd.state_dir / "users.toml"
    stored = tomllib.loads(users_file.read_text())["users"]
    assert {entry["user_id"] for entry in stored} == {r["user_id"] for r in results}
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    text = users_file.read_text()
    assert all(result["token"] not in text for result in results)
    assert relayd.stop() == 0
    assert "Traceback" not in relayd.log


@pytest.mark.parametrize("path", ["/admin/users/add", "/api/ask"])
@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_max_body_is_413(
    relayd_factory: Callable[..., Relayd], chunked: bool, path: str
) -> None:
    server = relayd_factory(config='[server]\nmax_body = "1KiB"\n')
    payload = body({"admin_key": server.admin_key, "content": "x" * 4096})

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 512):
            yield payload[start : start + 512]

    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.post(
                path,
                content=chunks() if chunked else payload,
                headers={"Authorization": server.admin_key},
            )
            assert ("Transfer-Encoding" in response.request.headers) is chunked
            assert response.status_code == 413, response.text
            assert response.json() == {
                "error": "request body larger than server.max_body (1024 bytes)"
            }
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/health")).text == "OK"
    assert not (server.state_dir / "users.toml").exists()
    assert server.stop() == 0


@pytest.mark.parametrize("path", ["/admin/users/add", "/api/ask"])
async def test_keep_alive_connection_works_after_a_413(
    relayd_factory: Callable[..., Relayd], path: str
) -> None:
    """A 413 must leave the connection usable (or close it): the client's next
    request on it must be answered, not left hanging."""
    server = relayd_factory(config='[server]\nmax_body = "1KiB"\n')
    payload = body({"admin_key": server.admin_key, "content": "x" * 2000})
    for attempt in range(10):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            response = await client.post(
                path, content=payload, headers={"Authorization": server.admin_key}
            )
            assert response.status_code == 413, response.text
            try:
                with trio.fail_after(3):
                    health = await client.get("/health")
            except trio.TooSlowError:
                pytest.fail(f"attempt {attempt + 1}: no answer on the connection after a 413")
            except (httpx.RemoteProtocolError, httpx.ReadError):
                continue  # the server closed the connection: allowed
            assert (health.status_code, health.text) == (200, "OK")
    assert server.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_stop_signal_exits_0(relayd: Relayd, signum: int) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relayd.url) as client:
            assert (await client.get("/health")).text == "OK"
            response = await client.post(
                "/api/ask", content=b'{"content": "hi"}', headers={"Authorization": "bad"}
            )
            assert response.status_code == 401
    relayd.signal(signum)
    relayd.wait_notification("STOPPING=1")
    assert relayd.process.wait(20) == 0
    log = relayd.log
    assert f"received {signal.Signals(signum).name}, stopping" in log
    assert "relayd stopped" in log
    assert "Traceback" not in log


async def test_a_refusal_before_the_body_keeps_the_connection_alive(relayd: Relayd) -> None:
    """A 401 decided from the head alone must still read the body that follows
    (here in a second segment, 50 ms later): Hypercorn closes a connection whose
    request was not read to its end, and a keep-alive client whose next request
    is already on its way would see the connection drop without an answer."""
    body_bytes = b'{"content": "hello"}'
    head = (
        b"POST /api/ask HTTP/1.1\r\nHost: relayd\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body_bytes)
    )
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", relayd.port)
        async with stream:
            received = b""
            for _ in range(2):
                await stream.send_all(head)
                await trio.sleep(0.05)
                await stream.send_all(body_bytes)
                while received.count(b"HTTP/1.1 401") < _ + 1 or not received.endswith(b"}"):
                    chunk = await stream.receive_some()
                    assert chunk, f"connection closed after {received.count(b'HTTP/1.1 ')} answers"
                    received += chunk
            assert received.count(b"HTTP/1.1 401") == 2
            assert b"connection: close" not in received.lower()
