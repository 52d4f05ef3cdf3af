"""Packets per second of the cTCP transform (encapsulate + decapsulate), pure Python.

Not a test: run ``python3 -m bench.bench_ctcp [seconds]`` and compare with the NFQUEUE
rates in lab.md (~200k packets/s for a Python callback that only accepts).
"""

from __future__ import annotations

import struct
import sys
import time

from tcpencap.wire.ctcp import decapsulate, encapsulate
from tcpencap.wire.packet import (
    PROTO_ESP,
    addr_bytes,
    build_ipv4,
    build_ipv6,
    build_udp_packet,
)

V4A, V4B = addr_bytes("198.18.0.1"), addr_bytes("198.18.1.2")
V6A, V6B = addr_bytes("fd00::1"), addr_bytes("fd00:1::2")
# A typical IKE message (IKE_SA_INIT / Main Mode size): 28-octet header plus ~300 octets.
IKE_MSG = bytes(range(1, 9)) + bytes(8) + b"\x21\x20\x22\x08" + bytes(4) + struct.pack("!I", 328)
IKE_MSG += bytes(300)


def _esp(src: bytes, dst: bytes, total: int) -> bytes:
    hdr = 40 if len(src) == 16 else 20
    body = struct.pack("!II", 0xC0FFEE01, 1) + bytes(total - hdr - 8)
    if len(src) == 16:
        return build_ipv6(src, dst, PROTO_ESP, body)
    return build_ipv4(src, dst, PROTO_ESP, body)


CASES = {
    "IKE  IPv4 (356 B)": build_udp_packet(V4A, V4B, 500, 500, IKE_MSG),
    "IKE  IPv6 (376 B)": build_udp_packet(V6A, V6B, 500, 500, IKE_MSG),
    "ESP  IPv4 (1400 B)": _esp(V4A, V4B, 1400),
    "ESP  IPv6 (1400 B)": _esp(V6A, V6B, 1400),
}


def bench(packet: bytes, seconds: float) -> tuple[float, float, float]:
    """Rates (packets/s) of encapsulate, decapsulate and the two together."""
    seg = encapsulate(packet, sport=10000, dport=40000, seq=1, ack=1)

    def rate(fn) -> float:
        n, batch = 0, 2000
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(batch):
                fn()
            n += batch
            now = time.perf_counter()
            if now >= deadline:
                return n / (now - start)

    enc = rate(lambda: encapsulate(packet, sport=10000, dport=40000, seq=1, ack=1))
    dec = rate(lambda: decapsulate(seg))
    both = rate(lambda: decapsulate(encapsulate(packet, sport=10000, dport=40000, seq=1, ack=1)))
    return enc, dec, both


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    print(f"cTCP transform, {seconds:g} s per figure, Python {sys.version.split()[0]}")
    print(f"{'case':<20} {'encap/s':>10} {'decap/s':>10} {'enc+dec/s':>10}")
    for name, pkt in CASES.items():
        enc, dec, both = bench(pkt, seconds)
        print(f"{name:<20} {enc:>10,.0f} {dec:>10,.0f} {both:>10,.0f}")


if __name__ == "__main__":
    main()
