"""The cTCP gateway engine against the bytes a remote, unauthenticated host can send.

Each test is one finding of the security review (issue 23, findings 1-3) driven through
the engine with a fake clock: no charon, no keys, only segments an attacker can forge."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.config import Config, GatewayConfig
from tcpencap.core.ctcp_conn import Drop, State
from tcpencap.core.ctcp_engine import CtcpEngine
from tcpencap.core.outputs import Inject, SendRaw, Steer
from tcpencap.core.reload import CtcpPeers
from tcpencap.wire.ctcp import encapsulate, read_segment
from tcpencap.wire.packet import (
    PROTO_UDP,
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    addr_bytes,
    build_ip,
    build_tcp,
    build_udp,
    build_udp_packet,
    parse_ip,
    parse_udp,
)

G = addr_bytes("198.19.0.2")
G6 = addr_bytes("fd00:19::2")
HONEST = addr_bytes("198.18.1.2")
ATTACKER = addr_bytes("198.18.66.6")
IKE = bytes(range(1, 9)) + bytes(8) + b"\x21\x20\x22\x08" + bytes(4) + (28).to_bytes(4, "big")


def gateway(**settings: Any) -> CtcpEngine:
    """A gateway listening on port 10000 of every address, with these gateway settings."""
    listen = (("0.0.0.0", 10000), ("::", 10000))
    cfg = Config(gateway=GatewayConfig(ctcp_listen=listen, **settings))
    return CtcpEngine(cfg, 0.0, rng=random.Random(5))


def syn(gw: CtcpEngine, src: bytes, port: int, now: float, dst: bytes = G) -> int | None:
    """A SYN; the cookie of the SYN+ACK it got, None if none."""
    gw.inbound(now, build_ip(src, dst, 6, build_tcp(src, dst, port, 10000, 1000, 0, TCP_SYN)))
    sends = [o for o in gw.pull() if type(o) is SendRaw]
    assert len(sends) <= 1
    if not sends:
        return None
    r = read_segment(sends[0].data)
    assert r.flags == TCP_SYN | TCP_ACK and r.ack == 1001
    return r.seq


def connect(gw: CtcpEngine, src: bytes, port: int, now: float, dst: bytes = G) -> bool:
    """The whole handshake from src:port; whether a connection now exists."""
    cookie = syn(gw, src, port, now, dst)
    if cookie is None:
        return False
    ack = build_tcp(src, dst, port, 10000, 1001, (cookie + 1) & 0xFFFFFFFF, TCP_ACK)
    gw.inbound(now, build_ip(src, dst, 6, ack))
    gw.pull()
    return (dst, 10000, src, port) in gw.flows


def data(gw: CtcpEngine, src: bytes, port: int, inner: bytes, now: float, *,
         seq: int | None = None, ack: int | None = None) -> list:  # fmt: skip
    flow = gw.flows[(G, 10000, src, port)]
    seg = encapsulate(inner, sport=port, dport=10000,
                      seq=flow.conn.ack if seq is None else seq,
                      ack=flow.conn.seq if ack is None else ack)  # fmt: skip
    gw.inbound(now, seg)
    return gw.pull()


def esp_in_udp(src: bytes, dst: bytes, spi: int, dport: int = 4500) -> bytes:
    body = spi.to_bytes(4, "big") + (1).to_bytes(4, "big") + b"x" * 40
    return build_ip(src, dst, PROTO_UDP, build_udp(src, dst, 4500, dport, body))


# --- finding 1: any local UDP port ----------------------------------------------------------


def test_inner_udp_to_local_services_is_never_injected() -> None:
    gw = gateway()
    assert connect(gw, ATTACKER, 40000, 0.0)
    for port in (53, 123, 161, 11211, 9999):
        out = data(gw, ATTACKER, 40000, build_udp_packet(ATTACKER, G, 500, port, IKE), 1.0)
        assert not [o for o in out if type(o) is Inject]
    flow = gw.flows[(G, 10000, ATTACKER, 40000)]
    assert flow.drops == {Drop.INNER_PORT.value: 5}
    out = data(gw, ATTACKER, 40000, build_udp_packet(ATTACKER, G, 500, 500, IKE), 2.0)
    (inj,) = [o for o in out if type(o) is Inject]
    assert parse_udp(parse_ip(inj.packet).payload).dport == 500


# --- finding 2: no sequence checks --------------------------------------------------------


def test_spoofed_rst_fin_and_data_with_random_numbers_change_nothing() -> None:
    gw = gateway()
    assert connect(gw, HONEST, 40000, 0.0)
    flow = gw.flows[(G, 10000, HONEST, 40000)]
    rng = random.Random(9)
    injected = 0
    for _ in range(2000):
        seq, ack = rng.getrandbits(32), rng.getrandbits(32)
        for flags in (TCP_RST, TCP_RST | TCP_ACK, 0x11):  # RST, RST+ACK, FIN+ACK
            if seq == flow.conn.ack and flags & TCP_RST:
                continue
            gw.inbound(1.0, build_ip(HONEST, G, 6, build_tcp(HONEST, G, 40000, 10000, seq,
                                                                ack, flags)))  # fmt: skip
        out = data(gw, HONEST, 40000, build_udp_packet(HONEST, G, 500, 500, IKE), 1.0,
                   seq=seq, ack=ack)  # fmt: skip
        injected += sum(1 for o in out if type(o) is Inject)
    assert gw.flows.get(flow.key) is flow and flow.conn.state is State.ESTABLISHED
    assert injected == 0
    # the honest peer's own segments still work, and its RST at RCV.NXT still closes
    out = data(gw, HONEST, 40000, build_udp_packet(HONEST, G, 500, 500, IKE), 2.0)
    assert [type(o) for o in out] == [Steer, Inject]  # its first IKE: the endpoint is steered
    rst = build_tcp(HONEST, G, 40000, 10000, flow.conn.ack, 0, TCP_RST)
    gw.inbound(3.0, build_ip(HONEST, G, 6, rst))
    gw.pull()
    assert flow.key not in gw.flows


def test_duplicate_syns_leave_no_state_to_search() -> None:
    gw = gateway()
    cookies = {syn(gw, HONEST, 40000, t * 0.5) for t in range(600)}
    assert not gw.flows  # nothing half-open, however long the SYNs go on
    assert len(cookies) > 1  # the cookie changes with the time slot
    late = syn(gw, HONEST, 40000, 300.0)
    assert late is not None
    ack = build_tcp(HONEST, G, 40000, 10000, 1001, (late + 1) & 0xFFFFFFFF, TCP_ACK)
    gw.inbound(307.0, build_ip(HONEST, G, 6, ack))  # two slots later: expired
    out = gw.pull()
    assert not gw.flows and gw.counters.get("stray-reset") == 1
    assert [read_segment(o.data).flags for o in out] == [TCP_RST | TCP_ACK]


@given(st.integers(0, 0xFFFFFFFF), st.integers(1, 0xFFFF))
@settings(max_examples=300, deadline=None)
def test_a_guessed_ack_makes_no_connection(ack: int, port: int) -> None:
    gw = gateway()
    real = syn(gw, HONEST, 40000, 0.0)
    seg = build_tcp(HONEST, G, port, 10000, 1001, ack, TCP_ACK)
    gw.inbound(0.5, build_ip(HONEST, G, 6, seg))
    gw.pull()
    made = bool(gw.flows)
    assert made == (port == 40000 and ack == ((real or 0) + 1) & 0xFFFFFFFF)


# --- finding 3: exhaustion -------------------------------------------------------------------


def test_spoofed_syn_flood_fills_nothing_and_an_honest_client_gets_in() -> None:
    gw = gateway(max_connections=1000, ctcp_reply_rate=20)  # 5000 a second in all
    rng = random.Random(3)
    answered_to_flood = 0
    for i in range(20000):
        src = bytes([198, 18, 66, 6])  # one source, two seconds of flood
        now = i * 0.0001
        seg = build_tcp(src, G, rng.randrange(1024, 65536), 10000, i, 0, TCP_SYN)
        gw.inbound(now, build_ip(src, G, 6, seg))
        answered_to_flood += len(gw.pull())
        if i == 10000:  # in the middle of it, an honest client from elsewhere
            assert connect(gw, HONEST, 40000, now)
    assert list(gw.flows) == [(G, 10000, HONEST, 40000)]  # the flood made nothing
    # the flooding source got its burst and its rate, never one reply per SYN
    assert answered_to_flood <= 2 * 20 + 2 * 20 + 1
    assert gw.counters["syn-ack-limited"] >= 19900


def test_replies_to_all_networks_have_a_total_bound() -> None:
    gw = gateway(ctcp_reply_rate=2)  # 500 a second in all
    rng = random.Random(4)
    sent = 0
    for i in range(20000):  # one second, every SYN from another source
        src = bytes([198, 18 + (i >> 8 & 1), i & 0xFF, rng.randrange(1, 255)])
        gw.inbound(i * 5e-5, build_ip(src, G, 6, build_tcp(src, G, 999, 10000, i, 0, TCP_SYN)))
        sent += len(gw.pull())
    assert sent <= 500 + 500 + 1
    assert len(gw._syn_acks) <= gw._syn_acks.networks


def test_one_source_holds_only_its_share() -> None:
    gw = gateway(max_per_source=8, ctcp_reply_rate=10**6)
    made = sum(connect(gw, ATTACKER, 20000 + p, 0.0) for p in range(30))
    assert made == 8 and gw.counters["refused-per-source"] == 22
    assert connect(gw, HONEST, 40000, 0.0)  # another source is not affected
    # IPv6: one /64 is one source, whichever of its addresses connects
    for n in range(30):
        connect(gw, addr_bytes(f"fd00:66::{n + 1:x}"), 30000, 0.0, dst=G6)
    assert sum(1 for k in gw.flows if len(k[2]) == 16) == 8
    assert connect(gw, addr_bytes("fd00:67::1"), 30000, 0.0, dst=G6)
    # with source_prefix_v4 = 24, a /24 is one source
    gw24 = gateway(max_per_source=8, source_prefix_v4=24, ctcp_reply_rate=10**6)
    neighbours = [bytes([198, 18, 66, n]) for n in range(10, 30)]
    assert sum(connect(gw24, a, 20000, 0.0) for a in neighbours) == 8
    # slots come back when connections end
    for key in [k for k in gw.flows if k[2] == ATTACKER]:
        rst = build_tcp(ATTACKER, G, key[3], 10000, gw.flows[key].conn.ack, 0, TCP_RST)
        gw.inbound(1.0, build_ip(ATTACKER, G, 6, rst))
    gw.pull()
    assert connect(gw, ATTACKER, 50000, 2.0)


def test_a_peers_own_esp_never_counts_as_an_sa() -> None:
    gw = gateway(ctcp_no_sa_timeout=60.0)
    assert connect(gw, ATTACKER, 40000, 0.0)
    flow = gw.flows[(G, 10000, ATTACKER, 40000)]
    for i in range(50):
        out = data(gw, ATTACKER, 40000, esp_in_udp(ATTACKER, G, 0x1000 + i), 1.0 + i)
        assert [type(o) for o in out if type(o) is not Steer] == [Inject]  # no SA has it
    assert not flow.conn.has_sa
    gw.handle_timer(60.0)
    out = gw.pull()
    assert flow.key not in gw.flows
    assert [read_segment(o.data).flags for o in out if type(o) is SendRaw] == [TCP_RST]
    # charon's ESP does count
    assert connect(gw, HONEST, 40000, 70.0)
    gw.outbound(71.0, esp_in_udp(G, HONEST, 0xC0FFEE01))
    gw.pull()
    assert gw.flows[(G, 10000, HONEST, 40000)].conn.has_sa


def test_drop_and_counter_names_do_not_grow_with_what_peers_send() -> None:
    gw = gateway(ctcp_reply_rate=10**6)
    assert connect(gw, ATTACKER, 40000, 0.0)
    rng = random.Random(4)
    for i in range(5000):
        trailer = bytes(8) + b"!Eli\x10" + bytes([rng.randrange(256)]) + b"\x01\x00"
        body = rng.randbytes(rng.randrange(0, 60)) + trailer
        flow = gw.flows[(G, 10000, ATTACKER, 40000)]
        seg = build_tcp(ATTACKER, G, 40000, 10000, flow.conn.ack, flow.conn.seq, TCP_ACK, body)
        gw.inbound(1.0 + i * 1e-3, build_ip(ATTACKER, G, 6, seg))
        src = bytes([198, 18, 70, rng.randrange(256)])
        stray = build_tcp(src, G, rng.randrange(65536), 10000, i, i, TCP_ACK, b"x" * (i % 50))
        gw.inbound(1.0 + i * 1e-3, build_ip(src, G, 6, stray))
        gw.inbound(1.0, bytes(rng.randbytes(rng.randrange(60))))
    gw.pull()
    flow = gw.flows[(G, 10000, ATTACKER, 40000)]
    assert set(flow.drops) <= {d.value for d in Drop}
    assert set(gw.counters) <= {"accepted", "syn-cookie-sent", "stray-reset", "stray-dropped",
                                "inbound-malformed", "stray-reset-limited"}  # fmt: skip


def test_replies_to_strangers_are_rate_limited_per_source() -> None:
    gw = gateway(ctcp_reply_rate=100)
    for i in range(5000):
        src = bytes([198, 18, 80, 1])  # one source, five seconds
        gw.inbound(i * 0.001, build_ip(src, G, 6, build_tcp(src, G, 1234, 10000, i, i, TCP_ACK)))
    sent = [o for o in gw.pull() if type(o) is SendRaw]
    assert 200 <= len(sent) <= 200 + 5 * 100 + 1
    assert gw.counters["stray-reset-limited"] == 5000 - len(sent)
    # another source still gets its RST
    other = addr_bytes("198.18.81.1")
    gw.inbound(5.0, build_ip(other, G, 6, build_tcp(other, G, 1234, 10000, 1, 1, TCP_ACK)))
    assert [read_segment(o.data).dport for o in gw.pull()] == [1234]


def test_outbound_fragment_is_never_carried() -> None:
    """charon's OUTPUT sees whole datagrams: a non-first fragment whose first octets look
    like a UDP header to a cTCP peer must open no connection and send nothing (issue 24:
    the one outbound classification, with RFC 9329's fragment check)."""
    client = CtcpEngine(Config(), 0.0, rng=random.Random(2))
    client.apply(0.0, [CtcpPeers({G: 10000})])
    client.pull()
    packet = bytearray(build_udp_packet(HONEST, G, 500, 500, IKE))
    packet[6:8] = (185).to_bytes(2, "big")  # offset 1480, last fragment
    client.outbound(1.0, bytes(packet))
    assert client.pull() == [] and not client.flows
    assert client.counters == {"outbound-fragment": 1}
    client.outbound(1.0, build_udp_packet(HONEST, G, 500, 500, IKE))  # the whole one is
    assert [type(o) for o in client.pull()] == [SendRaw] and len(client.flows) == 1
