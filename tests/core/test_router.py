"""Tests for the sans-I/O router: which connection a queued UDP packet goes to, and which UDP
packet charon sees for a frame that arrived over TCP.

Client side (TCP originator): inbound packets mirror the ports charon last used. Gateway side
(TCP responder): a connection is the UDP endpoint (peer IP, TCP source port) and everything is
delivered to 4500 behind the non-ESP marker. Injected packets are checked by parsing them back
(tcpencap.wire.packet) and, for checksums, also with scapy.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from tcpencap.core.role import Role
from tcpencap.core.router import ConnView, Drop, Inject, Open, Router, Send
from tcpencap.core.table import ConnectionTable
from tcpencap.wire import rfc9329
from tcpencap.wire.ike import NON_ESP_MARKER
from tcpencap.wire.packet import (
    PROTO_ESP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    addr_bytes,
    build_ip,
    build_ipv4,
    build_tcp,
    build_udp,
    build_udp_packet,
    checksum,
    ipv4_header_checksum_ok,
    l4_checksum_ok,
    parse_ip,
    parse_udp,
)

LOCAL = addr_bytes("198.18.1.2")
PEER = addr_bytes("198.19.0.2")
OTHER = addr_bytes("198.19.0.9")  # not a TCP peer
LOCAL6 = addr_bytes("fd00::1:2")
PEER6 = addr_bytes("fd00:19::2")

SPI_A = bytes.fromhex("a1a2a3a4a5a6a7a8")
SPI_B = bytes.fromhex("b1b2b3b4b5b6b7b8")
SPI_R = bytes.fromhex("c1c2c3c4c5c6c7c8")
ESP_SPI = 0xC0FFEE01

IKE_SA_INIT, IKE_AUTH, INFORMATIONAL = 34, 35, 37


def indexes_empty(table: ConnectionTable) -> bool:
    sizes = table.index_sizes()
    assert "connections" in sizes and "ike" in sizes and "esp" in sizes
    return all(n == 0 for n in sizes.values())


def ike(
    spi_i: bytes,
    spi_r: bytes = bytes(8),
    exchange: int = IKE_SA_INIT,
    flags: int = 0x08,
    mid: int = 0,
    body: bytes = b"",
) -> bytes:
    """An IKEv2 message: the 28-octet header (written field by field) and an opaque body."""
    length = 28 + len(body)
    return spi_i + spi_r + struct.pack("!BBBBII", 33, 0x20, exchange, flags, mid, length) + body


def esp(spi: int = ESP_SPI, seq: int = 1, body: bytes = b"\x5a" * 64) -> bytes:
    return struct.pack("!II", spi, seq) + body


def assert_send(res: object, conn_id: int, frame: bytes, is_ike: bool) -> None:
    assert isinstance(res, Send), res
    assert (res.conn_id, res.frame, res.is_ike) == (conn_id, frame, is_ike)


def udp_out(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """A packet as charon's UDP socket would put it in the queue."""
    return build_udp_packet(src, dst, sport, dport, payload)


def client_router(*peers: bytes) -> Router:
    tcp_peers = set(peers) or {PEER, PEER6}
    return Router(ConnectionTable(), lambda addr: addr in tcp_peers)


def open_client(r: Router, local: bytes = LOCAL, peer: bytes = PEER, spi: bytes = SPI_A) -> int:
    res = r.outbound(udp_out(local, peer, 500, 500, ike(spi)))
    assert isinstance(res, Open), res
    return res.conn_id


def decode_inject(res: object, local: bytes, peer: bytes) -> tuple[int, int, bytes]:
    """Check an Inject is a well-formed UDP packet from ``peer`` to ``local``; return the
    ports and the UDP payload."""
    assert isinstance(res, Inject), res
    assert res.dst == local
    ip = parse_ip(res.packet)
    assert ip.proto == PROTO_UDP
    assert (ip.src, ip.dst) == (peer, local)
    assert not ip.fragment
    udp = parse_udp(ip.payload)
    assert len(ip.payload) == 8 + len(udp.payload)  # the UDP length covers it all
    if ip.version == 4:
        assert ipv4_header_checksum_ok(ip.header)
        # 0 means "no checksum" (allowed on IPv4 only); anything else must be right.
        assert udp.checksum == 0 or l4_checksum_ok(ip.src, ip.dst, PROTO_UDP, ip.payload)
        sc = IP(res.packet)
        stored = sc.chksum
        del sc.chksum
        assert IP(bytes(sc)).chksum == stored  # scapy agrees on the header checksum
    else:
        assert udp.checksum != 0
        assert l4_checksum_ok(ip.src, ip.dst, PROTO_UDP, ip.payload)
        sc = IPv6(res.packet)
        stored = sc[UDP].chksum
        del sc[UDP].chksum
        assert IPv6(bytes(sc))[UDP].chksum == stored  # scapy agrees on the UDP checksum
    return udp.sport, udp.dport, udp.payload


