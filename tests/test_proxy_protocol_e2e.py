"""The PROXY protocol against a real relayd, on plain TCP and on relayd's own TLS.

A trusted proxy (HAProxy's ``send-proxy``, nginx's stream module, a cloud load
balancer) opens each connection with a PROXY header in the clear, then relays
the client's bytes: an HTTP request, or a TLS ClientHello. relayd must take the
header off (before the TLS handshake), use the client it names, and serve the
rest, whether the header comes in a segment of its own or with the first bytes
after it. tests/test_proxies.py checks the parser without sockets.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trustme

from relayd.proxies import PROXY_V2_SIGNATURE
from tests.raw_http import RawClient
from tests.support import Relayd
from tests.test_ask_wire_e2e import HEALTH, get_request
from tests.test_tls import HOST, Pair, ca, pair, tls_config, trusting  # noqa: F401

CLIENT_ADDRESS = "203.0.113.9"
PROXY_SETTINGS = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1"]\n'
# A refused request whose log line names the client relayd saw.
REFUSED = get_request("/api/connections", b"Authorization: not-the-admin-key")


def v1_header() -> bytes:
    return f"PROXY TCP4 {CLIENT_ADDRESS} 127.0.0.1 40001 443\r\n".encode()


def v2_header() -> bytes:
    addresses = bytes([203, 0, 113, 9, 127, 0, 0, 1]) + (40001).to_bytes(2, "big") * 2
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + len(addresses).to_bytes(2, "big") + addresses


HEADERS = {"v1": v1_header, "v2": v2_header}


class Proxied(trio.abc.Stream):
    """A TCP connection as a proxy opens it: the PROXY header, then the client's
    bytes; ``together``: the header goes out with the first of them, in one write."""

    def __init__(self, transport: trio.SocketStream, header: bytes, *, together: bool) -> None:
        self.transport = transport
        self.header = header
        self.together = together

    @classmethod
    async def open(cls, relayd: Relayd, header: bytes, *, together: bool) -> Proxied:
        proxied = cls(await trio.open_tcp_stream(HOST, relayd.port), header, together=together)
        if not together:
            await proxied.transport.send_all(header)
            # Not a synchronisation: a pause so that relayd reads the header alone,
            # as it does when a proxy sends it before the client has said anything.
            await trio.sleep(0.2)
            proxied.header = b""
        return proxied

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        data, self.header = self.header + bytes(data), b""
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.transport.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.transport.aclose()


async def check_served_as_the_named_client(relayd: Relayd, client: RawClient) -> None:
    with trio.fail_after(15):
        await client.send(HEALTH)
        assert (await client.response()).status == 200
        await client.send(REFUSED)
        assert (await client.response()).status == 401
    await client.aclose()
    assert f"remote={CLIENT_ADDRESS}" in relayd.log


@pytest.mark.parametrize("version", list(HEADERS))
@pytest.mark.parametrize("together", [True, False], ids=["with-the-request", "alone"])
async def test_plain_tcp_behind_a_proxy(
    relayd_factory: Callable[..., Relayd], version: str, together: bool
) -> None:
    relayd = relayd_factory(config=f"[server]\n{PROXY_SETTINGS}")
    with trio.fail_after(15):
        stream = await Proxied.open(relayd, HEADERS[version](), together=together)
    await check_served_as_the_named_client(relayd, RawClient(stream))


@pytest.mark.parametrize("version", list(HEADERS))
@pytest.mark.parametrize("together", [True, False], ids=["with-the-client-hello", "alone"])
async def test_tls_behind_a_proxy_takes_the_header_off_before_the_handshake(
    relayd_factory: Callable[..., Relayd],
    pair: Pair,  # noqa: F811
    ca: trustme.CA,  # noqa: F811
    version: str,
    together: bool,
) -> None:
    relayd = relayd_factory(config=tls_config(pair, PROXY_SETTINGS))
    with trio.fail_after(15):
        proxied = await Proxied.open(relayd, HEADERS[version](), together=together)
        stream = trio.SSLStream(proxied, trusting(ca), server_hostname=HOST, https_compatible=True)
        await stream.do_handshake()
    await check_served_as_the_named_client(relayd, RawClient(stream))


async def test_tls_with_a_malformed_proxy_header_closes_without_a_handshake(
    relayd_factory: Callable[..., Relayd],
    pair: Pair,  # noqa: F811
    ca: trustme.CA,  # noqa: F811
) -> None:
    relayd = relayd_factory(config=tls_config(pair, PROXY_SETTINGS))
    with trio.fail_after(15):
        proxied = await Proxied.open(relayd, b"PROXY NONSENSE\r\n", together=True)
        stream = trio.SSLStream(proxied, trusting(ca), server_hostname=HOST, https_compatible=True)
        with pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()
    assert "malformed PROXY v1 line" in relayd.log
    assert relayd.process.poll() is None


async def test_tls_without_a_trusted_proxy_ignores_nothing_and_serves_directly(
    relayd_factory: Callable[..., Relayd],
    pair: Pair,  # noqa: F811
    ca: trustme.CA,  # noqa: F811
) -> None:
    """From a peer that is not a trusted proxy no header is read: a plain TLS client."""
    relayd = relayd_factory(
        config=tls_config(pair, 'proxy_protocol = true\ntrusted_proxies = ["10.0.0.1"]\n')
    )
    with trio.fail_after(15):
        stream = await trio.open_ssl_over_tcp_stream(
            HOST, relayd.port, ssl_context=trusting(ca), https_compatible=True
        )
        client = RawClient(stream)
        await client.send(HEALTH)
        assert (await client.response()).status == 200
    await client.aclose()
    assert isinstance(stream, trio.SSLStream) and stream.version() in ("TLSv1.2", "TLSv1.3")
