"""Every string JSON can carry, through a real relayd, on both HTTP paths.

JSON's ``\\uXXXX`` escapes can spell a lone surrogate (``"\\ud800"``): legal
JSON, decoded by Python into a ``str``, but not Unicode. Before the security
fix such a string in ``content`` or ``parent_id`` failed only when relayd
encoded the agent's frame, after it had taken the agent's slot, and the slot
was never given back (``inflight`` 1 of 1 for good). Now it is a 400 naming
the field, at the door, on every route that takes JSON. Every other string
JSON can carry (NUL, U+FFFF, U+FFFE, a BOM, astral characters, surrogate
pairs, the six characters ``\\ud800`` spelled with an escaped backslash, long
strings) is relayed to the agent and back intact.

The property runs against one relayd and one agent for all its examples, so
that a slot leaked by any example shows: after every example,
``/api/connections`` must list the same agent with nothing in flight.
Hypothesis runs in a worker thread and hands each example to the test's Trio
loop (``trio.from_thread.run``), where the agent and the HTTP client live.

The paths: a connection whose first request is a plain ``POST /api/ask`` is
served by relayd's own wire loop; one whose ask has a chunked body, or comes
after a ``GET /health``, is Hypercorn's. Which one served is read from
relayd's debug log (see ``send_ask``). Everything is on 127.0.0.1 and every
wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

from relayd.agentkit import AgentStats, serve_agent
from relayd.protocol import Request
from tests.raw_http import Response
from tests.support import Relayd
from tests.test_ask_wire_e2e import HEALTH, ask_request, open_connection
from tests.test_relay_e2e import client, connections, raw_handshake, wait_for_agents

MAX_CONTENT = 256 * 1024  # requests.max_content's default
# Room for bodies of escaped long strings, and for an agent frame that escapes
# them once more: the limits are not what the property is about.
BIG = 16 * 1024 * 1024
PROPERTY_CONFIG = f"""
[server]
max_body = "{BIG}B"
log_level = "debug"
[agents]
max_message = "{BIG}B"
[requests]
queue_timeout = "2s"
timeout = "20s"
"""
# Capacity 1 (agents.max_inflight's default): one leaked slot and the agent is gone.
SMALL_CONFIG = '[server]\nlog_level = "debug"\n[requests]\nqueue_timeout = "2s"\ntimeout = "10s"\n'
# A request left in flight shows as a 504 within 2 s.
SHORT_TIMEOUT_CONFIG = (
    '[server]\nlog_level = "debug"\n[requests]\nqueue_timeout = "1s"\ntimeout = "2s"\n'
)
EXAMPLES_PER_PATH = 50
LONE_SURROGATE = "holds a lone surrogate"
BOM = b"\xef\xbb\xbf"


# -- an echo agent that keeps what it was sent ---------------------------------------------


@dataclass
class EchoAgent:
    """agentkit's serve_agent on a trio-websocket connection that takes big frames;
    answers ``echo:<content>`` and keeps every request."""

    requests: list[Request] = field(default_factory=list)
    stats: AgentStats = field(default_factory=AgentStats)
    id: str = ""

    @property
    def contents(self) -> list[str]:
        return [request.content for request in self.requests]

    async def handle(self, request: Request) -> tuple[str, str, str]:
        self.requests.append(request)
        conversation = request.conversation_id or str(uuid.uuid4())
        return str(uuid.uuid4()), conversation, "echo:" + request.content

    async def run(self, url: str, *, task_status: trio.TaskStatus[str]) -> None:
        async with open_websocket_url(url, max_message_size=BIG, message_queue_size=16) as ws:
            await serve_agent(ws, self.handle, stats=self.stats, task_status=task_status)


async def start_echo(nursery: trio.Nursery, http: httpx.AsyncClient, relayd: Relayd) -> EchoAgent:
    agent = EchoAgent()
    agent.id = await nursery.start(agent.run, relayd.agent_url)
    await wait_for_agents(http, relayd, ids={agent.id})
    return agent


async def assert_idle(http: httpx.AsyncClient, relayd: Relayd, agent_ids: set[str]) -> None:
    """Every agent in ``agent_ids`` still connected, none with a request in flight.

    A slot is released as the reply arrives, before the client's answer is
    written, so this normally holds at the first look; it is polled for up to
    2 s all the same, and then fails with the listing.
    """
    listing: list[dict[str, Any]] = []
    with trio.move_on_after(2):
        while True:
            listing = await connections(http, relayd)
            if {entry["Id"] for entry in listing} == agent_ids and all(
                entry["inflight"] == 0 for entry in listing
            ):
                return
            await trio.sleep(0.02)
    raise AssertionError(f"a slot leaked, or an agent went: {listing}\nlog:\n{relayd.log[-4000:]}")


# -- the two paths ---------------------------------------------------------------------------

HYPERCORN_WAYS = ("after-health", "chunked")


def chunked_ask(relayd: Relayd, raw: bytes) -> bytes:
    """``POST /api/ask`` with a chunked body (in two chunks, when it has two bytes):
    never relayd's wire path."""
    middle = len(raw) // 2
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (raw[:middle], raw[middle:]) if piece
    )
    return (
        b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\n"
        b"Authorization: " + relayd.admin_key.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    )


