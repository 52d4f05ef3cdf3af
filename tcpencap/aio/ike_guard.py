"""The shell of tcpencap.core.ike_guard: on a TCP client, charon's IKE to addresses that are
not steered is queued (nfq/rules.py, the rules after the steering one) and each packet gets
its verdict here. The SPIs of TCP peers' SAs come from charon (list-sas, refreshed on VICI
events) and from the engines' tables (what the wire taught them)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

from nfq.classify import VerdictQueue

from tcpencap.core.ike_guard import must_drop, tcp_ike_spis
from tcpencap.wire.packet import PacketError, addr_text, parse_ip

log = logging.getLogger("tcpencap")

REFRESH_ON = ("ike-updown", "ike-rekey", "ike-update")


class GuardHost(Protocol):
    """What the guard reads of the daemon (named here: no import of the composition root)."""

    config: Any
    rules: Any
    engine: Any
    ctcp: Any

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    async def _list_sas(self, purpose: str) -> list[dict[str, Any]] | None: ...

    def log_limited(self, key: str, fmt: str, *args: object) -> None: ...


class IkeGuard:
    def __init__(self, daemon: GuardHost) -> None:
        self.d = daemon
        self.queue: VerdictQueue | None = None
        self.tcp_ike: set[bytes] = set()  # initiator SPIs of charon's SAs with TCP peers

    def wanted(self) -> bool:
        """While any client connection may use TCP; nothing is queued otherwise."""
        return any(c.transport != "udp" for c in self.d.config.connections.values())

    @property
    def queue_num(self) -> int:
        return int(self.d.config.ike_guard_queue)

    def update(self, loop: asyncio.AbstractEventLoop) -> None:
        """At start and after a reload: check, or stop checking."""
        if self.wanted() and self.queue is None:
            self.queue = VerdictQueue(self.queue_num, self.may_leave)
            self.queue.start(loop)
            self.d.rules.set_classify(self.queue_num)
            self.d._spawn(self.learn())
        elif not self.wanted() and self.queue is not None:
            self.d.rules.set_classify(None)
            self.stop()

    def stop(self) -> None:
        if self.queue is not None:
            self.queue.stop()
            self.queue = None

    def vici_event(self, label: str) -> None:
        if self.queue is not None and label in REFRESH_ON:
            self.d._spawn(self.learn())

    def vici_resync(self, sas: list[dict[str, Any]]) -> None:
        if self.queue is not None:
            self.tcp_ike = tcp_ike_spis(sas, self.tcp_peers())

    async def learn(self) -> None:
        sas = await self.d._list_sas("tcp-sas")
        if sas is not None:
            self.tcp_ike = tcp_ike_spis(sas, self.tcp_peers())

    def tcp_peers(self) -> set[bytes]:
        peers = set(self.d.engine.steering.peers())
        ctcp = self.d.ctcp
        if ctcp is not None:
            peers.update(ctcp.peers)
            peers.update(ctcp.lingering)
        return peers

    def is_tcp_sa(self, spi_i: bytes) -> bool:
        if spi_i in self.tcp_ike or self.d.engine.table.find_ike_spi(spi_i) is not None:
            return True
        ctcp = self.d.ctcp.engine if self.d.ctcp is not None else None
        return ctcp is not None and ctcp.table.find_ike_spi(spi_i) is not None

    def may_leave(self, packet: bytes) -> bool:
        """The verdict: False (drop) for IKE of a TCP peer's SA."""
        if not must_drop(packet, self.is_tcp_sa):
            return True
        self.d.engine.shell_dropped(0, "ike-off-tcp")
        self.d.log_limited(
            "ike-off-tcp",
            "dropped IKE of a TCP peer's SA to %s, which is not steered (MOBIKE?): "
            "it must not leave as UDP",
            packet_dst(packet),
        )
        return False


def packet_dst(packet: bytes) -> str:
    """The destination of an IP packet, for a log line."""
    try:
        return addr_text(parse_ip(packet).dst)
    except PacketError:
        return "?"