# --- client side ------------------------------------------------------------------------


def test_client_first_ike_sa_init_opens_a_connection_with_the_framed_message():
    r = client_router()
    msg = ike(SPI_A, body=b"\x22" * 200)
    res = r.outbound(udp_out(LOCAL, PEER, 500, 500, msg))
    assert isinstance(res, Open)
    assert (res.local, res.peer) == (LOCAL, PEER)
    assert res.frame == rfc9329.frame_ike(msg)
    view = r.views[res.conn_id]
    assert view.side is Role.CLIENT
    assert r.table.lookup_ike(LOCAL, PEER, SPI_A).conn_id == res.conn_id


def test_client_retransmit_of_ike_sa_init_goes_to_the_same_connection():
    r = client_router()
    cid = open_client(r)
    msg = ike(SPI_A)
    res = r.outbound(udp_out(LOCAL, PEER, 500, 500, msg))
    assert_send(res, cid, rfc9329.frame_ike(msg), True)
    assert len(r.table) == 1


def test_client_message_to_a_non_tcp_peer_is_dropped():
    r = client_router()
    res = r.outbound(udp_out(LOCAL, OTHER, 500, 500, ike(SPI_A)))
    assert res == Drop("no-connection")
    assert len(r.table) == 0
    assert r.drops == {"no-connection": 1}


def test_client_reopens_for_an_sa_that_outlived_its_connection():
    """After a restart of tcpencap charon's SA still exists: its next IKE message (not an
    IKE_SA_INIT) or ESP packet to a TCP peer makes the originator open a connection."""
    r = client_router()
    msg = ike(SPI_A, SPI_R, 35)
    res = r.outbound(udp_out(LOCAL, PEER, 4500, 4500, NON_ESP_MARKER + msg))
    assert isinstance(res, Open) and res.frame == rfc9329.frame_ike(msg) and res.frame_is_ike
    assert r.table.lookup_ike(LOCAL, PEER, SPI_A).conn_id == res.conn_id
    r2 = client_router()
    res2 = r2.outbound(udp_out(LOCAL, PEER, 4500, 4500, esp(0x01020304)))
    assert isinstance(res2, Open) and not res2.frame_is_ike
    assert r2.table.lookup_esp(LOCAL, PEER, 0x01020304).conn_id == res2.conn_id


def test_a_non_tcp_peer_never_gets_a_connection():
    r = Router(ConnectionTable(), lambda addr: False)
    res = r.outbound(udp_out(LOCAL, PEER, 4500, 4500, NON_ESP_MARKER + ike(SPI_A, SPI_R, 35)))
    assert res == Drop("no-connection")
    assert r.outbound(udp_out(LOCAL, PEER, 4500, 4500, esp(0x01020304))) == Drop("no-connection")
    assert len(r.table) == 0


def test_fallback_route_does_not_rebind_an_spi_vici_removed():
    """charon's last message of a deleted IKE SA may be queued after VICI's ike-updown:
    it still goes out on the pair's connection but must not bind the SPI again."""
    r = client_router()
    cid = open_client(r)
    r.learn_esp = False  # VICI connected
    r.table.unbind_ike(cid, SPI_A)
    res = r.outbound(udp_out(LOCAL, PEER, 4500, 4500, NON_ESP_MARKER + ike(SPI_A, SPI_R, 37)))
    assert isinstance(res, Send) and res.conn_id == cid
    assert r.table.lookup_ike(LOCAL, PEER, SPI_A) is None


def test_nat_keepalive_is_never_sent_over_tcp():
    r = client_router()
    cid = open_client(r)
    res = r.outbound(udp_out(LOCAL, PEER, 4500, 4500, b"\xff"))
    assert res == Drop("nat-keepalive")
    assert r.views[cid].charon_sport == 500  # a keepalive does not move the ports either


def test_client_after_float_sends_ike_with_the_marker_stripped():
    r = client_router()
    cid = open_client(r)
    auth = ike(SPI_A, SPI_R, IKE_AUTH, mid=1, body=b"\x2e" * 300)
    res = r.outbound(udp_out(LOCAL, PEER, 4500, 4500, NON_ESP_MARKER + auth))
    assert_send(res, cid, rfc9329.frame_ike(auth), True)
    view = r.views[cid]
    assert (view.charon_sport, view.charon_dport) == (4500, 4500)