# relayd's debug line for a connection its own loop serves (relayd/front/ask_wire.py).
WIRE_PATH_LOG = "connection served on the wire path: remote="


async def send_ask(relayd: Relayd, raw: bytes, path: str) -> Response:
    """``raw`` POSTed to /api/ask on a fresh connection, on ``path`` ("wire",
    "after-health" or "chunked"), with the admin key.

    Which loop served the connection is checked in relayd's debug log (the
    config must say ``log_level = "debug"``): the two paths are meant to answer
    alike, byte for byte, so the response cannot tell.
    """
    connection = await open_connection(relayd)
    assert isinstance(connection.stream, trio.SocketStream)
    host, port = connection.stream.socket.getsockname()[:2]
    served_on_wire = f"{WIRE_PATH_LOG}{host}:{port}\n"
    before = relayd.log.count(served_on_wire)
    try:
        if path == "wire":
            await connection.send(ask_request(relayd, raw))
        elif path == "after-health":
            await connection.send(HEALTH + ask_request(relayd, raw))
            health = await connection.response()
            assert (health.status, health.body) == (200, b"OK")
        else:
            assert path == "chunked", path
            await connection.send(chunked_ask(relayd, raw))
        response = await connection.response()
    finally:
        await connection.aclose()
    assert relayd.log.count(served_on_wire) - before == (path == "wire"), (path, port)
    return response


# -- strings -----------------------------------------------------------------------------------


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def holds_lone_surrogate(value: object) -> bool:
    """Whether any string in a decoded JSON value, key or value at any depth, is not Unicode."""
    if isinstance(value, str):
        return not is_unicode(value)
    if isinstance(value, dict):
        return any(
            holds_lone_surrogate(key) or holds_lone_surrogate(item) for key, item in value.items()
        )
    if isinstance(value, list):
        return any(holds_lone_surrogate(item) for item in value)
    return False


# Strings JSON carries that are Unicode: relayed intact.
CLEAN = [
    "\x00",
    "\x00\x00",
    "\x1f\x7f",
    "\uffff",
    "\ufffe",
    "\ufeff",  # a BOM
    "\U0001f600",
    "\U0010ffff",
    "\ud83d\ude00",  # a pair of code points: JSON escapes it as a pair, which decodes to one
    "\\ud800",  # backslash, then "ud800": six characters, no surrogate
    "\\\\ud800",
    "\\u0000",
    '"',
    "\\",
    "\u2028\u2029",
]
# Lone surrogates, high and low, alone or in twos that are not a pair.
DIRTY = ["\ud800", "\udbff", "\udc00", "\udfff", "\udc00\ud800", "\ud800\ud800", "\udfff\udfff"]
# Every code point but the surrogates, and the surrogates.
unicode_text = st.text(st.characters(), max_size=6)
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
clean_strings = st.lists(unicode_text | st.sampled_from(CLEAN), max_size=4).map("".join)
lone = st.sampled_from(DIRTY) | surrogates


