"""The gateway's admission rules: how many connections it takes, from one source prefix,
without a first message yet, and which sources cool down after a flood.

A host rule of the RFC 9329 engine (the gateway is on the internet: every accepted
connection costs a socket, a first-message deadline and charon's IKE_SA_INIT work). It
counts; the engine asks before it accepts and tells it when a connection's first message
arrives or the connection goes. The limits are read from the ``gateway`` section passed in,
so a reload's new values hold at once.
"""

from __future__ import annotations

import ipaddress
from typing import Any

# A source whose connection was cut for flooding (frame rate, invalid frames) is refused new
# connections this long, so a flood is not simply resumed at once on a new connection (each
# costs an accept, charon's IKE_SA_INIT work, steering); at most COOL_DOWN_MAX sources kept.
COOL_DOWN = 2.0
COOL_DOWN_MAX = 4096

Refusal = tuple[str, str]  # (event key of the rate-limited log, what to log)


class Admission:
    def __init__(self) -> None:
        self.n_gateway = 0  # admitted gateway connections
        self.n_pending = 0  # ... without a first message yet
        self.n_proxied = 0  # connections of a proxy whose PROXY header has not arrived
        self.per_source: dict[str, int] = {}  # source prefix -> admitted connections
        self.pending_per_source: dict[str, int] = {}  # ... of them without a first message
        self.cooling: dict[str, float] = {}  # source prefix cut for a flood -> refused until

    @staticmethod
    def source_of(gw: Any, peer: str) -> str:
        """The source prefix ``peer`` counts under (source_prefix_v4 / _v6)."""
        addr = ipaddress.ip_address(peer)
        bits = gw.source_prefix_v4 if addr.version == 4 else gw.source_prefix_v6
        return str(ipaddress.ip_network((addr, bits), strict=False))

    def refusal(self, gw: Any, connections: int, source: str | None) -> Refusal | None:
        """The gateway limit a new connection would break (the per-source ones only for a
        known ``source`` prefix), or None."""
        pending = self.n_pending + self.n_proxied
        if connections >= gw.max_connections:
            return ("limit-connections", f"{connections} connections")
        if source is not None:
            if self.per_source.get(source, 0) >= gw.max_per_source:
                return ("limit-per-source", f"{self.per_source[source]} connections from {source}")
            waiting = self.pending_per_source.get(source, 0)
            if waiting >= gw.max_pending_per_source:
                return (
                    "limit-pending-per-source",
                    f"{waiting} connections from {source} without a first message",
                )
        if pending >= gw.max_pending:
            return ("limit-pending", f"{pending} connections without a first message")
        return None

    def refuse_accept(self, gw: Any, now: float, source: str) -> Refusal | None:
        """Why a connection from ``source`` is refused now (a limit, or its cool-down)."""
        refusal = self.refusal(gw, self.n_gateway, source)
        if refusal is None and self.cooling.get(source, 0.0) > now:
            refusal = ("limit-cool-down", f"{source} flooded a connection, cooling down")
        return refusal

    def admit(self, source: str) -> None:
        """An accepted connection: counted, and waiting for its first message."""
        self.n_gateway += 1
        self.n_pending += 1
        self.per_source[source] = self.per_source.get(source, 0) + 1
        self.pending_per_source[source] = self.pending_per_source.get(source, 0) + 1

    def first_message(self, source: str) -> None:
        """A counted connection no longer waits for its first message."""
        self.n_pending -= 1
        _decrement(self.pending_per_source, source)

    def gone(self, source: str, waiting: bool) -> None:
        """A counted connection closed (``waiting``: before its first message)."""
        self.n_gateway -= 1
        if waiting:
            self.first_message(source)
        _decrement(self.per_source, source)

    def admit_proxied(self, gw: Any) -> Refusal | None:
        """A load balancer's connection, before its PROXY header names the client: it
        takes a pending slot, and the per-source limit applies to the client later."""
        refusal = self.refusal(gw, self.n_gateway + self.n_proxied, None)
        if refusal is None:
            self.n_proxied += 1
        return refusal

    def proxied_done(self) -> None:
        """The PROXY header arrived (``accept`` follows) or the connection went."""
        self.n_proxied -= 1

    def cool_down(self, now: float, source: str) -> None:
        """Refuse ``source`` for COOL_DOWN: a connection of it was cut for flooding."""
        if not source:
            return
        self.cooling.pop(source, None)
        self.cooling[source] = now + COOL_DOWN
        while len(self.cooling) > COOL_DOWN_MAX:
            del self.cooling[next(iter(self.cooling))]

    def expire(self, now: float) -> None:
        for source in [s for s, until in self.cooling.items() if until <= now]:
            del self.cooling[source]


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 1) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
