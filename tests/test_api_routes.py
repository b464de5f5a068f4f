"""The HTTP routes, through Quart's test client, on a hand-built RelayState.

No agent ever connects here: ``/api/ask`` is tested up to the dispatcher's
"no agent connected" answer. Every error must be ``{"error": ...}`` JSON with
the status that says what happened (docs: compat.md, "Deliberate differences").
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from relayd.api import STATUS, create_app, create_asgi_app, status_of
from relayd.config import Config, parse_config
from relayd.daemon import assemble
from relayd.errors import (
    AgentFailed,
    AgentTimeout,
    BadRequest,
    ConversationAgentGone,
    Forbidden,
    NoAgent,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    QueueTimeout,
    RateLimited,
    RequestTimeout,
    ShuttingDown,
    Unauthorized,
    UnknownConversation,
)
from relayd.locate import AdminKey
from relayd.state import RelayState, Snapshot, load_agent_keys
from relayd.users import UserStore

ADMIN_KEY = "the-real-admin-key-d2f1e0"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def make_state(tmp_path: Path, config: Config | None = None) -> RelayState:
    config = config or parse_config({})
    store = UserStore(tmp_path)
    state, _ = assemble(
        Snapshot(config, store.load(), load_agent_keys(config)),
        admin=AdminKey.of(ADMIN_KEY, "test"),
        store=store,
        state_dir=tmp_path,
    )
    return state


def client_for(state: RelayState) -> httpx.AsyncClient:
    """The whole server's ASGI app (Quart routes and the bare /api/ask), in process."""
    transport = httpx.ASGITransport(app=create_asgi_app(state))
    return httpx.AsyncClient(transport=transport, base_url="http://relayd.test")


@pytest.fixture
def state(tmp_path: Path) -> RelayState:
    return make_state(tmp_path)


@pytest.fixture
async def client(state: RelayState) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(state) as client:
        yield client


def body_of(response: httpx.Response) -> Any:
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    return json.loads(response.text)


async def expect_error(response: httpx.Response, status: int, fragment: str) -> str:
    """Assert ``status`` and an ``{"error": ...}`` body containing ``fragment``."""
    text = response.text
    assert response.status_code == status, text
    body = body_of(response)
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str)
    assert fragment in body["error"], body
    return text


async def add_user(client: httpx.AsyncClient, name: str | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {"admin_key": ADMIN_KEY}
    if name is not None:
        document["name"] = name
    response = await client.post("/admin/users/add", content=json.dumps(document))
    assert response.status_code == 200, response.text
    result: dict[str, Any] = body_of(response)
    return result


# -- health and the unknown ------------------------------------------------------------


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.text == "OK"
    assert response.headers["Content-Type"].startswith("text/plain")


async def test_index_names_relayd(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert (body_of(response))["name"] == "relayd"


async def test_unknown_route_is_404_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/no/such/route")
    await expect_error(response, 404, "no route /no/such/route")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/api/ask", "POST"),
        ("GET", "/admin/users/add", "POST"),
        ("GET", "/admin/users/delete", "POST"),
        ("POST", "/admin/users", "GET"),
        ("POST", "/health", "GET"),
        ("DELETE", "/api/connections", "GET"),
        ("PUT", "/api/ask", "POST"),
    ],
)
async def test_wrong_method_is_405_json(
    client: httpx.AsyncClient, method: str, path: str, allowed: str
) -> None:
    response = await client.request(method, path)
    await expect_error(response, 405, f"method {method} not allowed on {path}")
    assert allowed in response.headers["Allow"]


# -- admin authentication ------------------------------------------------------------------


async def test_add_with_key_in_body(client: httpx.AsyncClient, state: RelayState) -> None:
    body = await add_user(client)
    assert UUID_RE.match(body["user_id"])
    assert re.match(r"^[A-Za-z0-9_-]{43}$", body["token"])
    assert body["name"] is None
    assert state.users.authenticate(body["token"]) is not None
    assert state.store.load().authenticate(body["token"]) is not None
    assert body["token"] not in state.store.path.read_text()


