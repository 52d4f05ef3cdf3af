"""The cTCP engine without I/O: two engines (client and gateway) wired back to back."""

from __future__ import annotations

import random

from tcpencap.config import Config, GatewayConfig
from tcpencap.core.ctcp_conn import State
from tcpencap.core.ctcp_engine import CtcpEngine as _Engine
from tcpencap.core.outputs import Inject, Query, SendRaw, Steer, SteerSegments
from tcpencap.core.ports import PortAllocator
from tcpencap.core.reload import CtcpPeers
from tcpencap.wire.ctcp import read_segment
from tcpencap.wire.packet import (
    PROTO_UDP,
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    addr_bytes,
    build_ip,
    build_tcp,
    build_udp,
    parse_ip,
    parse_udp,
)


class CtcpEngine(_Engine):
    """The engine plus the shell's pull: each input returns what it output."""

    def outbound(self, now: float, packet: bytes) -> list:  # type: ignore[override]
        super().outbound(now, packet)
        return self.pull()

    def inbound(self, now: float, packet: bytes) -> list:  # type: ignore[override]
        super().inbound(now, packet)
        return self.pull()

    def fire(self, now: float) -> list:
        super().handle_timer(now)
        return self.pull()


C, G = addr_bytes("198.18.1.2"), addr_bytes("198.19.0.2")
SPI_I = bytes.fromhex("1122334455667788")


def _ike(
    src: bytes,
    dst: bytes,
    spi_r: bytes = bytes(8),
    exchange: int = 34,
    spi_i: bytes = SPI_I,
    dport: int = 500,
) -> bytes:
    msg = spi_i + spi_r + bytes([33, 0x20, exchange, 0x08]) + bytes(4) + (28).to_bytes(4, "big")
    return build_ip(src, dst, PROTO_UDP, build_udp(src, dst, 500, dport, msg))


def _esp(src: bytes, dst: bytes, spi: int, dport: int = 4500) -> bytes:
    """ESP-in-UDP; from the gateway's charon it goes to the connection's endpoint, the
    client's TCP port (40000 for the first)."""
    body = spi.to_bytes(4, "big") + (1).to_bytes(4, "big") + b"x" * 40
    return build_ip(src, dst, PROTO_UDP, build_udp(src, dst, 4500, dport, body))


def _client(first_port: int, seed: int) -> CtcpEngine:
    """A client whose one cTCP peer is G (port 10000), as a reload plan makes it."""
    client = CtcpEngine(Config(), 0.0, ports=PortAllocator(first_port), rng=random.Random(seed))
    client.apply(0.0, [CtcpPeers({G: 10000})])
    assert client.pull() == [SteerSegments(G, 10000, True), Steer(G, True)]
    return client


def _engines(max_connections: int = 10) -> tuple[CtcpEngine, CtcpEngine]:
    listen = (("198.19.0.2", 10000),)
    cfg = Config(gateway=GatewayConfig(ctcp_listen=listen, max_connections=max_connections))
    return _client(40000, 1), CtcpEngine(cfg, 0.0, rng=random.Random(2))


def _sends(out: list) -> list[bytes]:
    return [o.data for o in out if type(o) is SendRaw]


def _exchange(a: CtcpEngine, b: CtcpEngine, out: list, now: float) -> list:
    """Feed a's SendRaw outputs into b; return everything b produced."""
    res: list = []
    for data in _sends(out):
        res += b.inbound(now, data)
    return res


