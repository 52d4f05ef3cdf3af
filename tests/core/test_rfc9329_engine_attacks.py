"""Issue 23, findings 5-9: what a peer that never authenticates can make an RFC 9329 gateway
do, driven with the bytes it can send (no charon, a fake clock), on both data paths. Each
test failed on 96634d6."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tcpencap.core.admission import COOL_DOWN, COOL_DOWN_MAX
from tcpencap.core.lingering import BRIEF_LINGER
from tcpencap.core.outputs import Inject, Query, Steer, Transmit
from tcpencap.core.rfc9329_conn import State
from tcpencap.core.rfc9329_engine import Rfc9329Engine
from tcpencap.wire import rfc9329
from tcpencap.wire.ike import NON_ESP_MARKER, check_first_ike
from tcpencap.wire.packet import addr_bytes
from tests.core.test_rfc9329_engine import (  # noqa: F401  (datapath: every test on both paths)
    CB,
    GB,
    SPI_I,
    SPI_R,
    C,
    G,
    child_sa_event,
    closes,
    datapath,
    esp,
    from_charon,
    gateway_config,
    ike,
    make_engine,
    open_gateway,
    payload,
    raw_gateway,
    send_frames,
)

SPI_X = bytes.fromhex("0badc0de0badc0de")  # the attacker's own IKE SPI


def first(g: Rfc9329Engine, gid: int, now: float = 1.0, spi: bytes = SPI_I) -> None:
    """The prefix and an IKE_SA_INIT with initiator SPI ``spi`` on connection ``gid``."""
    g.receive_data(now, gid, 0, rfc9329.PREFIX)
    send_frames(g, gid, now, NON_ESP_MARKER + ike(spi_i=spi))


def steers(outs: list[Any]) -> list[tuple[bytes, bool, int]]:
    return [(o.peer, o.on, o.port) for o in outs if isinstance(o, Steer)]


def protected(spi_i: bytes) -> bytes:
    """charon's INFORMATIONAL request, encrypted (SK first), as a UDP 4500 payload."""
    return NON_ESP_MARKER + ike(37, spi_r=SPI_R, np=46, spi_i=spi_i)


def sent_on(outs: list[Any]) -> list[int]:
    return [o.conn_id for o in outs if isinstance(o, Transmit)]


# --- 5: steering by endpoint --------------------------------------------------------------


def test_a_gateway_steers_the_tcp_peers_endpoint_not_its_address() -> None:
    """A plain-UDP client behind the attacker's address (a NAT) keeps its UDP: only the TCP
    connection's endpoint is queued, and what charon sends to another port of the address
    never goes into the attacker's connection."""
    g, gid = raw_gateway()
    first(g, gid)
    assert steers(g.pull()) == [(CB, True, 50000)]
    # Were it queued anyway (a stale whole-address entry): charon's IKE and ESP to the
    # UDP client at C:4500 name SPIs the table does not know, and are dropped.
    g.outbound(2.0, from_charon(G, C, 4500, 4500, NON_ESP_MARKER + ike(spi_i=SPI_X)))
    g.outbound(2.0, from_charon(G, C, 4500, 4500, esp(0xC0FFEE01)))
    assert sent_on(g.pull()) == []
    assert g.router.drops == {"no-connection": 2}


def test_lingering_is_per_endpoint() -> None:
    g = make_engine(gateway_config(), 0.0)
    a = g.accept(0.0, G, 4500, C, 50000)
    b = g.accept(0.0, G, 4500, C, 50001)
    assert a and b
    first(g, a)
    first(g, b, spi=SPI_X)
    assert steers(g.pull()) == [(CB, True, 50000), (CB, True, 50001)]
    g.conns[a].sa_seen = True  # charon reported its SA
    g.connection_lost(2.0, a, 0, None)
    g.connection_lost(2.0, b, 0, None)
    assert steers(g.pull()) == []  # both linger: charon may still send to them
    listed = [{"c1": {"remote-host": C, "remote-port": "50000", "state": "ESTABLISHED"}}]
    released = []
    for now in (3.0, 5.0, 40.0, 80.0):
        g.handle_timer(now)
        for o in g.pull():
            if isinstance(o, Query):
                g.sas_listed(now, o.purpose, listed)
        released += steers(g.pull())
        if now == 5.0:  # the SA-less one goes after BRIEF_LINGER, the other stays
            assert released == [(CB, False, 50001)]
    assert released == [(CB, False, 50001)] and (CB, 50000) in g.lingering.endpoints


