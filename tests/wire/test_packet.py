"""Tests for tcpencap.wire.packet: IPv4/IPv6/UDP/TCP parsing, building and checksums.

scapy is used as an independent implementation: what the core builds must read back in
scapy with the same fields and checksums scapy agrees with, and what scapy builds must
parse in the core with the same fields.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH, ESP
from scapy.packet import Raw

from tcpencap.wire import packet as P
from tcpencap.wire.packet import PacketError

A4 = P.addr_bytes("198.18.0.1")
B4 = P.addr_bytes("198.19.255.254")
A6 = P.addr_bytes("fd00::1")
B6 = P.addr_bytes("fd00:abcd::2")
FAMILIES = [pytest.param((A4, B4), id="v4"), pytest.param((A6, B6), id="v6")]

# Router Alert (4 octets) and a 3-octet option that must be padded to 4.
RTR_ALERT = b"\x94\x04\x00\x00"


def ref_checksum(data: bytes) -> int:
    """A plain word-by-word RFC 1071 checksum, independent of the folding trick in the core."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ref_pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + bytes([0, proto]) + length.to_bytes(2, "big")
    return src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, proto])


# --- addresses and the raw checksum ----------------------------------------------------


def test_addr_round_trip() -> None:
    assert P.addr_bytes("198.18.0.1") == bytes([198, 18, 0, 1])
    assert P.addr_text(A4) == "198.18.0.1"
    assert len(A6) == 16
    assert P.addr_text(B6) == "fd00:abcd::2"


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3 example: the words sum to 0xddf2, so the checksum is 0x220d.
    assert P.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\x00\x00", b"\xff\xff", b"\xff\xff\xff\xff", b"\x12", b"\xab\xcd\xef"],
)
def test_checksum_edge_cases(data: bytes) -> None:
    assert P.checksum(data) == ref_checksum(data)


@given(st.binary(max_size=200))
def test_checksum_matches_reference(data: bytes) -> None:
    assert P.checksum(data) == ref_checksum(data)
    assert P.checksum(memoryview(data)) == ref_checksum(data)


@given(st.binary(max_size=120), st.sampled_from([P.PROTO_UDP, P.PROTO_TCP]), st.booleans())
def test_l4_checksum_matches_reference(body: bytes, proto: int, v6: bool) -> None:
    src, dst = (A6, B6) if v6 else (A4, B4)
    seg = b"\x00" * 8 + body
    expected = ref_checksum(ref_pseudo(src, dst, proto, len(seg)) + seg)
    assert P.l4_checksum(src, dst, proto, seg) == expected


# --- IPv4 ------------------------------------------------------------------------------


def test_ipv4_build_parse_no_options() -> None:
    raw = P.build_ipv4(A4, B4, P.PROTO_UDP, b"payload", ttl=17, ident=0xBEEF, tos=0x28, df=True)
    assert len(raw) == 27
    assert raw[0] == 0x45
    assert struct.unpack_from("!H", raw, 2)[0] == 27
    assert P.ipv4_header_checksum_ok(raw[:20])
    assert struct.unpack_from("!H", raw, 10)[0] == ref_checksum(raw[:10] + b"\0\0" + raw[12:20])
    pkt = P.parse_ip(raw)
    assert (pkt.version, pkt.src, pkt.dst, pkt.proto) == (4, A4, B4, P.PROTO_UDP)
    assert (pkt.ttl, pkt.ident, pkt.tos, pkt.df, pkt.fragment) == (17, 0xBEEF, 0x28, True, False)
    assert pkt.header == raw[:20]
    assert pkt.nh_offset == 9
    assert pkt.header[pkt.nh_offset] == P.PROTO_UDP
    assert pkt.payload == b"payload"


@pytest.mark.parametrize(
    ("options", "padded"),
    [
        (RTR_ALERT, RTR_ALERT),
        (b"\x01\x01\x01", b"\x01\x01\x01\x00"),
        (b"\x01" * 40, b"\x01" * 40),
        (b"\x07\x07\x04" + b"\x00" * 4, b"\x07\x07\x04" + b"\x00" * 5),
    ],
)
def test_ipv4_options(options: bytes, padded: bytes) -> None:
    raw = P.build_ipv4(A4, B4, P.PROTO_TCP, b"abc", options=options)
    ihl = 20 + len(padded)
    assert (raw[0] & 0x0F) * 4 == ihl
    assert raw[20:ihl] == padded
    assert P.ipv4_header_checksum_ok(raw[:ihl])
    pkt = P.parse_ip(raw)
    assert pkt.header == raw[:ihl]
    assert pkt.payload == b"abc"
    assert pkt.proto == P.PROTO_TCP


def test_ipv4_options_too_long() -> None:
    with pytest.raises(PacketError):
        P.build_ipv4(A4, B4, P.PROTO_UDP, b"", options=b"\x01" * 41)


def test_ipv4_header_checksum_detects_corruption() -> None:
    raw = bytearray(P.build_ipv4(A4, B4, P.PROTO_UDP, b"x", options=RTR_ALERT))
    assert P.ipv4_header_checksum_ok(bytes(raw[:24]))
    raw[8] ^= 0x01  # TTL
    assert not P.ipv4_header_checksum_ok(bytes(raw[:24]))


def test_ipv4_trailing_bytes_beyond_total_length_are_dropped() -> None:
    raw = P.build_ipv4(A4, B4, P.PROTO_UDP, b"data")
    pkt = P.parse_ip(raw + b"\x00" * 10)  # e.g. Ethernet padding
    assert pkt.payload == b"data"


