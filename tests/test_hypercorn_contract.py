"""Every private name and behaviour of Hypercorn (and h11) that relayd relies on.

relayd's front (relayd/front/server.py) subclasses Hypercorn's TCPServer,
replaces its read loop, swaps its lock and its h11 connection, and reads
attributes that are not Hypercorn's public API. pyproject.toml pins Hypercorn
exactly; to upgrade, change the pin, run this file, and read the failure: each
test names the one thing that moved and where relayd uses it.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import h11
import pytest
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

PINNED = "0.18.0"


def test_the_pinned_version_is_installed() -> None:
    assert version("hypercorn") == PINNED, (
        f"Hypercorn {version('hypercorn')} is installed; relayd is checked against "
        f"{PINNED} (pyproject.toml). Run this file against the new version and fix what fails."
    )


def source(function: object) -> str:
    return inspect.getsource(function)  # type: ignore[arg-type]


def test_tcp_server_run_creates_the_protocol_then_calls_read_data() -> None:
    """GuardedTCPServer.run reads the first head itself and then calls
    TCPServer.run, whose read loop is our _read_data (via self._read_data)."""
    run = source(TCPServer.run)
    for needle in ("ProtocolWrapper(", "self._read_data()", "self.protocol.initiate()", "_close()"):
        assert needle in run, f"TCPServer.run no longer contains {needle!r}"
    assert "self._task_group = task_group" in run, "TCPServer._task_group moved"


def test_tcp_server_methods_we_override_exist_with_their_roles() -> None:
    for name in ("_read_data", "_close", "_idle_timeout", "protocol_send"):
        assert hasattr(TCPServer, name), f"TCPServer.{name} is gone (relayd overrides it)"
    send = source(TCPServer.protocol_send)
    assert "self.send_lock" in send, "TCPServer.protocol_send no longer uses send_lock"
    assert "Updated" in send, "TCPServer.protocol_send no longer handles Updated (idle timer)"
    assert "idle_task" in source(TCPServer.__init__), "TCPServer's idle timer moved"


def test_task_group_has_a_trio_nursery() -> None:
    """relayd cancels ``self._task_group._nursery`` when the client goes away."""
    from hypercorn.trio.task_group import TaskGroup

    assert "_nursery" in source(TaskGroup), "hypercorn.trio.task_group.TaskGroup._nursery moved"


def test_protocol_wrapper_exposes_the_http11_protocol() -> None:
    """relayd reads ``self.protocol.protocol`` (the H11Protocol), its ``stream``,
    its ``client``, and its ``connection`` (an h11.Connection it swaps)."""
    assert "self.protocol = H11Protocol(" in source(ProtocolWrapper.__init__)
    init = source(H11Protocol.__init__)
    for needle in ("self.client = client", "self.connection", "h11.Connection(", "self.stream"):
        assert needle in init, f"H11Protocol.__init__ no longer sets {needle!r}"
    assert "self.client" in source(H11Protocol._create_stream), "H11Protocol's client moved"


def test_h11_protocol_sends_updated_and_recycles() -> None:
    handle = source(H11Protocol._handle_events)
    assert "Updated(idle=False)" in handle, "H11Protocol no longer reports a request starting"
    recycle = source(H11Protocol._maybe_recycle)
    assert "Updated(idle=True)" in recycle and "Closed()" in recycle
    assert "terminated.is_set()" in recycle, (
        "H11Protocol no longer closes after a response at shutdown"
    )


def test_h11_connection_internals_we_copy() -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=1234)
    assert connection._max_incomplete_event_size == 1234, "h11's _max_incomplete_event_size moved"
    assert hasattr(h11.Connection, "send_with_data_passthrough"), (
        "h11.Connection.send_with_data_passthrough is gone (relayd adds reason phrases there)"
    )
    response = h11.Response(status_code=200, headers=[])
    assert response.reason == b"", "h11.Response's default reason changed"


def test_h11_protocol_recycles_only_a_request_read_to_its_end() -> None:
    """relayd/front/server.py says Connection: close on a response that starts
    while h11 is still in SEND_BODY, because Hypercorn then closes after it."""
    recycle = source(H11Protocol._maybe_recycle)
    assert "their_state is h11.DONE" in recycle, (
        "H11Protocol._maybe_recycle no longer requires the request read to its end: "
        "relayd's Connection: close rule (relayd/front/server.py) may now be too eager"
    )


def test_websocket_stream_state() -> None:
    assert ASGIWebsocketState.HANDSHAKE, "ASGIWebsocketState.HANDSHAKE is gone"
    init = source(WSStream.__init__)
    assert "self.state" in init and "self.closed" in source(WSStream), "WSStream.state/closed moved"


def test_events_and_helpers() -> None:
    assert Updated(idle=True).idle is True
    assert RawData(data=b"x").data == b"x"
    assert Closed() is not None
    assert issubclass(ShutdownError, Exception)
    assert inspect.iscoroutinefunction(raise_shutdown)
    assert callable(repr_socket_addr) and callable(wrap_app)


def test_worker_context_events() -> None:
    context = WorkerContext(None)
    for name in ("terminate", "terminated"):
        event = getattr(context, name)
        assert hasattr(event, "is_set") and hasattr(event, "set"), f"WorkerContext.{name} moved"


def test_config_create_sockets_and_ssl_flag() -> None:
    config = Config()
    assert hasattr(config, "create_sockets") and hasattr(config, "ssl_enabled")
    assert "insecure_sockets" in source(Config.create_sockets)
    for name in ("keep_alive_timeout", "graceful_timeout", "backlog", "max_app_queue_size"):
        assert hasattr(config, name), f"hypercorn.config.Config.{name} is gone"


@pytest.mark.parametrize(
    "name",
    [
        "hypercorn.trio.lifespan.Lifespan",
        "hypercorn.typing.AppWrapper",
        "hypercorn.typing.ConnectionState",
        "hypercorn.typing.LifespanState",
        "hypercorn.utils.parse_socket_addr",
    ],
)
def test_imported_names_exist(name: str) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = __import__(module_name, fromlist=[attribute])
    assert hasattr(module, attribute), f"{name} is gone (relayd/front/server.py imports it)"
