"""The smallest end-to-end proof: a real relayd, a real agent, a curl-shaped ask."""

from __future__ import annotations

import httpx
import trio

from relayd.agentkit import AgentStats, echo_handler, run_agent
from tests.support import Relayd


async def test_ask_through_a_real_agent(relayd: Relayd) -> None:
    stats = AgentStats()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_agent(
                    relayd.agent_url, echo_handler(), stats=stats, task_status=task_status
                )
            )
            async with httpx.AsyncClient(base_url=relayd.url) as client:
                # The seed's curl shape: raw Authorization, no Content-Type.
                response = await client.post(
                    "/api/ask",
                    content=b'{"content": "hello"}',
                    headers={"Authorization": relayd.admin_key},
                )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["content"] == "echo:hello"
            assert body["error"] == ""
            assert stats.requests == 1
            nursery.cancel_scope.cancel()
    assert relayd.stop() == 0