def test_client_esp_is_sent_framed_and_its_spi_bound():
    r = client_router()
    cid = open_client(r)
    packet = esp()
    res = r.outbound(udp_out(LOCAL, PEER, 4500, 4500, packet))
    assert_send(res, cid, rfc9329.frame_esp(packet), False)
    assert r.table.lookup_esp(LOCAL, PEER, ESP_SPI).conn_id == cid


def test_client_inbound_ike_before_the_float_is_500_to_500_without_marker():
    r = client_router()
    cid = open_client(r)
    reply = ike(SPI_A, SPI_R, flags=0x20, body=b"\x01" * 100)
    sport, dport, payload = decode_inject(r.inbound_ike(cid, reply), LOCAL, PEER)
    assert (sport, dport) == (500, 500)
    assert payload == reply


def test_client_inbound_ike_after_the_float_mirrors_charons_ports_with_marker():
    r = client_router()
    cid = open_client(r)
    r.outbound(udp_out(LOCAL, PEER, 4500, 4500, NON_ESP_MARKER + ike(SPI_A, SPI_R, IKE_AUTH)))
    reply = ike(SPI_A, SPI_R, IKE_AUTH, flags=0x20, mid=1, body=b"\x02" * 80)
    sport, dport, payload = decode_inject(r.inbound_ike(cid, reply), LOCAL, PEER)
    assert (sport, dport) == (4500, 4500)
    assert payload == NON_ESP_MARKER + reply


@pytest.mark.parametrize(("charon_sport", "charon_dport"), [(500, 500), (4500, 4500)])
def test_client_inbound_ike_swaps_the_ports_charon_used(charon_sport, charon_dport):
    """charon sent from its port A to the peer's port B: the reply comes from B to A."""
    r = client_router()
    cid = open_client(r)
    msg = ike(SPI_A, SPI_R, INFORMATIONAL, mid=2)
    if charon_sport == 4500:
        msg = NON_ESP_MARKER + msg
    r.outbound(udp_out(LOCAL, PEER, charon_sport, charon_dport, msg))
    reply = ike(SPI_A, SPI_R, INFORMATIONAL, flags=0x20, mid=2)
    sport, dport, payload = decode_inject(r.inbound_ike(cid, reply), LOCAL, PEER)
    assert (sport, dport) == (charon_dport, charon_sport)
    assert payload.startswith(NON_ESP_MARKER) == (dport == 4500)


def test_client_inbound_esp_is_4500_to_4500_without_marker():
    r = client_router()
    cid = open_client(r)  # still on 500: ESP is always on 4500 regardless
    packet = esp(0x0BADCAFE, 7)
    sport, dport, payload = decode_inject(r.inbound_esp(cid, packet), LOCAL, PEER)
    assert (sport, dport) == (4500, 4500)
    assert payload == packet


def test_client_second_ike_sa_init_with_a_new_spi_opens_a_second_connection():
    r = client_router()
    first = open_client(r, spi=SPI_A)
    res = r.outbound(udp_out(LOCAL, PEER, 500, 500, ike(SPI_B)))
    assert isinstance(res, Open)
    assert res.conn_id != first
    assert r.table.lookup_ike(LOCAL, PEER, SPI_A).conn_id == first
    assert r.table.lookup_ike(LOCAL, PEER, SPI_B).conn_id == res.conn_id
    # Each SA's later messages stay on their own connection.
    a = r.outbound(udp_out(LOCAL, PEER, 500, 500, ike(SPI_A, SPI_R, IKE_AUTH, mid=1)))
    b = r.outbound(udp_out(LOCAL, PEER, 500, 500, ike(SPI_B, SPI_R, IKE_AUTH, mid=1)))
    assert isinstance(a, Send) and a.conn_id == first
    assert isinstance(b, Send) and b.conn_id == res.conn_id


