"""Packet size on cTCP paths: what the cTCP engine knows of each peer's path MTU, and what
it does about a packet that will not fit (tcpencap/wire/mtu.py builds, docs/mtu.md explains).

A header-included raw socket never fragments, and cTCP adds 36 octets to charon's packet,
so the engine decides before anything is sent:
- charon's IPv4 packet with DF that will not fit once encapsulated is answered with ICMP
  "fragmentation needed" (path MTU minus the overhead) instead of being carried;
- a segment larger than the path is fragmented (IPv4 without DF, IPv6 at the source), and
  an IPv6 one also teaches charon the smaller MTU ("packet too big", at most once a second
  per destination).
The route's MTU itself is the shell's to read (``lookup``: a socket option, I/O); this
module caches it for :data:`CACHE_SECONDS`, bounded in entries since a stranger chooses the
addresses. Our own ICMP makes the kernel keep a smaller PMTU for the peer, shared by
charon's socket and ours: the path MTU of a destination stays the route's, not that one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

from tcpencap.core.outputs import count
from tcpencap.wire.mtu import CTCP_OVERHEAD, check_inner, ctcp_original, plan
from tcpencap.wire.packet import PacketError

CACHE_SECONDS = 10.0
CACHE_ENTRIES = 4096  # destinations whose path MTU is remembered; oldest go first
SIGNAL_INTERVAL = 1.0  # an ICMP "too big" for queued segments, per destination

K = TypeVar("K")


def bounded_put(cache: dict[K, Any], key: K, value: Any, entries: int) -> None:
    """Insert as the newest, first evicting the oldest insertions while the dict is full: a
    cache keyed by addresses a stranger can choose must not grow with them."""
    cache.pop(key, None)
    while len(cache) >= entries:
        del cache[next(iter(cache))]
    cache[key] = value


class PathMtus:
    """Path MTUs towards cTCP peers and the sizing decisions that follow from them.
    ``counters`` is the engine's (the names are metric labels)."""

    def __init__(
        self,
        lookup: Callable[[bytes], int],
        counters: dict[str, int],
        *,
        ttl: float = CACHE_SECONDS,
        entries: int = CACHE_ENTRIES,
    ) -> None:
        self.lookup = lookup
        self.counters = counters
        self.ttl = ttl
        self.entries = entries
        self._routes: dict[bytes, tuple[float, int]] = {}  # dst -> (valid until, route MTU)
        # dst -> (the MTU we told the local stack, the path MTU it was derived from)
        self._told: dict[bytes, tuple[int, int]] = {}
        self._signalled: dict[bytes, float] = {}  # dst -> when its last ICMP was queued
        self._frag_ident = random.getrandbits(32)  # IPv6 fragment identification

    def __len__(self) -> int:
        return len(self._routes)

    def route_mtu(self, dst: bytes, now: float) -> int:
        hit = self._routes.get(dst)
        if hit is not None and hit[0] > now:
            return hit[1]
        mtu = self.lookup(dst)
        bounded_put(self._routes, dst, (now + self.ttl, mtu), self.entries)
        return mtu

    def forget(self, dst: bytes) -> None:
        """The route changed under the cache (the kernel refused a send): look again."""
        self._routes.pop(dst, None)

    def path_mtu(self, dst: bytes, now: float) -> int:
        """The route's MTU to ``dst``, not the smaller PMTU exception our own ICMP created
        (someone else lowering it is believed)."""
        mtu = self.route_mtu(dst, now)
        told = self._told.get(dst)
        return told[1] if told is not None and mtu == told[0] else mtu

    def too_big(self, now: float, packet: bytes) -> tuple[bytes, bytes] | None:
        """charon's ``packet`` before it is carried: (ICMP "fragmentation needed", the local
        address to hand it to) when it is IPv4 with DF and will not fit, else None."""
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return None
        dst = packet[16:20]
        base = self.path_mtu(dst, now)
        try:
            decision = check_inner(packet, base)
        except PacketError:
            return None
        if decision is None or decision.signal is None:
            return None
        count(self.counters, "too-big-df")
        self._tell(dst, base)
        count(self.counters, "icmp-frag-needed-sent")
        return decision.signal, packet[12:16]

    def size(
        self, now: float, segment: bytes, dst: bytes
    ) -> tuple[tuple[bytes, ...], tuple[bytes, bytes] | None]:
        """What to put on the wire for ``segment`` (itself, its fragments, or nothing: IPv4
        with DF), and (ICMP, local address) for the local stack (None: nothing to tell, or
        told within the last second)."""
        base = self.path_mtu(dst, now)
        if len(segment) <= base:
            return (segment,), None
        self._frag_ident = (self._frag_ident + 1) & 0xFFFFFFFF
        decision = plan(segment, base, self._frag_ident, ctcp_original(segment))
        count(self.counters, decision.reason)
        if decision.signal is None:
            return decision.send, None
        if now - self._signalled.get(dst, -10.0) < SIGNAL_INTERVAL:
            count(self.counters, "icmp-suppressed")
            return decision.send, None
        bounded_put(self._signalled, dst, now, self.entries)
        self._tell(dst, base)
        count(self.counters, "icmp-too-big-sent")
        local = segment[12:16] if segment[0] >> 4 == 4 else segment[8:24]
        return decision.send, (decision.signal, local)

    def _tell(self, dst: bytes, base: int) -> None:
        bounded_put(self._told, dst, (base - CTCP_OVERHEAD, base), self.entries)
