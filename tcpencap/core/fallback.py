"""UDP-first with fallback to TCP (``transport = fallback``), pure.

RFC 9329 §5.1: an initiator that knows nothing about the network should try UDP first and
fall back to TCP. The monitor is fed charon's IKE SAs (``list-sas``) with the current time;
when an IKE SA of a fallback connection has been CONNECTING longer than the timeout, its
peers are switched to TCP, and charon's next retransmission of IKE_SA_INIT travels over TCP.
A peer switched to TCP stays there while any SA of the connection lives, and returns to
UDP-first once the connection has none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class FallbackConn:
    name: str
    peers: tuple[str, ...]
    timeout: float
    on_tcp: bool = False
    connecting_since: dict[str, float] = field(default_factory=dict)  # initiator SPI -> time


@dataclass(frozen=True, slots=True)
class Switch:
    """Steer (``tcp`` True) or stop steering the peers of connection ``name``."""

    name: str
    peers: tuple[str, ...]
    tcp: bool


class FallbackMonitor:
    def __init__(self) -> None:
        self.conns: dict[str, FallbackConn] = {}

    def add(self, name: str, peers: Iterable[str], timeout: float) -> None:
        self.conns[name] = FallbackConn(name, tuple(peers), timeout)

    def update(self, now: float, sas: list[dict[str, Any]]) -> list[Switch]:
        """``sas``: list-sas output (one {name: SA} dict per IKE SA, values as str)."""
        seen: dict[str, list[dict[str, Any]]] = {name: [] for name in self.conns}
        for item in sas:
            for name, sa in item.items():
                if name in seen and isinstance(sa, dict):
                    seen[name].append(sa)
        switches: list[Switch] = []
        for name, conn in self.conns.items():
            connecting = {
                spi: sa
                for sa in seen[name]
                if sa.get("state") == "CONNECTING"
                and isinstance(spi := sa.get("initiator-spi", ""), str)
            }
            for spi in list(conn.connecting_since):
                if spi not in connecting:
                    del conn.connecting_since[spi]
            for spi in connecting:
                conn.connecting_since.setdefault(spi, now)
            if not conn.on_tcp:
                if any(now - t >= conn.timeout for t in conn.connecting_since.values()):
                    conn.on_tcp = True
                    switches.append(Switch(name, conn.peers, True))
            elif not seen[name]:
                conn.on_tcp = False
                switches.append(Switch(name, conn.peers, False))
        return switches