def test_handshake_trigger_and_delivery_both_ways():
    client, gw = _engines()
    ike = _ike(C, G)
    out = client.outbound(0.0, ike)
    (syn,) = _sends(out)
    assert read_segment(syn).flags == TCP_SYN
    (flow,) = client.flows.values()
    assert flow.conn.get_timer() == 3.0 and flow.key[1] == 40000
    synack_out = _exchange(client, gw, out, 0.1)
    assert read_segment(_sends(synack_out)[0]).flags == TCP_SYN | TCP_ACK
    ack_and_data = _exchange(gw, client, synack_out, 0.2)
    assert client.flows[flow.key].conn.state is State.ESTABLISHED
    delivered = _exchange(client, gw, ack_and_data, 0.3)
    # the UDP endpoint charon answers (C and the inner source port), not C's whole address,
    # is steered before the first packet from it is injected
    assert [type(o) for o in delivered] == [Steer, Inject]
    assert delivered[0] == Steer(C, True, 500)
    inner = parse_ip(delivered[1].packet)
    assert (inner.src, inner.dst, inner.proto) == (C, G, PROTO_UDP)
    udp = parse_udp(inner.payload)
    assert (udp.sport, udp.dport, udp.payload[:8]) == (500, 500, SPI_I)
    (gflow,) = gw.flows.values()
    assert gflow.entry.ike_spis == {SPI_I}
    # reply: found by IKE SPI, carried back, injected on the client
    reply = gw.outbound(0.4, _ike(G, C, spi_r=b"\x99" * 8))
    back = _exchange(gw, client, reply, 0.5)
    assert [type(o) for o in back] == [Inject] and back[0].dst == C
    back_udp = parse_udp(parse_ip(back[0].packet).payload)
    assert (back_udp.sport, back_udp.dport) == (500, 500)
    # charon's ESP binds an SA: the 60 s no-SA timer stops, the idle check stays
    assert gflow.conn.get_timer() == 60.3 and not gflow.conn.has_sa
    esp_out = gw.outbound(0.6, _esp(G, C, 0xC0FFEE01))
    assert gflow.conn.has_sa and gflow.entry.esp_spis == {0xC0FFEE01}
    assert gflow.conn.get_timer() == 300.3
    got = _exchange(gw, client, esp_out, 0.7)
    assert [type(o) for o in got] == [Inject]
    st = gw.status(1.0)[0]
    assert st["side"] == "gateway" and st["state"] == "established"
    assert st["frames_in"] == 1 and st["frames_out"] == 2 and st["esp_spis"] == ["c0ffee01"]
    assert st["peer"] == "198.18.1.2:40000" and st["local"] == "198.19.0.2:10000"


def test_stray_segment_gets_rst_ack_and_no_flow():
    _, gw = _engines()
    seg = build_ip(C, G, 6, build_tcp(C, G, 5555, 10000, 100, 999, TCP_ACK, b"abc"))
    out = gw.inbound(0.0, seg)
    (rst,) = _sends(out)
    r = read_segment(rst)
    assert (r.flags, r.seq, r.ack, r.sport, r.dport) == (TCP_RST | TCP_ACK, 999, 103, 10000, 5555)
    assert not gw.flows and gw.counters == {"stray-reset": 1}
    # a SYN to a port nobody listens on opens nothing
    syn = build_ip(C, G, 6, build_tcp(C, G, 5555, 10001, 1, 0, TCP_SYN))
    assert gw.inbound(0.0, syn) == [] and not gw.flows


def _syn(gw: CtcpEngine, port: int, now: float, src: bytes = C) -> int | None:
    """A SYN from src:port; the gateway's cookie (None: no SYN+ACK)."""
    out = gw.inbound(now, build_ip(src, G, 6, build_tcp(src, G, port, 10000, 7, 0, TCP_SYN)))
    sends = _sends(out)
    return read_segment(sends[0]).seq if sends else None


def _ack(gw: CtcpEngine, port: int, cookie: int, now: float, src: bytes = C) -> list:
    seg = build_tcp(src, G, port, 10000, 8, (cookie + 1) & 0xFFFFFFFF, TCP_ACK)
    return gw.inbound(now, build_ip(src, G, 6, seg))


def test_connection_limit_counts_refusals():
    _, gw = _engines(max_connections=2)
    for port in (1, 2, 3, 4):
        cookie = _syn(gw, port, 0.0)
        if cookie is not None:
            _ack(gw, port, cookie, 0.1)
    assert len(gw.flows) == 2 and gw.counters["refused-limit"] == 2


def test_handshake_timeouts_remove_or_reset_flows():
    client, gw = _engines()
    out = client.outbound(0.0, _ike(C, G))
    _exchange(client, gw, out, 0.0)
    assert not gw.flows  # a SYN leaves nothing behind on the gateway
    (ckey,) = client.flows
    assert client.fire(3.0) == []
    assert client.flows[ckey].conn.state is State.CLOSED
    # the next IKE retransmission sends a new SYN on the same flow
    (syn,) = _sends(client.outbound(4.0, _ike(C, G)))
    assert read_segment(syn).flags == TCP_SYN