async def test_add_with_name(client: httpx.AsyncClient, state: RelayState) -> None:
    body = await add_user(client, "alice")
    assert body["name"] == "alice"
    assert state.store.load().find(body["user_id"]).name == "alice"  # type: ignore[union-attr]


async def test_add_with_bearer_key(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/admin/users/add", content="{}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 200
    assert "token" in body_of(response)


async def test_add_with_key_in_query(client: httpx.AsyncClient) -> None:
    response = await client.post("/admin/users/add", content="{}", params={"admin_key": ADMIN_KEY})
    assert response.status_code == 200


async def test_list_with_key_in_query(client: httpx.AsyncClient) -> None:
    added = await add_user(client, "alice")
    response = await client.get("/admin/users", params={"admin_key": ADMIN_KEY})
    assert response.status_code == 200
    body = body_of(response)
    assert len(body["users"]) == 1
    (user,) = body["users"]
    assert set(user) == {"user_id", "name", "created"}
    assert user["user_id"] == added["user_id"]
    assert user["name"] == "alice"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", user["created"])


async def test_list_never_shows_tokens_or_hashes(client: httpx.AsyncClient) -> None:
    tokens = [(await add_user(client, f"u{i}"))["token"] for i in range(3)]
    response = await client.get("/admin/users", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200
    text = response.text
    for token in tokens:
        assert token not in text
        assert hashlib.sha256(token.encode()).hexdigest() not in text
    assert "token" not in text
    assert len((body_of(response))["users"]) == 3


async def test_list_with_raw_authorization_key(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/users", headers={"Authorization": ADMIN_KEY})
    assert response.status_code == 200
    assert body_of(response) == {"users": []}


WRONG_KEY_REQUESTS = [
    ("GET", "/admin/users", {"params": {"admin_key": "wrong"}}),
    ("GET", "/admin/users", {"headers": {"Authorization": "Bearer wrong"}}),
    ("POST", "/admin/users/add", {"content": '{"admin_key": "wrong"}'}),
    ("POST", "/admin/users/add", {"content": '{"admin_key": ""}'}),
    ("POST", "/admin/users/delete", {"content": '{"admin_key": "wrong", "user_id": "x"}'}),
    ("GET", "/api/connections", {"headers": {"Authorization": "wrong"}}),
    ("GET", "/api/connections", {"params": {"admin_key": ADMIN_KEY[:-1]}}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), WRONG_KEY_REQUESTS)
async def test_wrong_admin_key_is_401_and_never_shows_the_key(
    client: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    response = await client.request(method, path, **kwargs)
    text = await expect_error(response, 401, "invalid admin key")
    assert ADMIN_KEY not in text
    assert ADMIN_KEY[:8] not in text
    assert hashlib.sha256(ADMIN_KEY.encode()).hexdigest() not in text
    assert all(ADMIN_KEY not in value for value in response.headers.values())


@pytest.mark.parametrize(
    ("method", "path", "data"),
    [
        ("GET", "/admin/users", None),
        ("GET", "/api/connections", None),
        ("POST", "/admin/users/add", "{}"),
        ("POST", "/admin/users/delete", '{"user_id": "x"}'),
    ],
)
async def test_missing_admin_key_is_401(
    client: httpx.AsyncClient, method: str, path: str, data: str | None
) -> None:
    response = await client.request(method, path, content=data)
    await expect_error(response, 401, "the admin key is required")


async def test_user_token_is_not_an_admin_key(client: httpx.AsyncClient) -> None:
    token = (await add_user(client))["token"]
    response = await client.post("/admin/users/add", content=json.dumps({"admin_key": token}))
    await expect_error(response, 401, "invalid admin key")
    response = await client.get("/admin/users", headers={"Authorization": token})
    await expect_error(response, 401, "invalid admin key")
    response = await client.get("/api/connections", headers={"Authorization": f"Bearer {token}"})
    await expect_error(response, 401, "invalid admin key")


async def test_connections_with_admin_key(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/api/connections", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 200
    assert body_of(response) == {"connections": []}
    response = await client.get("/api/connections", params={"admin_key": ADMIN_KEY})
    assert response.status_code == 200


# -- admin: delete ---------------------------------------------------------------------------


async def test_delete_known_user(client: httpx.AsyncClient, state: RelayState) -> None:
    added = await add_user(client, "alice")
    kept = await add_user(client, "bob")
    response = await client.post(
        "/admin/users/delete",
        content=json.dumps({"admin_key": ADMIN_KEY, "user_id": added["user_id"]}),
    )
    assert response.status_code == 200
    assert body_of(response) == {"message": "User deleted"}
    assert state.users.authenticate(added["token"]) is None
    assert state.users.authenticate(kept["token"]) is not None
    assert [u.user_id for u in state.store.load().users] == [kept["user_id"]]
    listing = await client.get("/admin/users", params={"admin_key": ADMIN_KEY})
    assert [u["user_id"] for u in (body_of(listing))["users"]] == [kept["user_id"]]


async def test_delete_unknown_user_is_404(client: httpx.AsyncClient, state: RelayState) -> None:
    await add_user(client)
    before = state.store.path.read_bytes()
    response = await client.post(
        "/admin/users/delete", content=json.dumps({"admin_key": ADMIN_KEY, "user_id": "nobody"})
    )
    await expect_error(response, 404, "no user nobody")
    assert state.store.path.read_bytes() == before


@pytest.mark.parametrize("user_id", [None, "", 5, ["x"]])
async def test_delete_needs_a_user_id_string(client: httpx.AsyncClient, user_id: Any) -> None:
    document: dict[str, Any] = {"admin_key": ADMIN_KEY}
    if user_id is not None:
        document["user_id"] = user_id
    response = await client.post("/admin/users/delete", content=json.dumps(document))
    await expect_error(response, 400, "user_id must be a non-empty string")


# -- bodies -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ("{not json", "the request body is not valid JSON"),
        ('{"admin_key": "k",}', "the request body is not valid JSON"),
        ("", "the request body is empty"),
        ("   \n", "the request body is empty"),
        (b'{"admin_key": "\xff"}', "the request body is not UTF-8"),
        ("[1, 2]", "the request body must be a JSON object"),
        ('"admin_key"', "the request body must be a JSON object"),
        ("null", "the request body must be a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
@pytest.mark.parametrize("path", ["/admin/users/add", "/admin/users/delete", "/api/ask"])
async def test_bad_body_is_400(
    client: httpx.AsyncClient, path: str, data: str | bytes, fragment: str
) -> None:
    headers = {"Authorization": ADMIN_KEY} if path == "/api/ask" else {}
    response = await client.post(path, content=data, headers=headers)
    await expect_error(response, 400, fragment)


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"admin_key": 12345}, "admin_key must be a string"),
        ({"admin_key": [ADMIN_KEY]}, "admin_key must be a string"),
        ({"admin_key": None}, "admin_key must be a string"),
        ({"admin_key": ADMIN_KEY, "name": ["alice"]}, "name must be a string"),
        ({"admin_key": ADMIN_KEY, "name": 7}, "name must be a string"),
        ({"admin_key": ADMIN_KEY, "name": "x" * 201}, "name must be printable"),
        ({"admin_key": ADMIN_KEY, "name": "bell\x07"}, "name must be printable"),
    ],
)
async def test_add_wrong_types_are_400(
    client: httpx.AsyncClient, state: RelayState, document: dict[str, Any], fragment: str
) -> None:
    response = await client.post("/admin/users/add", content=json.dumps(document))
    await expect_error(response, 400, fragment)
    assert not state.store.path.exists()


async def test_body_over_max_body_is_413(tmp_path: Path) -> None:
    state = make_state(tmp_path, parse_config({"server": {"max_body": "1KiB"}}))
    client = client_for(state)
    padded = json.dumps({"admin_key": ADMIN_KEY, "pad": "x" * 2000})
    response = await client.post("/admin/users/add", content=padded)
    await expect_error(response, 413, "request body larger than server.max_body (1024 bytes)")
    assert not state.store.path.exists()
    response = await client.post("/api/ask", content=padded, headers={"Authorization": ADMIN_KEY})
    await expect_error(response, 413, "server.max_body")


async def test_body_of_exactly_max_body_is_accepted(tmp_path: Path) -> None:
    state = make_state(tmp_path, parse_config({"server": {"max_body": "1KiB"}}))
    client = client_for(state)
    document = {"admin_key": ADMIN_KEY, "pad": ""}
    document["pad"] = "x" * (1024 - len(json.dumps(document)))
    data = json.dumps(document)
    assert len(data) == 1024
    response = await client.post("/admin/users/add", content=data)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "content_type",
    [None, "application/x-www-form-urlencoded", "text/plain", "application/json"],
)
async def test_body_is_json_whatever_the_content_type(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post(
        "/admin/users/add", content=json.dumps({"admin_key": ADMIN_KEY}), headers=headers
    )
    assert response.status_code == 200, response.text


# -- /api/ask ------------------------------------------------------------------------------------


async def test_ask_without_authorization_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/ask", content='{"content": "hi"}')
    await expect_error(response, 401, "missing Authorization header")


@pytest.mark.parametrize("header", ["not-a-token", "Bearer not-a-token", "Bearer", "Basic abc"])
async def test_ask_with_unknown_token_is_401(client: httpx.AsyncClient, header: str) -> None:
    response = await client.post(
        "/api/ask", content='{"content": "hi"}', headers={"Authorization": header}
    )
    text = await expect_error(response, 401, "invalid token")
    assert ADMIN_KEY not in text


async def expect_no_agent(response: Any) -> None:
    await expect_error(response, 503, "no agent connected")
    assert (body_of(response)) == {"error": "no agent connected"}
    assert int(response.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("scheme", ["", "Bearer ", "bearer "])
async def test_ask_with_a_user_token(client: httpx.AsyncClient, scheme: str) -> None:
    token = (await add_user(client))["token"]
    response = await client.post(
        "/api/ask", content='{"content": "hi"}', headers={"Authorization": scheme + token}
    )
    await expect_no_agent(response)


async def test_ask_with_the_admin_key(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/ask", content='{"content": "hi"}', headers={"Authorization": ADMIN_KEY}
    )
    await expect_no_agent(response)


async def test_ask_after_delete_is_401(client: httpx.AsyncClient) -> None:
    added = await add_user(client)
    headers = {"Authorization": added["token"]}
    await expect_no_agent(
        await client.post("/api/ask", content='{"content": "hi"}', headers=headers)
    )
    response = await client.post(
        "/admin/users/delete",
        content=json.dumps({"admin_key": ADMIN_KEY, "user_id": added["user_id"]}),
    )
    assert response.status_code == 200
    response = await client.post("/api/ask", content='{"content": "hi"}', headers=headers)
    await expect_error(response, 401, "invalid token")


@pytest.mark.parametrize(
    "document",
    [{}, {"content": ""}, {"content": None}, {"content": 5}, {"content": ["hi"]}, {"text": "hi"}],
)
async def test_ask_content_must_be_a_non_empty_string(
    client: httpx.AsyncClient, document: dict[str, Any]
) -> None:
    response = await client.post(
        "/api/ask", content=json.dumps(document), headers={"Authorization": ADMIN_KEY}
    )
    await expect_error(response, 400, "content must be a non-empty string")


@pytest.mark.parametrize("field", ["conversation_id", "parent_id"])
@pytest.mark.parametrize("value", [5, ["c"], {"id": "c"}, True])
async def test_ask_ids_must_be_strings(client: httpx.AsyncClient, field: str, value: Any) -> None:
    response = await client.post(
        "/api/ask",
        content=json.dumps({"content": "hi", field: value}),
        headers={"Authorization": ADMIN_KEY},
    )
    await expect_error(response, 400, f"{field} must be a string")


@pytest.mark.parametrize("value", ["", None])
async def test_ask_empty_conversation_id_starts_a_new_one(
    client: httpx.AsyncClient, value: Any
) -> None:
    response = await client.post(
        "/api/ask",
        content=json.dumps({"content": "hi", "conversation_id": value, "parent_id": value}),
        headers={"Authorization": ADMIN_KEY},
    )
    await expect_no_agent(response)


async def test_ask_unknown_conversation_is_404(client: httpx.AsyncClient) -> None:
    token = (await add_user(client))["token"]
    response = await client.post(
        "/api/ask",
        content=json.dumps({"content": "hi", "conversation_id": "no-such-conversation"}),
        headers={"Authorization": token},
    )
    await expect_error(response, 404, "unknown conversation_id")


async def test_ask_content_over_max_content_is_413(tmp_path: Path) -> None:
    state = make_state(tmp_path, parse_config({"requests": {"max_content": "1KiB"}}))
    client = client_for(state)
    headers = {"Authorization": ADMIN_KEY}

    async def ask(content: str) -> Any:
        return await client.post(
            "/api/ask", content=json.dumps({"content": content}), headers=headers
        )

    await expect_error(
        await ask("x" * 1025), 413, "content is larger than requests.max_content (1024 bytes)"
    )
    await expect_no_agent(await ask("x" * 1024))
    # The limit is in UTF-8 bytes: 342 euro signs are 1026 bytes.
    await expect_error(await ask("\u20ac" * 342), 413, "requests.max_content")
    await expect_no_agent(await ask("\u20ac" * 341))


async def test_ask_authenticates_before_reading_the_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/ask", content="{not json")
    await expect_error(response, 401, "missing Authorization header")


# -- status mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (BadRequest(), 400),
        (Unauthorized(), 401),
        (Forbidden(), 403),
        (NotFound(), 404),
        (UnknownConversation(), 404),
        (PayloadTooLarge(), 413),
        (RequestTimeout(), 408),
        (RateLimited(), 429),
        (AgentFailed(), 502),
        (NoAgent(), 503),
        (QueueFull(), 503),
        (QueueTimeout(), 503),
        (ConversationAgentGone(), 503),
        (ShuttingDown(), 503),
        (AgentTimeout(), 504),
    ],
)
def test_status_of(error: Exception, status: int) -> None:
    assert status_of(error) == status  # type: ignore[arg-type]
    assert all(code != 500 for code in STATUS.values())


async def test_corrupt_users_file_is_a_json_500_and_not_overwritten(
    client: httpx.AsyncClient, state: RelayState
) -> None:
    state.store.path.write_text("[[users]\nbroken")
    before = state.store.path.read_bytes()
    response = await client.post("/admin/users/add", content=json.dumps({"admin_key": ADMIN_KEY}))
    text = await expect_error(response, 500, "internal error")
    assert str(state.store.path) not in text
    assert state.store.path.read_bytes() == before


async def test_ask_chunked_body_over_max_body_is_413(tmp_path: Path) -> None:
    state = make_state(tmp_path, parse_config({"server": {"max_body": "1KiB"}}))
    payload = json.dumps({"content": "x" * 4000}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 256):
            yield payload[start : start + 256]

    async with client_for(state) as client:
        response = await client.post(
            "/api/ask", content=chunks(), headers={"Authorization": ADMIN_KEY}
        )
        assert "Content-Length" not in response.request.headers
        await expect_error(response, 413, "request body larger than server.max_body (1024 bytes)")


@pytest.mark.parametrize("chunks_before_the_stall", [0, 1])
async def test_ask_body_that_stops_arriving_is_408(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, chunks_before_the_stall: int
) -> None:
    """Hypercorn's path: a body that stops for server.idle_timeout fails the request."""
    state = make_state(tmp_path, parse_config({"server": {"idle_timeout": "7s"}}))
    app = create_asgi_app(state)
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": b'{"content":', "more_body": True}]
    chunks = chunks[:chunks_before_the_stall]

    async def receive() -> dict[str, Any]:
        if chunks:
            return chunks.pop(0)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/ask",
        "headers": [(b"authorization", ADMIN_KEY.encode()), (b"content-length", b"100")],
        "client": ("127.0.0.1", 5000),
    }
    started = trio.current_time()
    with trio.fail_after(60):
        await app(scope, receive, send)
    assert trio.current_time() - started == pytest.approx(7)
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"]) == {
        "error": "the request body stopped arriving for server.idle_timeout (7 s)"
    }


