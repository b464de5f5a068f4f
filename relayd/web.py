"""HTTP pieces shared by the Quart routes and the bare ASGI ``/api/ask``.

Nothing here knows Quart: body parsing, field checks, the status of each
domain error, and :class:`Gate`, which checks credentials and throttles the
addresses that fail them.
"""

from __future__ import annotations

import codecs
import datetime as dt
import json
import logging
import re
from typing import Any, NamedTuple

import trio

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
    RelayError,
    RequestTimeout,
    ShuttingDown,
    StreamBroken,
    Unauthorized,
    Unprocessable,
)
from relayd.jsontext import may_hold_surrogate, unencodable_string
from relayd.state import RelayState
from relayd.users import User

__all__ = [
    "STATUS",
    "Caller",
    "Gate",
    "error_body",
    "optional_string",
    "parse_json_object",
    "redact_path",
    "rfc3339",
    "status_of",
    "token_from_header",
]

log = logging.getLogger("relayd.api")

STATUS: dict[type[RelayError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    RequestTimeout: 408,
    PayloadTooLarge: 413,
    Unprocessable: 422,
    RateLimited: 429,
    AgentFailed: 502,
    StreamBroken: 502,
    NoAgent: 503,
    QueueFull: 503,
    QueueTimeout: 503,
    ConversationAgentGone: 503,
    ShuttingDown: 503,
    AgentTimeout: 504,
}


def status_of(error: RelayError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def rfc3339(timestamp: float) -> str:
    moment = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, whatever the Content-Type said. Raises BadRequest.

    The body must be UTF-8 (RFC 8259, 8.1), and no string in it may hold a
    lone surrogate (``"\\ud800"``, legal JSON but not Unicode): such a string
    cannot be encoded again, so it is refused here, at the door, rather than
    failing wherever it is next written (an agent's frame, a log, a file).
    """
    if not raw.strip():
        raise BadRequest("the request body is empty; expected a JSON object")
    try:
        # json.loads(bytes) would let UTF-8-encoded surrogates through ("surrogatepass").
        text = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8") from None
    try:
        document = json.loads(text)
    except ValueError as error:
        raise BadRequest(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(document, dict):
        raise BadRequest("the request body must be a JSON object")
    if may_hold_surrogate(text):
        problem = unencodable_string(document)
        if problem is not None:
            raise BadRequest(
                f"{problem} holds a lone surrogate (a \\ud800-\\udfff escape that is not "
                "half of a pair): it is not valid Unicode and cannot be encoded as UTF-8"
            )
    return document


def optional_string(document: dict[str, Any], name: str) -> str | None:
    """A string field that may be absent, null or empty (all meaning "not given")."""
    value = document.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return value


def token_from_header(header: str | None) -> str | None:
    """The token of an ``Authorization`` header: raw (the seed's form) or ``Bearer``."""
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return rest.strip()
    return header.strip()


# "agent" as a path segment (any case, after any run of slashes), and whatever
# follows it up to a "client/register" tail or the end: where an agent key is.
_AGENT_KEY_IN_PATH = re.compile(r"(?i)(/agent/+)(.*?)(/+client/register/*$|$)")


def redact_path(path: str) -> str:
    """``path`` with any agent key in it hidden, for messages and logs that echo it.

    Keys travel as ``/agent/<key>/client/register``, but a path of any other
    shape may carry one too (``//agent/KEY/client/register``,
    ``/AGENT/KEY/``, ``/x/agent/KEY``): everything after an ``agent``
    segment, up to a ``client/register`` tail, is hidden, whatever the shape.
    """
    if "agent" not in path.lower():
        return path
    return _AGENT_KEY_IN_PATH.sub(
        lambda match: match[1] + ("<key>" if match[2] else "") + match[3], path
    )


class Caller(NamedTuple):
    """Who is asking, once their credentials are checked."""

    user: User | None  # None for the admin key
    log_id: str  # the id the log shows: the user's id, or "admin"


class Gate:
    """Credential checks for HTTP routes, with failure throttling (:mod:`relayd.throttle`).

    A valid user token is checked first and always passes: it cannot be
    guessed, so it needs no throttle, and a client sharing an address with a
    broken or hostile one keeps its service. Everything else (the admin key,
    a missing or unknown credential) is refused with 429 while the address
    or its prefix is locked, before the admin key is compared; every failure
    is counted and logged (never the credential itself).
    """

    def __init__(self, state: RelayState) -> None:
        self._state = state

    def _check_throttle(self, address: str) -> None:
        wait = self._state.throttle.retry_after(address, trio.current_time())
        if wait is not None:
            raise RateLimited(retry_after=wait)

    def _failed(self, message: str, address: str, path: str, count: int = 1) -> Unauthorized:
        self._state.throttle.failed(address, trio.current_time(), count)
        log.info("authentication failed: %s remote=%s path=%s", message, address, redact_path(path))
        return Unauthorized(message)

    def user(self, header: str | None, address: str, path: str) -> Caller:
        """``(user, user id for logs)`` for a user token or the admin key (user None)."""
        token = token_from_header(header)
        if token is not None:
            user = self._state.users.authenticate(token)  # one hash, one lookup
            if user is not None:
                return Caller(user, user.user_id)
        self._check_throttle(address)
        if token is None:
            raise self._failed("missing Authorization header (a user token)", address, path)
        if self._state.admin.verify(token):
            return Caller(None, "admin")
        raise self._failed("invalid token", address, path)

    def admin(self, candidates: list[str], address: str, path: str) -> None:
        """Pass if any candidate is the admin key.

        Each candidate compared is an attempt and counts as one failure if it
        is wrong; no more are compared than the address may still fail (the
        rest get the 429 of a locked address).
        """
        self._check_throttle(address)
        if not candidates:
            raise self._failed("the admin key is required", address, path)
        allowed = self._state.throttle.allowance(address, trio.current_time())
        wrong = 0
        for candidate in candidates[:allowed]:
            if self._state.admin.verify(candidate):
                if wrong:
                    self._state.throttle.failed(address, trio.current_time(), wrong)
                return
            wrong += 1
        refusal = self._failed("invalid admin key", address, path, wrong)
        if wrong < len(candidates):  # the address ran out of attempts on the way
            self._check_throttle(address)
        raise refusal
