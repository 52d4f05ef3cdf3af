"""SAs of a gateway connection that closed, waiting for their client to come back.

RFC 9329 §6.1: only the TCP originator (the client) re-establishes a lost connection, and
it resumes the same IKE and CHILD SAs on the new one. The gateway cannot tell a returning
client from a new one by its endpoint (a NAT may pick a new port), so the SPIs of a closed
connection wait here under their address pair for ORPHAN_GRACE; the new connection of the
pair whose first message resumes one of them (its ESP, or IKE of one of these IKE SAs)
takes them. An IKE_SA_INIT means a new SA: the orphan is stale.
"""

from __future__ import annotations

from dataclasses import dataclass

ORPHAN_GRACE = 30.0  # how long a closed gateway connection's SAs wait for its client

Pair = tuple[bytes, bytes]  # (local address, peer address)


@dataclass(slots=True)
class Orphan:
    deadline: float
    ike: list[bytes]
    esp: list[int]
    sa_seen: bool

    def resumed_by(self, first_spi: bytes | None) -> bool:
        """A first message resumes these SAs: ESP (no IKE SPI), or IKE of one of them."""
        return first_spi is None or first_spi in self.ike


class Orphans(dict[Pair, Orphan]):
    """The waiting SAs by address pair (a dict, so status and tests read it as one)."""

    def park(self, now: float, pair: Pair, ike: list[bytes], esp: list[int], sa_seen: bool) -> None:
        self[pair] = Orphan(now + ORPHAN_GRACE, ike, esp, sa_seen)

    def claim(self, now: float, pair: Pair, first_spi: bytes | None) -> Orphan | None:
        """The SAs a new connection of ``pair`` resumes with its first message, taken out;
        None when there are none in time, or the message starts something new (then the
        orphan is dropped as stale)."""
        orphan = self.pop(pair, None) if self else None
        if orphan is not None and orphan.deadline >= now and orphan.resumed_by(first_spi):
            return orphan
        return None

    def forget(self, gone: set[bytes]) -> None:
        """charon deleted these IKE SAs: no reconnect will resume them."""
        for pair, orphan in list(self.items()):
            orphan.ike = [spi for spi in orphan.ike if spi not in gone]
            if not orphan.ike:
                del self[pair]

    def expire(self, now: float) -> None:
        for pair in [p for p, o in self.items() if o.deadline < now]:
            del self[pair]
