"""The gateway's door on its own (tcpencap.core.gateway_door), called directly with a fake
clock; the engine is its host (its parts are real: admission, lingering, the table):
who is taken, what a first message must be, the deadlines, the cost of a flood and what
a connection's loss gives back."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.core.admission import COOL_DOWN
from tcpencap.core.lingering import BRIEF_LINGER
from tcpencap.core.outputs import Close, Steer
from tcpencap.core.rfc9329_conn import Conn, Event, State
from tcpencap.core.rfc9329_engine import Rfc9329Engine
from tests.core.test_rfc9329_engine import C, G, child_sa_event, esp, gateway_config, ike

OTHER = "198.18.7.9"  # another source prefix than C's


def gateway(**gw: str) -> Rfc9329Engine:
    return Rfc9329Engine(gateway_config(**gw), 0.0)


def arrive(e: Rfc9329Engine, now: float = 0.0, peer: str = C, port: int = 50000) -> Conn:
    """A connection taken by the door, its prefix received."""
    gid = e.door.accept(now, G, 4500, peer, port)
    assert gid is not None
    conn = e.conns[gid]
    conn.handle(Event.PREFIX)
    return conn


def closes(e: Rfc9329Engine) -> list[str]:
    return [o.reason for o in e.pull() if isinstance(o, Close)]


def lose(e: Rfc9329Engine, now: float, conn: Conn) -> None:
    e.connection_lost(now, conn.conn_id, conn.generation)


def test_accept_counts_and_arms_the_first_message_deadline() -> None:
    e = gateway(first_message_timeout="5s")
    conn = arrive(e, 1.0)
    assert conn.counted and conn.source == f"{C}/32"
    assert (e.admission.n_gateway, e.admission.n_pending) == (1, 1)
    e.handle_timer(5.9)
    assert closes(e) == []
    e.handle_timer(6.0)
    assert closes(e) == ["first-message deadline"]
    assert conn.drops == {"first-message-timeout": 1} and e.events["deadline"] == 1


def test_a_second_connection_from_the_same_endpoint_is_refused() -> None:
    e = gateway()
    arrive(e)
    assert e.door.accept(0.0, G, 4500, C, 50000) is None
    assert e.events == {"endpoint-in-use": 1} and e.admission.n_gateway == 1
    assert e.door.accept(0.0, G, 4500, C, 50001) is not None  # another port is another peer


def test_limits_refuse_with_their_own_event() -> None:
    e = gateway(max_pending_per_source="1")
    arrive(e)
    assert e.door.accept(0.0, G, 4500, C, 50001) is None
    assert e.events == {"limit-pending-per-source": 1}
    assert e.door.accept(0.0, G, 4500, OTHER, 50001) is not None


def test_a_proxy_connection_takes_a_pending_slot_until_its_header() -> None:
    e = gateway(max_pending="1")
    assert e.door.admit_proxied(0.0, "lb")
    assert e.admission.n_proxied == 1
    assert not e.door.admit_proxied(0.0, "lb")  # the slot is taken
    assert e.events == {"limit-pending": 1} and e.admission.n_proxied == 1
    e.proxied_done()
    assert e.door.admit_proxied(0.0, "lb")


def test_a_malformed_first_ike_is_invalid_and_the_deadline_keeps_running() -> None:
    e = gateway(max_invalid_frames="2")
    conn = arrive(e)
    assert not e.door.admit_ike(1.0, conn, ike()[:-1])
    assert conn.state is State.PREFIX_RECEIVED and conn.invalid == 1
    assert closes(e) == []
    assert not e.door.admit_ike(1.0, conn, ike(exchange=99))
    assert closes(e) == ["too many invalid frames"]
    assert e.admission.cooling == {f"{C}/32": 1.0 + COOL_DOWN}


def test_a_well_formed_first_ike_steers_the_endpoint_and_arms_the_sa_deadline() -> None:
    e = gateway(no_sa_timeout="30s")
    conn = arrive(e)
    assert e.door.admit_ike(1.0, conn, ike())
    assert conn.state is State.OPEN and conn.first_at == 1.0
    assert e.admission.n_pending == 0 and e.admission.n_gateway == 1
    [steer] = e.pull()
    assert isinstance(steer, Steer) and (steer.port, steer.on) == (50000, True)
    e.handle_timer(30.9)
    assert closes(e) == []
    e.handle_timer(31.0)
    assert closes(e) == ["no IKE SA"] and conn.drops == {"no-sa-timeout": 1}


def test_a_connection_with_charons_sa_passes_the_sa_deadline() -> None:
    e = gateway(no_sa_timeout="30s")
    conn = arrive(e)
    e.door.admit_ike(1.0, conn, ike())
    conn.sa_seen = True
    e.handle_timer(40.0)
    assert closes(e) == []


def test_a_full_steering_set_refuses_a_first_message() -> None:
    e = gateway(max_connections="1")
    first = arrive(e)
    e.door.admit_ike(1.0, first, ike())
    first.sa_seen = True  # a real peer: its endpoint lingers in the steering set
    lose(e, 2.0, first)
    second = arrive(e, 3.0, port=50001)
    assert not e.door.admit_ike(3.0, second, ike())
    assert "limit-steered" in closes(e) and e.events["limit-steered"] == 1


def test_esp_first_needs_an_spi_charon_holds_with_this_peer() -> None:
    e = gateway()
    e.vici_state(0.0, True)
    e.vici_event(0.0, "child-updown", child_sa_event(0xC0FFEE01))
    conn = arrive(e)
    assert not e.door.admit_esp(1.0, conn, esp(0xC0FFEE02))
    assert conn.drops == {"esp-unknown-spi-first": 1} and conn.state is State.PREFIX_RECEIVED
    assert e.door.admit_esp(1.0, conn, esp(0xC0FFEE01))
    assert conn.state is State.OPEN and conn.sa_seen


def test_without_vici_plausible_esp_passes_unconfirmed() -> None:
    e = gateway()
    conn = arrive(e)
    assert not e.door.admit_esp(1.0, conn, esp(0xFF))  # reserved SPIs (RFC 4303)
    assert not e.door.admit_esp(1.0, conn, esp(0x100)[:7])  # too short for ESP
    assert e.door.admit_esp(1.0, conn, esp(0x100))
    assert conn.state is State.OPEN and not conn.sa_seen and conn.resume_spi == 0x100


def test_a_flood_closes_and_cools_the_source_down() -> None:
    e = gateway()
    conn = arrive(e)
    e.door.over_rate(1.0, conn)
    assert closes(e) == ["frame rate limit"] and conn.drops == {"frame-rate": 1}
    lose(e, 1.0, conn)
    assert e.door.accept(1.0, G, 4500, C, 50001) is None
    assert e.events["limit-cool-down"] == 1
    assert e.door.accept(1.0 + COOL_DOWN, G, 4500, C, 50001) is not None


def test_a_lost_connection_gives_its_counts_back_and_lingers_after_a_first_message() -> None:
    e = gateway()
    silent, talked = arrive(e), arrive(e, port=50001)
    e.door.admit_ike(1.0, talked, ike())
    e.pull()
    lose(e, 2.0, silent)
    lose(e, 2.0, talked)
    a = e.admission
    assert (a.n_gateway, a.n_pending, a.per_source, a.pending_per_source) == (0, 0, {}, {})
    assert set(e.lingering.release_at) == {(talked.entry.peer, 50001)}  # only who talked
    assert e.lingering.release_at[(talked.entry.peer, 50001)] == 2.0 + BRIEF_LINGER


Step = tuple[str, int]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["accept", "first", "lose", "flood"]), st.integers(0, 5)),
        max_size=40,
    )
)
def test_admission_counts_always_match_the_connections(steps: list[Step]) -> None:
    """Whatever arrives, talks, floods and goes, the counts are those of the counted
    connections: all of them, those without a first message, and per source."""
    e = gateway(max_connections="4", max_pending="3", max_per_source="3")
    now = 0.0
    for what, k in steps:
        now += 0.5
        live = sorted(e.conns)
        if what == "accept":
            gid = e.door.accept(now, G, 4500, (C, OTHER)[k % 2], 50000 + k)
            if gid is not None:
                e.conns[gid].handle(Event.PREFIX)
        elif live:
            conn = e.conns[live[k % len(live)]]
            if what == "first" and conn.state is State.PREFIX_RECEIVED:
                e.door.admit_ike(now, conn, ike())
            elif what == "flood" and not conn.ending:
                e.door.over_rate(now, conn)
            elif what == "lose":
                lose(e, now, conn)
        e.pull()
        counted = [c for c in e.conns.values() if c.counted]
        waiting = [c for c in counted if c.first_at is None]
        a = e.admission
        assert a.n_gateway == len(counted) <= 4 and a.n_pending == len(waiting)
        assert a.per_source == _by_source(counted)
        assert a.pending_per_source == _by_source(waiting)


def _by_source(conns: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in conns:
        out[c.source] = out.get(c.source, 0) + 1
    return out