def test_one_message_connections_do_not_fill_the_steering_set() -> None:
    """A thousand IKE_SA_INITs that hang up: their endpoints go within BRIEF_LINGER, are
    bounded by max_pending meanwhile and never refuse a real client (limit-steered)."""
    g = make_engine(gateway_config(max_connections="20", max_pending="10"), 0.0)
    now = 0.0
    for port in range(1000, 2000):
        now += 0.001
        cid = g.accept(now, G, 4500, "198.18.7.7", port)
        assert cid is not None
        first(g, cid, now, spi=port.to_bytes(8, "big"))
        g.connection_lost(now, cid, 0, None)
    assert len(g.lingering.brief) == 10 and len(g.lingering.endpoints) == 10
    honest = g.accept(now, G, 4500, C, 50000)
    assert honest is not None
    first(g, honest, now)
    assert g.conns[honest].state is State.OPEN and "limit-steered" not in g.events
    g.handle_timer(now + BRIEF_LINGER)
    for o in g.pull():
        if isinstance(o, Query):  # charon: only their half-open SAs
            half = {"remote-host": "198.18.7.7", "remote-port": "1999", "state": "CONNECTING"}
            g.sas_listed(now + BRIEF_LINGER, o.purpose, [{"x": half}])
    assert list(g.lingering.endpoints.peers()) == [(CB, 50000)] and g.lingering.brief == {}


# --- 6: endpoint takeover -----------------------------------------------------------------


def test_a_second_connection_from_a_held_endpoint_is_refused() -> None:
    g, gid = open_gateway()
    assert g.accept(1.0, G, 443, C, 50000) is None  # the same ip:port, another listener
    assert g.events["endpoint-in-use"] == 1
    g.connection_lost(2.0, gid, 0, None)
    assert g.accept(2.0, G, 443, C, 50000) is not None  # free again once it closed


def test_protected_ike_at_another_endpoint_does_not_take_the_sas() -> None:
    """An attacker behind the victim's NAT quotes the victim's SPI; charon answering at
    the attacker's endpoint (a replayed request) must not move the victim's SAs."""
    g = make_engine(gateway_config(), 0.0)
    victim = g.accept(0.0, G, 4500, C, 50000)
    first(g, victim)
    g.conns[victim].sa_seen = True
    g.outbound(0.5, from_charon(G, C, 4500, 50000, esp(0xBEEF0001)))  # learns its ESP SPI
    attacker = g.accept(1.0, G, 4500, C, 50001)
    first(g, attacker, spi=SPI_X)
    send_frames(g, attacker, 1.0, NON_ESP_MARKER + ike(37, spi_r=SPI_R, np=46))
    g.pull()
    g.outbound(2.0, from_charon(G, C, 4500, 50001, protected(SPI_I)))
    g.outbound(2.0, from_charon(G, C, 4500, 50001, esp(0xBEEF0001)))
    assert sent_on(g.pull()) == [attacker, attacker]  # charon chose that endpoint
    assert g.conns[victim].entry.ike_spis == {SPI_I}
    assert g.conns[victim].entry.esp_spis == {0xBEEF0001}
    assert g.conns[attacker].entry.ike_spis == {SPI_X}
    assert g.router.views[attacker].drops["spi-move-refused"] == 2
    g.handle_timer(10.0)
    assert closes(g) == [] and g.conns[victim].state is State.OPEN
    # From a closing owner they do move (the client reconnected from a new port).
    g.close(g.conns[victim], "test")
    g.outbound(11.0, from_charon(G, C, 4500, 50001, protected(SPI_I)))
    assert SPI_I in g.conns[attacker].entry.ike_spis


