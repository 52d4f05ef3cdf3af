"""Tests for tcpencap.wire.ike: the fixed IKE header and UDP 500/4500 classification.

Some messages are built with scapy's ISAKMP (IKEv1) and IKEv2 layers so the header layout
is checked against an independent implementation, not only against struct calls here.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.contrib.ikev2 import IKEv2, IKEv2_KE, IKEv2_Nonce, IKEv2_SA
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, NAT_KEEPALIVE, NON_ESP
from scapy.layers.isakmp import ISAKMP, ISAKMP_payload_SA
from scapy.packet import Raw

from tcpencap.wire import ike as I
from tcpencap.wire import packet as P
from tcpencap.wire.ike import IKEError, Kind

SPI_I = bytes.fromhex("0102030405060708")
SPI_R = bytes.fromhex("a1a2a3a4a5a6a7a8")


def ike_msg(
    spi_i: bytes = SPI_I,
    spi_r: bytes = bytes(8),
    *,
    np: int = 33,
    version: int = 0x20,
    exchange: int = I.IKEV2_SA_INIT,
    flags: int = I.FLAG_V2_INITIATOR,
    mid: int = 0,
    body: bytes = b"",
    length: int | None = None,
) -> bytes:
    """An IKE message: the 28-octet header followed by body."""
    if length is None:
        length = 28 + len(body)
    return (
        struct.pack("!8s8sBBBBII", spi_i, spi_r, np, version, exchange, flags, mid, length) + body
    )


# --- parse_ike_header ------------------------------------------------------------------


def test_constants() -> None:
    assert (I.IKE_PORT, I.NATT_PORT, I.IKE_HEADER_LEN) == (500, 4500, 28)
    assert I.NON_ESP_MARKER == bytes(4)
    assert I.NAT_KEEPALIVE == b"\xff"


def test_ikev2_sa_init_request() -> None:
    msg = ike_msg(body=b"\x00" * 40)
    hdr = I.parse_ike_header(msg)
    assert (hdr.spi_i, hdr.spi_r) == (SPI_I, bytes(8))
    assert (hdr.next_payload, hdr.major, hdr.minor) == (33, 2, 0)
    assert (hdr.exchange, hdr.flags, hdr.message_id, hdr.length) == (34, 0x08, 0, 68)
    assert hdr.is_sa_init
    assert not hdr.is_response


def test_ikev2_response() -> None:
    msg = ike_msg(spi_r=SPI_R, exchange=35, flags=I.FLAG_V2_RESPONSE, mid=0xDEADBEEF, np=46)
    hdr = I.parse_ike_header(msg)
    assert (hdr.spi_r, hdr.exchange, hdr.message_id, hdr.next_payload) == (
        SPI_R,
        35,
        0xDEADBEEF,
        46,
    )
    assert hdr.is_response
    assert not hdr.is_sa_init


def test_ikev1_main_mode() -> None:
    msg = ike_msg(version=0x10, exchange=I.IKEV1_MAIN_MODE, flags=0, np=1, body=b"\x00" * 12)
    hdr = I.parse_ike_header(msg)
    assert (hdr.major, hdr.minor, hdr.exchange, hdr.length) == (1, 0, 2, 40)
    assert hdr.is_sa_init
    assert not hdr.is_response


def test_ikev1_flag_0x20_is_not_a_response() -> None:
    # The IKEv2 Response bit has no such meaning in IKEv1 (which uses E/C/A flags).
    msg = ike_msg(spi_r=SPI_R, version=0x10, exchange=I.IKEV1_AGGRESSIVE, flags=0x21)
    hdr = I.parse_ike_header(msg)
    assert hdr.flags == 0x21
    assert not hdr.is_response
    assert not hdr.is_sa_init


def test_minor_version_is_kept() -> None:
    hdr = I.parse_ike_header(ike_msg(version=0x21))
    assert (hdr.major, hdr.minor) == (2, 1)


def test_trailing_bytes_after_length_are_accepted() -> None:
    msg = ike_msg(body=b"x" * 8) + b"trailing"
    assert I.parse_ike_header(msg).length == 36


def test_memoryview_input() -> None:
    hdr = I.parse_ike_header(memoryview(ike_msg(mid=7)))
    assert hdr.message_id == 7 and hdr.spi_i == SPI_I


@pytest.mark.parametrize("version", [0x00, 0x0F, 0x30, 0x40, 0xF2])
def test_bad_major_version(version: int) -> None:
    with pytest.raises(IKEError, match="version"):
        I.parse_ike_header(ike_msg(version=version))


def test_zero_initiator_spi() -> None:
    with pytest.raises(IKEError, match="SPI"):
        I.parse_ike_header(ike_msg(spi_i=bytes(8), spi_r=SPI_R))


@pytest.mark.parametrize(
    ("length", "body"),
    [(27, b""), (0, b""), (29, b""), (40, b"x" * 11), (0xFFFFFFFF, b"x" * 100)],
)
def test_length_mismatch(length: int, body: bytes) -> None:
    with pytest.raises(IKEError, match="length"):
        I.parse_ike_header(ike_msg(length=length, body=body))


def test_every_truncation_raises() -> None:
    msg = ike_msg(body=b"b" * 20)
    for n in range(len(msg)):
        with pytest.raises(IKEError):
            I.parse_ike_header(msg[:n])


def test_header_is_frozen() -> None:
    hdr = I.parse_ike_header(ike_msg())
    with pytest.raises(AttributeError):
        hdr.flags = 0  # type: ignore[misc]


# --- parse_ike_header against scapy ----------------------------------------------------


def test_scapy_ikev2_sa_init() -> None:
    sp = (
        IKEv2(init_SPI=SPI_I, exch_type=34, flags="Initiator", id=0)
        / IKEv2_SA()
        / IKEv2_KE(group=14, ke=b"k" * 256)
        / IKEv2_Nonce(nonce=b"n" * 32)
    )
    raw = bytes(sp)
    hdr = I.parse_ike_header(raw)
    back = IKEv2(raw)
    assert (hdr.spi_i, hdr.spi_r) == (SPI_I, bytes(8))
    assert (hdr.major, hdr.minor) == (2, 0)
    assert hdr.exchange == 34 == back.exch_type
    assert hdr.flags == I.FLAG_V2_INITIATOR == int(back.flags)
    assert hdr.next_payload == back.next_payload == 33  # SA
    assert hdr.length == len(raw) == back.length
    assert hdr.is_sa_init and not hdr.is_response


def test_scapy_ikev2_response() -> None:
    sp = IKEv2(init_SPI=SPI_I, resp_SPI=SPI_R, exch_type=35, flags="Response", id=5) / Raw(
        b"\x00" * 20
    )
    raw = bytes(sp)
    hdr = I.parse_ike_header(raw)
    assert (hdr.spi_r, hdr.exchange, hdr.message_id) == (SPI_R, 35, 5)
    assert hdr.flags == int(IKEv2(raw).flags) == I.FLAG_V2_RESPONSE
    assert hdr.is_response and not hdr.is_sa_init
    # scapy fills the length field only from its own payloads; the raw tail is not counted.
    assert hdr.length == IKEv2(raw).length


def test_scapy_ikev1() -> None:
    sp = ISAKMP(init_cookie=SPI_I, exch_type=I.IKEV1_AGGRESSIVE, id=0) / ISAKMP_payload_SA()
    raw = bytes(sp)
    hdr = I.parse_ike_header(raw)
    assert (hdr.spi_i, hdr.spi_r, hdr.major, hdr.minor) == (SPI_I, bytes(8), 1, 0)
    assert hdr.exchange == I.IKEV1_AGGRESSIVE
    assert hdr.next_payload == 1  # SA
    assert hdr.length == len(raw) == ISAKMP(raw).length
    assert hdr.is_sa_init


@settings(max_examples=50)
@given(
    st.binary(min_size=8, max_size=8).filter(any),
    st.binary(min_size=8, max_size=8),
    st.integers(0, 255),
    st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=60),
)
def test_scapy_ikev2_random(spi_i: bytes, spi_r: bytes, exch: int, mid: int, body: bytes) -> None:
    sp = IKEv2(init_SPI=spi_i, resp_SPI=spi_r, exch_type=exch, id=mid, length=28 + len(body))
    raw = bytes(sp / Raw(body))
    hdr = I.parse_ike_header(raw)
    assert (hdr.spi_i, hdr.spi_r, hdr.exchange, hdr.message_id) == (spi_i, spi_r, exch, mid)
    assert hdr.length == len(raw)
    assert hdr.is_sa_init == (spi_r == bytes(8))


# --- classify_udp_payload: port 500 ----------------------------------------------------


def test_classify_500_ike() -> None:
    msg = ike_msg(body=b"p" * 30)
    c = I.classify_udp_payload(500, msg)
    assert c.kind is Kind.IKE
    assert c.body == msg
    assert c.ike == I.parse_ike_header(msg)
    assert not c.marker
    assert (c.spi, c.seq) == (0, 0)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff",
        b"\x00" * 40,  # zero initiator SPI
        bytes(4) + ike_msg(),  # a non-ESP marker is not expected on 500
        ike_msg(version=0x30),
        ike_msg(length=100),
    ],
)
def test_classify_500_invalid(payload: bytes) -> None:
    c = I.classify_udp_payload(500, payload)
    assert c.kind is Kind.INVALID
    assert c.reason
    assert c.ike is None
    assert not c.marker


def test_classify_other_port_is_ike() -> None:
    msg = ike_msg()
    assert I.classify_udp_payload(10000, msg).kind is Kind.IKE
    assert I.classify_udp_payload(10000, b"\x00" * 4 + msg).kind is Kind.INVALID


# --- classify_udp_payload: port 4500 ---------------------------------------------------


def test_classify_4500_marker_ike() -> None:
    msg = ike_msg(spi_r=SPI_R, exchange=37, mid=3, body=b"e" * 48)
    c = I.classify_udp_payload(4500, I.NON_ESP_MARKER + msg)
    assert c.kind is Kind.IKE
    assert c.marker
    assert c.body == msg
    assert c.ike is not None and c.ike.message_id == 3 and c.ike.spi_r == SPI_R


@pytest.mark.parametrize(
    "msg",
    [b"", b"\x01", ike_msg()[:27], ike_msg(version=0x00), ike_msg(spi_i=bytes(8))],
)
def test_classify_4500_marker_bad_ike(msg: bytes) -> None:
    c = I.classify_udp_payload(4500, I.NON_ESP_MARKER + msg)
    assert c.kind is Kind.INVALID
    assert c.marker
    assert c.reason


@pytest.mark.parametrize(
    ("spi", "seq", "data"),
    [(0x00000001, 0, b""), (0xC0FFEE00, 1, b"x" * 64), (0xFFFFFFFF, 0xFFFFFFFF, b"\xff")],
)
def test_classify_4500_esp(spi: int, seq: int, data: bytes) -> None:
    payload = struct.pack("!II", spi, seq) + data
    c = I.classify_udp_payload(4500, payload)
    assert c.kind is Kind.ESP
    assert (c.spi, c.seq) == (spi, seq)
    assert c.body == payload
    assert c.ike is None and not c.marker


def test_classify_4500_ike_without_marker_is_esp() -> None:
    # On 4500 an IKE message without the marker reads as ESP: the SPI is the first word.
    c = I.classify_udp_payload(4500, ike_msg())
    assert c.kind is Kind.ESP
    assert c.spi == 0x01020304 and c.seq == 0x05060708


def test_classify_4500_keepalive() -> None:
    c = I.classify_udp_payload(4500, b"\xff")
    assert c.kind is Kind.KEEPALIVE
    assert c.body == b""


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00", b"\xfe", b"\xff\xff", b"\x00\x00\x00", b"\x01\x02\x03\x04", b"\xff" * 7],
)
def test_classify_4500_short_invalid(payload: bytes) -> None:
    c = I.classify_udp_payload(4500, payload)
    assert c.kind is Kind.INVALID
    assert c.reason


def test_classify_frame_payload_uses_4500_rules() -> None:
    msg = ike_msg()
    assert I.classify_frame_payload(I.NON_ESP_MARKER + msg).kind is Kind.IKE
    assert I.classify_frame_payload(I.NON_ESP_MARKER + msg).body == msg
    assert I.classify_frame_payload(b"\x00\x00\x10\x00" + bytes(8)).spi == 0x1000
    assert I.classify_frame_payload(b"\xff").kind is Kind.KEEPALIVE
    assert I.classify_frame_payload(b"\x01").kind is Kind.INVALID


# --- whole packets built by scapy, read by the core -----------------------------------


def _udp_payload(raw: bytes) -> tuple[int, bytes]:
    pkt = P.parse_ip(raw)
    assert pkt.proto == P.PROTO_UDP
    assert P.l4_checksum_ok(pkt.src, pkt.dst, P.PROTO_UDP, pkt.payload)
    udp = P.parse_udp(pkt.payload)
    return udp.dport, udp.payload


@pytest.mark.parametrize(
    "ip", [IP(src="198.18.0.1", dst="198.18.0.2"), IPv6(src="fd00::1", dst="fd00::2")]
)
def test_scapy_packets_on_500_and_4500(ip) -> None:  # type: ignore[no-untyped-def]
    v1 = ISAKMP(init_cookie=SPI_I, exch_type=2) / ISAKMP_payload_SA()
    port, payload = _udp_payload(bytes(ip / UDP(sport=500, dport=500) / v1))
    c = I.classify_udp_payload(port, payload)
    assert (port, c.kind, c.marker) == (500, Kind.IKE, False)
    assert c.ike is not None and (c.ike.major, c.ike.exchange) == (1, 2)

    v2 = IKEv2(init_SPI=SPI_I, resp_SPI=SPI_R, exch_type=36, flags="Initiator", id=1) / Raw(
        b"\x00" * 4
    )
    v2_raw = bytes(v2)
    nat = ip / UDP(sport=4500, dport=4500) / NON_ESP() / Raw(v2_raw)
    port, payload = _udp_payload(bytes(nat))
    c = I.classify_udp_payload(port, payload)
    assert (port, c.kind, c.marker, c.body) == (4500, Kind.IKE, True, v2_raw)
    assert c.ike is not None and (c.ike.exchange, c.ike.message_id) == (36, 1)

    esp = ip / UDP(sport=4500, dport=4500) / ESP(spi=0xABCDEF01, seq=42, data=b"\x11" * 20)
    port, payload = _udp_payload(bytes(esp))
    c = I.classify_udp_payload(port, payload)
    assert (c.kind, c.spi, c.seq) == (Kind.ESP, 0xABCDEF01, 42)

    ka = ip / UDP(sport=4500, dport=4500) / NAT_KEEPALIVE()
    port, payload = _udp_payload(bytes(ka))
    assert I.classify_udp_payload(port, payload).kind is Kind.KEEPALIVE


# --- hypothesis ------------------------------------------------------------------------


@given(
    st.binary(min_size=8, max_size=8).filter(any),
    st.binary(min_size=8, max_size=8),
    st.integers(0, 255),
    st.sampled_from([0x10, 0x20, 0x1F, 0x2A]),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=80),
    st.binary(max_size=8),
)
def test_header_round_trip(
    spi_i: bytes,
    spi_r: bytes,
    np: int,
    version: int,
    exch: int,
    flags: int,
    mid: int,
    body: bytes,
    tail: bytes,
) -> None:
    msg = ike_msg(
        spi_i, spi_r, np=np, version=version, exchange=exch, flags=flags, mid=mid, body=body
    )
    hdr = I.parse_ike_header(msg + tail)
    assert (hdr.spi_i, hdr.spi_r, hdr.next_payload) == (spi_i, spi_r, np)
    assert (hdr.major, hdr.minor) == (version >> 4, version & 0x0F)
    assert (hdr.exchange, hdr.flags, hdr.message_id, hdr.length) == (exch, flags, mid, len(msg))
    c = I.classify_udp_payload(4500, I.NON_ESP_MARKER + msg + tail)
    assert (c.kind, c.ike, c.body) == (Kind.IKE, hdr, msg + tail)
    assert I.classify_udp_payload(500, msg).ike == hdr


@given(st.binary(max_size=80))
def test_fuzz_parse_ike_header(data: bytes) -> None:
    try:
        hdr = I.parse_ike_header(data)
    except IKEError:
        return
    assert 28 <= hdr.length <= len(data)
    assert hdr.major in (1, 2)


@st.composite
def near_ike(draw: st.DrawFn) -> bytes:
    """Random bytes shaped like an IKE header, so the checks after the size check run."""
    raw = bytearray(draw(st.binary(min_size=28, max_size=70)))
    raw[17] = draw(st.sampled_from([0x10, 0x20, 0x00, 0x30, raw[17]]))
    if draw(st.booleans()):
        raw[24:28] = draw(st.integers(0, len(raw) + 2)).to_bytes(4, "big")
    if draw(st.booleans()):
        raw[0:8] = bytes(8)
    return bytes(raw)


@given(
    st.sampled_from([500, 4500, 0, 10000, 65535]),
    st.one_of(
        st.binary(max_size=80),
        near_ike(),
        near_ike().map(lambda b: I.NON_ESP_MARKER + b),
    ),
)
def test_fuzz_classify(port: int, payload: bytes) -> None:
    c = I.classify_udp_payload(port, payload)
    assert isinstance(c.kind, Kind)
    if c.kind is Kind.INVALID:
        assert c.reason
    elif c.kind is Kind.IKE:
        assert c.ike is not None and c.ike == I.parse_ike_header(c.body)
    elif c.kind is Kind.ESP:
        assert port == 4500 and len(payload) >= 8 and c.spi != 0
    else:
        assert port == 4500 and payload == b"\xff"
    try:
        I.parse_ike_header(payload)
    except IKEError:
        pass


# --- classify_outbound: the one reading of charon's queued packets (both engines) ---------

ADDRS = st.sampled_from(
    [(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])), (bytes(15) + b"\x01", bytes(15) + b"\x02")]
)
PORTS = st.sampled_from([500, 4500, 10000, 0, 65535])
PAYLOADS = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda m: I.NON_ESP_MARKER + m, st.sampled_from([ike_msg(), ike_msg(SPI_I, SPI_R)])),
    st.just(I.NAT_KEEPALIVE),
    st.just(ike_msg()),
)


@given(st.binary(max_size=120))
@settings(max_examples=400, deadline=None)
def test_outbound_garbage_is_refused_or_read_never_raises(data: bytes) -> None:
    got = I.classify_outbound(data)
    assert isinstance(got, (I.Refused, I.CharonPacket))
    if isinstance(got, I.CharonPacket):
        assert got.what.kind in (Kind.IKE, Kind.ESP)


@given(ADDRS, PORTS, PORTS, PAYLOADS)
@settings(max_examples=300, deadline=None)
def test_outbound_udp_reads_as_its_payload_does(addrs, sport: int, dport: int, payload: bytes):
    src, dst = addrs
    got = I.classify_outbound(P.build_udp_packet(src, dst, sport, dport, payload))
    want = I.classify_udp_payload(sport, payload)
    if want.kind is Kind.KEEPALIVE:
        assert got is I.Refused.KEEPALIVE
    elif want.kind is Kind.INVALID:
        assert got is I.Refused.INVALID
    else:
        assert isinstance(got, I.CharonPacket)
        assert (got.ip.src, got.ip.dst, got.udp.sport, got.udp.dport) == (src, dst, sport, dport)
        assert got.what == want


@given(PAYLOADS, st.integers(1, 0x1FFF), st.booleans())
@settings(max_examples=200, deadline=None)
def test_outbound_ipv4_fragment_is_refused_whatever_it_carries(payload, offset, more):
    """A fragment's first octets are no UDP header (OUTPUT sees whole datagrams)."""
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    packet = bytearray(P.build_udp_packet(src, dst, 4500, 4500, payload))
    struct.pack_into("!H", packet, 6, (0x2000 if more else 0) | offset)
    assert I.classify_outbound(bytes(packet)) is I.Refused.FRAGMENT
    # the first fragment (offset 0, more fragments) carries the UDP header but not all of it
    struct.pack_into("!H", packet, 6, 0x2000)
    assert I.classify_outbound(bytes(packet)) is I.Refused.FRAGMENT