def test_only_ikev2_requests_are_marked_for_resend():
    """Send.request: an IKEv2 request (no Response flag) is resent after a reconnect;
    responses, IKEv1 and ESP are not."""
    r = client_router()
    cid = open_client(r)
    req = r.outbound(udp_out(LOCAL, PEER, 500, 500, ike(SPI_A, SPI_R, IKE_AUTH, 0x08, 1)))
    resp = r.outbound(udp_out(LOCAL, PEER, 500, 500, ike(SPI_A, SPI_R, INFORMATIONAL, 0x20, 5)))
    v1 = bytearray(ike(SPI_A, SPI_R, 2, 0x00))
    v1[17] = 0x10  # IKEv1 (ISAKMP) version octet
    ikev1 = r.outbound(udp_out(LOCAL, PEER, 500, 500, bytes(v1)))
    espres = r.outbound(udp_out(LOCAL, PEER, 4500, 4500, esp()))
    for res in (req, resp, ikev1, espres):
        assert isinstance(res, Send) and res.conn_id == cid, res
    assert (req.request, resp.request, ikev1.request, espres.request) == (
        True,
        False,
        False,
        False,
    )


def test_client_ipv6_round_trip():
    r = client_router()
    msg = ike(SPI_A)
    res = r.outbound(udp_out(LOCAL6, PEER6, 500, 500, msg))
    assert isinstance(res, Open)
    assert (res.local, res.peer, res.frame) == (LOCAL6, PEER6, rfc9329.frame_ike(msg))
    cid = res.conn_id
    auth = ike(SPI_A, SPI_R, IKE_AUTH, mid=1)
    res2 = r.outbound(udp_out(LOCAL6, PEER6, 4500, 4500, NON_ESP_MARKER + auth))
    assert_send(res2, cid, rfc9329.frame_ike(auth), True)
    reply = ike(SPI_A, SPI_R, IKE_AUTH, flags=0x20, mid=1, body=b"\x03" * 33)
    sport, dport, payload = decode_inject(r.inbound_ike(cid, reply), LOCAL6, PEER6)
    assert (sport, dport, payload) == (4500, 4500, NON_ESP_MARKER + reply)
    packet = esp(0x12345678, 1, b"\x77" * 31)  # odd length: exercises checksum padding
    sport, dport, payload = decode_inject(r.inbound_esp(cid, packet), LOCAL6, PEER6)
    assert (sport, dport, payload) == (4500, 4500, packet)


def test_client_ipv4_and_ipv6_connections_to_one_peer_stay_apart():
    r = client_router()
    c4 = open_client(r, LOCAL, PEER, SPI_A)
    c6 = open_client(r, LOCAL6, PEER6, SPI_A)  # same SPI value, other address pair
    assert c4 != c6
    assert r.table.lookup_ike(LOCAL, PEER, SPI_A).conn_id == c4
    assert r.table.lookup_ike(LOCAL6, PEER6, SPI_A).conn_id == c6


# --- gateway side -----------------------------------------------------------------------


def gateway_router() -> Router:
    return Router(ConnectionTable(), lambda addr: False)


def test_gateway_inbound_ike_is_delivered_to_4500_from_the_peer_port_with_marker():
    r = gateway_router()
    view = r.add_gateway_conn(LOCAL, PEER, peer_port=40000)
    assert isinstance(view, ConnView) and view.side is Role.GATEWAY
    msg = ike(SPI_A, body=b"\x21" * 250)
    sport, dport, payload = decode_inject(r.inbound_ike(view.conn_id, msg), LOCAL, PEER)
    assert (sport, dport) == (40000, 4500)
    assert payload == NON_ESP_MARKER + msg
    assert r.table.lookup_ike(LOCAL, PEER, SPI_A).conn_id == view.conn_id


def test_gateway_inbound_esp_is_delivered_to_4500_from_the_peer_port():
    r = gateway_router()
    view = r.add_gateway_conn(LOCAL, PEER, peer_port=40000)
    packet = esp()
    sport, dport, payload = decode_inject(r.inbound_esp(view.conn_id, packet), LOCAL, PEER)
    assert (sport, dport, payload) == (40000, 4500, packet)


def test_gateway_outbound_is_found_by_endpoint_even_with_an_unknown_spi():
    r = gateway_router()
    view = r.add_gateway_conn(LOCAL, PEER, peer_port=40000)
    reply = ike(SPI_B, SPI_R, IKE_SA_INIT, flags=0x20)  # SPI never seen inbound
    res = r.outbound(udp_out(LOCAL, PEER, 4500, 40000, NON_ESP_MARKER + reply))
    assert_send(res, view.conn_id, rfc9329.frame_ike(reply), True)
    packet = esp(0x01020304)
    res = r.outbound(udp_out(LOCAL, PEER, 4500, 40000, packet))
    assert_send(res, view.conn_id, rfc9329.frame_esp(packet), False)
    assert r.table.lookup_esp(LOCAL, PEER, 0x01020304).conn_id == view.conn_id


