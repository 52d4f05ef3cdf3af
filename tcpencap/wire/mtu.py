"""Packet-size decisions for the cTCP data path, pure (no sockets, no clock).

cTCP turns charon's UDP packet into a TCP segment of the same IP packet: 20 octets of TCP
header plus the 16-octet trailer, so every packet grows by :data:`CTCP_OVERHEAD` (the UDP
header stays inside). A grown packet may no longer fit the outgoing path MTU, and a
header-included raw socket never fragments (it fails with EMSGSIZE). So:

- DF clear (IPv4): fragment the outer packet here (:func:`fragment_ipv4`);
- DF set (IPv4): do not send; tell the local stack with ICMP "fragmentation needed" quoting
  charon's original packet, carrying ``mtu - CTCP_OVERHEAD`` (:func:`icmp_frag_needed`), so
  the kernel caches that path MTU for charon's socket;
- IPv6 (routers never fragment, only the source may): the outer packet is sent as source
  fragments (:func:`fragment_ipv6`), so nothing is lost, and when ``mtu - CTCP_OVERHEAD`` is
  at least 1280 the local stack is told with ICMPv6 "packet too big"
  (:func:`icmpv6_packet_too_big`).

:func:`plan` returns the decision as data; the caller does the I/O and counts it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tcpencap.wire.packet import (
    PacketError,
    build_ipv4,
    build_ipv6,
    checksum,
    l4_checksum,
    parse_ip,
    rebuild_ip,
)

CTCP_TCP_HEADER = 20
CTCP_TRAILER = 16
CTCP_OVERHEAD = CTCP_TCP_HEADER + CTCP_TRAILER  # 36
IPV4_MIN_MTU = 68
IPV6_MIN_MTU = 1280
PROTO_ICMP = 1
PROTO_ICMPV6 = 58
PROTO_FRAGMENT = 44
_IPV4_DF = 0x4000
_IPV4_MF = 0x2000
_ICMP_QUOTE = 576  # RFC 1812: quote as much as fits a 576-octet ICMP packet


def ipv4_df(packet: bytes) -> bool:
    """The Don't Fragment bit of an IPv4 packet."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        raise PacketError("not an IPv4 header")
    return bool(struct.unpack_from("!H", packet, 6)[0] & _IPV4_DF)


def _copied_options(options: bytes) -> bytes:
    """The IPv4 options whose copied flag says they repeat in every fragment."""
    out = bytearray()
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # end of list
            break
        if kind == 1:  # no-op
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            break  # malformed: stop copying rather than guess
        size = options[i + 1]
        if kind & 0x80:
            out += options[i : i + size]
        i += size
    return bytes(out)


