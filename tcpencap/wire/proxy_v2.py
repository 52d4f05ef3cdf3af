"""PROXY protocol version 2 (HAProxy's specification, section 2.2): the binary header a
TCP load balancer sends before the client's bytes, naming the client's address and port.

Only the fixed part and the address block are read; TLVs are skipped. The text form of
version 1 is recognised only so that it can be refused with a clear reason.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED = 16  # signature, version/command, family/transport, length
MAX_LENGTH = 1024  # address block and TLVs; HAProxy's own TLVs are far smaller
V1_PREFIX = b"PROXY "

CMD_LOCAL = 0  # the proxy's own connection (a health check): no client address
CMD_PROXY = 1
_FAMILIES = {0x11: (4, 12), 0x21: (16, 36)}  # INET/INET6 over STREAM: address size, block


class ProxyHeaderError(ValueError):
    """A header that is not PROXY v2 or cannot be used; ``reason`` is a short key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """``local``: a LOCAL command (no addresses: the proxy speaks for itself)."""

    length: int  # octets of the whole header, to skip in the stream
    local: bool
    source: str = ""
    source_port: int = 0
    destination: str = ""
    destination_port: int = 0


def starts_like_header(data: bytes) -> bool:
    """Could ``data`` be (the start of) a PROXY header of either version?"""
    n = min(len(data), len(SIGNATURE))
    if n and data[:n] == SIGNATURE[:n]:
        return True
    m = min(len(data), len(V1_PREFIX))
    return bool(m) and data[:m] == V1_PREFIX[:m]


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while it is incomplete. Raises
    ProxyHeaderError for anything that is not a usable version 2 header."""
    n = min(len(data), len(SIGNATURE))
    if data[:n] != SIGNATURE[:n]:
        m = min(len(data), len(V1_PREFIX))
        if m and data[:m] == V1_PREFIX[:m]:
            if m < len(V1_PREFIX):
                return None
            raise ProxyHeaderError("proxy-v1", "PROXY protocol version 1 (text) is not accepted")
        raise ProxyHeaderError("proxy-missing", "no PROXY protocol v2 header")
    if len(data) < FIXED:
        return None
    ver_cmd, fam, length = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("proxy-malformed", f"PROXY header version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (CMD_LOCAL, CMD_PROXY):
        raise ProxyHeaderError("proxy-malformed", f"PROXY header command {command}")
    if length > MAX_LENGTH:
        raise ProxyHeaderError("proxy-malformed", f"PROXY header of {length} octets")
    if len(data) < FIXED + length:
        return None
    total = FIXED + length
    if command == CMD_LOCAL:
        return ProxyHeader(total, True)
    shape = _FAMILIES.get(fam)
    if shape is None:
        raise ProxyHeaderError("proxy-malformed", f"PROXY header family/transport {fam:#04x}")
    size, block = shape
    if length < block:
        raise ProxyHeaderError(
            "proxy-malformed", f"PROXY address block of {length} octets, need {block}"
        )
    a = FIXED
    src = _unmapped(ipaddress.ip_address(data[a : a + size]))
    dst = _unmapped(ipaddress.ip_address(data[a + size : a + 2 * size]))
    if src.version != dst.version:
        raise ProxyHeaderError("proxy-malformed", "PROXY header mixes IPv4 and IPv6 addresses")
    sport, dport = struct.unpack_from("!HH", data, a + 2 * size)
    if sport == 0:
        raise ProxyHeaderError("proxy-malformed", "PROXY header with source port 0")
    return ProxyHeader(total, False, str(src), sport, str(dst), dport)


def _unmapped(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A dual-stack proxy names IPv4 clients as ::ffff:a.b.c.d: they are IPv4 clients."""
    mapped = getattr(addr, "ipv4_mapped", None)
    return mapped if mapped is not None else addr


def build(source: str, source_port: int, destination: str, destination_port: int) -> bytes:
    """A PROXY command header (for tests and tools that play the proxy)."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if not (0 <= source_port <= 65535 and 0 <= destination_port <= 65535):
        raise ValueError("ports must be 0..65535")
    if src.version != dst.version:
        raise ValueError("source and destination of different families")
    fam = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source_port, destination_port)
    return SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(block)) + block


def build_local() -> bytes:
    """A LOCAL command header, as a proxy's health check sends it."""
    return SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])
