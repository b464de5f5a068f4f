"""TLS on relayd's own listeners: https for clients, wss for agents.

The certificate and key are PEM files (``server.tls_certificate`` and
``server.tls_key``), or systemd credentials named ``tls_certificate`` and
``tls_key`` (``LoadCredential=``) when the config names none. TLS 1.2 is the
oldest version offered; ALPN says ``http/1.1`` (relayd's front speaks
HTTP/1.1 only).

Renewals need no restart: on SIGHUP the daemon loads the new pair into a
fresh context (:func:`tls_context`, in a worker thread) and swaps it in with
:meth:`TlsTerms.use` only if it is good; a broken or mismatched pair leaves
the old one serving and says why. Connections made
before a swap keep the context they were made with.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from relayd.config import Config, ConfigError

__all__ = [
    "TlsFiles",
    "TlsListener",
    "TlsTerms",
    "find_tls_files",
    "handshake",
    "replayed",
    "tls_context",
]

log = logging.getLogger("relayd.server")

# How long a refused client's alert may take to leave.
ALERT_WAIT = 1.0

CREDENTIAL_CERTIFICATE = "tls_certificate"
CREDENTIAL_KEY = "tls_key"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    certificate: Path
    key: Path
    source: str  # for the log: "the config" or "systemd credentials"


def find_tls_files(config: Config, environ: Mapping[str, str]) -> TlsFiles | None:
    """The certificate and key to serve with, or None to serve plain HTTP."""
    server = config.server
    if server.tls_certificate is not None and server.tls_key is not None:
        return TlsFiles(server.tls_certificate, server.tls_key, "the config")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        certificate = Path(credentials) / CREDENTIAL_CERTIFICATE
        key = Path(credentials) / CREDENTIAL_KEY
        if certificate.is_file() and key.is_file():
            return TlsFiles(certificate, key, "systemd credentials")
        if certificate.is_file() or key.is_file():  # half a pair: say so, never plain HTTP
            missing = key if certificate.is_file() else certificate
            raise ConfigError(
                f"the systemd credential {missing.name} is missing: TLS needs "
                f"{CREDENTIAL_CERTIFICATE} and {CREDENTIAL_KEY} together",
                source=str(missing),
            )
    return None


def tls_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context for ``files``; ConfigError naming the file if they do not load."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    for path in (files.certificate, files.key):  # ssl's error names neither
        if not path.is_file():
            raise ConfigError("cannot read it: no such file", source=str(path))
    try:
        context.load_cert_chain(files.certificate, files.key)
    except FileNotFoundError as error:
        raise ConfigError(
            "cannot read it: no such file", source=str(error.filename or files.certificate)
        ) from None
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"the certificate and the key {files.key} do not load as a pair (PEM files, "
            f"the key matching the certificate): {getattr(error, 'reason', None) or error}",
            source=str(files.certificate),
        ) from None
    return context


class TlsTerms:
    """The live TLS context of a server, swapped whole on reload."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.context = tls_context(files)

    def use(self, files: TlsFiles, context: ssl.SSLContext) -> None:
        """Serve new connections with ``context`` (made by :func:`tls_context`)."""
        self.context = context
        self.files = files
        log.info("TLS certificate loaded from %s: %s", files.source, files.certificate)


class TlsListener(trio.abc.Listener[trio.SSLStream[trio.SocketStream]]):
    """A socket listener whose connections speak TLS with the terms' current
    context (trio's SSLListener fixes one context for good)."""

    def __init__(self, transport: trio.SocketListener, terms: TlsTerms) -> None:
        self.transport_listener = transport
        self._terms = terms

    async def accept(self) -> trio.SSLStream[trio.SocketStream]:
        stream = await self.transport_listener.accept()
        return trio.SSLStream(stream, self._terms.context, server_side=True, https_compatible=True)

    async def aclose(self) -> None:
        await self.transport_listener.aclose()


async def handshake(stream: trio.SSLStream[Any]) -> bool:
    """Complete the TLS handshake of a new connection; False if it failed.

    A refused client (TLS 1.1, no common cipher) must be told why: OpenSSL
    writes the alert (``protocol_version``, ``handshake_failure``) and trio,
    which marks the stream broken when the handshake fails, never sends it,
    so clients saw the connection drop (curl: ``SSL_ERROR_SYSCALL``). The
    alert waiting in the stream's outgoing buffer (trio's private
    ``_outgoing``, checked by tests/test_tls.py) is sent here, for at most
    :data:`ALERT_WAIT`, before the caller closes the connection.
    """
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as error:
        log.debug("TLS handshake failed: %s", error.__cause__ or error)
        outgoing = getattr(stream, "_outgoing", None)
        alert = outgoing.read() if isinstance(outgoing, ssl.MemoryBIO) else b""
        if alert:
            deadline = trio.current_time() + ALERT_WAIT
            with (
                trio.CancelScope(shield=True, deadline=deadline),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.transport_stream.send_all(alert)
        return False
    return True


class _Replayed(trio.abc.HalfCloseableStream):
    """A connection's socket stream whose first bytes were read already: they
    come again first. The PROXY header's reader (which reads the socket before
    the TLS handshake) may have taken the start of the ClientHello with it."""

    def __init__(self, prefix: bytes, transport: trio.SocketStream) -> None:
        self._prefix = prefix
        self.transport = transport

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.transport.socket  # Hypercorn and the server loop read the peer from it

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._prefix:
            return bytes(await self.transport.receive_some(max_bytes))
        size = len(self._prefix) if max_bytes is None else max_bytes
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        await trio.lowlevel.checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport.send_eof()

    async def aclose(self) -> None:
        await self.transport.aclose()


def replayed(stream: trio.SSLStream[trio.SocketStream], prefix: bytes) -> trio.SSLStream[Any]:
    """``stream`` (not yet handshaken) with ``prefix``, bytes already read from its
    socket, given back to it first."""
    if not prefix:
        return stream
    transport = _Replayed(prefix, stream.transport_stream)
    return trio.SSLStream(transport, stream.context, server_side=True, https_compatible=True)
