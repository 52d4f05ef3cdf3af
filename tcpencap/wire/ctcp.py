"""Cisco cTCP ("IPsec over TCP", TCPENCAP) packet transform: protocols.md A.2-A.5, A.8.

cTCP is not a byte stream: each IKE (UDP) or ESP IP packet becomes exactly one TCP
segment. The IP header is kept (protocol/next header set to 6), a 20-byte TCP header is
inserted before the original L4 bytes and a 16-byte trailer naming the inner protocol is
appended. Pure functions over bytes; the connection state lives in :mod:`tcpencap.core.ctcp_conn`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tcpencap.wire.packet import (
    PROTO_ESP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    IPPacket,
    PacketError,
    build_ipv4,
    build_ipv6,
    build_tcp,
    l4_checksum,
    l4_checksum_ok,
    parse_ip,
    rebuild_ip,
)

TRAILER_LEN = 16
TCP_HEADER_LEN = 20
UDP_HEADER_LEN = 8
# The shortest TCP payload that can carry something: a UDP header (or ESP SPI+seq) and the
# trailer. Anything shorter is a keepalive or garbage (A.6 step 5).
MIN_PAYLOAD = UDP_HEADER_LEN + TRAILER_LEN
MAGIC = b"\x21\x45\x6c\x69\x10"  # trailer bytes 8-12 ("!Eli" + 0x10)
MAGIC2 = b"\x01\x00"  # trailer bytes 14-15
INNER_PROTOS = frozenset({PROTO_UDP, PROTO_ESP})
CONTROL_TTL = 240  # TTL / hop limit of handshake and RST segments (A.3)
WINDOW = 65535
DEFAULT_PORT = 10000
_MAX_IPV4 = 0xFFFF


class CTCPError(ValueError):
    """A packet that cannot be encapsulated, or a segment that is rejected on receive."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Trailer:
    """The 16-octet trailer as received. Bytes 4-7 and the magic are only reported:
    QuickSec logs mismatches but never rejects on them, so neither do we."""

    zero: bytes  # bytes 0-3, should be 00 00 00 00
    seq: int  # bytes 4-5, IPv4 ID of an IKE packet, 0 for ESP
    direction: int  # bytes 6-7, 0x0000 or 0x4000 (Cisco client IKE)
    magic: bytes  # bytes 8-12
    proto: int  # byte 13, the inner protocol
    magic2: bytes  # bytes 14-15

    @property
    def magic_ok(self) -> bool:
        return self.magic == MAGIC and self.magic2 == MAGIC2

    @property
    def zero_ok(self) -> bool:
        return self.zero == b"\x00\x00\x00\x00"


def build_trailer(proto: int, seq: int = 0) -> bytes:
    """The trailer exactly as QuickSec writes it (A.4)."""
    return struct.pack("!4xHxx5sB2s", seq & 0xFFFF, MAGIC, proto, MAGIC2)


def parse_trailer(data: bytes | memoryview) -> Trailer:
    if len(data) != TRAILER_LEN:
        raise CTCPError(f"trailer of {len(data)} octets")
    zero, seq, direction, magic, proto, magic2 = struct.unpack("!4sHH5sB2s", data)
    return Trailer(zero, seq, direction, magic, proto, magic2)


@dataclass(frozen=True, slots=True)
class Decapsulated:
    """A data segment taken apart: the restored inner IP packet plus the TCP fields the
    connection state machine needs."""

    packet: bytes  # inner IP packet (UDP or ESP) with the outer addresses
    proto: int  # inner protocol from trailer byte 13
    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload_len: int  # TCP payload length, trailer included
    trailer: Trailer
    inner_ports: tuple[int, int] | None = None  # inner UDP (sport, dport); None for ESP

    @property
    def is_ike(self) -> bool:
        return self.proto == PROTO_UDP


@dataclass(frozen=True, slots=True)
class Segment:
    """Any inbound cTCP segment (handshake, keepalive or data), the state machine's input.

    ``decap`` is set when the payload decapsulated; ``error`` says why a payload-bearing
    segment did not (for keepalives it says "short")."""

    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload_len: int = 0
    decap: Decapsulated | None = None
    error: str | None = None

    @property
    def is_short(self) -> bool:
        """Zero-length or too short to hold anything: a keepalive (A.6)."""
        return self.payload_len < MIN_PAYLOAD


# --- encapsulation ----------------------------------------------------------------------


def encapsulate(
    ip_packet: bytes,
    *,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    trailer_seq: int | None = None,
) -> bytes:
    """Turn an IKE (UDP) or ESP IP packet into one cTCP data segment.

    ``trailer_seq`` defaults to the IPv4 ID for IKE (0 on IPv6) and is always 0 for ESP.
    The inner UDP checksum is zeroed on IPv4 because the Cisco client does not fix it up
    after NAT (A.8); IPv6 forbids a zero UDP checksum, so there it stays valid.
    """
    return encapsulate_info(
        ip_packet, sport=sport, dport=dport, seq=seq, ack=ack, trailer_seq=trailer_seq
    )[0]


