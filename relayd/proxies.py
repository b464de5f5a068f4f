"""The real client behind a reverse proxy: X-Forwarded-For and the PROXY protocol.

Behind nginx, Caddy or a cloud load balancer every connection comes from the
proxy, so the failed-authentication throttle, the logs, the loopback rule for
keyless agents and ``/api/connections`` would all see the proxy. The operator
names the proxies (``server.trusted_proxies``: addresses and CIDRs); from
those peers only, relayd takes the client's address from

* ``X-Forwarded-For``: the rightmost address that is not itself a trusted
  proxy (everything to its left was written by the client or by proxies
  relayd does not know, and is not believed); or
* with ``server.proxy_protocol = true``, the PROXY protocol header (v1 text or
  v2 binary, as HAProxy, nginx's stream module and cloud load balancers send
  it) at the start of the connection, which then must come first.

From any other peer these headers are ignored (and a PROXY header is just
bytes that are not HTTP). Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "PROXY_V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "TrustedProxies",
    "cidr_problem",
    "parse_proxy_header",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
_V1_MAX = 107  # the longest v1 line, CRLF included (the spec's figure)
_V2_MAX = 16 + 65535


def cidr_problem(value: str) -> str | None:
    """Why ``value`` is not an address or CIDR, or None."""
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"an IP address or CIDR (10.0.0.0/8, ::1), got {value!r}"
    return None


class TrustedProxies:
    """The peers whose forwarding headers relayd believes."""

    __slots__ = ("_networks",)

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(network, strict=False) for network in networks
        )

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, host: str | None) -> bool:
        if not self._networks or not host:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def client(self, peer: str, forwarded_for: Sequence[bytes | str]) -> str:
        """The client's address: ``peer``, or from ``X-Forwarded-For`` values (in
        the order the headers came) when ``peer`` is a trusted proxy."""
        if not forwarded_for or not self.trusts(peer):
            return peer
        hops: list[str] = []
        for value in forwarded_for:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            hops += [hop.strip() for hop in text.split(",")]
        for hop in reversed(hops):
            host = _strip_port(hop)
            if host is None:
                return peer  # a hop that is not an address: believe nothing further left
            if not self.trusts(host):
                return host
        return peer


def _strip_port(hop: str) -> str | None:
    """The address in one X-Forwarded-For element (``1.2.3.4``, ``[::1]:80``), or None."""
    if hop.startswith("["):
        host = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        host = hop.partition(":")[0]
    else:
        host = hop
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class ProxyProtocolError(Exception):
    """A PROXY header that is malformed: the connection is closed."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY header said: the client (None for a LOCAL or UNKNOWN one, which
    keeps the peer's own address) and how many bytes the header took."""

    client: tuple[str, int] | None
    length: int


def parse_proxy_header(buffer: bytes) -> ProxyHeader | None:
    """The PROXY header (v1 or v2) at the start of ``buffer``; None if more bytes
    are needed. Raises ProxyProtocolError if it is not one."""
    if buffer.startswith(PROXY_V2_SIGNATURE[: len(buffer)]) and len(buffer) < 16:
        return None
    if buffer.startswith(PROXY_V2_SIGNATURE):
        return _parse_v2(buffer)
    if len(buffer) < len(_V1_PREFIX):
        if _V1_PREFIX.startswith(buffer):
            return None
        raise ProxyProtocolError("no PROXY header")
    if not buffer.startswith(_V1_PREFIX):
        raise ProxyProtocolError("no PROXY header")
    end = buffer.find(b"\r\n")
    if end < 0:
        if len(buffer) >= _V1_MAX:
            raise ProxyProtocolError("PROXY v1 line too long")
        return None
    return _parse_v1(buffer[:end].decode("ascii", "replace"), end + 2)


def _parse_v1(line: str, length: int) -> ProxyHeader:
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(None, length)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 line {line[:_V1_MAX]!r}")
    _, family, source, _destination, source_port, _ = parts
    try:
        address = ipaddress.ip_address(source)
        port = int(source_port)
    except ValueError:
        raise ProxyProtocolError(f"malformed PROXY v1 line {line[:_V1_MAX]!r}") from None
    if (family == "TCP4") != (address.version == 4) or not 0 <= port <= 65535:
        raise ProxyProtocolError(f"malformed PROXY v1 line {line[:_V1_MAX]!r}")
    return ProxyHeader((str(address), port), length)


def _parse_v2(buffer: bytes) -> ProxyHeader | None:
    version_command, family = buffer[12], buffer[13]
    size = int.from_bytes(buffer[14:16], "big")
    if len(buffer) < 16 + size:
        return None
    if version_command >> 4 != 2:
        raise ProxyProtocolError("PROXY v2 header with another version")
    command = version_command & 0x0F
    length = 16 + size
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return ProxyHeader(None, length)
    if command != 1:
        raise ProxyProtocolError("PROXY v2 header with an unknown command")
    body = buffer[16:length]
    if family == 0x11 and size >= 12:  # TCP over IPv4
        host = str(ipaddress.IPv4Address(body[0:4]))
        port = int.from_bytes(body[8:10], "big")
    elif family == 0x21 and size >= 36:  # TCP over IPv6
        host = str(ipaddress.IPv6Address(body[0:16]))
        port = int.from_bytes(body[32:34], "big")
    elif family >> 4 in (0, 3):  # UNSPEC, or a Unix socket: keep the peer's address
        return ProxyHeader(None, length)
    else:
        raise ProxyProtocolError("PROXY v2 header with an unsupported address family")
    return ProxyHeader((host, port), length)
