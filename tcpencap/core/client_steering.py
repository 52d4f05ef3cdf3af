"""Which peers this host reaches as an RFC 9329 client, and why: the steering reasons of
configured TCP connections (``tcp:<name>``) and of UDP-first connections that fell back
(``fallback:<name>``), from reload plans and the fallback monitor.

A peer is steered (charon's UDP to it queued for the engine) while any reason holds it;
each reason steers exactly the peers it names, new ones before old ones stop, so a reload
never lets a packet leave as plain UDP in between.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from tcpencap.core.fallback import FallbackMonitor
from tcpencap.core.outputs import Output, Steer
from tcpencap.core.peers import SteeringRefs
from tcpencap.core.reload import Operation, SteerTcp, UnsteerTcp, UnwatchFallback, WatchFallback
from tcpencap.wire.packet import addr_text

log = logging.getLogger("tcpencap")
DEFAULT_PORT = 4500


class ClientSteering:
    def __init__(self, emit: Callable[[Output], None]) -> None:
        self.steering: SteeringRefs[bytes] = SteeringRefs()  # whole addresses
        self.client_peers: dict[bytes, int] = {}  # steered client peer -> TCP port
        self.peer_ports: dict[bytes, int] = {}  # every configured peer -> TCP port
        self.fallback = FallbackMonitor()
        self._emit = emit

    def is_client_peer(self, addr: bytes) -> bool:
        return addr in self.client_peers

    def port_of(self, peer: bytes) -> int:
        return self.peer_ports.get(peer, DEFAULT_PORT)

    def apply(self, ops: list[Operation]) -> None:
        """The steering part of a reload plan (tcpencap.core.reload.plan)."""
        for op in ops:
            if isinstance(op, SteerTcp):
                self.set_reason(f"tcp:{op.name}", op.peers, op.port)
            elif isinstance(op, UnsteerTcp):
                self.set_reason(f"tcp:{op.name}", (), 0)
            elif isinstance(op, WatchFallback):
                old = self.fallback.conns.get(op.name)
                self.fallback.add(op.name, [addr_text(p) for p in op.peers], op.timeout)
                for p in op.peers:
                    self.peer_ports[p] = op.port
                if old is not None and old.on_tcp:
                    # Already on TCP: it stays there (with its new peers) while its SAs
                    # live, as if it had just fallen back; the poll brings it back to UDP.
                    self.fallback.conns[op.name].on_tcp = True
                    self.set_reason(f"fallback:{op.name}", op.peers, op.port)
            elif isinstance(op, UnwatchFallback):
                self.fallback.conns.pop(op.name, None)
                self.set_reason(f"fallback:{op.name}", (), 0)

    def set_reason(self, reason: str, peers: tuple[bytes, ...], port: int) -> None:
        """Steer exactly ``peers`` for ``reason``: new ones first, then the others stop."""
        for p in peers:
            if port:
                self.peer_ports[p] = port
            self.client_peers[p] = self.port_of(p)
            if self.steering.add(p, reason):
                self._emit(Steer(p, True))
        for p in [p for p in self.steering.peers() if p not in peers]:
            if self.steering.has(p, reason) and self.steering.remove(p, reason):
                self._emit(Steer(p, False))
        for p in list(self.client_peers):
            if not any(r.startswith(("tcp:", "fallback:")) for r in self.steering.reasons(p)):
                del self.client_peers[p]

    def fallback_update(self, now: float, sas: list[dict[str, Any]]) -> None:
        """charon's SAs (list-sas): UDP-first connections fall back to TCP or return."""
        for sw in self.fallback.update(now, sas):
            peers = tuple(ipaddress.ip_address(p).packed for p in sw.peers)
            if sw.tcp:
                log.warning(
                    "connection %s: no answer over UDP, falling back to TCP for %s",
                    sw.name,
                    ", ".join(sw.peers),
                )
                self.set_reason(f"fallback:{sw.name}", peers, 0)
            else:
                log.info("connection %s: no SA left, back to UDP first", sw.name)
                self.set_reason(f"fallback:{sw.name}", (), 0)
