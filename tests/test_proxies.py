"""The client behind a trusted proxy: X-Forwarded-For and the PROXY protocol, sans-I/O."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.proxies import (
    PROXY_V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    TrustedProxies,
    cidr_problem,
    parse_proxy_header,
)

PROXIES = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("127.0.0.1", [b"203.0.113.7"], "203.0.113.7"),
        # The rightmost address that is not a trusted proxy: what is left of it was
        # written by the client (or proxies nobody vouches for) and is not believed.
        ("127.0.0.1", [b"198.51.100.1, 203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", [b"203.0.113.7, 10.1.2.3"], "203.0.113.7"),
        ("127.0.0.1", [b"203.0.113.7", b"10.1.2.3"], "203.0.113.7"),  # two headers
        ("127.0.0.1", [b"[2001:db8::1]:443"], "2001:db8::1"),
        ("127.0.0.1", [b"203.0.113.7:5000"], "203.0.113.7"),
        ("127.0.0.1", [b"10.0.0.1, 10.0.0.2"], "127.0.0.1"),  # only proxies: the peer
        ("127.0.0.1", [b"unknown"], "127.0.0.1"),  # not an address: believe nothing
        ("127.0.0.1", [b"203.0.113.7, garbage, 10.0.0.1"], "127.0.0.1"),
        ("127.0.0.1", [], "127.0.0.1"),
        ("::ffff:127.0.0.1", [b"203.0.113.7"], "203.0.113.7"),  # IPv4-mapped
        ("fd00::5", [b"203.0.113.7"], "203.0.113.7"),
        # From a peer that is not trusted, the header is ignored.
        ("192.0.2.1", [b"203.0.113.7"], "192.0.2.1"),
        ("unix", [b"203.0.113.7"], "unix"),
    ],
)
def test_x_forwarded_for(peer: str, forwarded: list[bytes], expected: str) -> None:
    assert PROXIES.client(peer, forwarded) == expected


def test_no_trusted_proxies_trusts_nobody() -> None:
    nobody = TrustedProxies()
    assert not nobody
    assert nobody.client("127.0.0.1", [b"203.0.113.7"]) == "127.0.0.1"


@given(st.lists(st.ip_addresses().map(str), min_size=1, max_size=6))
def test_a_client_can_never_name_a_trusted_proxy_or_hide_behind_one(hops: list[str]) -> None:
    """Whatever a client writes, the answer is either the peer or an address in
    the header that is not a trusted proxy."""
    header = ", ".join(hops).encode()
    answer = PROXIES.client("127.0.0.1", [header])
    assert answer == "127.0.0.1" or (answer in hops and not PROXIES.trusts(answer))


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("10.0.0.0/8", True),
        ("127.0.0.1", True),
        ("::1", True),
        ("fd00::/8", True),
        ("10.0.0.1/8", True),
        ("nope", False),
        ("10.0.0.0/33", False),
        ("", False),
    ],
)
def test_cidr_problem(value: str, ok: bool) -> None:
    assert (cidr_problem(value) is None) == ok


# -- PROXY protocol v1 -----------------------------------------------------------------------


def test_v1_tcp4_and_the_bytes_after_it() -> None:
    data = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\nGET / HTTP/1.1\r\n"
    header = parse_proxy_header(data)
    assert header == ProxyHeader(("203.0.113.9", 5555), data.index(b"GET"))


def test_v1_tcp6_and_unknown() -> None:
    header = parse_proxy_header(b"PROXY TCP6 2001:db8::1 ::1 443 8080\r\n")
    assert header is not None and header.client == ("2001:db8::1", 443)
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == ProxyHeader(None, 15)


@pytest.mark.parametrize("end", range(1, len(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\n")))
def test_v1_prefixes_wait_for_more(end: int) -> None:
    assert parse_proxy_header(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\n"[:end]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 203.0.113.9 127.0.0.1 5555\r\n",
        b"PROXY TCP4 2001:db8::1 127.0.0.1 5555 80\r\n",  # family mismatch
        b"PROXY TCP5 203.0.113.9 127.0.0.1 5555 80\r\n",
        b"PROXY TCP4 203.0.113.999 127.0.0.1 5555 80\r\n",
        b"PROXY TCP4 203.0.113.9 127.0.0.1 99999 80\r\n",
        b"PROXY " + b"x" * 200,  # no CRLF within the longest v1 line
    ],
)
def test_v1_malformed(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(data)


# -- PROXY protocol v2 -----------------------------------------------------------------------


def v2(command: int, family: int, body: bytes) -> bytes:
    return (
        PROXY_V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack(">H", len(body)) + body
    )


def test_v2_tcp4_tcp6_local_and_unix() -> None:
    body4 = (
        ipaddress.IPv4Address("198.51.100.4").packed
        + ipaddress.IPv4Address("127.0.0.1").packed
        + struct.pack(">HH", 1234, 80)
    )
    data = v2(1, 0x11, body4) + b"rest"
    assert parse_proxy_header(data) == ProxyHeader(("198.51.100.4", 1234), len(data) - 4)
    body6 = (
        ipaddress.IPv6Address("2001:db8::7").packed
        + ipaddress.IPv6Address("::1").packed
        + struct.pack(">HH", 4321, 443)
    )
    header = parse_proxy_header(v2(1, 0x21, body6))
    assert header is not None and header.client == ("2001:db8::7", 4321)
    assert parse_proxy_header(v2(0, 0x00, b"")) == ProxyHeader(None, 16)  # LOCAL
    assert parse_proxy_header(v2(1, 0x31, b"\0" * 216)) == ProxyHeader(None, 16 + 216)
    # TLVs after the addresses are skipped with them.
    tlv = b"\x04\x00\x02ok"
    assert parse_proxy_header(v2(1, 0x11, body4 + tlv)) == ProxyHeader(
        ("198.51.100.4", 1234), 16 + len(body4) + len(tlv)
    )


def test_v2_incomplete_and_malformed() -> None:
    body4 = b"\x01\x02\x03\x04" * 2 + b"\x00\x01\x00\x02"
    whole = v2(1, 0x11, body4)
    for end in range(1, len(whole)):
        assert parse_proxy_header(whole[:end]) is None
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(PROXY_V2_SIGNATURE + bytes([0x11, 0x11, 0, 0]))  # version 1
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(v2(2, 0x11, body4))  # unknown command
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(v2(1, 0x51, body4))  # unknown family


@given(st.binary(max_size=64))
def test_any_bytes_give_a_header_need_more_or_a_clear_error(data: bytes) -> None:
    try:
        header = parse_proxy_header(data)
    except ProxyProtocolError:
        return
    assert header is None or 0 < header.length <= len(data)