def test_keepalives_and_non_peers_are_not_sent():
    client, _ = _engines()
    ka = build_ip(C, G, PROTO_UDP, build_udp(C, G, 4500, 4500, b"\xff"))
    assert client.outbound(0.0, ka) == [] and client.counters == {"nat-keepalive": 1}
    other = addr_bytes("198.18.9.9")
    assert client.outbound(0.0, _ike(C, other)) == []
    assert client.counters["not-a-ctcp-peer"] == 1 and not client.flows


def _handshake(client: CtcpEngine, gw: CtcpEngine, out: list, now: float) -> list:
    """SYN (in ``out``) -> SYN/ACK -> ACK and held data; returns what gw delivered."""
    synack = _exchange(client, gw, out, now)
    ack_and_data = _exchange(gw, client, synack, now + 0.1)
    return _exchange(client, gw, ack_and_data, now + 0.2)


def test_restarted_client_reconnects_on_esp_alone():
    """A client tcpencap restarted under a live SA (found in the VM lab: the tunnel never
    came back) sees ESP before any IKE: it opens a new connection, as RFC 9329's originator
    does, and the gateway delivers the ESP on it. A gateway never opens one for ESP."""
    client, gw = _engines()
    delivered = _handshake(client, gw, client.outbound(0.0, _ike(C, G)), 0.1)
    assert [type(o) for o in delivered] == [Steer, Inject]
    restarted = _client(41000, 3)
    out = restarted.outbound(5.0, _esp(C, G, 0xC0FFEE02))
    (syn,) = _sends(out)
    assert read_segment(syn).flags == TCP_SYN and "esp-no-connection" not in restarted.counters
    got = _handshake(restarted, gw, out, 5.1)
    # the gateway still sends on the old connection: the restarted client resets it there
    (old,) = [f for f in gw.flows.values() if f.key[3] == 40000]
    rst = _exchange(gw, restarted, gw.outbound(5.5, _ike(G, C, spi_r=b"\x99" * 8)), 5.5)
    assert [read_segment(d).flags for d in _sends(rst)] == [TCP_RST | TCP_ACK]
    assert _exchange(restarted, gw, rst, 5.6) == []  # its endpoint lingers, steered
    assert gw.lingering == {(C, 500)}
    assert old.key not in gw.flows
    injected = [o for o in got if type(o) is Inject]
    assert len(injected) == 1 and parse_udp(parse_ip(injected[0].packet).payload).payload[:4] == (
        0xC0FFEE02
    ).to_bytes(4, "big")
    assert gw.outbound(6.0, _esp(G, addr_bytes("198.18.7.7"), 0xABCDEF01)) == []
    assert gw.counters["esp-no-connection"] == 1 and len(gw.flows) == 1


def test_ike_spis_of_gone_sas_leave_the_index_once_a_flow_holds_max_spis():
    """cTCP hears of no IKE SA's end (no VICI), so a long-lived flow would index every
    rekey's and every collision's SPI forever. It keeps max_spis, dropping the SPI seen
    least recently: the SA still in use stays, however old, and a message with a dropped
    SPI still reaches the peer on the flow of its address pair."""
    client, gw = _engines()
    _handshake(client, gw, client.outbound(0.0, _ike(C, G)), 0.1)
    (cflow,), (gflow,) = client.flows.values(), gw.flows.values()
    limit = client.table.max_spis
    rekeyed = [bytes([0xA0, n]) + bytes(6) for n in range(limit + 4)]
    now = 1.0
    for spi in rekeyed:
        now += 1.0
        for msg in (_ike(C, G, exchange=37, spi_i=spi), _ike(C, G, exchange=37)):
            got = _exchange(client, gw, client.outbound(now, msg), now)
            assert [type(o) for o in got] == [Inject]
    for flow in (cflow, gflow):
        assert len(flow.entry.ike_spis) == limit
        assert SPI_I in flow.entry.ike_spis  # in use all along
        assert rekeyed[-1] in flow.entry.ike_spis
        assert not {*rekeyed[:5]} & flow.entry.ike_spis
    assert len(client.table._ike) == len(gw.table._ike) == limit
    late = _ike(C, G, exchange=37, spi_i=rekeyed[0])  # its DELETE, long after
    got = _exchange(client, gw, client.outbound(now + 1, late), now + 1)
    assert [type(o) for o in got] == [Inject] and len(client.flows) == 1


