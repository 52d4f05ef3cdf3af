"""Micro-benchmark (not a test): packets/s of the router's per-packet decisions.

Outbound: a 1400-octet ESP-in-UDP packet from charon to a TCP peer becomes a frame;
inbound: an ESP frame's payload becomes the UDP packet injected to charon. Run it against
an older checkout to see what an optimisation changed: ``python3 -m bench.bench_router``.
"""

from __future__ import annotations

import sys
import time

from tcpencap.core.router import Router
from tcpencap.core.table import ConnectionTable
from tcpencap.wire.packet import addr_bytes, build_udp_packet


def rate(fn, n: int) -> float:
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    for family, local, peer in (
        (4, "198.18.1.2", "198.19.0.2"),
        (6, "fd00:1::2", "fd00:100::2"),
    ):
        lo, pe = addr_bytes(local), addr_bytes(peer)
        router = Router(ConnectionTable(), lambda addr: True)
        view = router.add_client_conn(lo, pe)
        esp = (0x12345678).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"x" * 1392
        packet = build_udp_packet(lo, pe, 4500, 4500, esp)
        out = rate(lambda p=packet, r=router: r.outbound(p), n)
        inb = rate(lambda c=view.conn_id, e=esp, r=router: r.inbound_esp(c, e), n)
        print(f"IPv{family}  outbound ESP {out:>10,.0f} pkt/s   inbound ESP {inb:>10,.0f} pkt/s")


if __name__ == "__main__":
    main()
