"""The gateway's admission counts on their own (tcpencap.core.admission): every limit
refuses at its value, counts return to zero, cool-downs expire and stay bounded."""

from __future__ import annotations

from types import SimpleNamespace

from tcpencap.core.admission import COOL_DOWN, COOL_DOWN_MAX, Admission

GW = SimpleNamespace(
    max_connections=4,
    max_per_source=2,
    max_pending_per_source=1,
    max_pending=3,
    source_prefix_v4=24,
    source_prefix_v6=64,
)


def test_sources_are_prefixes() -> None:
    assert Admission.source_of(GW, "198.18.1.77") == "198.18.1.0/24"
    assert Admission.source_of(GW, "fd00:1:2:3:4::9") == "fd00:1:2:3::/64"


def test_each_limit_refuses_at_its_value_and_counts_come_back() -> None:
    a = Admission()
    assert a.refuse_accept(GW, 0.0, "s1") is None
    a.admit("s1")
    assert a.refuse_accept(GW, 0.0, "s1")[0] == "limit-pending-per-source"
    a.first_message("s1")
    a.admit("s1")
    a.first_message("s1")
    assert a.refuse_accept(GW, 0.0, "s1")[0] == "limit-per-source"
    a.admit("s2")
    a.admit("s3")
    assert a.n_gateway == 4 and a.n_pending == 2
    assert a.refuse_accept(GW, 0.0, "s4")[0] == "limit-connections"
    for source, waiting in (("s1", False), ("s1", False), ("s2", True), ("s3", True)):
        a.gone(source, waiting)
    assert (a.n_gateway, a.n_pending, a.per_source, a.pending_per_source) == (0, 0, {}, {})


def test_proxied_connections_take_pending_slots() -> None:
    a = Admission()
    for _ in range(3):
        assert a.admit_proxied(GW) is None
    assert a.admit_proxied(GW)[0] == "limit-pending"
    assert a.n_proxied == 3  # a refusal takes no slot
    a.proxied_done()
    assert a.refuse_accept(GW, 0.0, "s1") is None


def test_a_cool_down_refuses_its_source_until_it_expires() -> None:
    a = Admission()
    a.cool_down(1.0, "s1")
    a.cool_down(1.0, "")  # a connection without a source (a client's) cools nothing
    assert a.refuse_accept(GW, 1.5, "s1")[0] == "limit-cool-down"
    assert a.refuse_accept(GW, 1.5, "s2") is None
    assert a.refuse_accept(GW, 1.0 + COOL_DOWN, "s1") is None
    a.expire(1.0 + COOL_DOWN)
    assert a.cooling == {}
    for i in range(COOL_DOWN_MAX + 3):
        a.cool_down(2.0, f"s{i}")
    assert len(a.cooling) == COOL_DOWN_MAX and "s0" not in a.cooling
