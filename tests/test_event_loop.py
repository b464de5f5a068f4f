"""The event loop never waits on a file (issue 14, part 6).

Adding or deleting a user takes the users file's cross-process lock and
fsyncs (a reload reads files too, also in a worker thread, but takes no lock:
the file is replaced atomically). A ``relayd users add`` in another process
that holds the lock (stuck, or just slow) must not freeze every heartbeat and
request: those operations run in worker threads. A real relayd subprocess,
another process holding the lock for 3 s, and agents and clients that keep
being served meanwhile.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import trio

from relayd.agentkit import echo_handler
from tests.support import Relayd
from tests.test_relay_e2e import client, connections, start_admitted

HOLD = 3.0
# A request answered by an instant agent takes milliseconds; a stalled loop,
# the whole hold. Anything under this is "did not wait for the lock".
PROMPT = 1.0

LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(relayd: Relayd) -> subprocess.Popen[bytes]:
    """Another process holding the users file's lock for HOLD seconds (like a
    `relayd users add` stuck on a slow disk); returns once it holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(relayd.state_dir / "users.toml.lock"), str(HOLD)],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"locked\n"
    return holder


@pytest.mark.slow
@pytest.mark.parametrize("blocked", ["add a user", "delete a user"])
async def test_a_locked_users_file_stalls_nothing_but_its_own_operation(
    relayd_factory: Callable[..., Relayd], blocked: str
) -> None:
    relayd = relayd_factory(config='[agents]\nheartbeat_interval = "0.2s"\n')
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            await start_admitted(nursery, http, relayd, echo_handler())
            added = await http.post(
                "/admin/users/add", headers={"Authorization": relayd.admin_key}, json={}
            )
            assert added.status_code == 200, added.text
            token, user_id = added.json()["token"], added.json()["user_id"]
            holder = await trio.to_thread.run_sync(hold_lock, relayd)
            held_since = time.monotonic()
            blocked_done = trio.Event()
            statuses: list[int] = []

            async def blocked_operation() -> None:
                path, body = (
                    ("/admin/users/add", {"name": "late"})
                    if blocked == "add a user"
                    else ("/admin/users/delete", {"user_id": user_id})
                )
                response = await http.post(
                    path, headers={"Authorization": relayd.admin_key}, json=body
                )
                statuses.append(response.status_code)
                blocked_done.set()

            nursery.start_soon(blocked_operation)
            await trio.sleep(0.2)  # the operation is now waiting for the lock
            # Meanwhile: asks are answered promptly, /api/connections too, and the
            # agent's heartbeat goes on (its last pong moves).
            heartbeats = set()
            answered = 0
            while time.monotonic() - held_since < HOLD - 0.5:
                started = time.monotonic()
                response = await http.post(
                    "/api/ask",
                    content=json.dumps({"content": "during the lock"}).encode(),
                    headers={"Authorization": token},
                )
                assert response.status_code == 200, response.text
                assert time.monotonic() - started < PROMPT
                listing = await connections(http, relayd)
                heartbeats.add(listing[0]["Heartbeat"])
                answered += 1
                await trio.sleep(0.1)
            assert not blocked_done.is_set(), "the blocked operation did not wait for the lock"
            assert answered >= 5
            assert len(heartbeats) >= 3, heartbeats  # pongs kept coming
            await blocked_done.wait()
            assert time.monotonic() - held_since >= HOLD - 0.2
            assert statuses == [200]
            await trio.to_thread.run_sync(holder.wait)
            nursery.cancel_scope.cancel()