def test_an_idle_tunnel_lives_on_keepalives_and_a_silent_peer_is_reset():
    """The client's keepalives keep an idle tunnel's gateway connection; once the client
    goes silent (gone without a RST the gateway accepts), the gateway resets it."""
    client, gw = _engines()
    _handshake(client, gw, client.outbound(0.0, _ike(C, G)), 0.1)
    gw.outbound(1.0, _esp(G, C, 0xC0FFEE01))  # charon's ESP: an SA
    client.outbound(1.0, _esp(C, G, 0xC0FFEE02))
    gw.pull()
    client.pull()
    (gflow,) = gw.flows.values()
    now = 1.0
    while now < 1000.0:  # nothing but timers for 1000 s
        now = min(t for t in (client.get_timer(), gw.get_timer()) if t is not None)
        _exchange(client, gw, client.fire(now), now)
        gw.fire(now)
    assert gw.flows.get(gflow.key) is gflow and gflow.drops.get("keepalive", 0) >= 45
    silent_since = now
    while gw.flows:  # the client is gone: only the gateway's timers run
        now = gw.get_timer()
        out = gw.fire(now)
    assert 300.0 <= now - silent_since <= 321.0
    assert [read_segment(d).flags for d in _sends(out)] == [TCP_RST]


def test_gateway_steers_endpoints_and_lets_them_go_with_the_connection():
    """Finding 5: a cTCP peer's address may be a NAT that other clients (plain UDP, RFC
    9329 with their own ports) share: only the endpoints its IKE came from are queued (500,
    then 4500 after the NAT-T float), and only while the connection lasts."""
    client, gw = _engines()
    delivered = _handshake(client, gw, client.outbound(0.0, _ike(C, G)), 0.1)
    assert [o for o in delivered if type(o) is Steer] == [Steer(C, True, 500)]
    floated = build_ip(C, G, PROTO_UDP, build_udp(C, G, 4500, 4500, bytes(4) + _ike(C, G)[28:]))
    got = _exchange(client, gw, client.outbound(1.0, floated), 1.0)
    assert [o for o in got if type(o) is Steer] == [Steer(C, True, 4500)]
    got = _exchange(client, gw, client.outbound(1.1, floated), 1.1)
    assert [type(o) for o in got] == [Inject]  # steered once
    (gflow,) = gw.flows.values()
    rst = build_tcp(C, G, gflow.key[3], 10000, gflow.conn.ack, 0, TCP_RST)
    out = gw.inbound(2.0, build_ip(C, G, 6, rst))
    # charon may still hold the SA: both stay steered (dropped, never UDP) until it lists none
    assert not gw.flows and [o for o in out if type(o) is Steer] == []
    assert gw.lingering == {(C, 500), (C, 4500)}
    assert gw.get_timer() == 7.0 and gw.fire(7.0) == [Query("ctcp-release")]
    gw.sas_listed(7.1, "ctcp-release", None)  # charon cannot be asked: all stay
    assert gw.pull() == [] and gw.get_timer() == 12.1 and gw.fire(12.1) == [Query("ctcp-release")]
    gw.sas_listed(12.2, "ctcp-release", [{"sa": {"remote-host": "198.18.1.2"}}])
    assert gw.pull() == [] and gw.get_timer() == 17.2 and gw.fire(17.2) == [Query("ctcp-release")]
    gw.sas_listed(17.3, "ctcp-release", [])
    assert gw.pull() == [Steer(C, False, 500), Steer(C, False, 4500)]
    assert not gw.steering and not gw.lingering
    assert gw.fire(100.0) == [] and gw.get_timer() is None  # no more questions