def encapsulate_info(
    ip_packet: bytes,
    *,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    trailer_seq: int | None = None,
) -> tuple[bytes, int, int]:
    """:func:`encapsulate`, also returning the TCP payload length (what the sender's seq
    grows by) and the inner protocol, so the state machine need not parse again."""
    try:
        pkt = parse_ip(ip_packet)
    except PacketError as exc:
        raise CTCPError(f"not an IP packet: {exc}") from None
    if pkt.fragment:
        raise CTCPError("IP fragment (reassemble before encapsulating)")
    if pkt.proto not in INNER_PROTOS:
        raise CTCPError(f"IP protocol {pkt.proto} cannot be encapsulated")
    l4 = pkt.payload
    if len(l4) < UDP_HEADER_LEN:
        raise CTCPError(f"{len(l4)}-octet L4 payload is too short")
    if pkt.proto == PROTO_UDP:
        if pkt.version == 4:
            l4 = l4[:6] + b"\x00\x00" + l4[8:]
            if trailer_seq is None:
                trailer_seq = pkt.ident
    else:
        trailer_seq = 0
    tcp_payload = l4 + build_trailer(pkt.proto, trailer_seq or 0)
    if pkt.version == 4 and len(pkt.header) + TCP_HEADER_LEN + len(tcp_payload) > _MAX_IPV4:
        raise CTCPError("encapsulated packet exceeds 65535 octets")
    tcp = build_tcp(pkt.src, pkt.dst, sport, dport, seq, ack, TCP_ACK, tcp_payload, window=WINDOW)
    return rebuild_ip(pkt, PROTO_TCP, tcp), len(tcp_payload), pkt.proto


def build_control(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    *,
    ident: int = 0,
) -> bytes:
    """A bare handshake or RST segment as QuickSec sends it: no options, TTL/hop limit 240,
    DF clear (A.3)."""
    tcp = build_tcp(src, dst, sport, dport, seq, ack, flags, window=WINDOW)
    if len(src) == 4:
        return build_ipv4(src, dst, PROTO_TCP, tcp, ttl=CONTROL_TTL, ident=ident & 0xFFFF)
    return build_ipv6(src, dst, PROTO_TCP, tcp, hop_limit=CONTROL_TTL)


# --- decapsulation ----------------------------------------------------------------------


def _parse_outer(ip_packet: bytes | memoryview) -> tuple[IPPacket, tuple[int, ...], int]:
    """The outer IP packet, its TCP header fields and the TCP data offset."""
    try:
        pkt = parse_ip(ip_packet)
    except PacketError as exc:
        raise CTCPError(f"not an IP packet: {exc}") from None
    if pkt.proto != PROTO_TCP:
        raise CTCPError(f"IP protocol {pkt.proto} is not TCP")
    if pkt.fragment:
        raise CTCPError("IP fragment")
    tcp = pkt.payload
    if len(tcp) < TCP_HEADER_LEN:
        raise CTCPError("TCP header truncated")
    fields = struct.unpack_from("!HHIIBBH", tcp)  # sport dport seq ack doff flags window
    doff = (fields[4] >> 4) * 4
    if doff < TCP_HEADER_LEN or doff > len(tcp):
        raise CTCPError(f"TCP data offset {doff} for {len(tcp)} octets")
    return pkt, fields, doff


def _decap(pkt: IPPacket, fields: tuple[int, ...], doff: int) -> Decapsulated:
    sport, dport, seq, ack, _, flags, window = fields
    payload = pkt.payload
    plen = len(payload) - doff
    if plen < MIN_PAYLOAD:
        raise CTCPError("short")
    trailer = parse_trailer(payload[-TRAILER_LEN:])
    proto = trailer.proto
    if proto not in INNER_PROTOS:
        raise CTCPError(f"inner protocol {proto} in trailer")
    body = payload[doff:-TRAILER_LEN]
    ports: tuple[int, int] | None = None
    if proto == PROTO_UDP:
        isport, idport, udp_len = struct.unpack_from("!HHH", body)
        ports = (isport, idport)
        if udp_len < UDP_HEADER_LEN or udp_len > len(body):
            raise CTCPError(f"inner UDP length {udp_len} for {len(body)} octets")
        udp = bytearray(body)
        udp[6:8] = b"\x00\x00"
        if pkt.version == 6:
            csum = l4_checksum(pkt.src, pkt.dst, PROTO_UDP, udp[:udp_len]) or 0xFFFF
            struct.pack_into("!H", udp, 6, csum)
        body = bytes(udp)
    return Decapsulated(
        packet=rebuild_ip(pkt, proto, body),
        proto=proto,
        src=pkt.src,
        dst=pkt.dst,
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        payload_len=plen,
        trailer=trailer,
        inner_ports=ports,
    )


def decapsulate(ip_packet: bytes | memoryview, *, verify_checksum: bool = False) -> Decapsulated:
    """Restore the inner IKE or ESP packet from a cTCP data segment.

    Raises CTCPError for anything that is not a payload-bearing segment with inner protocol
    17 or 50. The TCP checksum is only checked on request: packets captured on the local
    host may still carry a partial (offloaded) checksum.
    """
    pkt, fields, doff = _parse_outer(ip_packet)
    if verify_checksum and not l4_checksum_ok(pkt.src, pkt.dst, PROTO_TCP, pkt.payload):
        raise CTCPError("bad TCP checksum")
    return _decap(pkt, fields, doff)


def read_segment(ip_packet: bytes | memoryview, *, verify_checksum: bool = False) -> Segment:
    """Parse any inbound cTCP segment for the state machine; decapsulates when it carries
    a payload. Raises CTCPError only when it is not a TCP/IP packet at all."""
    pkt, fields, doff = _parse_outer(ip_packet)
    if verify_checksum and not l4_checksum_ok(pkt.src, pkt.dst, PROTO_TCP, pkt.payload):
        raise CTCPError("bad TCP checksum")
    sport, dport, seq, ack, _, flags, _ = fields
    plen = len(pkt.payload) - doff
    decap: Decapsulated | None = None
    error: str | None = None
    if plen:
        try:
            decap = _decap(pkt, fields, doff)
        except CTCPError as exc:
            error = exc.reason
    return Segment(pkt.src, pkt.dst, sport, dport, seq, ack, flags, plen, decap, error)