@pytest.mark.parametrize(
    ("frag", "df", "fragment"),
    [
        (0x0000, False, False),
        (0x4000, True, False),
        (0x2000, False, True),  # MF
        (0x0001, False, True),  # offset 8
        (0x4000 | 0x1FFF, True, True),
        (0x8000, False, False),  # reserved bit only
    ],
)
def test_ipv4_flags(frag: int, df: bool, fragment: bool) -> None:
    raw = bytearray(P.build_ipv4(A4, B4, P.PROTO_UDP, b"12345678"))
    struct.pack_into("!H", raw, 6, frag)
    pkt = P.parse_ip(bytes(raw))
    assert (pkt.df, pkt.fragment) == (df, fragment)


def _ipv4_with(raw: bytes, **changes: int) -> bytes:
    b = bytearray(raw)
    if "ihl" in changes:
        b[0] = 0x40 | changes["ihl"]
    if "total" in changes:
        struct.pack_into("!H", b, 2, changes["total"])
    return bytes(b)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda r: b"", id="empty"),
        pytest.param(lambda r: r[:19], id="short-header"),
        pytest.param(lambda r: _ipv4_with(r, ihl=4), id="ihl-4"),
        pytest.param(lambda r: _ipv4_with(r, ihl=0), id="ihl-0"),
        pytest.param(lambda r: _ipv4_with(r, total=len(r) + 1), id="total-too-big"),
        pytest.param(lambda r: _ipv4_with(r, total=19), id="total-below-ihl"),
        pytest.param(lambda r: _ipv4_with(r, ihl=15), id="ihl-beyond-total"),
        pytest.param(lambda r: r[:-1], id="truncated-payload"),
        pytest.param(lambda r: bytes([0x55]) + r[1:], id="version-5"),
        pytest.param(lambda r: bytes([0x05]) + r[1:], id="version-0"),
    ],
)
def test_ipv4_malformed(mutate) -> None:  # type: ignore[no-untyped-def]
    raw = P.build_ipv4(A4, B4, P.PROTO_UDP, b"0123456789")
    with pytest.raises(PacketError):
        P.parse_ip(mutate(raw))


def test_ipv4_every_truncation_raises() -> None:
    raw = P.build_udp_packet(A4, B4, 500, 500, b"\x01" * 30)
    for n in range(len(raw)):
        with pytest.raises(PacketError):
            P.parse_ip(raw[:n])


def test_parse_accepts_memoryview() -> None:
    raw = P.build_ipv4(A4, B4, P.PROTO_UDP, b"mv", options=RTR_ALERT)
    pkt = P.parse_ip(memoryview(raw))
    assert isinstance(pkt.header, bytes) and isinstance(pkt.payload, bytes)
    assert pkt.payload == b"mv"
    assert pkt.src == A4


# --- IPv6 and extension headers --------------------------------------------------------


def test_ipv6_build_parse_plain() -> None:
    raw = P.build_ipv6(A6, B6, P.PROTO_UDP, b"hello", hop_limit=9, tclass=0xB8, flow=0x12345)
    assert len(raw) == 45
    assert struct.unpack_from("!I", raw)[0] == (6 << 28) | (0xB8 << 20) | 0x12345
    assert struct.unpack_from("!H", raw, 4)[0] == 5
    pkt = P.parse_ip(raw)
    assert (pkt.version, pkt.src, pkt.dst, pkt.proto) == (6, A6, B6, P.PROTO_UDP)
    assert (pkt.ttl, pkt.tos, pkt.fragment) == (9, 0xB8, False)
    assert pkt.nh_offset == 6
    assert pkt.header == raw[:40]
    assert pkt.payload == b"hello"