def test_a_closed_connections_sas_wait_for_their_own_client() -> None:
    """When the victim's connection drops, an open connection of the same address that
    began with another SA (here one quoting a third connection's SPI, so it holds none of
    its own) does not inherit the victim's SPIs."""
    g = make_engine(gateway_config(), 0.0)
    victim = g.accept(0.0, G, 4500, C, 50000)
    first(g, victim)
    third = g.accept(0.0, G, 4500, C, 50003)
    first(g, third, spi=SPI_X)
    attacker = g.accept(1.0, G, 4500, C, 50001)
    first(g, attacker, spi=SPI_X)
    assert not g.conns[attacker].entry.carries_sa
    g.connection_lost(2.0, victim, 0, None)
    assert not g.conns[attacker].entry.carries_sa
    assert (GB, CB) in g.orphans
    back = g.accept(3.0, G, 4500, C, 50002)  # the victim, from a new port: resumes
    first(g, back, 3.0)
    assert SPI_I in g.conns[back].entry.ike_spis and not g.orphans


# --- 7: limits per source prefix ----------------------------------------------------------


def test_one_ipv6_slash_64_cannot_fill_max_pending() -> None:
    g = make_engine(gateway_config(max_pending="256"), 0.0)
    admitted = [g.accept(0, G, 4500, f"fd00:66::{i:x}", 1000) for i in range(1, 301)]
    assert sum(a is not None for a in admitted) == 8  # max_pending_per_source
    assert g.events["limit-pending-per-source"] == 292
    assert g.accept(0, G, 4500, "fd00:67::1", 1000) is not None  # another /64
    assert g.accept(0, G, 4500, C, 50000) is not None
    assert g.admission.pending_per_source == {"fd00:66::/64": 8, "fd00:67::/64": 1, f"{C}/32": 1}


def test_per_source_limits_count_the_prefix_and_are_given_back() -> None:
    g = make_engine(gateway_config(max_per_source="4", source_prefix_v4="24"), 0.0)
    ids = [g.accept(0, G, 4500, f"198.18.9.{i}", 1) for i in range(1, 7)]
    assert [i is not None for i in ids] == [True] * 4 + [False] * 2
    assert g.events["limit-per-source"] == 2
    for cid in ids[:4]:
        first(g, cid)  # past pending: still counted per source
    assert g.accept(0, G, 4500, "198.18.9.200", 1) is None
    for cid in ids[:4]:
        g.connection_lost(1.0, cid, 0, None)
    assert (
        g.admission.per_source == {}
        and g.admission.pending_per_source == {}
        and g.admission.n_pending == 0
    )
    assert g.accept(1.0, G, 4500, "198.18.9.200", 1) is not None


# --- 8: every frame counts ----------------------------------------------------------------


def test_a_keepalive_flood_is_cut_by_the_frame_rate() -> None:
    g, gid = open_gateway(max_frame_rate="100")
    g.receive_data(1.5, gid, 0, rfc9329.KEEPALIVE_FRAME * 5000)
    assert closes(g) == ["frame rate limit"]
    assert g.events["limit-frame-rate"] == 1
    # Python stops at the limit; the native pump drops a read's keepalives in C first
    assert 99 <= g.conns[gid].drops["keepalive"] <= 5000


