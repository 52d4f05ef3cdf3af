"""cTCP packet transform: exact wire layout, round trips, rejection, and scapy as an
independent parser."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.packet import Raw

from tcpencap.wire import ctcp
from tcpencap.wire.ctcp import (
    CTCPError,
    build_control,
    build_trailer,
    decapsulate,
    encapsulate,
    encapsulate_info,
    parse_trailer,
    read_segment,
)
from tcpencap.wire.packet import (
    PROTO_ESP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    addr_bytes,
    build_ipv4,
    build_ipv6,
    build_tcp,
    build_udp,
    ipv4_header_checksum_ok,
    l4_checksum_ok,
    parse_ip,
    parse_tcp,
)

V4A, V4B = addr_bytes("198.18.0.1"), addr_bytes("198.18.1.2")
V6A, V6B = addr_bytes("fd00::1"), addr_bytes("fd00:1::2")
IKE_HDR = bytes(range(1, 9)) + bytes(8) + b"\x01\x10\x02\x00" + bytes(4) + struct.pack("!I", 40)
IKE_MSG = IKE_HDR + b"\xaa" * 12
ESP_BODY = struct.pack("!II", 0xC0FFEE01, 7) + b"\x55" * 40

# IPv6 extension headers: hop-by-hop (0) then destination options (60), each 8 octets of
# PadN; the last one's Next Header is patched in by _v6_ext().
_PADN6 = b"\x01\x04\x00\x00\x00\x00"


def _v6_ext(proto: int) -> bytes:
    return bytes([60, 0]) + _PADN6 + bytes([proto, 0]) + _PADN6


def ike_v4(msg: bytes = IKE_MSG, *, ident: int = 0x1234, options: bytes = b"") -> bytes:
    udp = build_udp(V4A, V4B, 500, 500, msg)
    return build_ipv4(V4A, V4B, PROTO_UDP, udp, ident=ident, ttl=61, tos=0x28, options=options)


def ike_v6(msg: bytes = IKE_MSG, *, ext: bool = False) -> bytes:
    udp = build_udp(V6A, V6B, 500, 500, msg)
    if ext:
        return build_ipv6(V6A, V6B, PROTO_UDP, udp, ext=_v6_ext(PROTO_UDP), ext_first=0)
    return build_ipv6(V6A, V6B, PROTO_UDP, udp, hop_limit=55)


def esp_v4(body: bytes = ESP_BODY, *, df: bool = True) -> bytes:
    return build_ipv4(V4A, V4B, PROTO_ESP, body, ident=0x4321, df=df)


def esp_v6(body: bytes = ESP_BODY, *, ext: bool = False) -> bytes:
    if ext:
        return build_ipv6(V6A, V6B, PROTO_ESP, body, ext=_v6_ext(PROTO_ESP), ext_first=0)
    return build_ipv6(V6A, V6B, PROTO_ESP, body)


def _zero_udp_csum(ip_packet: bytes) -> bytes:
    pkt = parse_ip(ip_packet)
    off = len(pkt.header) + 6
    return ip_packet[:off] + b"\x00\x00" + ip_packet[off + 2 :]


# --- trailer --------------------------------------------------------------------------


def test_trailer_matches_worked_examples() -> None:
    assert build_trailer(17, 0x1234) == bytes.fromhex("00000000 1234 0000 21456c69 10 11 0100")
    assert build_trailer(50) == bytes.fromhex("00000000 0000 0000 21456c69 10 32 0100")


def test_parse_trailer_reports_fields() -> None:
    raw = bytes.fromhex("00000000 00ab 4000 21456c69 10 11 0100")
    t = parse_trailer(raw)
    assert (t.seq, t.direction, t.proto, t.magic_ok, t.zero_ok) == (0xAB, 0x4000, 17, True, True)
    bad = parse_trailer(bytes.fromhex("00000001 0000 0000 deadbeef 10 32 0200"))
    assert not bad.magic_ok and not bad.zero_ok and bad.proto == 50
    with pytest.raises(CTCPError):
        parse_trailer(raw[:15])


# --- encapsulation layout -------------------------------------------------------------


def test_encapsulate_ike_v4_layout() -> None:
    inner = ike_v4(options=b"\x94\x04\x00\x00")  # router alert: IHL 6
    out = encapsulate(inner, sport=10000, dport=40000, seq=0x01020304, ack=0xFFFFFFFF)
    pkt = parse_ip(out)
    orig = parse_ip(inner)
    assert pkt.proto == PROTO_TCP and len(pkt.header) == 24
    assert pkt.header[12:] == orig.header[12:]  # addresses and options untouched
    assert (pkt.ttl, pkt.ident, pkt.tos, pkt.df) == (61, 0x1234, 0x28, False)
    assert len(out) == len(inner) + 20 + 16
    assert struct.unpack_from("!H", out, 2)[0] == len(out)
    assert ipv4_header_checksum_ok(pkt.header)
    tcp = parse_tcp(pkt.payload)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (10000, 40000, 0x01020304, 0xFFFFFFFF)
    assert (tcp.flags, tcp.window, tcp.urgent, tcp.options) == (TCP_ACK, 65535, 0, b"")
    assert pkt.payload[12] >> 4 == 5
    assert l4_checksum_ok(pkt.src, pkt.dst, PROTO_TCP, pkt.payload)
    udp = orig.payload
    assert tcp.payload[:-16] == udp[:6] + b"\x00\x00" + udp[8:]  # UDP checksum zeroed
    assert tcp.payload[-16:] == bytes.fromhex("00000000 1234 0000 21456c69 10 11 0100")


def test_encapsulate_ike_v6_keeps_valid_udp_checksum_and_ext_chain() -> None:
    inner = ike_v6(ext=True)
    out, plen, proto = encapsulate_info(inner, sport=1, dport=2, seq=3, ack=4)
    pkt = parse_ip(out)
    assert proto == PROTO_UDP and plen == len(parse_ip(inner).payload) + 16
    assert out[6] == 0  # first header still hop-by-hop
    assert pkt.proto == PROTO_TCP and pkt.nh_offset == 48  # dest-opts NH rewritten
    assert struct.unpack_from("!H", out, 4)[0] == len(out) - 40
    tcp = parse_tcp(pkt.payload)
    udp = tcp.payload[:-16]
    assert udp == parse_ip(inner).payload
    assert l4_checksum_ok(V6A, V6B, PROTO_UDP, udp) and udp[6:8] != b"\x00\x00"
    assert tcp.payload[-16:] == build_trailer(17, 0)  # no IPv6 ident
    assert l4_checksum_ok(V6A, V6B, PROTO_TCP, pkt.payload)


def test_encapsulate_esp_trailer_and_seq_override() -> None:
    out = encapsulate(esp_v4(), sport=1, dport=2, seq=3, ack=4, trailer_seq=99)
    pkt = parse_ip(out)
    assert pkt.df and pkt.ident == 0x4321
    assert pkt.payload[-16:] == build_trailer(50, 0)  # ESP: always 0
    assert pkt.payload[20:-16] == ESP_BODY
    ike = encapsulate(ike_v4(), sport=1, dport=2, seq=3, ack=4, trailer_seq=0xBEEF)
    assert ike[-12:-10] == b"\xbe\xef"


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "not an IP packet"),
        (b"\x45" + bytes(10), "not an IP packet"),
        (build_ipv4(V4A, V4B, PROTO_TCP, build_tcp(V4A, V4B, 1, 2, 0, 0, TCP_SYN)), "protocol 6"),
        (build_ipv4(V4A, V4B, 1, bytes(16)), "protocol 1"),
        (build_ipv4(V4A, V4B, PROTO_ESP, bytes(7)), "too short"),
    ],
)
def test_encapsulate_rejects(packet: bytes, reason: str) -> None:
    with pytest.raises(CTCPError, match=reason):
        encapsulate(packet, sport=1, dport=2, seq=0, ack=0)


def test_encapsulate_rejects_fragment() -> None:
    frag = bytearray(esp_v4(df=False))
    frag[6] = 0x20  # more fragments
    frag[10:12] = b"\x00\x00"
    with pytest.raises(CTCPError, match="fragment"):
        encapsulate(bytes(frag), sport=1, dport=2, seq=0, ack=0)


# --- decapsulation --------------------------------------------------------------------


@pytest.mark.parametrize("make", [ike_v4, esp_v4, ike_v6, esp_v6])
def test_decapsulate_fields(make) -> None:
    inner = make()
    seg = encapsulate(inner, sport=10000, dport=2345, seq=77, ack=88)
    d = decapsulate(seg, verify_checksum=True)
    proto = parse_ip(inner).proto
    assert (d.proto, d.sport, d.dport, d.seq, d.ack, d.flags, d.window) == (
        proto,
        10000,
        2345,
        77,
        88,
        TCP_ACK,
        65535,
    )
    assert d.payload_len == len(parse_ip(inner).payload) + 16
    assert d.trailer.proto == proto and d.trailer.magic_ok and d.is_ike == (proto == PROTO_UDP)
    expected = _zero_udp_csum(inner) if make is ike_v4 else inner
    assert d.packet == expected


def test_decapsulate_tolerates_tcp_options_and_recomputes_checksums() -> None:
    # A peer's segment with TCP options (timestamps) and a non-zero IPv4 UDP checksum.
    udp = build_udp(V4A, V4B, 500, 500, IKE_MSG)
    opts = b"\x01\x01\x08\x0a" + bytes(8)
    tcp = build_tcp(V4A, V4B, 10000, 5555, 1, 2, TCP_ACK, udp + build_trailer(17, 5), options=opts)
    seg = build_ipv4(V4A, V4B, PROTO_TCP, tcp, ident=5)
    d = decapsulate(seg)
    assert d.packet == _zero_udp_csum(build_ipv4(V4A, V4B, PROTO_UDP, udp, ident=5))
    assert ipv4_header_checksum_ok(parse_ip(d.packet).header)
    # IPv6: a wrong inner UDP checksum is replaced by the correct one.
    udp6 = bytearray(build_udp(V6A, V6B, 500, 500, IKE_MSG))
    good = bytes(udp6[6:8])
    udp6[6:8] = b"\x12\x34"
    tcp6 = build_tcp(V6A, V6B, 1, 2, 0, 0, TCP_ACK, bytes(udp6) + build_trailer(17), options=opts)
    d6 = decapsulate(build_ipv6(V6A, V6B, PROTO_TCP, tcp6))
    assert parse_ip(d6.packet).payload[6:8] == good


def test_decapsulate_magic_mismatch_is_reported_not_rejected() -> None:
    seg = bytearray(encapsulate(esp_v4(), sport=1, dport=2, seq=0, ack=0))
    seg[-8:-4] = b"XXXX"
    seg[-16] = 1
    d = decapsulate(bytes(seg))  # TCP checksum not verified by default
    assert not d.trailer.magic_ok and not d.trailer.zero_ok and d.packet == esp_v4()
    with pytest.raises(CTCPError, match="checksum"):
        decapsulate(bytes(seg), verify_checksum=True)


def _with_trailer(trailer: bytes, body: bytes = ESP_BODY) -> bytes:
    tcp = build_tcp(V4A, V4B, 1, 2, 0, 0, TCP_ACK, body + trailer)
    return build_ipv4(V4A, V4B, PROTO_TCP, tcp)


@pytest.mark.parametrize("proto", [0, 6, 51, 255])
def test_decapsulate_rejects_other_inner_protocols(proto: int) -> None:
    with pytest.raises(CTCPError, match=f"inner protocol {proto}"):
        decapsulate(_with_trailer(build_trailer(proto)))


def test_decapsulate_rejects_short_and_non_tcp() -> None:
    for plen in (0, 1, 23):
        with pytest.raises(CTCPError, match="short"):
            decapsulate(_with_trailer(b"", bytes(plen)))
    minimal = decapsulate(_with_trailer(build_trailer(50), bytes(8)))  # exactly 24 octets
    assert minimal.packet == build_ipv4(V4A, V4B, PROTO_ESP, bytes(8))
    with pytest.raises(CTCPError, match="not TCP"):
        decapsulate(esp_v4())
    bad_off = bytearray(_with_trailer(build_trailer(50)))
    bad_off[20 + 12] = 0x40  # data offset 16 octets
    with pytest.raises(CTCPError, match="data offset"):
        decapsulate(bytes(bad_off))
    with pytest.raises(CTCPError, match="inner UDP length"):
        decapsulate(_with_trailer(build_trailer(17), b"\x01\xf4\x01\xf4\x00\x07\x00\x00"))


def test_read_segment_kinds() -> None:
    ctl = read_segment(build_control(V4A, V4B, 1, 2, 5, 6, TCP_SYN))
    assert (ctl.flags, ctl.seq, ctl.ack, ctl.payload_len, ctl.decap, ctl.error) == (
        TCP_SYN,
        5,
        6,
        0,
        None,
        None,
    )
    assert ctl.is_short
    ka = read_segment(_with_trailer(b"", b"\x00"))
    assert ka.payload_len == 1 and ka.is_short and ka.decap is None and ka.error == "short"
    data = read_segment(encapsulate(ike_v6(), sport=1, dport=2, seq=9, ack=10))
    assert data.decap is not None and data.decap.packet == ike_v6() and not data.is_short
    bad = read_segment(_with_trailer(build_trailer(6)))
    assert bad.decap is None and bad.error == "inner protocol 6 in trailer"
    with pytest.raises(CTCPError):
        read_segment(esp_v4())


def test_build_control_v4_v6() -> None:
    v4 = build_control(V4A, V4B, 10000, 3333, 1, 2, TCP_RST | TCP_ACK, ident=0x10005)
    p = parse_ip(v4)
    assert (p.ttl, p.df, p.ident, p.proto, len(p.payload)) == (240, False, 5, PROTO_TCP, 20)
    t = parse_tcp(p.payload)
    assert (t.flags, t.seq, t.ack, t.window, t.options) == (TCP_RST | TCP_ACK, 1, 2, 65535, b"")
    assert l4_checksum_ok(V4A, V4B, PROTO_TCP, p.payload) and ipv4_header_checksum_ok(p.header)
    v6 = parse_ip(build_control(V6A, V6B, 1, 2, 3, 0, TCP_SYN))
    assert (v6.ttl, v6.proto, len(v6.payload)) == (240, PROTO_TCP, 20)
    assert l4_checksum_ok(V6A, V6B, PROTO_TCP, v6.payload)


# --- hypothesis -----------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
port = st.integers(0, 0xFFFF)


@st.composite
def inner_packets(draw: st.DrawFn) -> bytes:
    v6 = draw(st.booleans())
    ike = draw(st.booleans())
    src, dst = (V6A, V6B) if v6 else (V4A, V4B)
    if ike:
        proto = PROTO_UDP
        l4 = build_udp(src, dst, draw(port), draw(port), draw(st.binary(max_size=300)))
    else:
        proto = PROTO_ESP
        l4 = draw(st.binary(min_size=8, max_size=300))
    if v6:
        ext = draw(st.booleans())
        if ext:
            return build_ipv6(src, dst, proto, l4, ext=_v6_ext(proto), ext_first=0)
        return build_ipv6(src, dst, proto, l4, hop_limit=draw(st.integers(0, 255)))
    opts = draw(st.sampled_from([b"", b"\x01\x01\x01\x01", b"\x94\x04\x00\x00" + b"\x01" * 8]))
    return build_ipv4(
        src, dst, proto, l4, ident=draw(port), ttl=draw(st.integers(0, 255)), options=opts
    )


@given(inner_packets(), port, port, u32, u32)
@settings(max_examples=300)
def test_round_trip(inner: bytes, sport: int, dport: int, seq: int, ack: int) -> None:
    out, plen, proto = encapsulate_info(inner, sport=sport, dport=dport, seq=seq, ack=ack)
    orig = parse_ip(inner)
    assert proto == orig.proto and plen == len(orig.payload) + 16
    d = decapsulate(out, verify_checksum=True)
    assert (d.sport, d.dport, d.seq, d.ack, d.payload_len, d.proto) == (
        sport,
        dport,
        seq,
        ack,
        plen,
        orig.proto,
    )
    if orig.version == 4 and orig.proto == PROTO_UDP:
        assert d.packet == _zero_udp_csum(inner)
        assert d.trailer.seq == orig.ident
    else:
        assert d.packet == inner


@given(st.binary(max_size=200))
def test_decapsulate_random_bytes_only_raise_ctcperror(data: bytes) -> None:
    for fn in (decapsulate, read_segment):
        try:
            fn(data)
        except CTCPError:
            pass


@given(inner_packets(), st.data())
def test_decapsulate_truncated_or_mutated_only_raise_ctcperror(inner: bytes, data) -> None:
    seg = encapsulate(inner, sport=1, dport=2, seq=3, ack=4)
    cut = data.draw(st.integers(0, len(seg)))
    pos = data.draw(st.integers(0, len(seg) - 1))
    mutated = bytearray(seg)
    mutated[pos] = data.draw(st.integers(0, 255))
    for candidate in (seg[:cut], bytes(mutated)):
        for fn in (decapsulate, read_segment):
            try:
                fn(candidate)
            except CTCPError:
                pass


# --- scapy as an independent parser ---------------------------------------------------


def _scapy_checksums_ok(pkt) -> bool:
    """scapy recomputes the checksums it would write; they must equal ours."""
    clone = pkt.copy()
    del clone[TCP].chksum
    if IP in clone:
        del clone[IP].chksum
    rebuilt = clone.__class__(bytes(clone))
    ok = rebuilt[TCP].chksum == pkt[TCP].chksum
    if IP in pkt:
        ok = ok and rebuilt[IP].chksum == pkt[IP].chksum
    return ok


def test_scapy_reads_ike_v4() -> None:
    inner = bytes(
        IP(src="198.18.0.1", dst="198.18.1.2", id=777) / UDP(sport=500, dport=500) / Raw(IKE_MSG)
    )
    out = encapsulate(inner, sport=10000, dport=50000, seq=1000, ack=2000)
    p = IP(out)
    assert p.proto == 6 and p.len == len(out) and p.id == 777 and p.flags == 0
    t = p[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, t.dataofs, t.window, t.urgptr) == (
        10000,
        50000,
        1000,
        2000,
        5,
        65535,
        0,
    )
    assert t.flags == "A"
    payload = bytes(t.payload)
    assert payload[:4] == b"\x01\xf4\x01\xf4" and payload[6:8] == b"\x00\x00"
    assert payload[8:-16] == IKE_MSG
    assert payload[-16:] == bytes.fromhex("00000000 0309 0000 21456c69 10 11 0100")
    assert _scapy_checksums_ok(p)
    back = IP(decapsulate(out).packet)
    assert back.proto == 17 and back[UDP].chksum == 0 and bytes(back[UDP].payload) == IKE_MSG
    assert _ip_checksum_ok_by_scapy(back)


def _ip_checksum_ok_by_scapy(p) -> bool:
    clone = p.copy()
    del clone.chksum
    return IP(bytes(clone)).chksum == p.chksum


def test_scapy_reads_esp_v6_with_ext_headers() -> None:
    inner = bytes(
        IPv6(src="fd00::1", dst="fd00:1::2")
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt(nh=50)
        / Raw(ESP_BODY)
    )
    out = encapsulate(inner, sport=10000, dport=50000, seq=5, ack=6)
    p = IPv6(out)
    assert p.plen == len(out) - 40
    assert p[IPv6ExtHdrDestOpt].nh == 6
    t = p[TCP]
    assert (t.seq, t.ack, t.dataofs, t.flags, t.window) == (5, 6, 5, "A", 65535)
    assert bytes(t.payload) == ESP_BODY + build_trailer(50)
    assert _scapy_checksums_ok(p)
    assert decapsulate(out).packet == inner


def test_scapy_reads_ike_v6_and_control_segments() -> None:
    inner = bytes(IPv6(src="fd00::1", dst="fd00:1::2") / UDP(sport=500, dport=500) / Raw(IKE_MSG))
    out = encapsulate(inner, sport=10000, dport=50000, seq=5, ack=6)
    assert _scapy_checksums_ok(IPv6(out))
    back = IPv6(decapsulate(out).packet)
    assert back[UDP].chksum == IPv6(inner)[UDP].chksum != 0
    for src, dst, cls in ((V4A, V4B, IP), (V6A, V6B, IPv6)):
        ctl = cls(build_control(src, dst, 10000, 4000, 123, 456, TCP_SYN | TCP_ACK, ident=9))
        assert ctl[TCP].flags == "SA" and ctl[TCP].dataofs == 5 and not ctl[TCP].options
        assert (ctl.ttl if cls is IP else ctl.hlim) == 240
        assert _scapy_checksums_ok(ctl)
        if cls is IP:
            assert ctl.flags == 0 and ctl.id == 9


def test_module_constants() -> None:
    assert ctcp.MIN_PAYLOAD == 24 and ctcp.TRAILER_LEN == 16 and ctcp.MAGIC == b"!Eli\x10"