def ext_generic(nh: int, total_len: int) -> bytes:
    """A generic (Hop-by-Hop, Routing, Destination Options) header of total_len octets."""
    assert total_len % 8 == 0 and total_len >= 8
    return bytes([nh, total_len // 8 - 1]) + b"\x01" * (total_len - 2)


def ext_fragment(nh: int, offset: int = 0, more: bool = False, ident: int = 7) -> bytes:
    return struct.pack("!BBHI", nh, 0, (offset << 3) | int(more), ident)


def ext_ah(nh: int, total_len: int) -> bytes:
    """An AH header of total_len octets (its length field counts 4-octet words minus 2)."""
    assert total_len % 4 == 0 and total_len >= 12
    return struct.pack("!BBHII", nh, total_len // 4 - 2, 0, 0x1000, 1) + b"\x00" * (total_len - 12)


# Each spec entry: (header type, length); built so that each Next Header points at the next.
CHAINS = [
    [(0, 8)],
    [(0, 16)],
    [(43, 24)],
    [(60, 8)],
    [(44, 8)],
    [(51, 24)],
    [(51, 12)],
    [(51, 16)],
    [(0, 8), (43, 24), (44, 8), (60, 16)],
    [(0, 8), (60, 8), (43, 24), (44, 8), (51, 24), (60, 8)],
    [(44, 8), (51, 20)],
]


def build_chain(spec: list[tuple[int, int]], last_nh: int) -> tuple[bytes, list[int]]:
    """The extension header bytes and the offset (from the IPv6 header start) of each header."""
    out = b""
    offsets = []
    for i, (typ, length) in enumerate(spec):
        nh = spec[i + 1][0] if i + 1 < len(spec) else last_nh
        offsets.append(40 + len(out))
        if typ == 44:
            out += ext_fragment(nh)
        elif typ == 51:
            out += ext_ah(nh, length)
        else:
            out += ext_generic(nh, length)
    return out, offsets


@pytest.mark.parametrize("spec", CHAINS, ids=lambda s: "-".join(f"{t}:{n}" for t, n in s))
@pytest.mark.parametrize("l4", [P.PROTO_UDP, P.PROTO_TCP, P.PROTO_ESP])
def test_ipv6_extension_chain(spec: list[tuple[int, int]], l4: int) -> None:
    ext, offsets = build_chain(spec, l4)
    if l4 == P.PROTO_UDP:
        seg = P.build_udp(A6, B6, 4500, 4501, b"udp-data")
    elif l4 == P.PROTO_TCP:
        seg = P.build_tcp(A6, B6, 1000, 2000, 1, 2, P.TCP_ACK, b"tcp-data")
    else:
        seg = struct.pack("!II", 0xC0FFEE, 3) + b"esp-data"
    raw = P.build_ipv6(A6, B6, l4, seg, ext=ext, ext_first=spec[0][0])
    assert struct.unpack_from("!H", raw, 4)[0] == len(ext) + len(seg)
    assert raw[6] == spec[0][0]
    pkt = P.parse_ip(raw)
    assert pkt.proto == l4
    assert pkt.header == raw[: 40 + len(ext)]
    assert pkt.nh_offset == offsets[-1]
    assert pkt.header[pkt.nh_offset] == l4
    assert pkt.payload == seg
    assert pkt.fragment == any(t == 44 for t, _ in spec)
    if l4 != P.PROTO_ESP:
        assert P.l4_checksum_ok(pkt.src, pkt.dst, l4, pkt.payload)


def test_ipv6_build_requires_ext_first() -> None:
    with pytest.raises(PacketError):
        P.build_ipv6(A6, B6, P.PROTO_UDP, b"", ext=ext_generic(P.PROTO_UDP, 8))


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x60" + b"\x00" * 38, id="short-header"),
        pytest.param(
            P.build_ipv6(A6, B6, P.PROTO_UDP, b"x" * 8)[:-1], id="payload-length-beyond-data"
        ),
        pytest.param(
            P.build_ipv6(A6, B6, 0, b"\x11\x00\x00\x00", ext_first=None), id="hbh-truncated"
        ),
        pytest.param(
            P.build_ipv6(A6, B6, 0, bytes([17, 1]) + b"\x00" * 6 + b"\x00" * 4),
            id="hbh-overruns",
        ),
        pytest.param(P.build_ipv6(A6, B6, 51, bytes([17, 4]) + b"\x00" * 14), id="ah-overruns"),
        pytest.param(P.build_ipv6(A6, B6, 44, ext_fragment(17)[:7]), id="fragment-truncated"),
        pytest.param(P.build_ipv6(A6, B6, 59, b""), id="no-next-header"),
        pytest.param(
            P.build_ipv6(A6, B6, 0, ext_generic(59, 8) + b"junk"), id="no-next-header-after-hbh"
        ),
    ],
)
def test_ipv6_malformed(raw: bytes) -> None:
    with pytest.raises(PacketError):
        P.parse_ip(raw)


def test_ipv6_trailing_bytes_beyond_payload_length_are_dropped() -> None:
    raw = P.build_ipv6(A6, B6, P.PROTO_UDP, b"data")
    assert P.parse_ip(raw + b"\xaa" * 6).payload == b"data"


def test_ipv6_every_truncation_raises() -> None:
    ext, _ = build_chain([(0, 8), (44, 8), (51, 24)], P.PROTO_UDP)
    raw = P.build_ipv6(A6, B6, P.PROTO_UDP, P.build_udp(A6, B6, 1, 2, b"zz"), ext=ext, ext_first=0)
    for n in range(len(raw)):
        with pytest.raises(PacketError):
            P.parse_ip(raw[:n])


# --- rebuild_ip ------------------------------------------------------------------------


def test_rebuild_ipv4_keeps_fields_and_fixes_lengths() -> None:
    orig = P.build_ipv4(
        A4, B4, P.PROTO_UDP, b"u" * 12, ttl=33, ident=0x4321, tos=0x10, df=True, options=RTR_ALERT
    )
    pkt = P.parse_ip(orig)
    new_payload = b"t" * 40
    out = P.rebuild_ip(pkt, P.PROTO_TCP, new_payload)
    assert len(out) == 24 + 40
    assert struct.unpack_from("!H", out, 2)[0] == 64
    assert P.ipv4_header_checksum_ok(out[:24])
    # Everything except total length, protocol and checksum is unchanged.
    for lo, hi in [(0, 2), (4, 9), (12, 24)]:
        assert out[lo:hi] == orig[lo:hi]
    back = P.parse_ip(out)
    assert back.proto == P.PROTO_TCP
    assert (back.ttl, back.ident, back.tos, back.df) == (33, 0x4321, 0x10, True)
    assert back.header[20:] == RTR_ALERT
    assert back.payload == new_payload
    # And back again: identical to the original, checksum included.
    assert P.rebuild_ip(back, P.PROTO_UDP, b"u" * 12) == orig


def test_rebuild_ipv4_shrinks() -> None:
    pkt = P.parse_ip(P.build_ipv4(A4, B4, P.PROTO_TCP, b"x" * 100, ident=9))
    out = P.rebuild_ip(pkt, P.PROTO_UDP, b"y")
    assert struct.unpack_from("!H", out, 2)[0] == 21
    assert P.ipv4_header_checksum_ok(out[:20])
    assert P.parse_ip(out).payload == b"y"


def test_rebuild_ipv6_with_extensions() -> None:
    ext, offsets = build_chain([(0, 8), (60, 16), (44, 8)], P.PROTO_UDP)
    orig = P.build_ipv6(
        A6, B6, P.PROTO_UDP, b"u" * 10, ext=ext, ext_first=0, hop_limit=3, tclass=4, flow=5
    )
    pkt = P.parse_ip(orig)
    out = P.rebuild_ip(pkt, P.PROTO_TCP, b"t" * 30)
    assert struct.unpack_from("!H", out, 4)[0] == len(ext) + 30
    assert out[:4] == orig[:4] and out[6:40] == orig[6:40]
    hdr_len = 40 + len(ext)
    for i in range(40, hdr_len):
        expected = P.PROTO_TCP if i == offsets[-1] else orig[i]
        assert out[i] == expected
    back = P.parse_ip(out)
    assert (back.proto, back.nh_offset, back.payload) == (P.PROTO_TCP, offsets[-1], b"t" * 30)
    assert (back.ttl, back.tos, back.fragment) == (3, 4, True)
    assert P.rebuild_ip(back, P.PROTO_UDP, b"u" * 10) == orig


def test_rebuild_ipv6_plain_rewrites_next_header() -> None:
    pkt = P.parse_ip(P.build_ipv6(A6, B6, P.PROTO_ESP, b"e" * 16))
    out = P.rebuild_ip(pkt, P.PROTO_TCP, b"t")
    assert out[6] == P.PROTO_TCP
    assert struct.unpack_from("!H", out, 4)[0] == 1


# --- UDP -------------------------------------------------------------------------------


@pytest.mark.parametrize("fam", FAMILIES)
def test_udp_build_parse(fam: tuple[bytes, bytes]) -> None:
    src, dst = fam
    seg = P.build_udp(src, dst, 500, 4500, b"ike!")
    assert struct.unpack_from("!HHH", seg) == (500, 4500, 12)
    udp = P.parse_udp(seg)
    assert (udp.sport, udp.dport, udp.payload) == (500, 4500, b"ike!")
    assert udp.checksum == ref_checksum(ref_pseudo(src, dst, 17, 12) + seg[:6] + b"\0\0" + seg[8:])
    assert P.l4_checksum_ok(src, dst, P.PROTO_UDP, seg)
    bad = bytearray(seg)
    bad[-1] ^= 0x40
    assert not P.l4_checksum_ok(src, dst, P.PROTO_UDP, bytes(bad))
    assert not P.l4_checksum_ok(
        src, P.addr_bytes("fd00::9" if len(src) == 16 else "1.2.3.4"), P.PROTO_UDP, seg
    )


def test_udp_ipv4_without_checksum_is_zero() -> None:
    seg = P.build_udp(A4, B4, 1, 2, b"abc", with_checksum=False)
    assert P.parse_udp(seg).checksum == 0


def test_udp_ipv6_checksum_is_mandatory() -> None:
    seg = P.build_udp(A6, B6, 1, 2, b"abc", with_checksum=False)
    assert P.parse_udp(seg).checksum != 0
    assert P.l4_checksum_ok(A6, B6, P.PROTO_UDP, seg)


def _payload_with_zero_checksum(src: bytes, dst: bytes) -> bytes:
    """A 2-octet payload for which the computed UDP checksum is 0 (word sum 0xFFFF)."""
    probe = P.build_udp(src, dst, 1000, 2000, b"\x00\x00")
    csum = struct.unpack_from("!H", probe, 6)[0]
    # With a zero payload word the sum is ~csum; adding csum makes it 0xFFFF.
    return csum.to_bytes(2, "big")


@pytest.mark.parametrize("fam", FAMILIES)
def test_udp_computed_zero_is_sent_as_ffff(fam: tuple[bytes, bytes]) -> None:
    src, dst = fam
    payload = _payload_with_zero_checksum(src, dst)
    zeroed = struct.pack("!HHHH", 1000, 2000, 10, 0) + payload
    assert P.l4_checksum(src, dst, P.PROTO_UDP, zeroed) == 0
    seg = P.build_udp(src, dst, 1000, 2000, payload)
    assert struct.unpack_from("!H", seg, 6)[0] == 0xFFFF
    assert P.l4_checksum_ok(src, dst, P.PROTO_UDP, seg)
    # scapy makes the same substitution.
    pkt = (IP if len(src) == 4 else IPv6)(src=P.addr_text(src), dst=P.addr_text(dst))
    scapy_seg = bytes(pkt / UDP(sport=1000, dport=2000) / Raw(payload))[len(bytes(pkt)) :]
    assert scapy_seg == seg


@pytest.mark.parametrize(
    "seg",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00" * 7, id="short"),
        pytest.param(struct.pack("!HHHH", 1, 2, 7, 0), id="length-below-8"),
        pytest.param(struct.pack("!HHHH", 1, 2, 10, 0) + b"x", id="length-beyond-data"),
    ],
)
def test_udp_malformed(seg: bytes) -> None:
    with pytest.raises(PacketError):
        P.parse_udp(seg)