def test_outbound_ipv6_fragment_is_refused() -> None:
    src, dst = bytes(15) + b"\x01", bytes(15) + b"\x02"
    udp = P.build_udp(src, dst, 500, 500, ike_msg())
    frag = bytes([P.PROTO_UDP, 0, 0, 0]) + (7).to_bytes(4, "big")  # offset 0, M clear
    packet = P.build_ipv6(src, dst, 44, frag + udp)
    assert I.classify_outbound(packet) is I.Refused.FRAGMENT
    # without the fragment header the same datagram is read
    assert isinstance(I.classify_outbound(P.build_ipv6(src, dst, P.PROTO_UDP, udp)), I.CharonPacket)


# IPv6 extension headers (and No Next Header) are a chain to follow, not a protocol
_CHAIN = frozenset({0, 43, 44, 51, 59, 60, 135, 139, 140})


@given(ADDRS, st.integers(0, 255).filter(lambda p: p != P.PROTO_UDP and p not in _CHAIN))
def test_outbound_other_protocols_are_refused(addrs, proto: int) -> None:
    assert I.classify_outbound(P.build_ip(*addrs, proto, b"\x00" * 16)) is I.Refused.NOT_UDP


@given(ADDRS, PAYLOADS, st.data())
@settings(max_examples=200, deadline=None)
def test_outbound_truncated_packet_is_malformed(addrs, payload: bytes, data) -> None:
    whole = P.build_udp_packet(*addrs, 500, 4500, payload)
    cut = data.draw(st.integers(0, len(whole) - 1))
    got = I.classify_outbound(whole[:cut])
    assert got is I.Refused.MALFORMED