def test_a_source_that_flooded_cools_down_before_it_connects_again() -> None:
    """A cut flood resumed at once on a new connection (each one costing an accept and an
    IKE_SA_INIT for charon): its source prefix is refused for COOL_DOWN, others are not."""
    g, gid = open_gateway(max_frame_rate="100")
    g.receive_data(1.5, gid, 0, rfc9329.KEEPALIVE_FRAME * 500)
    g.connection_lost(1.6, gid, 0, None)
    assert g.accept(1.7, G, 4500, C, 50001) is None
    assert g.events["limit-cool-down"] == 1
    assert g.accept(1.7, G, 4500, "198.18.1.3", 50001) is not None
    assert g.accept(1.5 + COOL_DOWN, G, 4500, C, 50002) is not None
    for i in range(COOL_DOWN_MAX + 10):  # bounded, oldest out first
        g.admission.cool_down(2.0, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32")
    assert len(g.admission.cooling) == COOL_DOWN_MAX


def test_empty_frames_count_and_close_after_max_invalid_frames() -> None:
    g, gid = open_gateway(max_invalid_frames="16")
    g.receive_data(1.5, gid, 0, b"\x00\x02" * 15)
    assert closes(g) == []
    g.receive_data(1.6, gid, 0, b"\x00\x02" * 15)
    assert closes(g) == ["too many invalid frames"]
    assert g.conns[gid].drops["invalid-frame"] == 16


def test_malformed_first_messages_count_as_invalid() -> None:
    g, gid = raw_gateway(max_invalid_frames="4")
    g.receive_data(0.1, gid, 0, rfc9329.PREFIX)
    send_frames(g, gid, 0.1, *[NON_ESP_MARKER + ike(np=33)[:28]] * 4)
    assert closes(g) == ["too many invalid frames"]


# --- 9: first messages, UDP bounds, stale cache hits --------------------------------------


def test_a_first_message_whose_payload_is_missing_is_refused() -> None:
    """An IKE header announcing an SA payload with nothing behind it held the connection
    for no_sa_timeout (30 s) instead of first_message_timeout (5 s)."""
    g, gid = raw_gateway(first_message_timeout="5s", no_sa_timeout="30s")
    g.receive_data(0.1, gid, 0, rfc9329.PREFIX)
    header = ike(np=33)[:24] + struct.pack("!I", 28)
    send_frames(g, gid, 0.1, NON_ESP_MARKER + header)
    assert g.conns[gid].state is State.PREFIX_RECEIVED
    assert g.conns[gid].drops["malformed-first-ike"] == 1
    g.handle_timer(5.0)
    assert closes(g) == ["first-message deadline"]


def _big_esp_after_open(peer: str, n: int) -> tuple[Rfc9329Engine, int, list[Any]]:
    g = make_engine(gateway_config(), 0.0)
    gid = g.accept(0.0, G if ":" not in peer else "fd00:100::2", 4500, peer, 50000)
    assert gid is not None
    first(g, gid)
    g.pull()
    if g.datapath.inject_batch is not None:
        g.datapath.inject_batch.take()
    send_frames(g, gid, 1.0, esp(0x1234, n - 8), esp(0x1235))
    outs = g.pull()
    packets = [o.packet for o in outs if isinstance(o, Inject)]
    if g.datapath.inject_batch is not None:
        packets += g.datapath.inject_batch.take()
    return g, gid, packets


def test_frames_no_udp_datagram_can_carry_are_invalid() -> None:
    """65508 octets of ESP (a 65510-octet frame) overflowed the IPv4 packet's 16-bit length
    (struct.error in the protocol callback, the connection paused). The bound is exact:
    65507 for IPv4, 65527 for IPv6."""
    for peer, limit in ((C, 65507), ("fd00:1::2", 65527)):
        g, gid, packets = _big_esp_after_open(peer, limit)
        assert len(packets) == 2 and max(map(len, packets)) == limit + 28 + (peer != C) * 20
        g, gid, packets = _big_esp_after_open(peer, limit + 1)
        assert len(packets) == 1  # the small one behind it still went through
        conn = g.conns[gid]
        assert conn.state is State.OPEN and conn.drops["frame-too-big"] == 1
    # IKE carries the 4-octet non-ESP marker on 4500: 65503 is the most for IPv4.
    g, gid = open_gateway()
    send_frames(g, gid, 2.0, NON_ESP_MARKER + ike(37, spi_r=SPI_R) + b"\0" * (65504 - 68))
    assert g.conns[gid].drops["frame-too-big"] == 1


def test_a_flow_cache_hit_for_a_closed_connection_is_counted() -> None:
    """The native queue reader frames a batch with the cache as it was; a connection that
    closed meanwhile raised KeyError and lost the round's other packets."""
    g, gid = open_gateway()
    g.connection_lost(2.0, gid, 0, None)
    other = from_charon(G, "198.18.1.9", 4500, 4500, esp(0x777))
    g.outbound_batch(2.0, [other], [(gid, b"\x00\x0a" + b"e" * 8, 1)])
    assert g.router.drops == {"flow-stale": 1, "no-connection": 1}


# --- the first-message check on generated payload chains ----------------------------------


chains = st.lists(st.binary(max_size=40), min_size=1, max_size=12)


def message(bodies: list[bytes], types: list[int], major: int = 2) -> bytes:
    chain = b""
    for i, body in enumerate(bodies):
        nxt = types[i + 1] if i + 1 < len(bodies) else 0
        chain += payload(body, nxt)
    n = 28 + len(chain)
    hdr = SPI_I + bytes(8) + struct.pack("!BBBBII", types[0], major << 4, 34 if major == 2 else 2,
                                         8, 0, n)  # fmt: skip
    return hdr + chain


@given(bodies=chains, data=st.data(), major=st.sampled_from([1, 2]))
def test_whole_chains_pass_and_every_shorter_one_fails(
    bodies: list[bytes], data: st.DataObject, major: int
) -> None:
    types = data.draw(st.lists(st.integers(1, 45), min_size=len(bodies), max_size=len(bodies)))
    msg = message(bodies, types, major)
    assert check_first_ike(msg) == ""
    cut = data.draw(st.integers(28, len(msg) - 1))
    short = msg[:24] + struct.pack("!I", cut) + msg[28:cut]  # length field says so too
    assert check_first_ike(short) != ""


@given(st.binary(min_size=28, max_size=120))
def test_any_chain_gives_a_verdict(raw: bytes) -> None:
    msg = raw[:24] + struct.pack("!I", len(raw)) + raw[28:]
    assert isinstance(check_first_ike(msg), str)


def test_an_encrypted_payload_ends_the_chain_it_must_fill() -> None:
    sk = payload(b"\x00" * 40, next_payload=33)  # the inner chain is encrypted
    hdr = SPI_I + SPI_R + struct.pack("!BBBBII", 46, 0x20, 37, 8, 0, 28 + len(sk))
    assert check_first_ike(hdr + sk) == ""
    bad = SPI_I + SPI_R + struct.pack("!BBBBII", 46, 0x20, 37, 8, 0, 28 + len(sk) + 4)
    assert "does not end" in check_first_ike(bad + sk + b"\0" * 4)
    empty = SPI_I + bytes(8) + struct.pack("!BBBBII", 0, 0x20, 34, 8, 0, 28)
    assert check_first_ike(empty) == "IKE message without payloads"
    assert addr_bytes(C) == CB


def test_a_resumed_sa_brings_charons_old_endpoint_to_its_new_connection() -> None:
    """After a restart of the gateway's tcpencap the client reconnects from a new port and
    resumes with ESP; charon still names the old port. That endpoint (and only it) is
    steered and routed to the new connection, and lingers with it."""
    g, gid = raw_gateway()  # the client's new connection, from port 50000
    g.vici_state(0.5, True)
    g.vici_resync(0.5, [{"c1-gw": {**child_sa_event(0xC0FFEE01)["c1-gw"], "remote-port": "41000"}}])
    g.receive_data(1.0, gid, 0, rfc9329.PREFIX)
    send_frames(g, gid, 1.0, esp(0xC0FFEE01))
    assert steers(g.pull()) == [(CB, True, 50000), (CB, True, 41000)]
    g.outbound(2.0, from_charon(G, C, 4500, 41000, esp(0xBEEF0001)))
    g.outbound(2.0, from_charon(G, C, 4500, 41000, protected(SPI_I)))
    assert sent_on(g.pull()) == [gid, gid]
    other = g.accept(2.0, G, 4500, C, 41000)  # the alias is held: refused like the endpoint
    assert other is None and g.events["endpoint-in-use"] == 1
    g.connection_lost(3.0, gid, 0, None)
    assert set(g.lingering.release_at) == {(CB, 50000), (CB, 41000)} and g.lingering.brief == {}


def test_a_connection_refused_at_the_steering_limit_leaves_nothing_steered() -> None:
    g = make_engine(gateway_config(max_connections="1"), 0.0)
    a = g.accept(0.0, G, 4500, C, 50000)
    first(g, a)
    g.conns[a].sa_seen = True
    g.connection_lost(0.5, a, 0, None)  # lingers: the steering set is full
    b = g.accept(1.0, G, 4500, "198.18.1.3", 50000)
    first(g, b, spi=SPI_X)
    assert closes(g) == ["limit-steered"]
    g.connection_lost(1.1, b, 0, None)
    assert list(g.lingering.endpoints.peers()) == [(CB, 50000)] and g.lingering.brief == {}