def test_udp_length_shorter_than_data() -> None:
    seg = struct.pack("!HHHH", 1, 2, 10, 0) + b"abcdef"
    assert P.parse_udp(seg).payload == b"ab"


@pytest.mark.parametrize("fam", FAMILIES)
def test_build_udp_packet(fam: tuple[bytes, bytes]) -> None:
    src, dst = fam
    raw = P.build_udp_packet(src, dst, 4500, 4500, b"\xff")
    pkt = P.parse_ip(raw)
    assert (pkt.version, pkt.proto, pkt.src, pkt.dst) == (4 if len(src) == 4 else 6, 17, src, dst)
    udp = P.parse_udp(pkt.payload)
    assert (udp.sport, udp.dport, udp.payload) == (4500, 4500, b"\xff")
    assert P.l4_checksum_ok(src, dst, P.PROTO_UDP, pkt.payload)
    assert P.parse_ip(P.build_ip(src, dst, 17, pkt.payload)) == pkt


# --- TCP -------------------------------------------------------------------------------


MSS_WS = b"\x02\x04\x05\xb4\x01\x03\x03\x07"  # MSS 1460, NOP, window scale 7


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize(
    ("options", "padded"),
    [(b"", b""), (MSS_WS, MSS_WS), (b"\x01\x01\x01", b"\x01\x01\x01\x00"), (b"\x01" * 40, None)],
)
def test_tcp_build_parse(fam: tuple[bytes, bytes], options: bytes, padded: bytes | None) -> None:
    src, dst = fam
    padded = options if padded is None else padded
    flags = P.TCP_SYN | P.TCP_ACK | P.TCP_ECE
    seg = P.build_tcp(
        src, dst, 10000, 443, 2**32 + 5, -1, flags, b"data", window=1234, options=options
    )
    doff = (seg[12] >> 4) * 4
    assert doff == 20 + len(padded)
    tcp = P.parse_tcp(seg)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (10000, 443, 5, 0xFFFFFFFF)
    assert (tcp.flags, tcp.window, tcp.urgent) == (flags, 1234, 0)
    assert tcp.options == padded
    assert tcp.payload == b"data"
    zeroed = seg[:16] + b"\0\0" + seg[18:]
    assert tcp.checksum == ref_checksum(ref_pseudo(src, dst, 6, len(seg)) + zeroed)
    assert P.l4_checksum_ok(src, dst, P.PROTO_TCP, seg)
    assert not P.l4_checksum_ok(src, dst, P.PROTO_UDP, seg)