def inserted(text: str, bad: str, position: int) -> str:
    """``bad`` put into ``text`` at ``position`` (modulo its length): first, last or inside."""
    position %= len(text) + 1
    return text[:position] + bad + text[position:]


def repeated(piece: str, length: int) -> str:
    return (piece * (length // len(piece) + 1))[:length]


dirty_strings = st.builds(inserted, clean_strings, lone, st.integers(0, 1000))
# 20,000 to 100,000 characters: up to about 400 KB of UTF-8, over max_content at times.
long_clean = st.builds(repeated, clean_strings.filter(bool), st.integers(20_000, 100_000))
long_dirty = st.builds(inserted, long_clean, lone, st.integers(0, 100_000))


@st.composite
def strings(draw: st.DrawFn, dirty: int = 2, long: int = 1) -> str:
    """A string, of every kind JSON can carry: of ten draws, ``dirty`` hold a lone
    surrogate and ``long`` are long (one in ten of those long and dirty)."""
    kind = draw(st.integers(0, 9))
    if kind < long:
        return draw(long_dirty if draw(st.integers(0, 9)) == 0 else long_clean)
    return draw(dirty_strings if kind < long + dirty else clean_strings)


ABSENT = object()


@st.composite
def optional_strings(draw: st.DrawFn) -> object:
    """Mostly "not given" (absent, null, ""), so that the ask can succeed."""
    kind = draw(st.integers(0, 9))
    if kind < 6:
        return draw(st.sampled_from([ABSENT, ABSENT, None, ""]))
    return draw(strings(dirty=4, long=1))


KNOWN = {"content", "conversation_id", "parent_id"}
extra_names = st.sampled_from(["extra", "model", "messages"]) | strings(dirty=1, long=0).filter(
    lambda name: name not in KNOWN
)
extra_values = (
    strings()
    | st.lists(strings(long=0), max_size=3)
    | st.dictionaries(strings(long=0), strings(long=0), max_size=2)
    | st.integers()
    | st.none()
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """An /api/ask body: content, maybe conversation_id and parent_id, maybe an
    unknown field; in any order."""
    document: dict[str, Any] = {}
    if draw(st.integers(0, 19)) > 0:
        document["content"] = draw(strings())
    for name in ("conversation_id", "parent_id"):
        value = draw(optional_strings())
        if value is not ABSENT:
            document[name] = value
    if draw(st.integers(0, 2)) == 0:
        document[draw(extra_names)] = draw(extra_values)
    order = draw(st.permutations(list(document)))
    return {name: document[name] for name in order}


@dataclass(frozen=True)
class Expected:
    status: int
    error: str | None = None  # the error's start, when it matters


def expected_answer(decoded: dict[str, Any]) -> Expected:
    """What relayd must answer ``decoded`` (the body as relayd decodes it): the
    checks in order of the README's status table."""
    if holds_lone_surrogate(decoded):
        return Expected(400, LONE_SURROGATE)
    content = decoded.get("content")
    if not isinstance(content, str) or not content:
        return Expected(400, "content must be a non-empty string")
    if len(content.encode("utf-8")) > MAX_CONTENT:
        return Expected(413, "content is larger than requests.max_content")
    model = decoded.get("model")  # an "extra" field the ask route reads
    if model not in (None, "") and not isinstance(model, str):
        return Expected(400, "model must be a string")
    if decoded.get("conversation_id") not in (None, ""):
        return Expected(404, "unknown conversation_id")  # no such conversation
    return Expected(200)


def names_a_bad_field(error: str, decoded: dict[str, Any]) -> bool:
    """Whether ``error`` names a field of ``decoded`` that holds a lone surrogate: by
    its name (``field 'content'``, ``field 'extra'[0]``), or as a field name that is
    itself not Unicode (``a field name in the body``, ``a field name in field 'extra'``)."""
    for key, value in decoded.items():
        if not is_unicode(key) and error.startswith("a field name in the body "):
            return True
        if holds_lone_surrogate(value) and error.startswith(
            (f"field {key!r} ", f"field {key!r}[", f"a field name in field {key!r}")
        ):
            return True
    return False


# -- the property ------------------------------------------------------------------------------


async def check_example(
    relayd: Relayd,
    http: httpx.AsyncClient,
    agent: EchoAgent,
    path: str,
    raw: bytes,
    decoded: dict[str, Any],
    expected: Expected,
) -> None:
    """One example: POST ``raw`` (``decoded`` as relayd decodes it), check the answer
    against ``expected`` and what the agent got, then that no slot is left taken."""
    before = len(agent.requests)
    with trio.fail_after(30):
        response = await send_ask(relayd, raw, path)
        answer = response.json()
        assert response.status == expected.status, (response.status, answer, expected)
        if expected.status == 200:
            content = decoded["content"]
            assert answer["content"] == "echo:" + content
            assert answer["error"] == ""
            assert len(agent.requests) == before + 1
            request = agent.requests[-1]
            assert request.content == content
            assert request.conversation_id == ""
            if decoded.get("parent_id"):
                assert request.parent_id == decoded["parent_id"]
        else:
            assert set(answer) == {"error"}, answer
            assert expected.error is not None
            assert expected.error in answer["error"], answer
            if expected.error == LONE_SURROGATE:
                assert names_a_bad_field(answer["error"], decoded), (answer, decoded)
            assert len(agent.requests) == before, "a refused request reached the agent"
        await assert_idle(http, relayd, {agent.id})


def encode_body(document: dict[str, Any], ensure_ascii: bool, bom: bool) -> bytes:
    """The document as a body: escaped to ASCII, or as UTF-8 when it can be (a lone
    surrogate can only be sent escaped); with a leading BOM if ``bom``."""
    if not holds_lone_surrogate(document) and not ensure_ascii:
        raw = json.dumps(document, ensure_ascii=False).encode("utf-8")
    else:
        raw = json.dumps(document).encode("ascii")
    return BOM + raw if bom else raw


@pytest.mark.parametrize("path", ["wire", "hypercorn"])
async def test_any_json_string_is_relayed_intact_or_refused_without_leaking_a_slot(
    relayd_factory: Callable[..., Relayd], path: str
) -> None:
    relayd = relayd_factory(config=PROPERTY_CONFIG)
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_echo(nursery, http, relayd)
            outcomes: dict[str, int] = {}

            @settings(
                max_examples=EXAMPLES_PER_PATH,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(
                document=documents(),
                ensure_ascii=st.booleans(),
                bom=st.booleans(),
                way=st.sampled_from(HYPERCORN_WAYS),
            )
            @example({"content": "\ud800"}, True, False, "chunked")
            @example({"content": "x", "parent_id": "\udfff"}, True, False, "after-health")
            @example(
                {"content": "\x00\uffff\ud83d\ude00", "parent_id": "\\ud800"}, True, True, "chunked"
            )
            @example({"content": "\ufeff\U0001f600\ufffe"}, False, False, "after-health")
            @example({"content": "0" * 20_000, "model": []}, False, False, "after-health")
            def prop(document: dict[str, Any], ensure_ascii: bool, bom: bool, way: str) -> None:
                raw = encode_body(document, ensure_ascii, bom)
                decoded = json.loads(raw.removeprefix(BOM).decode("utf-8"))
                expected = expected_answer(decoded)
                outcome = f"{expected.status} {expected.error or ''}".strip()
                event(outcome)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                used = way if path == "hypercorn" else path
                trio.from_thread.run(
                    check_example, relayd, http, agent, used, raw, decoded, expected
                )

            await trio.to_thread.run_sync(prop)
            nursery.cancel_scope.cancel()
    print(f"outcomes on {path}: {outcomes}")
    # The explicit examples make sure both kinds of answer were seen.
    assert outcomes.get("200", 0) >= 2 and outcomes.get(f"400 {LONE_SURROGATE}", 0) >= 2, outcomes
    assert relayd.process.poll() is None
    log = relayd.log
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]


# -- the exact regressions ------------------------------------------------------------------

PATHS = ("wire", "after-health", "chunked")
REGRESSIONS = {
    # The body of the security report, and its parent_id twin.
    "content": b'{"content": "\\ud800"}',
    "parent_id": b'{"content": "x", "parent_id": "\\udfff"}',
    "conversation_id": b'{"content": "x", "conversation_id": "\\udbff"}',
    "nested": b'{"content": "x", "messages": [{"role": "\\udc00"}]}',
    "a field name": b'{"content": "x", "\\ud800": "y"}',
}


@pytest.mark.parametrize("path", PATHS)
async def test_the_reported_lone_surrogates_are_400_and_the_agent_answers_next(
    relayd_factory: Callable[..., Relayd], path: str
) -> None:
    relayd = relayd_factory(config=SMALL_CONFIG)
    answers: dict[str, tuple[Response, Response]] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_echo(nursery, http, relayd)
            (entry,) = await connections(http, relayd)
            assert entry["capacity"] == 1
            for name, raw in REGRESSIONS.items():
                refused = await send_ask(relayd, raw, path)
                await assert_idle(http, relayd, {agent.id})
                after = await send_ask(
                    relayd, json.dumps({"content": f"after {name}"}).encode(), path
                )
                answers[name] = refused, after
            await assert_idle(http, relayd, {agent.id})
            nursery.cancel_scope.cancel()
    for name, (refused, after) in answers.items():
        assert refused.status == 400, (name, refused)
        error = refused.json()["error"]
        assert LONE_SURROGATE in error, (name, error)
        assert after.status == 200, (name, after)
        assert after.json()["content"] == f"echo:after {name}"
    errors = {name: refused.json()["error"] for name, (refused, _) in answers.items()}
    assert errors["content"].startswith("field 'content' holds a lone surrogate")
    assert errors["parent_id"].startswith("field 'parent_id' holds a lone surrogate")
    assert errors["conversation_id"].startswith("field 'conversation_id' holds a lone surrogate")
    assert errors["nested"].startswith("field 'messages'[0]['role'] holds a lone surrogate")
    assert errors["a field name"].startswith("a field name in the body holds a lone surrogate")
    assert agent.contents == [f"after {name}" for name in REGRESSIONS]
    assert relayd.process.poll() is None


@pytest.mark.parametrize("path", PATHS)
async def test_surrogates_encoded_as_utf8_bytes_are_not_utf8(
    relayd_factory: Callable[..., Relayd], path: str
) -> None:
    """The bytes ED A0 80 (U+D800 encoded as if it were a character, as
    ``surrogatepass`` does) are not UTF-8: 400, no slot taken."""
    relayd = relayd_factory(config=SMALL_CONFIG)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_echo(nursery, http, relayd)
            refused = await send_ask(relayd, b'{"content": "\xed\xa0\x80"}', path)
            await assert_idle(http, relayd, {agent.id})
            after = await send_ask(relayd, b'{"content": "after"}', path)
            nursery.cancel_scope.cancel()
    assert refused.status == 400
    assert refused.json() == {"error": "the request body is not UTF-8"}
    assert after.status == 200
    assert agent.contents == ["after"]


# -- strings that look like surrogates, or are next to them, pass intact ------------------------

INTACT = {
    "nul": "\x00",
    "nuls": "a\x00b\x00",
    "uffff": "\uffff",
    "ufffe": "\ufffe",
    "bom": "\ufeffhello",
    "astral": "\U0001f600",
    "last code point": "\U0010ffff",
    "escaped backslash then ud800": "\\ud800",
    "two escaped backslashes then ud800": "\\\\ud800",
    "line separators": "\u2028\u2029",
    "long": repeated("ab\x00\uffff\U0001f600\\ud800", 100_000),
}


@pytest.mark.parametrize("path", PATHS)
async def test_strings_json_can_carry_are_relayed_intact(
    relayd_factory: Callable[..., Relayd], path: str
) -> None:
    relayd = relayd_factory(config=SMALL_CONFIG)
    escaped: dict[str, Response] = {}
    as_utf8: dict[str, Response] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_echo(nursery, http, relayd)
            for name, text in INTACT.items():
                document = {"content": text, "parent_id": text, "extra": [text]}
                escaped[name] = await send_ask(relayd, json.dumps(document).encode(), path)
                raw = json.dumps(document, ensure_ascii=False).encode()
                as_utf8[name] = await send_ask(relayd, raw, path)
                await assert_idle(http, relayd, {agent.id})
            # The surrogate pair spelled as two escapes is one astral character.
            pair = await send_ask(relayd, b'{"content": "\\ud83d\\ude00"}', path)
            nursery.cancel_scope.cancel()
    for name, text in INTACT.items():
        for response in (escaped[name], as_utf8[name]):
            assert response.status == 200, (name, response)
            assert response.json()["content"] == "echo:" + text, name
    assert pair.status == 200
    assert pair.json()["content"] == "echo:\U0001f600"
    expected = [text for text in INTACT.values() for _ in range(2)] + ["\U0001f600"]
    assert agent.contents == expected
    assert [request.parent_id for request in agent.requests[:-1]] == expected[:-1]


# -- the admin routes -------------------------------------------------------------------------


async def test_admin_routes_refuse_lone_surrogates(relayd: Relayd) -> None:
    key = relayd.admin_key
    bearer = {"Authorization": f"Bearer {key}"}
    with trio.fail_after(20):
        async with client(relayd) as http:
            added = await http.post(
                "/admin/users/add", content=b'{"admin_key": "%s", "name": "\\ud800"}' % key.encode()
            )
            added_by_header = await http.post(
                "/admin/users/add", content=b'{"name": "alice\\udfff"}', headers=bearer
            )
            nested = await http.post(
                "/admin/users/add", content=b'{"name": "bob", "x": {"\\udc00": 1}}', headers=bearer
            )
            bad_key = await http.post("/admin/users/add", content=b'{"admin_key": "\\ud800"}')
            real = await http.post("/admin/users/add", content=b'{"name": "carol"}', headers=bearer)
            user_id = real.json()["user_id"]
            deleted = await http.post(
                "/admin/users/delete",
                content=b'{"admin_key": "%s", "user_id": "\\ud800"}' % key.encode(),
            )
            deleted_by_header = await http.post(
                "/admin/users/delete",
                content=json.dumps({"user_id": user_id}).encode()[:-1] + b', "z": "\\udbff"}',
                headers=bearer,
            )
            users = await http.get("/admin/users", headers=bearer)
    for response in (added, added_by_header, nested, bad_key, deleted, deleted_by_header):
        assert response.status_code == 400, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert LONE_SURROGATE in response.json()["error"], response.text
    assert added.json()["error"].startswith("field 'name' ")
    assert added_by_header.json()["error"].startswith("field 'name' ")
    assert nested.json()["error"].startswith("a field name in field 'x' ")
    assert bad_key.json()["error"].startswith("field 'admin_key' ")
    assert deleted.json()["error"].startswith("field 'user_id' ")
    assert deleted_by_header.json()["error"].startswith("field 'z' ")
    assert real.status_code == 200
    # Nothing was added but carol, and carol was not deleted.
    assert [user["name"] for user in users.json()["users"]] == ["carol"]
    log = relayd.log
    assert "Traceback" not in log and " ERROR " not in log, log


# -- an agent that replies with a lone surrogate ----------------------------------------------

Frames = Callable[[str, dict[str, str]], list[str]]


def honest_reply(frame_id: str, request: dict[str, str]) -> str:
    data = {
        "response_id": str(uuid.uuid4()),
        "conversation_id": request["conversation_id"] or str(uuid.uuid4()),
        "content": "ok:" + request["content"],
    }
    return json.dumps({"id": frame_id, "message": "ChatGptResponse", "data": json.dumps(data)})


def honest(frame_id: str, request: dict[str, str]) -> list[str]:
    return [honest_reply(frame_id, request)]


def in_data_field(name: str) -> Frames:
    """A ChatGptResponse whose data (a JSON text) escapes a lone surrogate in
    ``name``: what a browser agent's ``JSON.stringify`` makes of a reply whose text
    was cut in the middle of a surrogate pair."""

    def frames(frame_id: str, request: dict[str, str]) -> list[str]:
        data = {"response_id": str(uuid.uuid4()), "conversation_id": str(uuid.uuid4())}
        data["content"] = "ok"
        data[name] = data[name] + "\ud83d"  # the first half of an emoji
        reply = {"id": frame_id, "message": "ChatGptResponse", "data": json.dumps(data)}
        return [json.dumps(reply)]

    return frames


def in_frame(kind: str) -> Frames:
    """A frame of ``kind`` for the request whose own ``data`` string holds a lone
    surrogate: an ``error`` frame's data is the error's text, so an agent that puts
    a truncated text there sends exactly this."""

    def frames(frame_id: str, request: dict[str, str]) -> list[str]:
        return [json.dumps({"id": frame_id, "message": kind, "data": "failed: \ud83d"})]

    return frames


def garbage_then_honest(frame_id: str, request: dict[str, str]) -> list[str]:
    """Frames with lone surrogates where no request is named (dropped, each a
    protocol error, but the last two: pongs with a lone surrogate in a field relayd
    never reads, and so never encodes again either), then the honest reply."""
    garbage = [
        {"id": "\ud800", "message": "ChatGptResponse", "data": "{}"},
        {"id": frame_id + "\udc00", "message": "ChatGptResponse", "data": "{}"},
        {"id": "p", "message": "pong\udfff", "data": ""},
        {"id": "p", "message": "pong", "data": "\ud800"},
        {"\ud800": "key", "id": "p", "message": "pong", "data": ""},
    ]
    return [json.dumps(frame) for frame in garbage] + honest(frame_id, request)


@dataclass
class RawAgent:
    """A trio-websocket agent that answers the first request with the frames of
    ``first`` and the rest honestly; keeps the requests' data and how its socket closed."""

    first: Frames
    seen: list[dict[str, str]] = field(default_factory=list)
    close_code: int | None = None

    async def run(self, url: str, *, task_status: trio.TaskStatus[str]) -> None:
        async with open_websocket_url(url) as ws:
            task_status.started(await raw_handshake(ws))
            try:
                while True:
                    frame = json.loads(await ws.get_message())
                    if frame["message"] == "ping":
                        pong = {"id": frame["id"], "message": "pong", "data": ""}
                        await ws.send_message(json.dumps(pong))
                    elif frame["message"] == "ChatGptRequest":
                        request = json.loads(frame["data"])
                        self.seen.append(request)
                        answer = self.first if len(self.seen) == 1 else honest
                        for text in answer(frame["id"], request):
                            await ws.send_message(text)
            except ConnectionClosed as closed:
                self.close_code = closed.reason.code if closed.reason else None


async def ask_raw_agent(relayd: Relayd, agent: RawAgent) -> tuple[Response, Response]:
    """Two asks, one after the other, to ``agent`` alone; the slot must be free after each."""
    async with trio.open_nursery() as nursery, client(relayd) as http:
        agent_id = await nursery.start(agent.run, relayd.agent_url)
        await wait_for_agents(http, relayd, ids={agent_id})
        first = await send_ask(relayd, b'{"content": "first"}', "wire")
        await assert_idle(http, relayd, {agent_id})
        second = await send_ask(relayd, b'{"content": "second"}', "wire")
        await assert_idle(http, relayd, {agent_id})
        nursery.cancel_scope.cancel()
    return first, second


@pytest.mark.parametrize("name", ["content", "response_id", "conversation_id"])
async def test_a_reply_with_a_lone_surrogate_is_a_502_and_frees_the_slot(
    relayd_factory: Callable[..., Relayd], name: str
) -> None:
    """A reply whose data holds a lone surrogate is a malformed reply: the agent
    failed the request. The only agent has been tried, so 502; the slot is back at
    once and the agent (still connected) answers the next request."""
    relayd = relayd_factory(config=SMALL_CONFIG)
    agent = RawAgent(in_data_field(name))
    with trio.fail_after(30):
        failed, after = await ask_raw_agent(relayd, agent)
    assert failed.status == 502, failed
    error = failed.json()["error"]
    assert "malformed reply" in error and LONE_SURROGATE in error, error
    assert after.status == 200, after
    assert after.json()["content"] == "ok:second"
    assert [request["content"] for request in agent.seen] == ["first", "second"]
    assert agent.close_code is None
    assert relayd.process.poll() is None
    log = relayd.log
    assert "Traceback" not in log and " ERROR " not in log, log


async def test_frames_with_lone_surrogates_naming_no_request_are_dropped(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config=SMALL_CONFIG)
    agent = RawAgent(garbage_then_honest)
    with trio.fail_after(30):
        first, second = await ask_raw_agent(relayd, agent)
    assert first.status == second.status == 200
    assert first.json()["content"] == "ok:first"
    assert agent.close_code is None
    log = relayd.log
    assert log.count("agent protocol error, frame dropped") == 3, log
    for name in ("id", "id", "message"):
        assert f"frame field {name!r} holds a lone surrogate: not Unicode" in log, log
    assert "Traceback" not in log and " ERROR " not in log, log


# A ChatGptResponse or error frame for a request in flight whose own data string
# holds a lone surrogate still ends that request: at once, as a malformed reply
# (502), and its slot is freed. (Dropping the frame whole, as the first version
# of the security fix did, kept the request in flight until requests.timeout and
# the agent's slot taken for good: the agent has answered and will never send
# that id again.) An error frame's data is the error's text, so an agent whose
# error text was cut inside a surrogate pair does exactly this.
@pytest.mark.parametrize("kind", ["ChatGptResponse", "error"])
async def test_a_reply_frame_whose_data_string_is_not_unicode_fails_and_frees_the_slot(
    relayd_factory: Callable[..., Relayd], kind: str
) -> None:
    relayd = relayd_factory(config=SHORT_TIMEOUT_CONFIG)
    agent = RawAgent(in_frame(kind))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent_id = await nursery.start(agent.run, relayd.agent_url)
            await wait_for_agents(http, relayd, ids={agent_id})
            failed = await send_ask(relayd, b'{"content": "first"}', "wire")
            listing = await connections(http, relayd)
            nursery.cancel_scope.cancel()
    # As it is: 504 after requests.timeout, and [1] (the slot held for good).
    assert (failed.status, [entry["inflight"] for entry in listing]) == (502, [0]), (
        failed,
        listing,
    )