# -- throttling of failed authentication -----------------------------------------------------


async def test_failed_authentication_is_throttled_per_address(tmp_path: Path) -> None:
    config = parse_config({"auth": {"failure_burst": 3, "failure_interval": "1h"}})
    state = make_state(tmp_path, config)
    async with client_for(state) as client:
        for _ in range(3):
            response = await client.get("/admin/users", params={"admin_key": "guess"})
            await expect_error(response, 401, "invalid admin key")
        # The bucket is empty: refused before the key is even checked, right key included.
        for attempt in (
            client.get("/admin/users", params={"admin_key": ADMIN_KEY}),
            client.post("/api/ask", content=b'{"content": "hi"}', headers={"Authorization": "x"}),
        ):
            response = await attempt
            await expect_error(response, 429, "too many failed attempts")
            assert int(response.headers["Retry-After"]) >= 1
    # Another address is not affected.
    transport = httpx.ASGITransport(app=create_asgi_app(state), client=("192.0.2.7", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://relayd.test") as other:
        response = await other.get("/admin/users", params={"admin_key": ADMIN_KEY})
        assert response.status_code == 200


async def test_successes_are_never_throttled(tmp_path: Path) -> None:
    config = parse_config({"auth": {"failure_burst": 1, "failure_interval": "1h"}})
    state = make_state(tmp_path, config)
    async with client_for(state) as client:
        for _ in range(20):
            response = await client.get("/admin/users", params={"admin_key": ADMIN_KEY})
            assert response.status_code == 200


# -- the Quart application alone (create_app) ------------------------------------------------


async def test_quart_app_health_and_admin_routes(state: RelayState) -> None:
    client = create_app(state).test_client()
    response = await client.get("/health")
    assert response.status_code == 200
    assert await response.get_data(as_text=True) == "OK"

    response = await client.post("/admin/users/add", data=json.dumps({"admin_key": ADMIN_KEY}))
    assert response.status_code == 200
    added = json.loads(await response.get_data(as_text=True))
    assert state.users.authenticate(added["token"]) is not None

    response = await client.get("/admin/users", query_string={"admin_key": "wrong"})
    assert response.status_code == 401
    text = await response.get_data(as_text=True)
    assert json.loads(text) == {"error": "invalid admin key"}
    assert ADMIN_KEY not in text

    response = await client.get("/admin/users", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    listed = json.loads(await response.get_data(as_text=True))["users"]
    assert [user["user_id"] for user in listed] == [added["user_id"]]

    response = await client.post(
        "/admin/users/delete",
        data=json.dumps({"admin_key": ADMIN_KEY, "user_id": added["user_id"]}),
    )
    assert json.loads(await response.get_data(as_text=True)) == {"message": "User deleted"}
    assert state.users.authenticate(added["token"]) is None


async def test_quart_app_body_limit_and_unknown_route(tmp_path: Path) -> None:
    state = make_state(tmp_path, parse_config({"server": {"max_body": "1KiB"}}))
    client = create_app(state).test_client()
    response = await client.post("/admin/users/add", data="x" * 2048)
    assert response.status_code == 413
    assert json.loads(await response.get_data(as_text=True)) == {
        "error": "request body larger than server.max_body (1024 bytes)"
    }
    response = await client.get("/nowhere")
    assert response.status_code == 404
    assert json.loads(await response.get_data(as_text=True)) == {"error": "no route /nowhere"}
