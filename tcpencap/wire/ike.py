"""IKE header parsing and classification of what charon puts on UDP 500/4500.

Only the fixed 28-octet ISAKMP/IKEv2 header is read: it is in the clear, and the SPIs
in it are what binds a message to a TCP connection. :func:`classify_outbound` is the one
reading of a packet charon sends to a TCP peer, for both encapsulations.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from tcpencap.wire.packet import PROTO_UDP, IPPacket, PacketError, UDPDatagram, parse_ip, parse_udp

IKE_PORT = 500
NATT_PORT = 4500
IKE_HEADER_LEN = 28
NON_ESP_MARKER = b"\x00\x00\x00\x00"
NAT_KEEPALIVE = b"\xff"

# Exchange types that open a new IKE SA (their responder SPI is zero).
IKEV2_SA_INIT = 34
IKEV1_MAIN_MODE = 2
IKEV1_AGGRESSIVE = 4

FLAG_V2_INITIATOR = 0x08
FLAG_V2_RESPONSE = 0x20


class IKEError(ValueError):
    """Not a well-formed IKE header."""


@dataclass(frozen=True, slots=True)
class IKEHeader:
    """The fixed IKE header; for IKEv1 the SPIs are the initiator and responder cookies."""

    spi_i: bytes
    spi_r: bytes
    next_payload: int
    major: int
    minor: int
    exchange: int
    flags: int
    message_id: int
    length: int

    @property
    def is_sa_init(self) -> bool:
        """The first message of a new IKE SA (responder SPI not yet chosen)."""
        return self.spi_r == bytes(8)

    @property
    def is_response(self) -> bool:
        return self.major == 2 and bool(self.flags & FLAG_V2_RESPONSE)


def parse_ike_header(msg: bytes | memoryview) -> IKEHeader:
    """Parse the 28-octet header; checks the version and that the length fits the message."""
    if len(msg) < IKE_HEADER_LEN:
        raise IKEError(f"IKE message of {len(msg)} octets, header needs {IKE_HEADER_LEN}")
    spi_i, spi_r, np, ver, exch, flags, mid, length = struct.unpack_from("!8s8sBBBBII", msg)
    major, minor = ver >> 4, ver & 0x0F
    if major not in (1, 2):
        raise IKEError(f"IKE major version {major}")
    if spi_i == bytes(8):
        raise IKEError("IKE initiator SPI is zero")
    if length < IKE_HEADER_LEN or length > len(msg):
        raise IKEError(f"IKE length field {length} for a {len(msg)}-octet message")
    return IKEHeader(spi_i, spi_r, np, major, minor, exch, flags, mid, length)


class Kind(enum.Enum):
    IKE = "ike"
    ESP = "esp"
    KEEPALIVE = "keepalive"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class Classified:
    """What a UDP 500/4500 payload is. ``body`` is the IKE message (marker removed) or
    the whole ESP packet; ``spi`` is the ESP SPI, ``ike`` the parsed IKE header."""

    kind: Kind
    body: bytes = b""
    spi: int = 0
    seq: int = 0
    ike: IKEHeader | None = None
    marker: bool = False
    reason: str = ""


def classify_udp_payload(port: int, payload: bytes) -> Classified:
    """Classify by the rules of RFC 3948: on 4500 a zero first word is the non-ESP marker,
    a single 0xFF is a NAT keepalive, anything else is ESP; on other ports it is IKE."""
    if port == NATT_PORT:
        if payload == NAT_KEEPALIVE:
            return Classified(Kind.KEEPALIVE)
        if len(payload) < 4:
            return Classified(Kind.INVALID, reason=f"{len(payload)}-octet payload on 4500")
        if payload[:4] == NON_ESP_MARKER:
            return _ike(payload[4:], marker=True)
        if len(payload) < 8:
            return Classified(Kind.INVALID, reason="ESP shorter than SPI and sequence")
        spi, seq = struct.unpack_from("!II", payload)
        return Classified(Kind.ESP, body=payload, spi=spi, seq=seq)
    return _ike(payload, marker=False)


def _ike(msg: bytes, *, marker: bool) -> Classified:
    try:
        hdr = parse_ike_header(msg)
    except IKEError as exc:
        return Classified(Kind.INVALID, reason=str(exc), marker=marker)
    return Classified(Kind.IKE, body=msg, ike=hdr, marker=marker)


class Refused(enum.Enum):
    """Why a queued outbound packet is not carried; each engine counts it under its own
    (stable) name."""

    NOT_UDP = "not-udp"
    FRAGMENT = "fragment"
    MALFORMED = "malformed"
    KEEPALIVE = "nat-keepalive"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class CharonPacket:
    """A packet charon sent to a TCP peer that is to be carried: IKE or ESP-in-UDP."""

    ip: IPPacket
    udp: UDPDatagram
    what: Classified


def classify_outbound(packet: bytes) -> CharonPacket | Refused:
    """Read a UDP packet charon sent (queued in OUTPUT). OUTPUT sees whole datagrams, so a
    fragment is not charon's, and its first octets are no UDP header; a NAT keepalive is
    never carried over TCP (RFC 9329 6.6; cTCP has keepalives of its own)."""
    try:
        ip = parse_ip(packet)
        if ip.proto != PROTO_UDP:
            return Refused.NOT_UDP
        if ip.fragment:
            return Refused.FRAGMENT
        udp = parse_udp(ip.payload)
    except PacketError:
        return Refused.MALFORMED
    c = classify_udp_payload(udp.sport, udp.payload)
    if c.kind is Kind.KEEPALIVE:
        return Refused.KEEPALIVE
    if c.kind is Kind.INVALID:
        return Refused.INVALID
    return CharonPacket(ip, udp, c)


def classify_frame_payload(payload: bytes) -> Classified:
    """Classify the content of an RFC 9329 frame: marker + IKE, or ESP (non-zero SPI)."""
    return classify_udp_payload(NATT_PORT, payload)


# Exchange types a first message may carry. IKEv2 (RFC 7296 §3.1; IKE_SESSION_RESUME
# RFC 5723, IKE_INTERMEDIATE RFC 9242, IKE_FOLLOWUP_KE RFC 9370); IKEv1 (RFC 2408 §3.1,
# Quick Mode and New Group RFC 2409, Transaction = Mode Config / XAuth).
IKEV2_EXCHANGES = frozenset({34, 35, 36, 37, 38, 43, 44})
IKEV1_EXCHANGES = frozenset({1, 2, 3, 4, 5, 6, 32, 33})


# Payloads that are encrypted and end the chain a reader can follow: IKEv2 SK and SKF
# (RFC 7296 §3.14, RFC 7383); what they contain needs the SA's keys.
IKEV2_ENCRYPTED = frozenset({46, 53})
IKEV1_FLAG_ENCRYPTED = 0x01
MAX_CHAIN = 64  # payloads followed; a real first message has far fewer


def check_first_ike(msg: bytes) -> str:
    """Why ``msg`` (a whole frame's IKE message) is not a well-formed IKE message, or ""
    when it is: a valid header whose length field is the frame's length, a known exchange
    type for its version, and a payload chain that is there: each generic payload header
    (next payload, flags, length) inside the message and the last one ending exactly at
    its end, up to an encrypted payload (or IKEv1's encrypted body), which must fill the
    rest. A header whose first payload is missing would otherwise hold a connection for
    the no-SA deadline instead of the first-message one. A connection's first frame must
    pass this."""
    try:
        hdr = parse_ike_header(msg)
    except IKEError as exc:
        return str(exc)
    if hdr.length != len(msg):
        return f"IKE length field {hdr.length} in a {len(msg)}-octet frame"
    known = IKEV2_EXCHANGES if hdr.major == 2 else IKEV1_EXCHANGES
    if hdr.exchange not in known:
        return f"IKEv{hdr.major} exchange type {hdr.exchange}"
    return _chain_problem(msg, hdr)


def _chain_problem(msg: bytes, hdr: IKEHeader) -> str:
    """What is wrong with the payload chain after the header, or ""."""
    nxt = hdr.next_payload
    if nxt == 0:
        return "IKE message without payloads"
    end = len(msg)
    if hdr.major == 1 and hdr.flags & IKEV1_FLAG_ENCRYPTED:
        # IKEv1's encrypted body has no generic header in the clear; a cipher block at least
        return "" if end - IKE_HEADER_LEN >= 8 else "IKEv1 encrypted body shorter than a block"
    pos = IKE_HEADER_LEN
    for _ in range(MAX_CHAIN):
        if end - pos < 4:
            return f"payload {nxt} promised at octet {pos}, {end - pos} octets left"
        length = (msg[pos + 2] << 8) | msg[pos + 3]
        if length < 4 or length > end - pos:
            return f"payload {nxt} at octet {pos} has length {length}, {end - pos} left"
        if hdr.major == 2 and nxt in IKEV2_ENCRYPTED:
            if length != end - pos:
                return f"encrypted payload at octet {pos} does not end the message"
            return ""
        nxt = msg[pos]
        pos += length
        if nxt == 0:
            return "" if pos == end else f"{end - pos} octets after the last payload"
    return ""