def test_tcp_flag_constants() -> None:
    flags = [P.TCP_FIN, P.TCP_SYN, P.TCP_RST, P.TCP_PSH, P.TCP_ACK, P.TCP_URG, P.TCP_ECE]
    flags.append(P.TCP_CWR)
    assert flags == [1 << i for i in range(8)]


def test_tcp_options_too_long() -> None:
    with pytest.raises(PacketError):
        P.build_tcp(A4, B4, 1, 2, 0, 0, P.TCP_SYN, options=b"\x01" * 41)


def _tcp_with_doff(doff_words: int, total: int) -> bytes:
    return struct.pack("!HHIIHHHH", 1, 2, 0, 0, doff_words << 12, 0, 0, 0) + b"\x00" * (total - 20)


@pytest.mark.parametrize(
    "seg",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00" * 19, id="short"),
        pytest.param(_tcp_with_doff(4, 20), id="doff-16"),
        pytest.param(_tcp_with_doff(0, 40), id="doff-0"),
        pytest.param(_tcp_with_doff(6, 23), id="doff-beyond-data"),
        pytest.param(_tcp_with_doff(15, 59), id="doff-60-beyond-data"),
    ],
)
def test_tcp_malformed(seg: bytes) -> None:
    with pytest.raises(PacketError):
        P.parse_tcp(seg)


def test_tcp_max_doff() -> None:
    tcp = P.parse_tcp(_tcp_with_doff(15, 61))
    assert len(tcp.options) == 40 and tcp.payload == b"\x00"


# --- scapy as an independent parser of what the core builds -----------------------------


def _v4_udp_cases() -> list[bytes]:
    return [
        P.build_ipv4(A4, B4, 17, P.build_udp(A4, B4, 500, 500, b"i" * 50), ttl=5, ident=77),
        P.build_ipv4(
            A4,
            B4,
            17,
            P.build_udp(A4, B4, 4500, 4500, b"\x00" * 4 + b"k" * 33),
            df=True,
            tos=0x20,
            options=RTR_ALERT,
        ),
    ]


@pytest.mark.parametrize("raw", _v4_udp_cases())
def test_scapy_reads_core_ipv4_udp(raw: bytes) -> None:
    core = P.parse_ip(raw)
    udp = P.parse_udp(core.payload)
    sp = IP(raw)
    sp[UDP].decode_payload_as(Raw)
    assert (sp.src, sp.dst, sp.proto, sp.ttl, sp.id, sp.tos) == (
        P.addr_text(core.src),
        P.addr_text(core.dst),
        17,
        core.ttl,
        core.ident,
        core.tos,
    )
    assert bool(sp.flags.DF) == core.df
    assert sp.ihl * 4 == len(core.header) and sp.len == len(raw)
    assert (sp[UDP].sport, sp[UDP].dport, sp[UDP].len) == (
        udp.sport,
        udp.dport,
        8 + len(udp.payload),
    )
    assert bytes(sp[UDP].payload) == udp.payload
    # scapy recomputes both checksums when they are deleted; the bytes must not change.
    del sp.chksum
    del sp[UDP].chksum
    assert bytes(sp) == raw


