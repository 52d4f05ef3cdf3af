"""The cTCP fake-TCP state machine: every transition and timer, without sleeping.

Segments from the peer are built as real bytes (build_control / encapsulate) and parsed
with read_segment, so the machine is exercised exactly as the daemon will drive it."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.core.ctcp_conn import (
    ACK_WINDOW,
    RECV_WINDOW,
    TRANSITIONS,
    Closed,
    Connection,
    DeliverInner,
    Drop,
    Dropped,
    State,
    Timers,
    TransmitSegment,
    stray_reply,
)
from tcpencap.core.role import Role
from tcpencap.wire.ctcp import Segment, build_control, decapsulate, encapsulate, read_segment
from tcpencap.wire.packet import (
    PROTO_ESP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_CWR,
    TCP_ECE,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    addr_bytes,
    build_ipv4,
    build_ipv6,
    build_tcp,
    build_udp_packet,
    parse_ip,
    parse_tcp,
)

LOCAL, PEER = addr_bytes("198.18.0.1"), addr_bytes("198.18.1.2")
LOCAL6, PEER6 = addr_bytes("fd00::1"), addr_bytes("fd00:1::2")
LPORT, PPORT = 10000, 41000
ISN = 0x10000000
PEER_ISN = 0x7FFFFFF0
IKE = bytes(range(1, 9)) + bytes(8) + b"\x01\x10\x02\x00" + bytes(8) + b"\xbb" * 20


def ike_out(src: bytes = LOCAL, dst: bytes = PEER, msg: bytes = IKE) -> bytes:
    return build_udp_packet(src, dst, 500, 500, msg)


def esp_out(src: bytes = LOCAL, dst: bytes = PEER, n: int = 100) -> bytes:
    body = b"\x00\x00\x10\x01" + n.to_bytes(4, "big") + bytes(n)
    if len(src) == 4:
        return build_ipv4(src, dst, PROTO_ESP, body)
    return build_ipv6(src, dst, PROTO_ESP, body)


def from_peer(flags: int, seq: int, ack: int, *, src: bytes = PEER, dst: bytes = LOCAL) -> Segment:
    return read_segment(build_control(src, dst, PPORT, LPORT, seq, ack, flags))


def data_from_peer(inner: bytes, seq: int, ack: int) -> Segment:
    return read_segment(encapsulate(inner, sport=PPORT, dport=LPORT, seq=seq, ack=ack))


def raw_from_peer(flags: int, seq: int, ack: int, payload: bytes) -> Segment:
    tcp = build_tcp(PEER, LOCAL, PPORT, LPORT, seq, ack, flags, payload)
    return read_segment(build_ipv4(PEER, LOCAL, PROTO_TCP, tcp))


def drain(conn: Connection) -> list:
    out = []
    while (a := conn.next_action()) is not None:
        out.append(a)
    return out


def listener(now: float = 0.0, *, isn: int = ISN, peer_seq: int = PEER_ISN + 1, **kw) -> Connection:
    """A gateway connection as the engine makes it, from the ACK that returned the cookie."""
    kw.setdefault("rng", random.Random(1))
    return Connection.accept(now, local=LOCAL, peer=PEER, local_port=LPORT, peer_port=PPORT,
                             isn=isn, peer_seq=peer_seq, **kw)  # fmt: skip


def client(**kw) -> Connection:
    kw.setdefault("isn", ISN)
    kw.setdefault("rng", random.Random(2))
    return Connection(Role.CLIENT, local=LOCAL, peer=PEER, local_port=LPORT, peer_port=PPORT, **kw)


established_listener = listener


def check_control(a, *, seq: int, ack: int, flags: int, src=LOCAL, dst=PEER) -> None:
    """A TransmitSegment carrying a bare control segment with these fields, local -> peer."""
    assert isinstance(a, TransmitSegment)
    assert (a.seq, a.ack, a.flags, a.inner_proto) == (seq, ack, flags, None)
    ip = parse_ip(a.data)
    assert (ip.src, ip.dst, ip.proto, ip.ttl, ip.df) == (src, dst, PROTO_TCP, 240, False)
    t = parse_tcp(ip.payload)
    assert (t.sport, t.dport, t.seq, t.ack, t.flags, t.payload) == (
        LPORT,
        PPORT,
        seq,
        ack,
        flags,
        b"",
    )


def reasons(acts: list) -> list:
    return [a.reason if isinstance(a, Dropped) else a for a in acts]


# --- listener: made from a completed handshake ---------------------------------------------


def test_accepted_listener_is_established_with_no_sa_timer() -> None:
    c = listener(5.0)
    assert c.state is State.ESTABLISHED and c.role is Role.GATEWAY
    assert (c.isn, c.seq, c.acked, c.ack, c.peer_isn) == (
        ISN, ISN + 1, ISN + 1, PEER_ISN + 1, PEER_ISN,
    )  # fmt: skip
    assert c.get_timer() == 65.0 and drain(c) == []  # the ACK gets no reply


def test_no_sa_timer_sends_rst() -> None:
    c = established_listener(10.0)
    c.send_packet(11.0, ike_out())
    drain(c)
    c.handle_timer(69.9)
    assert drain(c) == []
    c.handle_timer(70.0)
    rst, closed = drain(c)
    check_control(rst, seq=c.seq, ack=0, flags=TCP_RST)
    assert closed == Closed("no IPsec SA bound") and c.state is State.DELETED


def test_sa_bound_cancels_no_sa_timer_but_not_the_idle_check() -> None:
    c = established_listener()
    c.sa_bound(5.0)
    assert c.get_timer() == 300.0  # the idle check
    c.receive_segment(200.0, raw_from_peer(TCP_ACK, c.ack, c.seq, b""))  # a keepalive
    c.handle_timer(300.0)
    assert reasons(drain(c)) == [Drop.KEEPALIVE] and c.state is State.ESTABLISHED
    assert c.get_timer() == 500.0  # looked again: heard from at 200


def test_idle_listener_is_reset_at_its_peers_next_seq() -> None:
    c = established_listener()
    c.sa_bound(1.0)
    c.send_packet(2.0, esp_out())
    drain(c)
    c.handle_timer(299.0)
    assert drain(c) == []
    c.handle_timer(300.0)
    rst, closed = drain(c)
    check_control(rst, seq=c.seq, ack=0, flags=TCP_RST)
    assert closed == Closed("idle") and c.get_timer() is None


def test_spoofed_segments_do_not_keep_a_listener_alive() -> None:
    c = established_listener()
    c.sa_bound(1.0)
    for t in range(10, 300, 10):  # out of window: not heard from
        c.receive_segment(float(t), raw_from_peer(TCP_ACK, c.ack + RECV_WINDOW, c.seq, b""))
    c.handle_timer(300.0)
    assert isinstance(drain(c)[-1], Closed)


# --- established data path --------------------------------------------------------------


def test_send_packet_seq_grows_by_payload_incl_trailer() -> None:
    c = established_listener()
    c.sa_bound(0.0)
    sent = []
    for inner in (ike_out(), esp_out(), esp_out(n=1400)):
        c.send_packet(1.0, inner)
        [a] = drain(c)
        sent.append((a, inner))
    seq = ISN + 1
    for a, inner in sent:
        assert isinstance(a, TransmitSegment) and a.flags == TCP_ACK
        assert a.inner_proto == parse_ip(inner).proto
        d = decapsulate(a.data, verify_checksum=True)
        assert (d.seq, d.ack, d.sport, d.dport) == (seq, PEER_ISN + 1, LPORT, PPORT)
        assert (a.seq, a.ack) == (seq, PEER_ISN + 1)
        assert d.payload_len == len(parse_ip(inner).payload) + 16
        seq += d.payload_len
    assert c.seq == seq


def test_receive_ack_bookkeeping_in_order_gap_and_old() -> None:
    c = established_listener()
    esp = esp_out(PEER, LOCAL)
    start = PEER_ISN + 1
    s1 = data_from_peer(esp, start, ISN + 1)
    c.receive_segment(1.0, s1)
    assert c.ack == start + s1.payload_len  # in order
    gap_seq = c.ack + 1000
    c.receive_segment(1.0, data_from_peer(esp, gap_seq, ISN + 1))
    assert c.ack == (gap_seq + s1.payload_len) & 0xFFFFFFFF  # gap accepted, ack jumps
    high = c.ack
    c.receive_segment(1.0, data_from_peer(esp, start, ISN + 1))  # reordered, old
    assert c.ack == high
    acts = drain(c)
    assert [type(a) for a in acts] == [DeliverInner] * 3  # all decapsulated, no ACKs sent
    assert all(a.packet == esp and a.proto == PROTO_ESP for a in acts)
    # The next data segment we send carries the ack.
    c.send_packet(1.0, esp_out())
    assert drain(c)[0].ack == high


def test_ack_wraps_around_32_bits() -> None:
    c = established_listener(peer_seq=0xFFFFFFF0)
    seg = data_from_peer(esp_out(PEER, LOCAL), 0xFFFFFFF0, ISN + 1)
    c.receive_segment(1.0, seg)
    assert c.ack == (0xFFFFFFF0 + seg.payload_len) & 0xFFFFFFFF < 0x1000
    c.receive_segment(1.0, data_from_peer(esp_out(PEER, LOCAL), 0xFFFFFF00, ISN + 1))
    assert c.ack == (0xFFFFFFF0 + seg.payload_len) & 0xFFFFFFFF  # older: unchanged
    assert [type(a) for a in drain(c)] == [DeliverInner] * 2


def test_send_seq_wraps() -> None:
    c = established_listener(isn=0xFFFFFFFF)
    assert c.seq == 0
    c = established_listener(isn=0xFFFFFF00)
    c.send_packet(0.0, esp_out())
    [a] = drain(c)
    assert a.seq == 0xFFFFFF01 and c.seq == (0xFFFFFF01 + 124) & 0xFFFFFFFF


@pytest.mark.parametrize("payload", [b"", b"\x00", bytes(23)])
def test_keepalives_are_dropped_silently(payload: bytes) -> None:
    c = established_listener()
    before = c.ack
    c.receive_segment(1.0, raw_from_peer(TCP_ACK, PEER_ISN, ISN + 1, payload))
    assert reasons(drain(c)) == [Drop.KEEPALIVE]
    assert c.ack == before and c.state is State.ESTABLISHED and c.last_heard == 1.0


def test_bad_inner_protocol_is_dropped_under_a_fixed_name() -> None:
    c = established_listener()
    trailer = b"\x00" * 8 + b"!Eli\x10\x06\x01\x00"
    c.receive_segment(1.0, raw_from_peer(TCP_ACK, PEER_ISN + 1, ISN + 1, bytes(40) + trailer))
    [a] = drain(c)
    assert a.reason is Drop.BAD_SEGMENT and "inner protocol 6" in a.detail
    assert c.state is State.ESTABLISHED


# --- what a peer may inject (finding 1) ------------------------------------------------------


@pytest.mark.parametrize(
    ("sport", "dport", "ok"),
    [
        (500, 500, True),
        (4500, 4500, True),
        (500, 4500, True),
        (PPORT, 500, True),  # the connection's own port
        (500, 53, False),
        (4500, 123, False),
        (500, 161, False),
        (53, 500, False),
        (12345, 4500, False),
        (500, 11211, False),
    ],
)
def test_only_ike_for_charon_is_injected(sport: int, dport: int, ok: bool) -> None:
    c = established_listener()
    inner = build_udp_packet(PEER, LOCAL, sport, dport, IKE)
    c.receive_segment(1.0, data_from_peer(inner, PEER_ISN + 1, ISN + 1))
    [a] = drain(c)
    if ok:
        assert isinstance(a, DeliverInner)
    else:
        assert a.reason is Drop.INNER_PORT


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
@settings(max_examples=300, deadline=None)
def test_no_inner_port_outside_ike_is_ever_delivered(sport: int, dport: int) -> None:
    c = established_listener()
    c.receive_segment(1.0, data_from_peer(build_udp_packet(PEER, LOCAL, sport, dport, IKE),
                                          PEER_ISN + 1, ISN + 1))  # fmt: skip
    delivered = any(isinstance(a, DeliverInner) for a in drain(c))
    assert delivered == (dport in (500, 4500) and sport in (500, 4500, PPORT))


# --- sequence checks (finding 2, RFC 5961) ----------------------------------------------------


@pytest.mark.parametrize("flags", [TCP_RST, TCP_RST | TCP_ACK, TCP_RST | TCP_FIN])
def test_rst_at_exactly_rcv_nxt_deletes_silently(flags: int) -> None:
    c = established_listener()
    c.receive_segment(1.0, from_peer(flags, PEER_ISN + 1, ISN + 1))
    assert drain(c) == [Closed("reset by peer")] and c.state is State.DELETED
    c.send_packet(2.0, esp_out())
    assert reasons(drain(c)) == [Drop.NOT_CONNECTED]


@pytest.mark.parametrize("off", [1, -1, 100, 0x10000, 0x80000000])
def test_rst_anywhere_else_is_dropped(off: int) -> None:
    c = established_listener()
    c.receive_segment(1.0, from_peer(TCP_RST | TCP_ACK, (PEER_ISN + 1 + off) & 0xFFFFFFFF, 0))
    assert reasons(drain(c)) == [Drop.RST_BAD_SEQ] and c.state is State.ESTABLISHED


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
@settings(max_examples=300, deadline=None)
def test_blind_rst_closes_only_at_the_one_right_seq(seq: int, ack: int) -> None:
    c = established_listener()
    c.receive_segment(1.0, from_peer(TCP_RST | TCP_ACK, seq, ack))
    drain(c)
    assert (c.state is State.DELETED) == (seq == PEER_ISN + 1)


@pytest.mark.parametrize(
    ("dseq", "dack", "flags"),
    [
        (RECV_WINDOW, 0, TCP_ACK),  # too far ahead
        (-RECV_WINDOW - 1, 0, TCP_ACK),  # too far behind
        (0, 1, TCP_ACK),  # acknowledges more than we sent
        (0, -ACK_WINDOW - 1, TCP_ACK),  # acknowledges far less than the peer did before
        (0, 0, 0),  # no ACK flag
    ],
)
def test_data_outside_the_windows_is_not_delivered(dseq: int, dack: int, flags: int) -> None:
    c = established_listener()
    inner = ike_out(PEER, LOCAL)
    seq, ack = (PEER_ISN + 1 + dseq) & 0xFFFFFFFF, (ISN + 1 + dack) & 0xFFFFFFFF
    tcp_seg = encapsulate(inner, sport=PPORT, dport=LPORT, seq=seq, ack=ack)
    if not flags:  # clear the ACK flag (and fix nothing else: the checksum is not checked)
        tcp_seg = tcp_seg[:33] + bytes([tcp_seg[33] & ~TCP_ACK]) + tcp_seg[34:]
    c.receive_segment(1.0, read_segment(tcp_seg))
    [a] = drain(c)
    assert a.reason in (Drop.OUT_OF_WINDOW, Drop.NO_ACK)
    assert c.ack == PEER_ISN + 1 and c.last_heard == 0.0


def test_acked_follows_the_peer_and_bounds_old_acks() -> None:
    c = established_listener()
    c.sa_bound(0.0)
    for _ in range(3):
        c.send_packet(1.0, esp_out(n=1000))
    drain(c)
    c.receive_segment(2.0, data_from_peer(esp_out(PEER, LOCAL), PEER_ISN + 1, c.seq))
    assert c.acked == c.seq
    old = (c.seq - ACK_WINDOW) & 0xFFFFFFFF  # reordered, still acceptable
    c.receive_segment(2.0, data_from_peer(esp_out(PEER, LOCAL), c.ack, old))
    assert [type(a) for a in drain(c)] == [DeliverInner] * 2


@pytest.mark.parametrize(("flags", "rst_seq"), [(TCP_FIN | TCP_ACK, ISN + 1)])
def test_fin_in_window_gets_rst_and_deletes(flags: int, rst_seq: int) -> None:
    c = established_listener()
    c.receive_segment(1.0, from_peer(flags, PEER_ISN + 1, ISN + 1))
    rst, closed = drain(c)
    check_control(rst, seq=rst_seq, ack=0, flags=TCP_RST)
    assert closed == Closed("FIN from peer") and c.state is State.DELETED


@pytest.mark.parametrize(("seq", "ack"), [(PEER_ISN + 1, 0xABCDEF01), (0, ISN + 1)])
def test_fin_out_of_window_is_dropped(seq: int, ack: int) -> None:
    c = established_listener()
    c.receive_segment(1.0, from_peer(TCP_FIN | TCP_ACK, seq, ack))
    assert reasons(drain(c)) == [Drop.OUT_OF_WINDOW] and c.state is State.ESTABLISHED
    c.receive_segment(1.0, from_peer(TCP_FIN, PEER_ISN + 1, 0))
    assert reasons(drain(c)) == [Drop.NO_ACK] and c.state is State.ESTABLISHED


@pytest.mark.parametrize("flags", [TCP_SYN, TCP_SYN | TCP_ACK])
def test_syn_on_established_is_dropped(flags: int) -> None:
    c = established_listener()
    c.receive_segment(1.0, from_peer(flags, 5, 0))
    assert reasons(drain(c)) == [Drop.SYN_ESTABLISHED] and c.state is State.ESTABLISHED


def test_send_packet_rejects_non_ike_esp() -> None:
    c = established_listener()
    c.send_packet(1.0, build_ipv4(LOCAL, PEER, 1, bytes(20)))
    [a] = drain(c)
    assert a.reason is Drop.CANNOT_ENCAPSULATE and "protocol 1" in a.detail
    assert c.seq == ISN + 1


# --- closing ---------------------------------------------------------------------------


def test_timers_are_configurable() -> None:
    t = Timers(handshake=1.0, no_sa=10.0, idle=50.0, keepalive=5.0)
    c = listener(0.5, timers=t)
    assert c.get_timer() == 10.5
    c.sa_bound(1.0)
    assert c.get_timer() == 50.5
    k = client(timers=t)
    k.send_packet(0.0, ike_out())
    assert k.get_timer() == 1.0
    k.receive_segment(0.5, from_peer(TCP_SYN | TCP_ACK, PEER_ISN, ISN + 1))
    assert k.get_timer() == 5.5  # the keepalive check comes before the no-SA deadline


def test_stray_reply_rules() -> None:
    seg = data_from_peer(esp_out(PEER, LOCAL), 1000, 5000)
    r = stray_reply(seg)
    assert r is not None
    check_control(r, seq=5000, ack=1000 + seg.payload_len, flags=TCP_RST | TCP_ACK)
    fin = stray_reply(from_peer(TCP_FIN, 0xFFFFFFFF, 77))
    assert fin is not None and (fin.seq, fin.ack) == (0, 0)  # no ACK: seq 0; FIN counts one
    synack = stray_reply(from_peer(TCP_SYN | TCP_ACK, 41, 42))
    assert synack is not None and (synack.seq, synack.ack) == (42, 42)
    assert stray_reply(from_peer(TCP_RST, 1, 2)) is None
    assert stray_reply(from_peer(TCP_RST | TCP_ACK, 1, 2)) is None
    assert stray_reply(from_peer(TCP_SYN, 1, 0)) is None
    assert stray_reply(from_peer(TCP_SYN | TCP_ECE | TCP_CWR, 1, 0)) is None
    v6 = stray_reply(from_peer(TCP_ACK | TCP_PSH, 3, 4, src=PEER6, dst=LOCAL6), ident=3)
    assert v6 is not None
    check_control(v6, seq=4, ack=3, flags=TCP_RST | TCP_ACK, src=LOCAL6, dst=PEER6)


# --- client ----------------------------------------------------------------------------


def client_syn_sent(now: float = 0.0, **kw) -> tuple[Connection, bytes]:
    c = client(**kw)
    trigger = ike_out()
    c.send_packet(now, trigger)
    return c, trigger


def test_client_first_packet_sends_syn_and_holds_trigger() -> None:
    c, _ = client_syn_sent(4.0)
    [syn] = drain(c)
    check_control(syn, seq=ISN, ack=0, flags=TCP_SYN)
    assert c.state is State.SYN_SENT and c.get_timer() == 7.0


def test_client_packets_during_handshake_are_dropped() -> None:
    c, _ = client_syn_sent()
    drain(c)
    c.send_packet(1.0, ike_out())
    assert reasons(drain(c)) == [Drop.HANDSHAKE_BUSY]


def test_client_synack_establishes_and_sends_trigger() -> None:
    c, trigger = client_syn_sent()
    drain(c)
    c.receive_segment(0.5, from_peer(TCP_SYN | TCP_ACK, PEER_ISN, ISN + 1))
    ack, data = drain(c)
    check_control(ack, seq=ISN + 1, ack=PEER_ISN + 1, flags=TCP_ACK)
    assert isinstance(data, TransmitSegment) and data.inner_proto == PROTO_UDP
    d = decapsulate(data.data)
    assert (d.seq, d.ack, d.proto) == (ISN + 1, PEER_ISN + 1, PROTO_UDP)
    assert d.packet == decapsulate(encapsulate(trigger, sport=0, dport=0, seq=0, ack=0)).packet
    assert c.state is State.ESTABLISHED and c.get_timer() == 20.5  # the keepalive check
    assert c.seq == ISN + 1 + d.payload_len


def test_client_synack_with_wrong_ack_is_dropped() -> None:
    c, _ = client_syn_sent()
    drain(c)
    c.receive_segment(0.5, from_peer(TCP_SYN | TCP_ACK, PEER_ISN, ISN))
    [a] = drain(c)
    assert isinstance(a, Dropped) and c.state is State.SYN_SENT


@pytest.mark.parametrize("flags", [TCP_SYN, TCP_ACK, TCP_FIN | TCP_ACK])
def test_client_syn_sent_drops_other_segments(flags: int) -> None:
    c, _ = client_syn_sent()
    drain(c)
    c.receive_segment(0.5, from_peer(flags, PEER_ISN, ISN + 1))
    [a] = drain(c)
    assert isinstance(a, Dropped) and c.state is State.SYN_SENT


def test_client_syn_never_retransmitted_then_new_syn() -> None:
    c, _ = client_syn_sent()
    drain(c)
    c.handle_timer(2.9)
    assert drain(c) == []
    c.handle_timer(3.0)
    assert reasons(drain(c)) == [Drop.HANDSHAKE_TIMEOUT]
    assert c.state is State.CLOSED and c.get_timer() is None
    c.handle_timer(100.0)
    assert drain(c) == []  # nothing is resent while closed
    retry = ike_out()
    c.send_packet(5.0, retry)
    [syn] = drain(c)
    assert syn.flags == TCP_SYN and syn.seq != ISN  # a fresh ISN from the rng
    assert c.state is State.SYN_SENT and c.get_timer() == 8.0
    c.receive_segment(5.1, from_peer(TCP_SYN | TCP_ACK, PEER_ISN, syn.seq + 1))
    ack, data = drain(c)
    assert decapsulate(data.data).seq == syn.seq + 1  # the new trigger, not the old one


def test_client_refused_by_rst() -> None:
    c, _ = client_syn_sent()
    drain(c)
    c.receive_segment(0.1, from_peer(TCP_RST | TCP_ACK, 0, ISN + 7))
    assert reasons(drain(c)) == [Drop.RST_BAD_SEQ] and c.state is State.SYN_SENT
    c.receive_segment(0.1, from_peer(TCP_RST | TCP_ACK, 0, ISN + 1))
    assert reasons(drain(c)) == [Drop.REFUSED]
    assert c.state is State.CLOSED and c.get_timer() is None


def test_client_established_receives_and_closes_like_listener() -> None:
    c, _ = client_syn_sent()
    c.receive_segment(0.5, from_peer(TCP_SYN | TCP_ACK, PEER_ISN, ISN + 1))
    drain(c)
    c.receive_segment(0.6, data_from_peer(esp_out(PEER, LOCAL), PEER_ISN + 1, c.seq))
    [d] = drain(c)
    assert isinstance(d, DeliverInner) and d.packet == esp_out(PEER, LOCAL)
    c.receive_segment(0.7, from_peer(TCP_FIN | TCP_ACK, c.ack, c.seq))
    rst, closed = drain(c)
    assert rst.flags == TCP_RST and rst.seq == c.seq and isinstance(closed, Closed)


def test_client_ipv6() -> None:
    c = Connection(
        Role.CLIENT, local=LOCAL6, peer=PEER6, local_port=LPORT, peer_port=PPORT, isn=ISN
    )
    trigger = build_udp_packet(LOCAL6, PEER6, 500, 500, IKE)
    c.send_packet(0.0, trigger)
    [syn] = drain(c)
    check_control(syn, seq=ISN, ack=0, flags=TCP_SYN, src=LOCAL6, dst=PEER6)
    c.receive_segment(0.1, from_peer(TCP_SYN | TCP_ACK, PEER_ISN, ISN + 1, src=PEER6, dst=LOCAL6))
    _, data = drain(c)
    assert decapsulate(data.data).packet == trigger


# --- the transition table ----------------------------------------------------------------


def test_transition_table_is_enforced() -> None:
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.DELETED] == frozenset()
    c = client()
    with pytest.raises(RuntimeError):
        c._goto(State.ESTABLISHED)  # CLOSED cannot jump straight to ESTABLISHED


def test_deleted_ignores_everything() -> None:
    c = established_listener()
    c.receive_segment(1.0, from_peer(TCP_RST, PEER_ISN + 1, 0))
    drain(c)
    c.receive_segment(2.0, data_from_peer(esp_out(PEER, LOCAL), 0, 0))
    c.handle_timer(1e9)
    c.sa_bound(3.0)
    c.send_packet(3.0, esp_out())
    assert reasons(drain(c)) == [Drop.UNEXPECTED, Drop.NOT_CONNECTED]
    assert c.state is State.DELETED


# Every input a connection has, and the state it leads to from each state (an input that
# passes its checks: the right ack, RST at RCV.NXT, a FIN in the window, the deadline due).
# The walk below proves that the inputs make exactly the moves of TRANSITIONS: none outside
# it, and every one of it from a real input (no state or move kept for tests alone).
INPUTS = ("syn", "syn-ack", "rst", "fin", "other", "packet", "sa-bound", "timer")
S = State
EXPECTED: dict[tuple[State, str], State] = {
    **{(S.CLOSED, i): S.CLOSED for i in INPUTS},
    (S.CLOSED, "packet"): S.SYN_SENT,
    **{(S.SYN_SENT, i): S.SYN_SENT for i in INPUTS},
    (S.SYN_SENT, "syn-ack"): S.ESTABLISHED,
    (S.SYN_SENT, "rst"): S.CLOSED,
    (S.SYN_SENT, "timer"): S.CLOSED,
    **{(S.ESTABLISHED, i): S.ESTABLISHED for i in INPUTS},
    (S.ESTABLISHED, "rst"): S.DELETED,
    (S.ESTABLISHED, "fin"): S.DELETED,
    (S.ESTABLISHED, "timer"): S.DELETED,
    **{(S.DELETED, i): S.DELETED for i in INPUTS},
}


# A gateway connection exists only from ESTABLISHED on (made from the cookie's ACK).
GATEWAY_STATES = (State.ESTABLISHED, State.DELETED)


def in_state(state: State, role: Role) -> Connection:
    """A connection of ``role`` brought to ``state`` by real inputs."""
    if role is Role.GATEWAY:
        c = listener(0.0)
    else:
        c = client()
        if state is not State.CLOSED:
            c.send_packet(0.0, ike_out())
        if state in (State.ESTABLISHED, State.DELETED):
            c.receive_segment(0.1, from_peer(TCP_SYN | TCP_ACK, PEER_ISN, ISN + 1))
    if state is State.DELETED:
        c.receive_segment(0.2, from_peer(TCP_RST, c.ack, 0))
    drain(c)
    assert c.state is state
    return c


def feed(c: Connection, event: str) -> None:
    """One input that passes its checks in the connection's state."""
    flags = {"syn": TCP_SYN, "syn-ack": TCP_SYN | TCP_ACK, "rst": TCP_RST | TCP_ACK,
             "fin": TCP_FIN | TCP_ACK, "other": TCP_ACK}  # fmt: skip
    if event in flags:  # at RCV.NXT, acking SND.NXT (in SYN_SENT: the SYN)
        c.receive_segment(1.0, from_peer(flags[event], c.ack, c.seq))
    elif event == "packet":
        c.send_packet(1.0, esp_out())
    elif event == "sa-bound":
        c.sa_bound(1.0)
    else:  # every deadline it has is due (handshake, no SA, idle, keepalive)
        c.handle_timer(10_000.0)


