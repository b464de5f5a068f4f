"""The bench's baseline: a bare ASGI app on Hypercorn's trio worker.

``python -m relayd.bench.baseline --listen fd://N`` answers ``POST /api/ask``
with the same JSON relayd sends (``id``, ``response_id``, ``conversation_id``,
``content`` = ``"echo:" + content``, ``error``), parsing the body as relayd
does, and nothing else: no framework, no authentication, no agent. What it
achieves on a machine is the ceiling of any route served through Hypercorn
there; relayd serves ``/api/ask`` keep-alive connections on its own loop
(:mod:`relayd.front.ask_wire`), so its relay scenarios can pass it.

It serves with ``hypercorn.trio.serve`` and the Hypercorn settings relayd uses
(``--server guarded`` serves with relayd's own :func:`relayd.front.server.serve_guarded`
instead, to see what those fixes cost), says ``READY=1`` to ``$NOTIFY_SOCKET``
once listening, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import uuid
from typing import cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIFramework

from relayd.asgi import Receive, Scope, Send
from relayd.systemd import Notifier

# Seconds an idle keep-alive connection stays open: relayd.bench.servers.KEEP_ALIVE
# (not imported: this process loads as little as it can).
KEEP_ALIVE = 120.0

__all__ = ["app", "main"]


_encoder = json.JSONEncoder(separators=(", ", ": "))


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The whole baseline application (ASGI 3)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client went away
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    status, payload = _answer(scope["method"], scope["path"], body)
    data = _encoder.encode(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _answer(method: str, path: str, body: bytes) -> tuple[int, dict[str, str]]:
    if path != "/api/ask":
        return 404, {"error": f"no route {path}"}
    if method != "POST":
        return 405, {"error": f"method {method} not allowed on {path}"}
    try:
        document = json.loads(body)
    except ValueError:
        return 400, {"error": "the request body is not valid JSON"}
    content = document.get("content") if isinstance(document, dict) else None
    if not isinstance(content, str) or not content:
        return 400, {"error": "content must be a non-empty string"}
    return 200, {
        "id": str(uuid.uuid4()),
        "response_id": str(uuid.uuid4()),
        "conversation_id": str(uuid.uuid4()),
        "content": "echo:" + content,
        "error": "",
    }


def hypercorn_config(bind: str) -> HypercornConfig:
    """Hypercorn as relayd configures it (see relayd.daemon.hypercorn_config)."""
    config = HypercornConfig()
    config.bind = [bind]
    config.accesslog = None
    config.include_server_header = False
    # relayd's default is 10 s; the bench gives its relayds and this the same
    # longer one (relayd.bench.servers.KEEP_ALIVE says why).
    config.keep_alive_timeout = KEEP_ALIVE
    config.graceful_timeout = 2.0
    config.max_app_queue_size = 16
    return config


async def _serve(bind: str, guarded: bool) -> None:
    stop = trio.Event()
    config = hypercorn_config(bind)
    framework = cast("ASGIFramework", app)
    with (
        Notifier.from_environ(unset_environment=True) as notifier,
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
    ):
        async with trio.open_nursery() as nursery:
            if guarded:
                from relayd.front.server import serve_guarded

                await nursery.start(
                    lambda task_status: serve_guarded(
                        framework, config, shutdown_trigger=stop.wait, task_status=task_status
                    )
                )
            else:
                from hypercorn.trio import serve

                await nursery.start(
                    lambda task_status: serve(
                        framework, config, shutdown_trigger=stop.wait, task_status=task_status
                    )
                )
            notifier.ready()
            async for _ in signals:
                stop.set()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relayd.bench.baseline")
    parser.add_argument("--listen", required=True, metavar="ADDR", help="fd://N or host:port")
    parser.add_argument(
        "--server",
        choices=("hypercorn", "guarded"),
        default="hypercorn",
        help="hypercorn.trio.serve (default) or relayd's patched serve()",
    )
    args = parser.parse_args(argv)
    trio.run(_serve, args.listen, args.server == "guarded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
