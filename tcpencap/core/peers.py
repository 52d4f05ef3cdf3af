"""Which peers' UDP is queued to tcpencap, and why: one bookkeeping for both engines.

A target is a whole peer address (``bytes``: a client's configured peer, a cTCP peer) or
one UDP endpoint (``(address, port)``: an RFC 9329 gateway's TCP peer, so a plain-UDP
client behind the same address keeps its UDP). It is steered while it has at least one
reason: a configured client connection (``tcp:NAME``), a fallback connection that switched
to TCP (``fallback:NAME``), a live gateway connection (``conn:ID``), a gateway endpoint that
charon may still talk to after its connection closed (``linger``), or one whose connection
never carried an SA and stays a moment for replies in flight (``brief``). Adding before
removing means a change of reason never leaves a gap in which charon's IKE could leave as
UDP.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class SteeringRefs(Generic[T]):
    def __init__(self) -> None:
        self._reasons: dict[T, set[str]] = {}

    def add(self, peer: T, reason: str) -> bool:
        """Record ``reason``; True when ``peer`` was not steered before."""
        reasons = self._reasons.get(peer)
        if reasons is None:
            self._reasons[peer] = {reason}
            return True
        reasons.add(reason)
        return False

    def remove(self, peer: T, reason: str) -> bool:
        """Drop ``reason``; True when ``peer`` has no reason left (stop steering it)."""
        reasons = self._reasons.get(peer)
        if reasons is None or reason not in reasons:
            return False
        reasons.discard(reason)
        if reasons:
            return False
        del self._reasons[peer]
        return True

    def has(self, peer: T, reason: str) -> bool:
        return reason in self._reasons.get(peer, ())

    def reasons(self, peer: T) -> frozenset[str]:
        return frozenset(self._reasons.get(peer, ()))

    def __contains__(self, peer: object) -> bool:
        return peer in self._reasons

    def __len__(self) -> int:
        return len(self._reasons)

    def peers(self) -> list[T]:
        return list(self._reasons)