def fragment_ipv4(packet: bytes, mtu: int) -> list[bytes]:
    """Split an IPv4 packet into fragments of at most ``mtu`` octets (RFC 791).

    Raises PacketError if DF is set or the MTU cannot carry 8 data octets. A packet that
    already fits is returned unchanged. An input that is itself a fragment keeps its offset
    base and its MF bit on the last piece.
    """
    ip = parse_ip(packet)
    if ip.version != 4:
        raise PacketError("fragment_ipv4 needs IPv4")
    if len(packet) <= mtu:
        return [packet]
    flags_off = struct.unpack_from("!H", ip.header, 6)[0]
    if flags_off & _IPV4_DF:
        raise PacketError("DF set: must not fragment")
    base = (flags_off & 0x1FFF) * 8
    last_mf = flags_off & _IPV4_MF
    first_opts = ip.header[20:]
    later_opts = _copied_options(first_opts)
    frags: list[bytes] = []
    data = ip.payload
    pos = 0
    while pos < len(data):
        opts = first_opts if pos == 0 else later_opts
        hlen = 20 + (len(opts) + 3) // 4 * 4
        room = (mtu - hlen) // 8 * 8
        if room < 8:
            raise PacketError(f"MTU {mtu} too small to fragment")
        chunk = data[pos : pos + room]
        more = pos + len(chunk) < len(data)
        frag = build_ipv4(
            ip.src, ip.dst, ip.proto, chunk, ttl=ip.ttl, ident=ip.ident,
            tos=ip.header[1], options=opts,
        )  # fmt: skip
        field = ((base + pos) // 8) | (_IPV4_MF if more or last_mf else 0)
        frags.append(_set_ipv4_flags(frag, field))
        pos += len(chunk)
    return frags


def _set_ipv4_flags(frag: bytes, flags_off: int) -> bytes:
    hdr = bytearray(frag[: (frag[0] & 0xF) * 4])
    struct.pack_into("!H", hdr, 6, flags_off)
    struct.pack_into("!H", hdr, 10, 0)
    struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
    return bytes(hdr) + frag[len(hdr) :]


def fragment_ipv6(packet: bytes, mtu: int, ident: int) -> list[bytes]:
    """Source-fragment an IPv6 packet (RFC 8200 4.5) into pieces of at most ``mtu`` octets.

    The whole extension-header chain is treated as the unfragmentable part (our segments have
    none); ``ident`` is the Fragment header's identification.
    """
    ip = parse_ip(packet)
    if ip.version != 6:
        raise PacketError("fragment_ipv6 needs IPv6")
    if len(packet) <= mtu:
        return [packet]
    ext = ip.header[40:]
    first = ip.header[6]
    if ext:  # rewrite the last Next Header to 44; the fragment header carries ip.proto
        ext = bytearray(ext)
        ext[ip.nh_offset - 40] = PROTO_FRAGMENT
        ext = bytes(ext)
    else:
        first = PROTO_FRAGMENT
    room = (mtu - 40 - len(ext) - 8) // 8 * 8
    if room < 8:
        raise PacketError(f"MTU {mtu} too small to fragment")
    tclass = ((ip.header[0] & 0xF) << 4) | (ip.header[1] >> 4)
    flow = struct.unpack_from("!I", ip.header, 0)[0] & 0xFFFFF
    frags: list[bytes] = []
    data = ip.payload
    for pos in range(0, len(data), room):
        chunk = data[pos : pos + room]
        more = 1 if pos + len(chunk) < len(data) else 0
        fh = struct.pack("!BBHI", ip.proto, 0, pos | more, ident & 0xFFFFFFFF)
        chain = ext + fh
        frags.append(
            build_ipv6(
                ip.src,
                ip.dst,
                PROTO_FRAGMENT,
                chunk,
                hop_limit=ip.ttl,
                tclass=tclass,
                flow=flow,
                ext=chain,
                ext_first=first,
            )  # fmt: skip
        )
    return frags


def icmp_frag_needed(original: bytes, mtu: int, reporter: bytes | None = None) -> bytes:
    """ICMP type 3 code 4 to ``original``'s source quoting it, next-hop MTU ``mtu``
    (RFC 1191). ``reporter`` is the ICMP source (default: the original destination)."""
    ip = parse_ip(original)
    if ip.version != 4:
        raise PacketError("ICMP fragmentation needed is IPv4")
    mtu = max(IPV4_MIN_MTU, min(mtu, 0xFFFF))
    quote = original[: _ICMP_QUOTE - 20 - 8]
    body = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quote
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return build_ipv4(reporter or ip.dst, ip.src, PROTO_ICMP, body, ttl=64)


def icmpv6_packet_too_big(original: bytes, mtu: int, reporter: bytes | None = None) -> bytes:
    """ICMPv6 type 2 to ``original``'s source quoting as much of it as fits in 1280
    octets (RFC 4443 3.2), MTU ``mtu`` (never below 1280, which IPv6 guarantees)."""
    ip = parse_ip(original)
    if ip.version != 6:
        raise PacketError("ICMPv6 packet too big is IPv6")
    mtu = max(IPV6_MIN_MTU, mtu)
    quote = original[: IPV6_MIN_MTU - 40 - 8]
    src = reporter or ip.dst
    body = struct.pack("!BBHI", 2, 0, 0, mtu) + quote
    csum = l4_checksum(src, ip.src, PROTO_ICMPV6, body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    return build_ipv6(src, ip.src, PROTO_ICMPV6, body, hop_limit=255)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one outbound packet: ``send`` these packets (whole, or fragments),
    and/or ``signal`` this ICMP error to the local stack. ``reason`` names the counter."""

    send: tuple[bytes, ...]
    signal: bytes | None
    reason: str


def inner_limit(path_mtu: int, overhead: int = CTCP_OVERHEAD) -> int:
    """The largest packet charon may send so that its encapsulation fits ``path_mtu``."""
    return path_mtu - overhead


def check_inner(packet: bytes, path_mtu: int, overhead: int = CTCP_OVERHEAD) -> Plan | None:
    """Before encapsulating charon's ``packet``: None if it may go on (it fits, or it may be
    fragmented later), else a Plan that drops it and signals "too big" (IPv4 with DF)."""
    if len(packet) + overhead <= path_mtu:
        return None
    if packet[0] >> 4 == 4 and ipv4_df(packet):
        icmp = icmp_frag_needed(packet, inner_limit(path_mtu, overhead))
        return Plan((), icmp, "too-big-df")
    return None


def ctcp_original(segment: bytes) -> bytes | None:
    """charon's packet inside a cTCP data segment (TCP header and trailer removed, inner
    protocol restored), for quoting in an ICMP error; None for anything else. The IPv4 UDP
    checksum stays zero as cTCP carries it; an ICMP quote needs only the ports."""
    try:
        ip = parse_ip(segment)
    except PacketError:
        return None
    tcp = ip.payload
    if ip.proto != 6 or len(tcp) < 20:
        return None
    body = tcp[(tcp[12] >> 4) * 4 :]
    if len(body) < CTCP_TRAILER + 8:
        return None
    return rebuild_ip(ip, body[-CTCP_TRAILER + 13], body[:-CTCP_TRAILER])


def plan(segment: bytes, path_mtu: int, ident: int = 0, original: bytes | None = None) -> Plan:
    """How to send an encapsulated ``segment`` on a path of ``path_mtu`` octets.

    ``original`` (charon's packet, if known) is quoted in the IPv6 "packet too big" signal,
    which then carries ``path_mtu - (len(segment) - len(original))``.
    """
    if len(segment) <= path_mtu:
        return Plan((segment,), None, "fits")
    quoted = original if original is not None else segment
    limit = path_mtu - (len(segment) - len(quoted))
    if segment[0] >> 4 == 4:
        if ipv4_df(segment):  # DF set and too big: only the sender can fix it
            return Plan((), icmp_frag_needed(quoted, limit), "too-big-df")
        return Plan(tuple(fragment_ipv4(segment, path_mtu)), None, "fragmented")
    frags = tuple(fragment_ipv6(segment, path_mtu, ident))
    if limit < IPV6_MIN_MTU:  # the kernel would clamp it to 1280: nothing to teach
        return Plan(frags, None, "fragmented6")
    return Plan(frags, icmpv6_packet_too_big(quoted, limit), "fragmented6")