@pytest.mark.parametrize("options", [b"", MSS_WS, b"\x01\x01\x01"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_scapy_reads_core_tcp(fam: tuple[bytes, bytes], options: bytes) -> None:
    src, dst = fam
    flags = P.TCP_PSH | P.TCP_ACK
    seg = P.build_tcp(
        src,
        dst,
        40000,
        10000,
        0x01020304,
        0xA0B0C0D0,
        flags,
        b"x" * 21,
        window=999,
        options=options,
    )
    raw = P.build_ip(src, dst, P.PROTO_TCP, seg)
    sp = (IP if len(src) == 4 else IPv6)(raw)
    t = sp[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, int(t.flags), t.window) == (
        40000,
        10000,
        0x01020304,
        0xA0B0C0D0,
        flags,
        999,
    )
    assert t.dataofs * 4 == 20 + len(P.parse_tcp(seg).options)
    assert bytes(t.payload) == b"x" * 21
    if len(src) == 4:
        del sp.chksum
    del t.chksum
    assert bytes(sp) == raw


@pytest.mark.parametrize("with_ext", [False, True])
def test_scapy_reads_core_ipv6_udp(with_ext: bool) -> None:
    seg = P.build_udp(A6, B6, 4500, 4500, b"\x00\x00\x00\x00" + b"p" * 40)
    if with_ext:
        ext, _ = build_chain([(0, 8), (60, 8)], P.PROTO_UDP)
        raw = P.build_ipv6(A6, B6, 17, seg, ext=ext, ext_first=0, hop_limit=7, tclass=0x2E)
    else:
        raw = P.build_ipv6(A6, B6, 17, seg, hop_limit=7, tclass=0x2E, flow=0xABCDE)
    sp = IPv6(raw)
    sp[UDP].decode_payload_as(Raw)
    assert (sp.src, sp.dst, sp.hlim, sp.tc, sp.plen) == (
        "fd00::1",
        "fd00:abcd::2",
        7,
        0x2E,
        len(raw) - 40,
    )
    if not with_ext:
        assert sp.fl == 0xABCDE
    else:
        assert sp.nh == 0 and sp[IPv6ExtHdrDestOpt].nh == 17
    assert (sp[UDP].sport, sp[UDP].dport) == (4500, 4500)
    assert bytes(sp[UDP].payload) == seg[8:]
    del sp[UDP].chksum
    assert bytes(sp) == raw


# --- the core as a parser of what scapy builds -----------------------------------------


@pytest.mark.parametrize(
    "opts",
    [[], [IPOption_Router_Alert()], [IPOption_NOP(), IPOption_NOP(), IPOption_Router_Alert()]],
)
def test_core_reads_scapy_ipv4_udp(opts: list) -> None:  # type: ignore[type-arg]
    sp = (
        IP(
            src="198.18.1.2",
            dst="198.19.3.4",
            ttl=99,
            id=0x1357,
            tos=0x48,
            flags="DF",
            options=opts,
        )
        / UDP(sport=4500, dport=500)
        / Raw(b"abcdefg")
    )
    raw = bytes(sp)
    pkt = P.parse_ip(raw)
    assert (pkt.src, pkt.dst) == (P.addr_bytes("198.18.1.2"), P.addr_bytes("198.19.3.4"))
    assert (pkt.proto, pkt.ttl, pkt.ident, pkt.tos, pkt.df, pkt.fragment) == (
        17,
        99,
        0x1357,
        0x48,
        True,
        False,
    )
    assert len(pkt.header) == IP(raw).ihl * 4
    assert P.ipv4_header_checksum_ok(pkt.header)
    udp = P.parse_udp(pkt.payload)
    assert (udp.sport, udp.dport, udp.payload, udp.checksum) == (
        4500,
        500,
        b"abcdefg",
        IP(raw)[UDP].chksum,
    )
    assert P.l4_checksum_ok(pkt.src, pkt.dst, P.PROTO_UDP, pkt.payload)


def test_core_reads_scapy_ipv4_fragment() -> None:
    raw = bytes(IP(src="198.18.0.1", dst="198.18.0.2", flags="MF", frag=0) / UDP() / Raw(b"x" * 8))
    assert P.parse_ip(raw).fragment
    raw = bytes(IP(src="198.18.0.1", dst="198.18.0.2", proto=17, frag=3) / Raw(b"x" * 8))
    assert P.parse_ip(raw).fragment


@pytest.mark.parametrize("fam", [("198.18.0.9", "198.18.0.10"), ("fd00::9", "fd00::a")])
def test_core_reads_scapy_tcp(fam: tuple[str, str]) -> None:
    ip = IP(src=fam[0], dst=fam[1]) if ":" not in fam[0] else IPv6(src=fam[0], dst=fam[1])
    sp = (
        ip
        / TCP(
            sport=10000,
            dport=51000,
            seq=123456789,
            ack=987654321,
            flags="SA",
            window=512,
            options=[("MSS", 1400), ("NOP", None), ("WScale", 8), ("SAckOK", b"")],
        )
        / b"hi"
    )
    raw = bytes(sp)
    pkt = P.parse_ip(raw)
    assert pkt.proto == P.PROTO_TCP
    tcp = P.parse_tcp(pkt.payload)
    scapy_tcp = TCP(pkt.payload)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.window) == (
        10000,
        51000,
        123456789,
        987654321,
        512,
    )
    assert tcp.flags == P.TCP_SYN | P.TCP_ACK
    assert len(tcp.options) + 20 == scapy_tcp.dataofs * 4
    assert tcp.options[:4] == b"\x02\x04\x05\x78"  # MSS 1400
    assert tcp.payload == b"hi"
    assert tcp.checksum == scapy_tcp.chksum
    assert P.l4_checksum_ok(pkt.src, pkt.dst, P.PROTO_TCP, pkt.payload)


def _ext_offsets(sp) -> list[int]:  # type: ignore[no-untyped-def]
    """Offsets of each extension header in a scapy-built IPv6 packet, measured by scapy."""
    offsets = []
    off = 40
    layer = sp[IPv6].payload
    while not isinstance(layer, (UDP, TCP, ESP, Raw)):
        offsets.append(off)
        off += len(bytes(layer)) - len(bytes(layer.payload))
        layer = layer.payload
    return offsets


SCAPY_CHAINS = {
    "hbh": lambda nh: IPv6ExtHdrHopByHop(),
    "dest": lambda nh: IPv6ExtHdrDestOpt(),
    "frag": lambda nh: IPv6ExtHdrFragment(id=0x99, m=1),
    "routing": lambda nh: IPv6ExtHdrRouting(addresses=["fd00::77"], segleft=0),
    "hbh-rt-dest-frag": lambda nh: (
        IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting(addresses=["fd00::77", "fd00::78"], segleft=0)
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrFragment(id=1)
    ),
    "hbh-ah": lambda nh: IPv6ExtHdrHopByHop() / AH(nh=nh, payloadlen=4, spi=9, icv=b"\0" * 12),
    "dest-ah-dest": lambda nh: (
        IPv6ExtHdrDestOpt() / AH(nh=60, payloadlen=5, spi=9, icv=b"\0" * 16) / IPv6ExtHdrDestOpt()
    ),
}


@pytest.mark.parametrize("chain", SCAPY_CHAINS, ids=list(SCAPY_CHAINS))
@pytest.mark.parametrize("l4", ["udp", "tcp", "esp"])
def test_core_reads_scapy_ipv6_ext(chain: str, l4: str) -> None:
    if l4 == "udp":
        top = UDP(sport=500, dport=4500) / Raw(b"ike-ish")
        proto = P.PROTO_UDP
    elif l4 == "tcp":
        top = TCP(sport=1, dport=2, flags="A") / Raw(b"tcp")
        proto = P.PROTO_TCP
    else:
        top = ESP(spi=0x11223344, seq=5, data=b"\x00" * 12)
        proto = P.PROTO_ESP
    sp = IPv6(src="fd00::1", dst="fd00::2", hlim=11, tc=0x10) / SCAPY_CHAINS[chain](proto) / top
    raw = bytes(sp)
    offsets = _ext_offsets(sp)
    pkt = P.parse_ip(raw)
    assert (pkt.src, pkt.dst, pkt.ttl, pkt.tos) == (
        P.addr_bytes("fd00::1"),
        P.addr_bytes("fd00::2"),
        11,
        0x10,
    )
    assert pkt.proto == proto
    assert pkt.nh_offset == offsets[-1]
    assert pkt.header[pkt.nh_offset] == proto
    assert len(pkt.header) == len(raw) - len(bytes(top))
    assert pkt.payload == raw[len(pkt.header) :]
    if proto == P.PROTO_UDP:
        udp = P.parse_udp(pkt.payload)
        assert (udp.sport, udp.dport, udp.payload) == (500, 4500, b"ike-ish")
    elif proto == P.PROTO_TCP:
        tcp = P.parse_tcp(pkt.payload)
        assert (tcp.sport, tcp.dport, tcp.flags, tcp.payload) == (1, 2, P.TCP_ACK, b"tcp")
    else:
        assert struct.unpack_from("!II", pkt.payload) == (0x11223344, 5)
    assert pkt.fragment == ("frag" in chain)
    # scapy leaves the L4 checksum at 0 when AH is directly below it, so only check the others.
    if proto != P.PROTO_ESP and chain != "hbh-ah":
        assert P.l4_checksum_ok(pkt.src, pkt.dst, proto, pkt.payload)


# --- hypothesis: round trips -----------------------------------------------------------

v4addr = st.binary(min_size=4, max_size=4)
v6addr = st.binary(min_size=16, max_size=16)
addr_pair = st.one_of(st.tuples(v4addr, v4addr), st.tuples(v6addr, v6addr))
port = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


@given(addr_pair, port, port, st.binary(max_size=300))
def test_udp_round_trip(addrs: tuple[bytes, bytes], sport: int, dport: int, data: bytes) -> None:
    src, dst = addrs
    raw = P.build_udp_packet(src, dst, sport, dport, data)
    pkt = P.parse_ip(raw)
    assert (pkt.src, pkt.dst, pkt.proto) == (src, dst, P.PROTO_UDP)
    udp = P.parse_udp(pkt.payload)
    assert (udp.sport, udp.dport, udp.payload) == (sport, dport, data)
    assert udp.checksum != 0
    assert P.l4_checksum_ok(src, dst, P.PROTO_UDP, pkt.payload)


@given(
    addr_pair,
    port,
    port,
    u32,
    u32,
    st.integers(0, 0xFF),
    st.integers(0, 0xFFFF),
    st.binary(max_size=40).map(lambda b: b[: len(b) - len(b) % 4]),
    st.binary(max_size=200),
)
def test_tcp_round_trip(
    addrs: tuple[bytes, bytes],
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes,
    data: bytes,
) -> None:
    src, dst = addrs
    seg = P.build_tcp(src, dst, sport, dport, seq, ack, flags, data, window=window, options=options)
    pkt = P.parse_ip(P.build_ip(src, dst, P.PROTO_TCP, seg))
    tcp = P.parse_tcp(pkt.payload)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.flags, tcp.window) == (
        sport,
        dport,
        seq,
        ack,
        flags,
        window,
    )
    assert (tcp.options, tcp.payload) == (options, data)
    assert P.l4_checksum_ok(src, dst, P.PROTO_TCP, pkt.payload)