@pytest.mark.parametrize(
    ("role", "state", "event"),
    [
        (role, state, event)
        for state, event in EXPECTED
        for role in Role
        if role is Role.CLIENT or state in GATEWAY_STATES
    ],
)
def test_every_state_and_input(role: Role, state: State, event: str) -> None:
    c = in_state(state, role)
    feed(c, event)
    assert c.state is EXPECTED[state, event]
    drain(c)


def test_the_table_is_exactly_the_moves_inputs_make() -> None:
    assert {s for s, _ in EXPECTED} == set(State) and {i for _, i in EXPECTED} == set(INPUTS)
    moves = {(s, new) for (s, _), new in EXPECTED.items() if new is not s}
    assert moves == {(s, new) for s, targets in TRANSITIONS.items() for new in targets}


_FLAGS = st.sampled_from(
    [TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, TCP_RST, TCP_FIN, TCP_FIN | TCP_ACK, TCP_SYN | TCP_ECE]
)


@st.composite
def events(draw: st.DrawFn):
    kind = draw(st.sampled_from(["ctl", "data", "send", "timer", "sa"]))
    return kind, draw(_FLAGS), draw(st.integers(0, 0xFFFFFFFF)), draw(st.booleans())


@given(st.sampled_from(list(Role)), st.lists(events(), max_size=30))
@settings(max_examples=200, deadline=None)
def test_random_event_sequences_keep_invariants(role: Role, evs) -> None:
    c = client() if role is Role.CLIENT else listener()
    now = 0.0
    for kind, flags, num, ike in evs:
        now += 0.7
        before = c.state
        if kind == "ctl":
            c.receive_segment(now, from_peer(flags, num, ISN + 1 if num & 1 else num))
        elif kind == "data":
            c.receive_segment(now, data_from_peer(esp_out(PEER, LOCAL), num, ISN + 1))
        elif kind == "send":
            c.send_packet(now, ike_out() if ike else esp_out())
        elif kind == "timer":
            t = c.get_timer()
            c.handle_timer(t if t is not None else now)
            now = max(now, t or now)
        else:
            c.sa_bound(now)
        assert c.state is before or c.state in TRANSITIONS[before]
        for a in drain(c):
            assert isinstance(a, TransmitSegment | DeliverInner | Closed | Dropped)
            if isinstance(a, TransmitSegment):
                assert read_segment(a.data).src == LOCAL
        if c.state is State.DELETED:
            assert c.get_timer() is None


def test_client_keepalive_after_silence_only() -> None:
    c, _ = client_syn_sent()
    c.receive_segment(0.5, from_peer(TCP_SYN | TCP_ACK, PEER_ISN, ISN + 1))
    drain(c)
    c.sa_bound(1.0)
    c.send_packet(15.0, esp_out())
    drain(c)
    c.handle_timer(20.5)  # sent at 15: no keepalive yet, look again at 35
    assert drain(c) == [] and c.get_timer() == 35.0
    c.handle_timer(35.0)
    [ka] = drain(c)
    check_control(ka, seq=c.seq, ack=c.ack, flags=TCP_ACK)
    assert c.get_timer() == 55.0