def test_gateway_two_connections_from_one_peer_ip_stay_apart():
    r = gateway_router()
    a = r.add_gateway_conn(LOCAL, PEER, peer_port=40000)
    b = r.add_gateway_conn(LOCAL, PEER, peer_port=40001)
    msg_a, msg_b = ike(SPI_A), ike(SPI_B)
    assert decode_inject(r.inbound_ike(a.conn_id, msg_a), LOCAL, PEER)[:2] == (40000, 4500)
    assert decode_inject(r.inbound_ike(b.conn_id, msg_b), LOCAL, PEER)[:2] == (40001, 4500)
    for port, view, spi in ((40000, a, SPI_A), (40001, b, SPI_B)):
        out = ike(spi, SPI_R, flags=0x20)
        res = r.outbound(udp_out(LOCAL, PEER, 4500, port, NON_ESP_MARKER + out))
        assert_send(res, view.conn_id, rfc9329.frame_ike(out), True)
    # ESP too: the destination port, not the newest connection, decides.
    res = r.outbound(udp_out(LOCAL, PEER, 4500, 40000, esp(0xAAAA0001)))
    assert isinstance(res, Send) and res.conn_id == a.conn_id


def test_gateway_ike_spi_held_by_another_connection_is_not_moved():
    r = gateway_router()
    a = r.add_gateway_conn(LOCAL, PEER, peer_port=40000)
    b = r.add_gateway_conn(LOCAL, PEER, peer_port=40001)
    r.inbound_ike(a.conn_id, ike(SPI_A))
    quoted = ike(SPI_A, SPI_R, IKE_AUTH, mid=1)
    res = r.inbound_ike(b.conn_id, quoted)
    # charon still gets it (it judges authenticity), from B's endpoint...
    sport, dport, payload = decode_inject(res, LOCAL, PEER)
    assert (sport, dport, payload) == (40001, 4500, NON_ESP_MARKER + quoted)
    # ...but the SPI stays with A.
    assert r.table.lookup_ike(LOCAL, PEER, SPI_A).conn_id == a.conn_id
    assert b.drops == {"ike-spi-held-elsewhere": 1}
    assert a.drops == {}
    assert SPI_A not in r.table.get(b.conn_id).ike_spis


def test_gateway_remove_leaves_no_index_entries():
    r = gateway_router()
    a = r.add_gateway_conn(LOCAL, PEER, peer_port=40000)
    b = r.add_gateway_conn(LOCAL6, PEER6, peer_port=40001)
    r.inbound_ike(a.conn_id, ike(SPI_A))
    r.inbound_ike(b.conn_id, ike(SPI_B))
    r.outbound(udp_out(LOCAL, PEER, 4500, 40000, esp(0x11)))
    r.outbound(udp_out(LOCAL6, PEER6, 4500, 40001, esp(0x22)))
    assert not indexes_empty(r.table)
    r.remove(a.conn_id)
    r.remove(b.conn_id)
    assert indexes_empty(r.table)
    assert r.views == {}
    assert r.inbound_ike(a.conn_id, ike(SPI_A)) == Drop("unknown-connection")
    assert r.inbound_esp(b.conn_id, esp()) == Drop("unknown-connection")
    assert r.outbound(udp_out(LOCAL, PEER, 4500, 40000, esp(0x11))) == Drop("no-connection")


def test_client_remove_leaves_no_index_entries():
    r = client_router()
    cid = open_client(r)
    r.outbound(udp_out(LOCAL, PEER, 4500, 4500, esp()))
    r.remove(cid)
    assert indexes_empty(r.table)
    r.remove(cid)  # twice is harmless
    assert indexes_empty(r.table)


# --- garbage in, Drop out ---------------------------------------------------------------


def loaded_router() -> Router:
    """A router with a client and a gateway connection to PEER, where everything is a TCP
    peer: anything that is not dropped has somewhere to go."""
    r = Router(ConnectionTable(), lambda addr: True)
    open_client(r)
    r.add_gateway_conn(LOCAL, PEER, peer_port=40000)
    return r