@given(
    v4addr,
    v4addr,
    st.integers(0, 255),
    st.binary(max_size=100),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 255),
    st.booleans(),
    st.binary(max_size=40),
)
def test_ipv4_round_trip(
    src: bytes,
    dst: bytes,
    proto: int,
    data: bytes,
    ttl: int,
    ident: int,
    tos: int,
    df: bool,
    options: bytes,
) -> None:
    raw = P.build_ipv4(src, dst, proto, data, ttl=ttl, ident=ident, tos=tos, df=df, options=options)
    pkt = P.parse_ip(raw)
    assert (pkt.src, pkt.dst, pkt.proto, pkt.payload) == (src, dst, proto, data)
    assert (pkt.ttl, pkt.ident, pkt.tos, pkt.df, pkt.fragment) == (ttl, ident, tos, df, False)
    assert pkt.header[20:].startswith(options)
    assert P.ipv4_header_checksum_ok(pkt.header)
    new = P.rebuild_ip(pkt, 6, data[::-1] + b"!")
    assert P.ipv4_header_checksum_ok(new[: len(pkt.header)])
    assert P.rebuild_ip(P.parse_ip(new), proto, data) == raw


ext_spec = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([0, 43, 60]), st.integers(1, 4).map(lambda n: n * 8)),
        st.just((44, 8)),
        st.tuples(st.just(51), st.integers(3, 10).map(lambda n: n * 4)),
    ),
    min_size=1,
    max_size=5,
)


