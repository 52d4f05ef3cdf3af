"""tcpencap.core.ctcp_cookie: the gateway's SYN+ACK ISN is a keyed hash of the 4-tuple and
a time slot, good in its own slot and the next, and for nothing else."""

from __future__ import annotations

import ipaddress

from tcpencap.core.ctcp_cookie import SynCookies

SECRET = bytes(range(32))
GW, CLIENT = bytes([198, 19, 0, 2]), bytes([198, 18, 1, 2])
TUPLE = (GW, 10000, CLIENT, 40000)


def test_a_cookie_is_good_in_its_slot_and_the_next_only():
    cookies = SynCookies(SECRET, lifetime=3.0)
    isn = cookies.make(2.9, *TUPLE)  # slot 0
    assert 0 <= isn < 2**32
    assert cookies.check(0.0, *TUPLE, isn)
    assert cookies.check(3.0, *TUPLE, isn)  # slot 1: the next
    assert cookies.check(5.99, *TUPLE, isn)
    assert not cookies.check(6.0, *TUPLE, isn)  # slot 2: too late


def test_a_cookie_belongs_to_its_four_tuple():
    cookies = SynCookies(SECRET)
    isn = cookies.make(10.0, *TUPLE)
    assert not cookies.check(10.0, GW, 10000, CLIENT, 40001, isn)  # another source port
    assert not cookies.check(10.0, GW, 10001, CLIENT, 40000, isn)  # another gateway port
    assert not cookies.check(10.0, GW, 10000, bytes([198, 18, 1, 3]), 40000, isn)
    assert not cookies.check(10.0, *TUPLE, (isn + 1) % 2**32)


def test_the_secret_decides_the_cookie():
    a, b = SynCookies(SECRET), SynCookies(bytes(32))
    assert a.make(1.0, *TUPLE) == SynCookies(SECRET).make(1.0, *TUPLE)  # same key, same ISN
    assert a.make(1.0, *TUPLE) != b.make(1.0, *TUPLE)
    assert not b.check(1.0, *TUPLE, a.make(1.0, *TUPLE))
    # without a secret given, each instance draws its own
    assert SynCookies().make(1.0, *TUPLE) != SynCookies().make(1.0, *TUPLE)


def test_ipv6_tuples_work_the_same():
    cookies = SynCookies(SECRET)
    gw6, client6 = (
        ipaddress.ip_address("fd00:100::2").packed,
        ipaddress.ip_address("fd00:1::2").packed,
    )
    isn = cookies.make(0.5, gw6, 10000, client6, 50000)
    assert cookies.check(0.5, gw6, 10000, client6, 50000, isn)
    assert not cookies.check(0.5, gw6, 10000, client6, 50001, isn)
