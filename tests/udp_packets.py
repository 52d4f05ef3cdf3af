"""Charon's UDP packets of a given size, and their reassembly, for the packet-size tests of
the wire layer (tests/wire/test_mtu.py) and of the cTCP shell (tests/aio/test_ctcp_service.py)."""

from __future__ import annotations

from scapy.layers.inet import IP

from tcpencap.wire.packet import build_ipv4, build_udp_packet

SRC4, DST4 = bytes([198, 18, 1, 2]), bytes([198, 19, 0, 2])
SRC6 = bytes.fromhex("fd000001000000000000000000000002")
DST6 = bytes.fromhex("fd000100000000000000000000000002")


def udp4(size: int, df: bool, ident: int = 0x1234) -> bytes:
    """A UDP 4500 -> 4500 IPv4 packet of exactly ``size`` octets."""
    body = bytes(range(256)) * (size // 256 + 1)
    pkt = build_udp_packet(SRC4, DST4, 4500, 4500, body[: size - 28])
    return build_ipv4(SRC4, DST4, 17, pkt[20:], ident=ident, df=df)


def reassemble4(frags: list[bytes]) -> bytes:
    """Reassemble with our own reading of the RFC 791 fields (checked by scapy below)."""
    ident = {IP(f).id for f in frags}
    assert len(ident) == 1
    data = bytearray()
    for f in sorted(frags, key=lambda f: IP(f).frag):
        p = IP(f)
        assert p.frag * 8 == len(data)
        data += bytes(p.payload)
    return bytes(data)
