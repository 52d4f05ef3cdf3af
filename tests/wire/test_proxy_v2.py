"""Tests for the PROXY protocol v2 parser and builder (HAProxy's specification, 2.2)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.wire.proxy_v2 import (
    FIXED,
    MAX_LENGTH,
    SIGNATURE,
    V1_PREFIX,
    ProxyHeader,
    ProxyHeaderError,
    build,
    build_local,
    parse,
    starts_like_header,
)

REASONS = {"proxy-missing", "proxy-v1", "proxy-malformed"}

ipv4 = st.ip_addresses(v=4).map(str)
# IPv4-mapped IPv6 addresses are read as IPv4 (their own test is below)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
ports = st.integers(1, 65535)
address_pairs = st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6))


def header(
    ver_cmd: int = 0x21, fam: int = 0x11, block: bytes = bytes(4) + bytes(4) + b"\x01\xbb\x01\xf4"
) -> bytes:
    """A hand-made header: the signature, the two octets given and ``block`` (with its length)."""
    return SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(block)) + block


def ipv4_block(src: str = "192.0.2.7", dst: str = "198.19.0.2", sport=40000, dport=443) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def with_tlvs(raw: bytes, tlvs: bytes) -> bytes:
    """``raw`` (one header) with ``tlvs`` appended and the length field grown to match."""
    length = struct.unpack_from("!H", raw, 14)[0] + len(tlvs)
    return raw[:14] + struct.pack("!H", length) + raw[FIXED:] + tlvs


def refused(data: bytes) -> str:
    with pytest.raises(ProxyHeaderError) as info:
        parse(data)
    return info.value.reason


# --- the builder and the parser agree --------------------------------------------------


def test_build_layout_ipv4() -> None:
    raw = build("192.0.2.7", 40000, "198.19.0.2", 443)
    assert raw == SIGNATURE + b"\x21\x11\x00\x0c" + ipv4_block()
    assert len(raw) == FIXED + 12


def test_build_layout_ipv6() -> None:
    raw = build("2001:db8::7", 40000, "2001:db8::2", 443)
    assert raw[12:16] == b"\x21\x21\x00\x24"
    assert len(raw) == FIXED + 36
    assert raw[FIXED : FIXED + 16] == ipaddress.IPv6Address("2001:db8::7").packed
    assert raw[FIXED + 16 : FIXED + 32] == ipaddress.IPv6Address("2001:db8::2").packed
    assert raw[FIXED + 32 :] == struct.pack("!HH", 40000, 443)


def test_build_refuses_mixed_families() -> None:
    with pytest.raises(ValueError):
        build("192.0.2.7", 1, "2001:db8::2", 2)


def test_ipv4_mapped_addresses_are_read_as_ipv4() -> None:
    """HAProxy with a dual-stack listener names IPv4 clients ::ffff:a.b.c.d."""
    raw = build("::ffff:192.0.2.7", 40000, "::ffff:198.19.0.2", 443)
    assert parse(raw) == ProxyHeader(52, False, "192.0.2.7", 40000, "198.19.0.2", 443)
    mixed = build("::ffff:192.0.2.7", 40000, "2001:db8::2", 443)
    with pytest.raises(ProxyHeaderError) as err:
        parse(mixed)
    assert err.value.reason == "proxy-malformed"


def test_parse_known_ipv4_header() -> None:
    raw = build("192.0.2.7", 40000, "198.19.0.2", 443)
    assert parse(raw) == ProxyHeader(28, False, "192.0.2.7", 40000, "198.19.0.2", 443)


def test_parse_known_ipv6_header_compressed_text() -> None:
    raw = build("2001:0db8:0000::0007", 1, "2001:db8::2", 65535)
    assert parse(raw) == ProxyHeader(52, False, "2001:db8::7", 1, "2001:db8::2", 65535)


@settings(max_examples=200, deadline=None)
@given(addrs=address_pairs, sport=ports, dport=ports, rest=st.binary(max_size=64))
def test_round_trip_with_trailing_stream_bytes(
    addrs: tuple[str, str], sport: int, dport: int, rest: bytes
) -> None:
    src, dst = addrs
    raw = build(src, sport, dst, dport)
    data = raw + rest
    got = parse(data)
    assert got == ProxyHeader(len(raw), False, src, sport, dst, dport)
    assert got.length == FIXED + (12 if ":" not in src else 36)
    assert data[got.length :] == rest  # the stream after the header is untouched


@settings(max_examples=200, deadline=None)
@given(
    addrs=address_pairs,
    sport=ports,
    dport=ports,
    tlvs=st.binary(min_size=1, max_size=MAX_LENGTH - 36),
    rest=st.binary(max_size=16),
)
def test_tlvs_are_skipped(
    addrs: tuple[str, str], sport: int, dport: int, tlvs: bytes, rest: bytes
) -> None:
    src, dst = addrs
    raw = with_tlvs(build(src, sport, dst, dport), tlvs)
    got = parse(raw + rest)
    assert got == ProxyHeader(len(raw), False, src, sport, dst, dport)
    assert (raw + rest)[got.length :] == rest


def test_real_tlvs_skipped() -> None:
    # PP2_TYPE_ALPN "h2", PP2_TYPE_AUTHORITY "vpn.lab.test", PP2_TYPE_NOOP of 3 octets.
    tlvs = b"\x01\x00\x02h2" + b"\x02\x00\x0cvpn.lab.test" + b"\x04\x00\x03\x00\x00\x00"
    raw = with_tlvs(build("192.0.2.7", 40000, "198.19.0.2", 443), tlvs)
    assert struct.unpack_from("!H", raw, 14)[0] == 12 + len(tlvs)
    assert parse(raw + b"IKETCP") == ProxyHeader(
        len(raw), False, "192.0.2.7", 40000, "198.19.0.2", 443
    )


def test_length_at_max_accepted_above_refused() -> None:
    base = build("192.0.2.7", 40000, "198.19.0.2", 443)
    at_max = with_tlvs(base, bytes(MAX_LENGTH - 12))
    assert parse(at_max).length == FIXED + MAX_LENGTH
    over = with_tlvs(base, bytes(MAX_LENGTH - 12 + 1))
    assert refused(over) == "proxy-malformed"
    # Refused as soon as the fixed part shows it, without waiting for the octets.
    assert refused(over[:FIXED]) == "proxy-malformed"
    assert refused(SIGNATURE + b"\x21\x11\xff\xff") == "proxy-malformed"


# --- incomplete headers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        build("192.0.2.7", 40000, "198.19.0.2", 443),
        build("2001:db8::7", 40000, "2001:db8::2", 443),
        with_tlvs(build("192.0.2.7", 40000, "198.19.0.2", 443), b"\x04\x00\x02\x00\x00"),
        build_local(),
    ],
    ids=["ipv4", "ipv6", "tlv", "local"],
)
def test_every_strict_prefix_is_incomplete(raw: bytes) -> None:
    for n in range(len(raw)):
        assert parse(raw[:n]) is None, n
    assert parse(raw) is not None


@settings(max_examples=200, deadline=None)
@given(addrs=address_pairs, sport=ports, dport=ports, data=st.data())
def test_strict_prefix_at_any_split_is_incomplete(
    addrs: tuple[str, str], sport: int, dport: int, data
) -> None:
    raw = build(addrs[0], sport, addrs[1], dport)
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert parse(raw[:cut]) is None
    assert parse(raw[:cut] + raw[cut:]).length == len(raw)


# --- LOCAL -----------------------------------------------------------------------------


def test_local_command() -> None:
    raw = build_local()
    assert raw == SIGNATURE + b"\x20\x00\x00\x00"
    assert parse(raw) == ProxyHeader(FIXED, True)
    assert parse(raw + b"IKETCP").length == FIXED


def test_local_command_with_address_block_and_tlvs_skips_them() -> None:
    # A LOCAL header may still carry a block (and any family): it is skipped, not read.
    raw = header(0x20, 0x11, ipv4_block() + b"\x04\x00\x01\x00")
    got = parse(raw + b"IKETCP")
    assert got == ProxyHeader(FIXED + 16, True)
    assert got.source == "" and got.source_port == 0
    assert parse(header(0x20, 0x31, bytes(5))) == ProxyHeader(FIXED + 5, True)


# --- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"IKETCP",
        b"I",
        b"\x16\x03\x01\x00\x05hello",
        b"\x00\x10" + bytes(16),
        b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4),
        b"\r\n\r\n\x01",
        b"\r\n\n",
        b"GET / HTTP/1.1\r\n",
        b"PROXx",
    ],
)
def test_not_a_header_is_proxy_missing(data: bytes) -> None:
    assert refused(data) == "proxy-missing"


def test_v1_text_refused() -> None:
    assert refused(b"PROXY TCP4 192.0.2.7 198.19.0.2 40000 443\r\n") == "proxy-v1"
    assert refused(b"PROXY ") == "proxy-v1"
    assert refused(b"PROXY UNKNOWN\r\n") == "proxy-v1"


@pytest.mark.parametrize("n", range(len(V1_PREFIX)))
def test_v1_prefix_is_incomplete(n: int) -> None:
    assert parse(V1_PREFIX[:n]) is None
    assert parse(b"PROX") is None


@pytest.mark.parametrize("version", [0, 1, 3, 15])
def test_wrong_binary_version(version: int) -> None:
    raw = header(version << 4 | 1, 0x11, ipv4_block())
    assert refused(raw) == "proxy-malformed"
    assert refused(raw[:FIXED]) == "proxy-malformed"  # known from the fixed part


@pytest.mark.parametrize("command", range(2, 16))
def test_unknown_command(command: int) -> None:
    raw = header(0x20 | command, 0x11, ipv4_block())
    assert refused(raw) == "proxy-malformed"
    assert refused(raw[:FIXED]) == "proxy-malformed"


@pytest.mark.parametrize(
    ("fam", "size"),
    [(0x00, 0), (0x00, 12), (0x12, 12), (0x22, 36), (0x31, 216), (0x10, 12), (0x01, 12)],
)
def test_unsupported_family_or_transport_with_proxy_command(fam: int, size: int) -> None:
    # A block that would read as a valid IPv4/IPv6 one (non-zero ports), so only the
    # family/transport octet can be the reason.
    block = (ipv4_block() * 18)[:size]
    assert refused(header(0x21, fam, block)) == "proxy-malformed"


@pytest.mark.parametrize(("fam", "size"), [(0x11, 0), (0x11, 11), (0x21, 12), (0x21, 35)], ids=str)
def test_address_block_too_short(fam: int, size: int) -> None:
    block = bytes([1] * size)
    assert refused(header(0x21, fam, block)) == "proxy-malformed"
    # More bytes after the header do not make the block longer.
    assert refused(header(0x21, fam, block) + bytes(64)) == "proxy-malformed"


def test_source_port_zero() -> None:
    assert refused(header(0x21, 0x11, ipv4_block(sport=0))) == "proxy-malformed"
    assert refused(build("2001:db8::7", 0, "2001:db8::2", 443)) == "proxy-malformed"
    # Destination port 0 is not the client's and is allowed.
    assert parse(header(0x21, 0x11, ipv4_block(dport=0))).destination_port == 0


def test_error_is_a_value_error_with_reason_and_detail() -> None:
    with pytest.raises(ValueError) as info:
        parse(header(0x23))
    assert isinstance(info.value, ProxyHeaderError)
    assert info.value.reason == "proxy-malformed"
    assert str(info.value)


# --- arbitrary input -------------------------------------------------------------------


def check(data: bytes) -> None:
    try:
        got = parse(data)
    except ProxyHeaderError as exc:
        assert exc.reason in REASONS
        return
    if got is not None:
        assert data.startswith(SIGNATURE)
        assert FIXED <= got.length <= len(data)
        assert got.length <= FIXED + MAX_LENGTH
        if not got.local:
            assert got.source_port != 0
            assert ipaddress.ip_address(got.source).version == (
                ipaddress.ip_address(got.destination).version
            )
    else:
        assert starts_like_header(data) or not data


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_only_proxy_header_error(data: bytes) -> None:
    check(data)


fixed_parts = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 80)).map(
    lambda t: bytes(t[:2]) + struct.pack("!H", t[2])
)


@settings(max_examples=500, deadline=None)
@given(
    tail=st.one_of(
        st.binary(max_size=120),
        st.tuples(fixed_parts, st.binary(max_size=100)).map(lambda t: t[0] + t[1]),
        st.tuples(
            st.sampled_from([0x20, 0x21]), st.sampled_from([0x11, 0x21]), st.binary(max_size=60)
        ).map(lambda t: bytes(t[:2]) + struct.pack("!H", len(t[2])) + t[2]),
    )
)
def test_signature_then_arbitrary_bytes(tail: bytes) -> None:
    check(SIGNATURE + tail)


# --- starts_like_header ----------------------------------------------------------------


def test_starts_like_header() -> None:
    raw = build("192.0.2.7", 40000, "198.19.0.2", 443)
    for n in range(1, len(raw) + 1):
        assert starts_like_header(raw[:n]), n
    assert starts_like_header(raw + b"IKETCP")
    assert starts_like_header(build_local())
    for n in range(1, len(V1_PREFIX) + 1):
        assert starts_like_header(V1_PREFIX[:n]), n
    assert starts_like_header(b"PROXY TCP4 192.0.2.7 198.19.0.2 40000 443\r\n")
    assert not starts_like_header(b"")
    assert not starts_like_header(b"IKETCP")
    assert not starts_like_header(b"\x16\x03\x01")
    assert not starts_like_header(b"\r\n\r\n\x00\r\nQUIX\n")
    assert not starts_like_header(b"\r\r")
    assert not starts_like_header(b"PROXy")
    assert not starts_like_header(b"PROXYTCP4")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=40))
def test_starts_like_header_agrees_with_parse(data: bytes) -> None:
    # Whatever parse does not call "proxy-missing" starts like a header, and the reverse.
    try:
        parse(data)
        missing = False
    except ProxyHeaderError as exc:
        missing = exc.reason == "proxy-missing"
    assert starts_like_header(data) == (not missing and bool(data))
