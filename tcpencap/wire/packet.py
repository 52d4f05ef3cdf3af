"""IPv4/IPv6 with UDP, TCP or ESP: parsing, building and checksums.

Pure functions over bytes. Addresses are kept as packed ``bytes`` (4 or 16 octets)
on the packet path because converting to ``ipaddress`` objects per packet is costly;
:func:`addr_text` converts for logs and configuration.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ESP = 50
PROTO_AH = 51
PROTO_ICMPV6 = 58

# IPv6 extension headers we can walk: next-header value -> how to compute the length.
_EXT_GENERIC = frozenset({0, 43, 60, 135, 139, 140})  # (len + 1) * 8
_EXT_FRAGMENT = 44  # fixed 8 octets
_EXT_AH = 51  # (len + 2) * 4
_NO_NEXT_HEADER = 59

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80


class PacketError(ValueError):
    """The bytes are not a packet this module can handle."""


def addr_text(addr: bytes) -> str:
    """Packed address to its textual form (for logs and config)."""
    return str(ipaddress.ip_address(addr))


def addr_bytes(text: str) -> bytes:
    """Textual address to its packed form."""
    return ipaddress.ip_address(text).packed


def checksum(data: bytes | memoryview, initial: int = 0) -> int:
    """RFC 1071 internet checksum (one's complement of the one's complement sum)."""
    total = initial + word_sum(data)
    return fold(total, total != 0)


def word_sum(data: bytes | memoryview) -> int:
    """The 16-bit words of ``data`` summed, congruent modulo 0xFFFF to their one's
    complement sum; sums of several parts may be added before :func:`fold`."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    return int.from_bytes(data, "big")


def fold(total: int, nonzero: bool = True) -> int:
    """Fold a big-integer word sum: 2**16 == 1 (mod 0xFFFF), so the remainder is the
    one's complement sum, where a non-zero input sums to 0xFFFF rather than 0."""
    total %= 0xFFFF
    if total == 0 and nonzero:
        total = 0xFFFF
    return (~total) & 0xFFFF


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """:func:`word_sum` of the IPv4 or IPv6 pseudo-header of a TCP or UDP segment."""
    return word_sum(src) + word_sum(dst) + proto + length


def l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes | memoryview) -> int:
    """Checksum of a TCP or UDP segment (its checksum field zeroed) with the pseudo-header."""
    return fold(pseudo_sum(src, dst, proto, len(segment)) + word_sum(segment))


def l4_checksum_ok(src: bytes, dst: bytes, proto: int, segment: bytes | memoryview) -> bool:
    """True when the segment's stored checksum is valid (the sum over all of it is 0)."""
    return (pseudo_sum(src, dst, proto, len(segment)) + word_sum(segment)) % 0xFFFF == 0


@dataclass(slots=True)
class IPPacket:
    """A parsed IP packet: the header block (with options or extension headers) and L4 bytes.

    ``nh_offset`` is the offset inside ``header`` of the octet holding ``proto`` (9 for IPv4,
    the Next Header field of the last IPv6 header), which the cTCP transform rewrites.
    """

    version: int
    src: bytes
    dst: bytes
    proto: int
    header: bytes
    nh_offset: int
    payload: bytes
    ttl: int = 64
    ident: int = 0
    tos: int = 0
    df: bool = False
    fragment: bool = False


def parse_ip(data: bytes | memoryview) -> IPPacket:
    """Parse an IPv4 or IPv6 packet; raises PacketError on anything malformed or truncated."""
    if len(data) < 1:
        raise PacketError("empty packet")
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(data)
    if version == 6:
        return _parse_ipv6(data)
    raise PacketError(f"IP version {version}")


def _parse_ipv4(data: bytes | memoryview) -> IPPacket:
    if len(data) < 20:
        raise PacketError("IPv4 header truncated")
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20:
        raise PacketError(f"IPv4 IHL {ihl}")
    tos, total, ident, frag, ttl, proto = struct.unpack_from("!xBHHHBB", data)
    if total < ihl or total > len(data):
        raise PacketError(f"IPv4 total length {total} for {len(data)} octets")
    header = bytes(data[:ihl])
    return IPPacket(
        version=4,
        src=header[12:16],
        dst=header[16:20],
        proto=proto,
        header=header,
        nh_offset=9,
        payload=bytes(data[ihl:total]),
        ttl=ttl,
        ident=ident,
        tos=tos,
        df=bool(frag & 0x4000),
        fragment=bool(frag & 0x3FFF and (frag & 0x2000 or frag & 0x1FFF)),
    )


def _parse_ipv6(data: bytes | memoryview) -> IPPacket:
    if len(data) < 40:
        raise PacketError("IPv6 header truncated")
    plen = struct.unpack_from("!H", data, 4)[0]
    end = 40 + plen
    if end > len(data):
        raise PacketError(f"IPv6 payload length {plen} for {len(data)} octets")
    nh = data[6]
    nh_offset = 6
    off = 40
    fragment = False
    while nh in _EXT_GENERIC or nh in (_EXT_FRAGMENT, _EXT_AH):
        if off + 8 > end:
            raise PacketError("IPv6 extension header truncated")
        if nh == _EXT_FRAGMENT:
            hlen = 8
            fragment = True
        elif nh == _EXT_AH:
            hlen = (data[off + 1] + 2) * 4
        else:
            hlen = (data[off + 1] + 1) * 8
        if off + hlen > end:
            raise PacketError("IPv6 extension header overruns the packet")
        nh_offset = off
        nh = data[off]
        off += hlen
    if nh == _NO_NEXT_HEADER:
        raise PacketError("IPv6 no next header")
    header = bytes(data[:off])
    return IPPacket(
        version=6,
        src=header[8:24],
        dst=header[24:40],
        proto=nh,
        header=header,
        nh_offset=nh_offset,
        payload=bytes(data[off:end]),
        ttl=header[7],
        tos=((header[0] & 0x0F) << 4) | (header[1] >> 4),
        fragment=fragment,
    )


