"""tcpencap.core.ctcp_limits: what one source may hold of a cTCP gateway and how fast the
gateway answers strangers; the time is an argument, so the clock here is a plain number."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from tcpencap.core.ctcp_limits import PrefixBuckets, SourceSlots, TokenBucket, source_prefix
from tcpencap.wire.packet import addr_bytes

V4 = st.binary(min_size=4, max_size=4)
V6 = st.binary(min_size=16, max_size=16)


def test_limits_helpers_together() -> None:
    a, b = addr_bytes("198.18.66.6"), addr_bytes("198.18.66.200")
    assert source_prefix(a, 24) == source_prefix(b, 24) != source_prefix(a, 32)
    assert source_prefix(addr_bytes("fd00:1::1")) == source_prefix(addr_bytes("fd00:1::ffff:1"))
    assert source_prefix(addr_bytes("fd00:1::1")) != source_prefix(addr_bytes("fd00:2::1"))
    assert source_prefix(addr_bytes("0.0.0.0"), 8) != source_prefix(addr_bytes("::"), 8, 8)
    slots = SourceSlots(2)
    for _ in range(2):
        slots.take(a)
    assert slots.full(a) and not slots.full(b)
    for _ in range(2):
        slots.give_back(a)
    assert len(slots) == 0 and not slots.full(a)
    pb = PrefixBuckets(1.0, 100.0, networks=3)
    nets = [addr_bytes(f"198.18.{n}.1") for n in range(5)]
    assert all(pb.allow(0.0, a) for a in nets) and len(pb) == 3  # the oldest forgotten
    assert pb.allow(0.0, nets[4]) and not pb.allow(0.0, nets[4])  # a burst of 2 * rate
    tb = TokenBucket(10.0, 5.0)
    assert sum(tb.allow(0.0) for _ in range(20)) == 5
    assert sum(tb.allow(1.0) for _ in range(20)) == 5  # refilled to the burst, not beyond
    assert sum(tb.allow(1.1) for _ in range(20)) == 1


@given(V4, V4, st.integers(0, 32))
def test_two_ipv4_addresses_are_one_source_exactly_when_their_prefixes_agree(
    a: bytes, b: bytes, bits: int
) -> None:
    net_a = ipaddress.ip_network((ipaddress.ip_address(a), bits), strict=False)
    same = ipaddress.ip_address(b) in net_a
    assert (source_prefix(a, bits) == source_prefix(b, bits)) == same


@given(V6, V6, st.integers(0, 128))
def test_two_ipv6_addresses_are_one_source_exactly_when_their_prefixes_agree(
    a: bytes, b: bytes, bits: int
) -> None:
    shift = 128 - bits
    same = int.from_bytes(a, "big") >> shift == int.from_bytes(b, "big") >> shift
    assert (source_prefix(a, 32, bits) == source_prefix(b, 32, bits)) == same


@given(V4, V6, st.integers(0, 32), st.integers(0, 128))
def test_an_ipv4_source_never_equals_an_ipv6_one(a: bytes, b: bytes, b4: int, b6: int) -> None:
    assert source_prefix(a, b4, b6) != source_prefix(b, b4, b6)


@given(st.lists(st.sampled_from(["take", "give"]), max_size=60), st.integers(1, 5))
def test_source_slots_count_what_is_held_and_forget_a_source_at_zero(
    ops: list[str], per_source: int
) -> None:
    slots = SourceSlots(per_source, v4_bits=24)
    a, same_net = addr_bytes("198.18.7.1"), addr_bytes("198.18.7.200")
    held = 0
    for op in ops:
        if op == "take":
            slots.take(a)
            held += 1
        else:
            slots.give_back(same_net)  # the same /24: the same source
            held = max(0, held - 1)
        assert slots.full(a) == (held >= per_source)
        assert len(slots) == (1 if held else 0)
    assert not slots.full(addr_bytes("198.18.8.1"))


@given(
    st.floats(0.1, 100.0),
    st.integers(1, 20),
    st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=50),
)
def test_token_bucket_never_allows_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, steps: list[float]
) -> None:
    tb = TokenBucket(rate, float(burst))
    now, allowed = 0.0, 0
    for step in steps:
        now += step
        allowed += sum(tb.allow(now) for _ in range(burst + 3))
    assert allowed <= burst + rate * now + 1e-6


def test_token_bucket_going_back_in_time_adds_nothing() -> None:
    tb = TokenBucket(1.0, 1.0)
    assert tb.allow(10.0) and not tb.allow(10.0)
    assert not tb.allow(5.0)  # an earlier time: no refill (no negative one either)
    assert tb.allow(6.0)


def test_prefix_buckets_give_each_source_its_own_share_under_a_total() -> None:
    pb = PrefixBuckets(rate=2.0, total=5.0, networks=10)
    flood, honest = addr_bytes("198.18.66.6"), addr_bytes("198.18.1.2")
    assert sum(pb.allow(0.0, flood) for _ in range(100)) == 4  # burst of 2 * rate
    assert pb.allow(0.0, honest)  # the flood did not spend the honest source's share
    others = [addr_bytes(f"198.18.{n}.9") for n in range(10, 20)]
    assert sum(pb.allow(0.0, o) for o in others) == 0  # the total (5) is spent
    assert len(pb) == 10
