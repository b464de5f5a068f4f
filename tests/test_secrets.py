"""No secret leaves relayd: not in its log (at debug level), not in any response.

One real relayd with ``log_level = "debug"`` goes through the life a secret has:
users created (admin key in the body and as Bearer), questions asked with
their tokens (raw and Bearer), wrong tokens and wrong admin keys, agents with a
key in the path, in ``?key=`` and as Bearer, wrong agent keys, plain HTTP to an
agent path, ``/api/connections``, a reload that revokes a key, a user deleted.
Every response (status line aside: headers and body) is kept, and so is the
whole log once relayd has stopped.

Then not one secret may appear anywhere: the admin key, every user token and
its SHA-256 (as stored in users.toml), every agent key and its SHA-256, every
wrong key tried. The only exception is the one response that creates a token,
which must contain it. Besides whole secrets, their first and last 16
characters are looked for too (a truncated echo is still a leak).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import signal
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from relayd.agentkit import AgentStats, echo_handler, run_agent
from tests.support import Relayd


@dataclass
class Seen:
    """One response relayd gave: where it came from, and everything in it."""

    label: str
    status: int
    headers: list[tuple[str, str]]
    body: str

    def text(self) -> str:
        return "\n".join([*(f"{name}: {value}" for name, value in self.headers), self.body])


def token(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(24)}"


def fragments(secret: str) -> set[str]:
    return {secret, secret[:16], secret[-16:]}


async def test_no_secret_in_the_log_or_in_any_response(
    relayd_factory: Callable[..., Relayd], tmp_path: Path
) -> None:
    admin_key = token("admin")
    agent_keys = [token("agentkey1"), token("agentkey2"), token("agentkey3")]
    file_key = token("filekey")
    keys_file = tmp_path / "agent-keys"
    keys_file.write_text(f"# agent keys\n{file_key}\n")
    wrong = [token("wrong-admin"), token("wrong-token"), token("wrong-agent-key")]
    config = (
        '[server]\nlog_level = "debug"\n'
        "[auth]\nfailure_burst = 1000\n"
        '[requests]\nwait_for_agent = "5s"\n'
        f"[agents]\nkeys = {json.dumps(agent_keys)}\nkeys_file = {json.dumps(str(keys_file))}\n"
        "allow_loopback_without_key = false\n"
    )
    relayd = relayd_factory(config=config, admin_key=admin_key)
    seen: list[Seen] = []
    created: dict[str, Seen] = {}  # token -> the response that created it

    def keep(label: str, response: httpx.Response) -> httpx.Response:
        seen.append(
            Seen(label, response.status_code, list(response.headers.items()), response.text)
        )
        return response

    async def agent_refused(label: str, url: str, headers: list[tuple[bytes, bytes]]) -> int:
        try:
            async with open_websocket_url(url, extra_headers=headers):
                pass
        except ConnectionRejected as rejection:
            seen.append(
                Seen(
                    label,
                    rejection.status_code,
                    [(n.decode("latin-1"), v.decode("latin-1")) for n, v in rejection.headers],
                    (rejection.body or b"").decode("utf-8", "replace"),
                )
            )
            return rejection.status_code
        raise AssertionError(f"{label}: the agent was accepted")

    base = f"ws://127.0.0.1:{relayd.port}"
    agent_urls = [
        (f"{base}/agent/{agent_keys[0]}/client/register", []),
        (f"{base}/client/register?key={agent_keys[1]}", []),
        (f"{base}/client/register", [(b"authorization", f"Bearer {agent_keys[2]}".encode())]),
    ]
    file_agent = AgentStats()
    file_agent_done = trio.Event()

    async def run_file_agent(task_status: trio.TaskStatus[str]) -> None:
        try:
            await run_agent(
                f"{base}/agent/{file_key}/client/register",
                echo_handler(),
                stats=file_agent,
                task_status=task_status,
            )
        finally:
            file_agent_done.set()

    with trio.fail_after(60):
        async with (
            trio.open_nursery() as nursery,
            httpx.AsyncClient(base_url=relayd.url, timeout=10) as client,
        ):
            # Users: admin key in the body, then as Bearer.
            first = keep(
                "add user (body)",
                await client.post("/admin/users/add", json={"admin_key": admin_key, "name": "a"}),
            )
            second = keep(
                "add user (bearer)",
                await client.post(
                    "/admin/users/add",
                    content=b"{}",
                    headers={"Authorization": f"Bearer {admin_key}"},
                ),
            )
            assert first.status_code == second.status_code == 200, (first.text, second.text)
            tokens = [first.json()["token"], second.json()["token"]]
            created[tokens[0]] = seen[0]
            created[tokens[1]] = seen[1]
            user_ids = [first.json()["user_id"], second.json()["user_id"]]
            keep("list users (query)", await client.get(f"/admin/users?admin_key={admin_key}"))
            keep(
                "list users (bearer)",
                await client.get("/admin/users", headers={"Authorization": f"Bearer {admin_key}"}),
            )
            # Wrong admin keys, everywhere an admin key may be.
            for label, response in [
                ("wrong admin (query)", await client.get(f"/admin/users?admin_key={wrong[0]}")),
                (
                    "wrong admin (bearer)",
                    await client.get(
                        "/admin/users", headers={"Authorization": f"Bearer {wrong[0]}"}
                    ),
                ),
                (
                    "wrong admin (body)",
                    await client.post("/admin/users/add", json={"admin_key": wrong[0]}),
                ),
                (
                    "wrong admin (delete)",
                    await client.post(
                        "/admin/users/delete", json={"admin_key": wrong[0], "user_id": user_ids[0]}
                    ),
                ),
                (
                    "wrong admin (connections)",
                    await client.get("/api/connections", headers={"Authorization": wrong[0]}),
                ),
            ]:
                assert keep(label, response).status_code == 401, (label, response.text)

            # A client that gives up while its question waits for an agent (a debug line).
            with trio.move_on_after(0.3):
                await client.post(
                    "/api/ask", content=b'{"content": "wait"}', headers={"Authorization": tokens[0]}
                )
            # Bad upgrade requests with a key in the path (a connection error, logged).
            for key in (agent_keys[0], wrong[2]):
                stream = await trio.open_tcp_stream("127.0.0.1", relayd.port)
                await stream.send_all(
                    f"GET /agent/{key}/client/register?key={key} HTTP/1.1\r\nHost: x\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\nx\n".encode()
                )
                raw = b""
                with trio.move_on_after(2):
                    while chunk := await stream.receive_some(65536):
                        raw += chunk
                await stream.aclose()
                seen.append(Seen("bad upgrade", 0, [], raw.decode("latin-1")))

            # Agents, with their key in the path, the query and a Bearer header; one
            # more with the key from keys_file.
            for url, headers in agent_urls:
                await nursery.start(
                    lambda task_status, url=url, headers=headers: run_agent(
                        url, echo_handler(), headers=headers, task_status=task_status
                    )
                )
            await nursery.start(run_file_agent)
            # Wrong agent keys, in each place.
            for label, url, headers in [
                ("wrong agent key (path)", f"{base}/agent/{wrong[2]}/client/register", []),
                ("wrong agent key (query)", f"{base}/client/register?key={wrong[2]}", []),
                (
                    "wrong agent key (bearer)",
                    f"{base}/client/register",
                    [(b"authorization", f"Bearer {wrong[2]}".encode())],
                ),
                ("no agent key", f"{base}/client/register", []),
            ]:
                assert await agent_refused(label, url, headers) in (401, 403)
            # Plain HTTP to agent paths.
            keep("http to agent path", await client.get(f"/agent/{agent_keys[0]}/client/register"))
            keep(
                "http to agent path 2", await client.post(f"/agent/{wrong[2]}/other", content=b"{}")
            )

            # Questions with each token, raw and Bearer, and a conversation.
            with trio.fail_after(10):
                while True:
                    listing = keep(
                        "connections",
                        await client.get("/api/connections", headers={"Authorization": admin_key}),
                    )
                    assert listing.status_code == 200
                    if len(listing.json()["connections"]) == 4:
                        break
                    await trio.sleep(0.05)
            answer = keep(
                "ask (raw token)",
                await client.post(
                    "/api/ask",
                    content=b'{"content": "hello"}',
                    headers={"Authorization": tokens[0]},
                ),
            )
            assert answer.status_code == 200, answer.text
            follow = keep(
                "ask (bearer token, conversation)",
                await client.post(
                    "/api/ask",
                    json={
                        "content": "again",
                        "conversation_id": answer.json()["conversation_id"],
                        "parent_id": answer.json()["response_id"],
                    },
                    headers={"Authorization": f"Bearer {tokens[0]}"},
                ),
            )
            assert follow.status_code == 200, follow.text
            # Another user may not continue it; the answer must not say whose it is.
            keep(
                "ask (other user's conversation)",
                await client.post(
                    "/api/ask",
                    json={"content": "x", "conversation_id": answer.json()["conversation_id"]},
                    headers={"Authorization": tokens[1]},
                ),
            )
            for label, authorization in [
                ("ask (wrong token)", wrong[1]),
                ("ask (wrong bearer)", f"Bearer {wrong[1]}"),
                ("ask (token + 1)", tokens[1] + "x"),
                ("ask (admin key + 1)", admin_key + "x"),
            ]:
                response = keep(
                    label,
                    await client.post(
                        "/api/ask",
                        content=b'{"content": "hello"}',
                        headers={"Authorization": authorization},
                    ),
                )
                assert response.status_code == 401, (label, response.text)
            keep(
                "ask (bad body, good token)",
                await client.post(
                    "/api/ask", content=b"{not json", headers={"Authorization": tokens[1]}
                ),
            )

            # Reload with the file key gone: its agent is disconnected.
            keys_file.write_text("# emptied\n")
            relayd.signal(signal.SIGHUP)
            await trio.to_thread.run_sync(relayd.wait_notification, "READY=1")
            with trio.fail_after(10):
                await file_agent_done.wait()
            assert file_agent.close_code == 1008
            keep(
                "connections after reload",
                await client.get("/api/connections", headers={"Authorization": admin_key}),
            )

            # A user deleted; its token stops working.
            deleted = keep(
                "delete user",
                await client.post(
                    "/admin/users/delete", json={"admin_key": admin_key, "user_id": user_ids[1]}
                ),
            )
            assert deleted.status_code == 200, deleted.text
            gone = keep(
                "ask (deleted user)",
                await client.post(
                    "/api/ask", content=b'{"content": "x"}', headers={"Authorization": tokens[1]}
                ),
            )
            assert gone.status_code == 401
            nursery.cancel_scope.cancel()
    assert relayd.stop() == 0
    log = relayd.log

    stored = tomllib.loads((relayd.state_dir / "users.toml").read_text())
    hashes = [user["token_sha256"] for user in stored["users"]]
    assert hashlib.sha256(tokens[0].encode()).hexdigest() in hashes
    every_secret = {
        "admin key": admin_key,
        "admin key sha256": hashlib.sha256(admin_key.encode()).hexdigest(),
        **{f"token {n}": value for n, value in enumerate(tokens)},
        **{
            f"token {n} sha256": hashlib.sha256(t.encode()).hexdigest()
            for n, t in enumerate(tokens)
        },
        **{f"stored hash {n}": value for n, value in enumerate(hashes)},
        **{f"agent key {n}": value for n, value in enumerate([*agent_keys, file_key])},
        **{
            f"agent key {n} sha256": hashlib.sha256(key.encode()).hexdigest()
            for n, key in enumerate([*agent_keys, file_key])
        },
        **{f"wrong key {n}": value for n, value in enumerate(wrong)},
    }
    # The scenario did happen, and was logged at debug level.
    assert "DEBUG relayd.api: client went away" in log
    assert "agent refused" in log and "authentication failed" in log
    assert len(seen) > 25
    leaks = []
    for name, secret in every_secret.items():
        for fragment in fragments(secret):
            if fragment in log:
                line = next(line for line in log.splitlines() if fragment in line)
                leaks.append(f"{name} in the log: {line[:300]}")
            for response in seen:
                if fragment in response.text() and created.get(secret) is not response:
                    leaks.append(f"{name} in response {response.label!r}: {response.text()[:300]}")
    assert not leaks, "\n".join(leaks)
    # The creating responses do carry their token (shown once).
    for secret, response in created.items():
        assert secret in response.body
    # And the closed agents' close reasons did not echo a key either.
    assert file_agent.close_reason is not None
    assert all(fragment not in file_agent.close_reason for fragment in fragments(file_key))
