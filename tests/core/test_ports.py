"""Tests for local port allocation: fixed ports, random ports in a range, exhaustion."""

from __future__ import annotations

import random

import hypothesis.strategies as st
import pytest
from hypothesis import given

from tcpencap.core.ports import PortAllocator, PortsExhausted


def test_fixed_port_returned_as_is_for_every_connection():
    alloc = PortAllocator(fixed=4500, rng=random.Random(1))
    assert [alloc.allocate() for _ in range(3)] == [4500, 4500, 4500]
    assert alloc.allocate(exclude={4501}) == 4500
    # The fixed port is shared, so it is not tracked as a unique allocation.
    assert alloc.in_use == frozenset()
    alloc.release(4500)
    assert alloc.allocate() == 4500


def test_fixed_port_refused_when_excluded():
    alloc = PortAllocator(fixed=4500)
    with pytest.raises(PortsExhausted):
        alloc.allocate(exclude=frozenset({4500}))
    with pytest.raises(PortsExhausted):
        alloc.allocate(exclude={4500, 1})


def test_fixed_port_ignores_range():
    alloc = PortAllocator(fixed=80, low=40000, high=40010)
    assert alloc.allocate() == 80


def test_random_ports_in_range_and_unique():
    alloc = PortAllocator(low=40000, high=40099, rng=random.Random(7))
    ports = [alloc.allocate() for _ in range(100)]
    assert all(40000 <= p <= 40099 for p in ports)
    assert len(set(ports)) == 100
    assert alloc.in_use == frozenset(range(40000, 40100))
    with pytest.raises(PortsExhausted):
        alloc.allocate()


def test_default_range_is_linux_ephemeral():
    alloc = PortAllocator(rng=random.Random(3))
    assert (alloc.low, alloc.high) == (32768, 60999)
    ports = {alloc.allocate() for _ in range(200)}
    assert len(ports) == 200
    assert all(32768 <= p <= 60999 for p in ports)


def test_default_rng_works_without_seed():
    alloc = PortAllocator(low=50000, high=50003)
    got = {alloc.allocate() for _ in range(4)}
    assert got == {50000, 50001, 50002, 50003}


def test_release_makes_port_available_again():
    alloc = PortAllocator(low=45000, high=45000, rng=random.Random(0))
    assert alloc.allocate() == 45000
    with pytest.raises(PortsExhausted):
        alloc.allocate()
    alloc.release(45000)
    assert alloc.in_use == frozenset()
    assert alloc.allocate() == 45000
    alloc.release(12345)  # releasing something never allocated is harmless
    assert alloc.in_use == frozenset({45000})


def test_release_then_reallocate_in_full_range():
    alloc = PortAllocator(low=45000, high=45009, rng=random.Random(5))
    ports = [alloc.allocate() for _ in range(10)]
    alloc.release(ports[3])
    alloc.release(ports[7])
    again = {alloc.allocate(), alloc.allocate()}
    assert again == {ports[3], ports[7]}
    with pytest.raises(PortsExhausted):
        alloc.allocate()


def test_exclude_is_honoured():
    alloc = PortAllocator(low=46000, high=46009, rng=random.Random(11))
    exclude = frozenset(range(46000, 46009))  # all but 46009
    assert alloc.allocate(exclude) == 46009
    with pytest.raises(PortsExhausted):
        alloc.allocate(exclude)
    # Excluded ports are not taken by the allocator.
    assert alloc.in_use == frozenset({46009})


def test_exclusion_of_whole_range_exhausts():
    alloc = PortAllocator(low=46000, high=46003, rng=random.Random(2))
    with pytest.raises(PortsExhausted):
        alloc.allocate(set(range(46000, 46004)))
    assert alloc.in_use == frozenset()


@pytest.mark.parametrize("seed", range(20))
def test_nearly_full_large_range_finds_last_port(seed):
    low, high = 32768, 60999
    last = random.Random(f"target-{seed}").randint(low, high)
    alloc = PortAllocator(low=low, high=high, rng=random.Random(seed))
    # Everything but one port is refused (held by others): random probes will miss,
    # the sweep must still find it.
    exclude = frozenset(range(low, high + 1)) - {last}
    assert alloc.allocate(exclude) == last


def test_nearly_full_by_own_allocations_finds_last_port():
    alloc = PortAllocator(low=47000, high=47999, rng=random.Random(9))
    ports = {alloc.allocate() for _ in range(999)}
    assert len(ports) == 999
    (missing,) = set(range(47000, 48000)) - ports
    assert alloc.allocate() == missing
    with pytest.raises(PortsExhausted):
        alloc.allocate()


def test_deterministic_with_seeded_random():
    def run(seed: int) -> list[int]:
        alloc = PortAllocator(low=33000, high=34000, rng=random.Random(seed))
        out = [alloc.allocate() for _ in range(50)]
        alloc.release(out[0])
        out.append(alloc.allocate(exclude={out[1] + 1}))
        return out

    assert run(1234) == run(1234)
    assert run(1234) != run(4321)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"low": 0, "high": 100},
        {"low": 100, "high": 99},
        {"low": 1, "high": 65536},
        {"low": -5, "high": 10},
        {"low": 70000, "high": 70001},
        {"fixed": 65536},
        {"fixed": -1},
    ],
)
def test_bad_ranges_raise(kwargs):
    with pytest.raises(ValueError):
        PortAllocator(**kwargs)


def test_extreme_valid_ranges():
    assert PortAllocator(low=1, high=1, rng=random.Random(0)).allocate() == 1
    assert PortAllocator(low=65535, high=65535, rng=random.Random(0)).allocate() == 65535
    assert PortAllocator(fixed=65535).allocate() == 65535
    assert PortAllocator(fixed=1).allocate() == 1


@given(
    seed=st.integers(0, 2**32),
    low=st.integers(1, 65535),
    span=st.integers(0, 40),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=80),
)
def test_random_allocate_release_sequences(seed, low, span, ops):
    high = min(low + span, 65535)
    alloc = PortAllocator(low=low, high=high, rng=random.Random(seed))
    live: set[int] = set()
    for allocate, pick in ops:
        if allocate:
            if len(live) == high - low + 1:
                with pytest.raises(PortsExhausted):
                    alloc.allocate()
                continue
            port = alloc.allocate()
            assert low <= port <= high
            assert port not in live
            live.add(port)
        elif live:
            port = sorted(live)[pick % len(live)]
            alloc.release(port)
            live.discard(port)
        assert alloc.in_use == frozenset(live)