def ipv4_header_checksum_ok(header: bytes) -> bool:
    return word_sum(header) % 0xFFFF == 0


def rebuild_ip(pkt: IPPacket, proto: int, payload: bytes) -> bytes:
    """The packet's own header block with a new L4 protocol and payload; lengths and the
    IPv4 header checksum are fixed up, everything else (TTL, ID, DF, options) is kept."""
    hdr = bytearray(pkt.header)
    hdr[pkt.nh_offset] = proto
    if pkt.version == 4:
        struct.pack_into("!H", hdr, 2, len(hdr) + len(payload))
        hdr[10:12] = b"\x00\x00"
        struct.pack_into("!H", hdr, 10, checksum(hdr))
    else:
        struct.pack_into("!H", hdr, 4, len(hdr) - 40 + len(payload))
    return bytes(hdr) + payload


def build_ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    payload: bytes,
    *,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    df: bool = False,
    options: bytes = b"",
) -> bytes:
    """An IPv4 packet with a correct header checksum; options are padded to 32 bits."""
    if len(options) % 4:
        options += b"\x00" * (4 - len(options) % 4)
    ihl = 20 + len(options)
    if ihl > 60:
        raise PacketError("IPv4 options longer than 40 octets")
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | (ihl // 4),
            tos,
            ihl + len(payload),
            ident,
            0x4000 if df else 0,
            ttl,
            proto,
            0,
            src,
            dst,
        )
        + options
    )
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr) + payload


def build_ipv6(
    src: bytes,
    dst: bytes,
    proto: int,
    payload: bytes,
    *,
    hop_limit: int = 64,
    tclass: int = 0,
    flow: int = 0,
    ext: bytes = b"",
    ext_first: int | None = None,
) -> bytes:
    """An IPv6 packet. ``ext`` is a ready chain of extension headers whose last Next Header
    is already ``proto``; ``ext_first`` is the type of its first header."""
    first = proto if not ext else ext_first
    if first is None:
        raise PacketError("ext_first is required with extension headers")
    word0 = (6 << 28) | (tclass << 20) | (flow & 0xFFFFF)
    hdr = struct.pack("!IHBB16s16s", word0, len(ext) + len(payload), first, hop_limit, src, dst)
    return hdr + ext + payload


def build_ip(src: bytes, dst: bytes, proto: int, payload: bytes, **kw: int) -> bytes:
    """IPv4 or IPv6 according to the address length, with default header fields."""
    if len(src) == 4:
        return build_ipv4(src, dst, proto, payload, **kw)  # type: ignore[arg-type]
    return build_ipv6(src, dst, proto, payload, **kw)  # type: ignore[arg-type]


# --- UDP -------------------------------------------------------------------------------


@dataclass(slots=True)
class UDPDatagram:
    sport: int
    dport: int
    checksum: int
    payload: bytes


def parse_udp(segment: bytes | memoryview) -> UDPDatagram:
    if len(segment) < 8:
        raise PacketError("UDP header truncated")
    sport, dport, length, csum = struct.unpack_from("!HHHH", segment)
    if length < 8 or length > len(segment):
        raise PacketError(f"UDP length {length} for {len(segment)} octets")
    return UDPDatagram(sport, dport, csum, bytes(segment[8:length]))


def build_udp(
    src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, *, with_checksum: bool = True
) -> bytes:
    """A UDP segment; the checksum is computed unless asked for 0 (IPv4 only allows that)."""
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    if with_checksum or len(src) == 16:
        # A computed 0 is sent as 0xFFFF: 0 means "no checksum" in UDP.
        struct.pack_into("!H", seg, 6, l4_checksum(src, dst, PROTO_UDP, seg) or 0xFFFF)
    return bytes(seg)


def build_udp_packet(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """A whole IP+UDP packet as the kernel would deliver it to a UDP socket."""
    return build_ip(src, dst, PROTO_UDP, build_udp(src, dst, sport, dport, payload))


# --- TCP -------------------------------------------------------------------------------


@dataclass(slots=True)
class TCPSegment:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    checksum: int
    urgent: int
    options: bytes
    payload: bytes


def parse_tcp(segment: bytes | memoryview) -> TCPSegment:
    if len(segment) < 20:
        raise PacketError("TCP header truncated")
    sport, dport, seq, ack, off_flags, window, csum, urg = struct.unpack_from("!HHIIHHHH", segment)
    doff = (off_flags >> 12) * 4
    if doff < 20 or doff > len(segment):
        raise PacketError(f"TCP data offset {doff} for {len(segment)} octets")
    return TCPSegment(
        sport,
        dport,
        seq,
        ack,
        off_flags & 0xFF,
        window,
        csum,
        urg,
        bytes(segment[20:doff]),
        bytes(segment[doff:]),
    )


def build_tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    *,
    window: int = 65535,
    options: bytes = b"",
) -> bytes:
    """A TCP segment with a correct checksum over the pseudo-header."""
    if len(options) % 4:
        options += b"\x00" * (4 - len(options) % 4)
    if len(options) > 40:
        raise PacketError("TCP options longer than 40 octets")
    doff = (20 + len(options)) // 4
    seg = bytearray(
        struct.pack(
            "!HHIIHHHH",
            sport,
            dport,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            (doff << 12) | flags,
            window,
            0,
            0,
        )
        + options
        + payload
    )
    struct.pack_into("!H", seg, 16, l4_checksum(src, dst, PROTO_TCP, seg))
    return bytes(seg)
