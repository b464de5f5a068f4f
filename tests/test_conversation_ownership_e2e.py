"""Conversations belong to the user who started them and the agent that holds
them, end to end: a real relayd subprocess, two users made with the admin API,
an honest agent and a rogue one (both real trio-websocket agents).

The rogue agent answers an attacker's new question with the id of the victim's
conversation (or of one of its turns), which it was told. Before the security
fix relayd believed it and moved the victim's conversation, and with it every
later turn's content, to the rogue. Now the reply is the attacker's answer and
nothing more: the conversation stays where it was, relayd logs the agent as
misbehaving (its id and the user, never the content), and a client that names
another user's turn as its ``parent_id`` gets 403.

Where each question goes is made certain, not left to the pool's tie-breaking:
the victim's first turn is asked while the honest agent is the only one, and
the attacker's while the honest agent is busy with a request it holds until the
test lets it go. Everything is on 127.0.0.1 and every wait is bounded by
``trio.fail_after``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from relayd.protocol import Request
from tests.support import Relayd
from tests.test_relay_e2e import client, connections, start_agent, wait_for_agents

HOLD = "hold this slot"


@dataclass
class User:
    user_id: str
    token: str


async def add_user(http: httpx.AsyncClient, relayd: Relayd, name: str) -> User:
    response = await http.post(
        "/admin/users/add", content=json.dumps({"admin_key": relayd.admin_key, "name": name})
    )
    assert response.status_code == 200, response.text
    document = response.json()
    return User(document["user_id"], document["token"])


async def ask(http: httpx.AsyncClient, who: User | str, **body: Any) -> httpx.Response:
    """POST /api/ask as ``who`` (a user's token as ``Bearer``, or the admin key raw)."""
    authorization = f"Bearer {who.token}" if isinstance(who, User) else who
    return await http.post(
        "/api/ask", content=json.dumps(body).encode(), headers={"Authorization": authorization}
    )


@dataclass
class Honest:
    """Echoes, keeping the conversation (a fresh uuid for a new one); holds the
    slot on ``HOLD`` until ``release`` is set."""

    requests: list[Request] = field(default_factory=list)
    holding: trio.Event = field(default_factory=trio.Event)
    release: trio.Event = field(default_factory=trio.Event)

    async def handle(self, request: Request) -> tuple[str, str, str]:
        self.requests.append(request)
        if request.content == HOLD:
            self.holding.set()
            await self.release.wait()
        conversation = request.conversation_id or str(uuid.uuid4())
        return str(uuid.uuid4()), conversation, "echo:" + request.content


@dataclass
class Rogue:
    """Answers every question, naming the conversation and the response it was told
    to claim (its own fresh ids for what it was not told)."""

    conversation_id: str = ""
    response_id: str = ""
    requests: list[Request] = field(default_factory=list)

    async def handle(self, request: Request) -> tuple[str, str, str]:
        self.requests.append(request)
        response_id = self.response_id or str(uuid.uuid4())
        conversation_id = self.conversation_id or request.conversation_id or str(uuid.uuid4())
        return response_id, conversation_id, "rogue:" + request.content


@dataclass
class Scene:
    relayd: Relayd
    http: httpx.AsyncClient
    victim: User
    attacker: User
    honest: Honest
    honest_id: str
    rogue: Rogue
    rogue_id: str
    first: dict[str, Any]  # the victim's first turn, answered by the honest agent
    secret: str  # its content


async def set_the_scene(
    nursery: trio.Nursery, relayd: Relayd, http: httpx.AsyncClient, rogue: Rogue
) -> Scene:
    """Two users; the victim's first turn on the honest agent; then the honest agent
    busy (holding a request of the admin's) and the rogue connected, so that the
    next new question can only go to the rogue."""
    victim = await add_user(http, relayd, "victim")
    attacker = await add_user(http, relayd, "attacker")
    honest = Honest()
    honest_agent = await start_agent(nursery, relayd.agent_url, honest.handle)
    await wait_for_agents(http, relayd, ids={honest_agent.id})
    secret = f"the victim's secret {uuid.uuid4()}"
    response = await ask(http, victim, content=secret)
    assert response.status_code == 200, response.text
    first = response.json()

    async def hold() -> None:
        held = await ask(http, relayd.admin_key, content=HOLD)
        assert held.status_code == 200, held.text

    nursery.start_soon(hold)
    await honest.holding.wait()
    rogue_agent = await start_agent(nursery, relayd.agent_url, rogue.handle)
    await wait_for_agents(http, relayd, ids={honest_agent.id, rogue_agent.id})
    return Scene(
        relayd,
        http,
        victim,
        attacker,
        honest,
        honest_agent.id,
        rogue,
        rogue_agent.id,
        first,
        secret,
    )


async def release_the_honest_agent(scene: Scene) -> None:
    """Let the held request go, and wait until the honest agent is free again."""
    scene.honest.release.set()
    while True:
        listing = {entry["Id"]: entry for entry in await connections(scene.http, scene.relayd)}
        if listing[scene.honest_id]["inflight"] == 0:
            return
        await trio.sleep(0.02)


def conversations_by_agent(listing: list[dict[str, Any]]) -> dict[str, int]:
    return {entry["Id"]: entry["conversations"] for entry in listing}


async def wait_for_log(relayd: Relayd, text: str) -> None:
    """Poll relayd's log (bounded by the caller's fail_after) until it contains ``text``."""
    while True:
        if text in relayd.log:
            return
        await trio.sleep(0.02)


def misbehaving(agent_id: str, user: User, problem: str) -> str:
    return f"agent misbehaving: agent-{agent_id[:8]} replied for user={user.user_id}: {problem}"


# -- a rogue conversation_id -----------------------------------------------------------------


async def test_a_rogue_agent_cannot_take_another_users_conversation(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory()
    rogue = Rogue()
    question = f"the attacker's question {uuid.uuid4()}"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            scene = await set_the_scene(nursery, relayd, http, rogue)
            victim, attacker, first = scene.victim, scene.attacker, scene.first
            rogue.conversation_id = first["conversation_id"]
            stolen = await ask(http, attacker, content=question)
            problem = "its conversation_id is held by another agent; not recorded"
            await wait_for_log(relayd, misbehaving(scene.rogue_id, attacker, problem))
            await release_the_honest_agent(scene)
            # The attacker cannot continue the victim's conversation either.
            continued = await ask(
                http, attacker, content="and then?", conversation_id=first["conversation_id"]
            )
            # Nor branch from the victim's turn.
            branched = await ask(
                http, attacker, content="from your turn", parent_id=first["response_id"]
            )
            listing = await connections(http, relayd)
            # The victim's next turn: still the honest agent's.
            second_secret = f"the victim's second secret {uuid.uuid4()}"
            second = await ask(
                http,
                victim,
                content=second_secret,
                conversation_id=first["conversation_id"],
                parent_id=first["response_id"],
            )
            third = await ask(
                http, victim, content="third turn", conversation_id=first["conversation_id"]
            )
            nursery.cancel_scope.cancel()
    # The attacker got the rogue's answer, which names the conversation it claimed.
    assert stolen.status_code == 200, stolen.text
    assert stolen.json()["content"] == "rogue:" + question
    assert continued.status_code == 404, continued.text
    assert continued.json() == {"error": "unknown conversation_id"}
    assert branched.status_code == 403, branched.text
    assert branched.json() == {"error": "parent_id is a turn of a conversation that is not yours"}
    # Nothing moved: the honest agent holds the victim's conversation (and the
    # admin's held one), the rogue none.
    assert conversations_by_agent(listing) == {scene.honest_id: 2, scene.rogue_id: 0}
    assert second.status_code == 200, second.text
    assert second.json()["content"] == "echo:" + second_secret
    assert second.json()["conversation_id"] == first["conversation_id"]
    assert third.status_code == 200, third.text
    honest_turns = [r for r in scene.honest.requests if r.content != HOLD]
    assert [r.content for r in honest_turns] == [scene.secret, second_secret, "third turn"]
    assert honest_turns[1].conversation_id == first["conversation_id"]
    assert honest_turns[1].parent_id == first["response_id"]
    assert honest_turns[2].parent_id == second.json()["response_id"]
    # The rogue saw the attacker's question only: none of the victim's content.
    assert [r.content for r in rogue.requests] == [question]
    log = relayd.log
    assert log.count("agent misbehaving") == 1, log
    for content in (question, scene.secret, second_secret):
        assert content not in log, content


# -- a rogue response_id ---------------------------------------------------------------------


async def test_a_rogue_agent_cannot_claim_another_users_turn(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory()
    rogue = Rogue()
    question = f"the attacker's question {uuid.uuid4()}"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            scene = await set_the_scene(nursery, relayd, http, rogue)
            victim, attacker, first = scene.victim, scene.attacker, scene.first
            rogue.response_id = first["response_id"]
            claimed = await ask(http, attacker, content=question)
            problem = "its response_id is a turn held by another agent; turn not recorded"
            await wait_for_log(relayd, misbehaving(scene.rogue_id, attacker, problem))
            await release_the_honest_agent(scene)
            own_conversation = claimed.json()["conversation_id"]
            # The victim's turn is still the victim's: the attacker may not name it,
            # in a new conversation or in the one the rogue gave it.
            branched = await ask(http, attacker, content="branch", parent_id=first["response_id"])
            in_own = await ask(
                http,
                attacker,
                content="in my own conversation",
                conversation_id=own_conversation,
                parent_id=first["response_id"],
            )
            # The victim continues from it, on the honest agent.
            second = await ask(
                http,
                victim,
                content="second turn",
                conversation_id=first["conversation_id"],
                parent_id=first["response_id"],
            )
            listing = await connections(http, relayd)
            nursery.cancel_scope.cancel()
    assert claimed.status_code == 200, claimed.text
    assert claimed.json()["content"] == "rogue:" + question
    assert claimed.json()["response_id"] == first["response_id"]
    assert own_conversation != first["conversation_id"]
    for refused in (branched, in_own):
        assert refused.status_code == 403, refused.text
        assert refused.json() == {
            "error": "parent_id is a turn of a conversation that is not yours"
        }
    assert second.status_code == 200, second.text
    assert second.json()["content"] == "echo:second turn"
    assert second.json()["conversation_id"] == first["conversation_id"]
    # The attacker's own conversation is recorded, on the rogue: only its turn is not.
    assert conversations_by_agent(listing) == {scene.honest_id: 2, scene.rogue_id: 1}
    assert [r.content for r in scene.honest.requests] == [scene.secret, HOLD, "second turn"]
    assert scene.honest.requests[2].parent_id == first["response_id"]
    assert [r.content for r in rogue.requests] == [question]
    log = relayd.log
    assert log.count("agent misbehaving") == 1, log
    assert question not in log and scene.secret not in log


# -- parent_id checks, with honest agents only -------------------------------------------------


async def test_parent_ids_of_turns_that_are_not_yours(relayd: Relayd) -> None:
    """Another user's turn as parent_id: 403, for a new conversation or a continued
    one, before any agent sees the question; the admin key may use any turn. In a
    continued conversation, a turn of another conversation (even one's own): 400."""
    honest = Honest()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            victim = await add_user(http, relayd, "victim")
            attacker = await add_user(http, relayd, "attacker")
            agent = await start_agent(nursery, relayd.agent_url, honest.handle)
            await wait_for_agents(http, relayd, ids={agent.id})
            theirs = (await ask(http, victim, content="victim one")).json()
            other = (await ask(http, victim, content="victim two")).json()
            mine = (await ask(http, attacker, content="attacker one")).json()
            answers = {
                "new, another user's turn": await ask(
                    http, attacker, content="x1", parent_id=theirs["response_id"]
                ),
                "continued, another user's turn": await ask(
                    http,
                    attacker,
                    content="x2",
                    conversation_id=mine["conversation_id"],
                    parent_id=theirs["response_id"],
                ),
                "continued, own other conversation's turn": await ask(
                    http,
                    victim,
                    content="x3",
                    conversation_id=theirs["conversation_id"],
                    parent_id=other["response_id"],
                ),
                "new, own turn": await ask(
                    http, victim, content="branch", parent_id=theirs["response_id"]
                ),
                "admin, another user's turn": await ask(
                    http, relayd.admin_key, content="admin", parent_id=theirs["response_id"]
                ),
                "admin, continued": await ask(
                    http,
                    relayd.admin_key,
                    content="admin continues",
                    conversation_id=theirs["conversation_id"],
                    parent_id=theirs["response_id"],
                ),
                "unknown parent_id": await ask(
                    http, attacker, content="unknown", parent_id=str(uuid.uuid4())
                ),
            }
            nursery.cancel_scope.cancel()
    statuses = {name: response.status_code for name, response in answers.items()}
    assert statuses == {
        "new, another user's turn": 403,
        "continued, another user's turn": 403,
        "continued, own other conversation's turn": 400,
        "new, own turn": 200,
        "admin, another user's turn": 200,
        "admin, continued": 200,
        "unknown parent_id": 200,
    }, {name: response.text for name, response in answers.items()}
    not_yours = {"error": "parent_id is a turn of a conversation that is not yours"}
    assert answers["new, another user's turn"].json() == not_yours
    assert answers["continued, another user's turn"].json() == not_yours
    assert answers["continued, own other conversation's turn"].json() == {
        "error": "parent_id is a turn of another conversation"
    }
    # The refused questions never reached the agent.
    assert [r.content for r in honest.requests] == [
        "victim one",
        "victim two",
        "attacker one",
        "branch",
        "admin",
        "admin continues",
        "unknown",
    ]
    assert "agent misbehaving" not in relayd.log