def test_non_udp_outbound_is_dropped():
    r = loaded_router()
    tcp = build_ip(LOCAL, PEER, PROTO_TCP, build_tcp(LOCAL, PEER, 4500, 40000, 1, 1, TCP_ACK))
    assert r.outbound(tcp) == Drop("not-udp")
    assert r.outbound(build_ip(LOCAL, PEER, PROTO_ESP, esp())) == Drop("not-udp")


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00", b"\x00\x00\x00", b"\xff\xff", b"\x01\x02\x03\x04\x05\x06\x07", NON_ESP_MARKER],
    ids=["empty", "1", "3", "ff-ff", "short-esp", "marker-only"],
)
def test_short_payloads_on_4500_are_dropped(payload):
    r = loaded_router()
    res = r.outbound(udp_out(LOCAL, PEER, 4500, 4500, payload))
    assert isinstance(res, Drop)


def test_invalid_ike_on_500_is_dropped():
    r = loaded_router()
    bad = [
        ike(SPI_A)[:27],  # truncated header
        bytes(8) + ike(SPI_A)[8:],  # initiator SPI zero
        ike(SPI_A)[:17] + b"\x30" + ike(SPI_A)[18:],  # major version 3
        ike(SPI_A)[:24] + struct.pack("!I", 4000),  # length beyond the message
    ]
    for payload in bad:
        assert r.outbound(udp_out(LOCAL, PEER, 500, 500, payload)) == Drop("invalid-outbound")


def test_every_truncation_of_a_valid_packet_is_dropped():
    r = loaded_router()
    for packet in (
        udp_out(LOCAL, PEER, 500, 500, ike(SPI_A, SPI_R, IKE_AUTH, body=b"\x01" * 40)),
        udp_out(LOCAL, PEER, 4500, 4500, esp()),
        udp_out(LOCAL6, PEER6, 4500, 4500, NON_ESP_MARKER + ike(SPI_B)),
    ):
        for n in range(len(packet)):
            res = r.outbound(packet[:n])
            assert isinstance(res, Drop), (n, res)


def test_non_first_fragment_is_never_sent():
    """A non-first IPv4 fragment holds the middle of a datagram, not a UDP header, even when
    those octets happen to look like one (here: UDP 4500 -> 40000 carrying "ESP")."""
    r = loaded_router()
    lookalike = build_udp(LOCAL, PEER, 4500, 40000, esp(0x55667788))
    frag = bytearray(build_ipv4(LOCAL, PEER, PROTO_UDP, lookalike))
    struct.pack_into("!H", frag, 6, 185)  # fragment offset 185*8 = 1480, last fragment
    frag[10:12] = b"\x00\x00"
    struct.pack_into("!H", frag, 10, checksum(bytes(frag[:20])))
    assert ipv4_header_checksum_ok(bytes(frag[:20]))
    assert parse_ip(bytes(frag)).fragment
    res = r.outbound(bytes(frag))
    assert isinstance(res, Drop), res


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_with_no_connections_always_drop(data):
    r = Router(ConnectionTable(), lambda addr: False)
    assert isinstance(r.outbound(data), Drop)
    assert indexes_empty(r.table)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data):
    r = loaded_router()
    assert isinstance(r.outbound(data), (Send, Open, Drop))


def _check_frame(frame: bytes, is_ike: bool) -> None:
    """A frame the router emits must read back as exactly one IKE or ESP event."""
    codec = rfc9329.StreamCodec(rfc9329.Role.ORIGINATOR)
    codec.receive_data(frame)
    ev = codec.next_event()
    assert isinstance(ev, rfc9329.IKEMessage if is_ike else rfc9329.ESPPacket), ev
    assert isinstance(codec.next_event(), rfc9329.NeedData)


PORTS = st.sampled_from([500, 4500, 40000]) | st.integers(0, 65535)
PAYLOADS = (
    st.binary(max_size=120)
    | st.binary(max_size=120).map(lambda b: NON_ESP_MARKER + b)
    | st.builds(
        lambda spi_r, ex, body, marker: (
            (NON_ESP_MARKER if marker else b"") + ike(SPI_A, spi_r, ex, body=body)
        ),
        st.sampled_from([bytes(8), SPI_R]),
        st.integers(0, 255),
        st.binary(max_size=40),
        st.booleans(),
    )
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([(LOCAL, PEER), (LOCAL, OTHER), (LOCAL6, PEER6)]),
    PORTS,
    PORTS,
    PAYLOADS,
)
def test_well_formed_udp_with_random_payload_never_raises(addrs, sport, dport, payload):
    r = loaded_router()
    res = r.outbound(udp_out(addrs[0], addrs[1], sport, dport, payload))
    assert isinstance(res, (Send, Open, Drop))
    if isinstance(res, Send):
        _check_frame(res.frame, res.is_ike)
    if isinstance(res, Open):
        _check_frame(res.frame, res.frame_is_ike)
