"""The failed-authentication throttle: per address, per prefix, bounded, hard to erase.

Time is passed in, so these are plain synchronous tests.
"""

from __future__ import annotations

import pytest

from relayd.throttle import FailureThrottle, network_prefix


def locked(throttle: FailureThrottle, address: str, now: float = 0.0) -> bool:
    return throttle.retry_after(address, now) is not None


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("203.0.113.7", "203.0.113.0/24"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.0/24"),  # IPv4-mapped counts as IPv4
        ("127.0.0.1", "127.0.0.0/24"),
        ("unix", None),
        ("not an address", None),
    ],
)
def test_network_prefix(address: str, expected: str | None) -> None:
    assert network_prefix(address, 24, 64) == expected


def test_prefix_lengths_are_configurable() -> None:
    assert network_prefix("203.0.113.7", 16, 48) == "203.0.0.0/16"
    assert network_prefix("2001:db8:1:2::9", 16, 48) == "2001:db8:1::/48"
    assert network_prefix("203.0.113.7", 32, 128) == "203.0.113.7/32"


def test_an_address_is_locked_after_its_burst_and_refills_per_interval() -> None:
    throttle = FailureThrottle(burst=3, interval=10.0, prefix_burst=100)
    for _ in range(3):
        assert not locked(throttle, "198.51.100.1")
        throttle.failed("198.51.100.1", 0.0)
    assert throttle.retry_after("198.51.100.1", 0.0) == pytest.approx(10.0)
    assert throttle.allowance("198.51.100.1", 0.0) == 0
    assert not locked(throttle, "198.51.100.2")  # its neighbour: the prefix has room
    assert throttle.allowance("198.51.100.1", 10.0) == 1


def test_a_whole_prefix_is_locked_by_failures_spread_over_its_addresses() -> None:
    """An attacker with a /64 gets prefix_burst guesses, not burst per address."""
    throttle = FailureThrottle(burst=3, interval=10.0, prefix_burst=8)
    for host in range(8):
        address = f"2001:db8:0:1::{host + 1:x}"
        assert not locked(throttle, address)
        throttle.failed(address, 0.0)
    fresh = "2001:db8:0:1::ffff"
    assert locked(throttle, fresh)  # never failed itself: its prefix is locked
    assert throttle.retry_after(fresh, 0.0) == pytest.approx(10.0)
    assert not locked(throttle, "2001:db8:0:2::1")  # the next /64 is not
    assert not locked(throttle, "192.0.2.1")


def test_ipv4_24_is_a_prefix_too() -> None:
    throttle = FailureThrottle(burst=2, interval=60.0, prefix_burst=4)
    for host in range(1, 5):
        throttle.failed(f"192.0.2.{host}", 0.0)
    assert locked(throttle, "192.0.2.200")
    assert not locked(throttle, "192.0.3.1")


def test_counting_several_failures_at_once() -> None:
    throttle = FailureThrottle(burst=5, interval=10.0, prefix_burst=50)
    throttle.failed("192.0.2.1", 0.0, 3)
    assert throttle.allowance("192.0.2.1", 0.0) == 2
    throttle.failed("192.0.2.1", 0.0, 3)
    assert throttle.allowance("192.0.2.1", 0.0) == 0


def test_a_unix_socket_peer_has_no_prefix_but_an_address_bucket() -> None:
    throttle = FailureThrottle(burst=1, interval=10.0, prefix_burst=1)
    throttle.failed("unix", 0.0)
    assert locked(throttle, "unix")


def test_reconfigure_applies_to_the_next_decision() -> None:
    throttle = FailureThrottle(burst=1, interval=10.0, prefix_burst=100)
    throttle.failed("192.0.2.1", 0.0)
    assert locked(throttle, "192.0.2.1")
    throttle.configure(burst=5, interval=10.0, prefix_burst=100)
    assert throttle.allowance("192.0.2.1", 0.0) == 0  # the bucket keeps what it spent
    assert throttle.allowance("192.0.2.1", 10.0) == 1


# -- eviction cannot erase a lockout ----------------------------------------------------


def test_flooding_the_table_from_other_prefixes_does_not_erase_a_lockout() -> None:
    """The review's attack: fail once from each of max_entries other addresses
    (trivial with IPv6), and the victim's lockout was evicted."""
    throttle = FailureThrottle(burst=1, interval=600.0, prefix_burst=1, max_entries=100)
    attacker = "2001:db8:aaaa:1::1"
    throttle.failed(attacker, 0.0)
    assert locked(throttle, attacker)
    for n in range(5000):
        throttle.failed(f"2001:db8:{n // 256 + 1:x}:{n % 256:x}::1", 1.0)
    assert locked(throttle, attacker, 2.0)
    assert len(throttle) == 100


def test_unlocked_buckets_are_evicted_least_recently_failed_first() -> None:
    throttle = FailureThrottle(burst=5, interval=10.0, prefix_burst=1000, max_entries=3)
    for host in (1, 2, 3):
        throttle.failed(f"192.0.2.{host}", float(host))
    throttle.failed("192.0.2.1", 4.0)  # now the most recent
    throttle.failed("192.0.2.4", 5.0)  # evicts .2, the least recently failed
    assert throttle.allowance("192.0.2.2", 5.0) == 5  # forgotten: a full bucket
    assert throttle.allowance("192.0.2.1", 5.0) == 3


def test_a_table_full_of_lockouts_makes_newcomers_share_one_overflow_bucket() -> None:
    throttle = FailureThrottle(burst=1, interval=600.0, prefix_burst=2, max_entries=10)
    for n in range(10):
        throttle.failed(f"2001:db8:{n + 1:x}::1", 0.0)  # ten locked prefixes and addresses
    newcomers = [f"2001:db8:{n + 100:x}::1" for n in range(5)]
    assert not locked(throttle, newcomers[0], 1.0)
    throttle.failed(newcomers[0], 1.0)
    throttle.failed(newcomers[1], 1.0)
    # The overflow bucket (prefix_burst 2) is spent: every newcomer waits...
    assert all(locked(throttle, address, 1.0) for address in newcomers)
    # ...and the earlier lockouts are all still there.
    assert all(locked(throttle, f"2001:db8:{n + 1:x}::1", 1.0) for n in range(10))
    # Once the lockouts expire, their buckets are evicted and newcomers tracked again.
    later = 600.0 * 3
    throttle.failed(newcomers[2], later)
    assert not locked(throttle, newcomers[3], later)