@given(v6addr, v6addr, ext_spec, st.sampled_from([6, 17, 50]), st.binary(max_size=60))
def test_ipv6_ext_round_trip(
    src: bytes, dst: bytes, spec: list[tuple[int, int]], proto: int, data: bytes
) -> None:
    ext, offsets = build_chain(spec, proto)
    raw = P.build_ipv6(src, dst, proto, data, ext=ext, ext_first=spec[0][0])
    pkt = P.parse_ip(raw)
    assert (pkt.src, pkt.dst, pkt.proto, pkt.payload) == (src, dst, proto, data)
    assert pkt.nh_offset == offsets[-1]
    assert pkt.fragment == any(t == 44 for t, _ in spec)
    assert P.rebuild_ip(pkt, proto, data) == raw


@settings(max_examples=60)
@given(addr_pair, port, port, st.binary(max_size=100))
def test_scapy_agrees_on_random_udp(
    addrs: tuple[bytes, bytes], sport: int, dport: int, data: bytes
) -> None:
    src, dst = addrs
    raw = P.build_udp_packet(src, dst, sport, dport, data)
    sp = (IP if len(src) == 4 else IPv6)(raw)
    sp[UDP].decode_payload_as(Raw)
    assert (sp[UDP].sport, sp[UDP].dport, bytes(sp[UDP].payload)) == (sport, dport, data)
    if len(src) == 4:
        del sp.chksum
    del sp[UDP].chksum
    assert bytes(sp) == raw


# --- hypothesis: malformed input only raises PacketError ---------------------------------


def _only_packet_error(fn, data) -> None:  # type: ignore[no-untyped-def]
    try:
        fn(data)
    except PacketError:
        pass


@given(st.binary(max_size=120))
def test_fuzz_parse_ip_random(data: bytes) -> None:
    _only_packet_error(P.parse_ip, data)
    _only_packet_error(P.parse_ip, memoryview(data))


@st.composite
def ipv4_like(draw: st.DrawFn) -> bytes:
    ihl = draw(st.integers(0, 15))
    body = draw(st.binary(min_size=0, max_size=100))
    total = draw(st.one_of(st.integers(0, 0xFFFF), st.just(len(body) + 1), st.just(ihl * 4)))
    hdr = bytearray(draw(st.binary(min_size=19, max_size=19)))
    hdr[1:3] = total.to_bytes(2, "big")
    return bytes([0x40 | ihl]) + bytes(hdr) + body


@st.composite
def ipv6_like(draw: st.DrawFn) -> bytes:
    nh = draw(st.sampled_from([0, 43, 44, 51, 59, 60, 135, 139, 140, 6, 17, 50]))
    body = bytearray(draw(st.binary(max_size=120)))
    # Make later next-header octets likely to be extension headers too.
    for i in range(0, len(body), 8):
        if draw(st.booleans()):
            body[i] = draw(st.sampled_from([0, 43, 44, 51, 60, 17]))
    plen = draw(st.one_of(st.just(len(body)), st.integers(0, 0xFFFF)))
    hdr = struct.pack("!IHBB", 6 << 28, plen, nh, 64) + bytes(32)
    return hdr + bytes(body)


@given(st.one_of(ipv4_like(), ipv6_like()))
def test_fuzz_parse_ip_structured(data: bytes) -> None:
    _only_packet_error(P.parse_ip, data)


@given(st.sampled_from([(A4, B4), (A6, B6)]), st.binary(max_size=60), st.data())
def test_fuzz_truncated_valid_packets(
    fam: tuple[bytes, bytes], data: bytes, draw: st.DataObject
) -> None:
    src, dst = fam
    raw = P.build_udp_packet(src, dst, 500, 500, data)
    cut = draw.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(PacketError):
        P.parse_ip(raw[:cut])


@given(st.binary(max_size=80))
def test_fuzz_parse_udp_tcp(data: bytes) -> None:
    _only_packet_error(P.parse_udp, data)
    _only_packet_error(P.parse_tcp, data)
    _only_packet_error(P.parse_udp, memoryview(data))
    _only_packet_error(P.parse_tcp, memoryview(data))
