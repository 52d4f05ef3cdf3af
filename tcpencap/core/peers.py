"""Which peers' UDP is queued to tcpencap, and why: one bookkeeping for both engines.

A peer is steered while it has at least one reason: a configured client connection
(``tcp:NAME``), a fallback connection that switched to TCP (``fallback:NAME``), a live
gateway connection (``conn:ID``) or a gateway peer that charon may still talk to after its
connection closed (``linger``). Adding before removing means a change of reason never
leaves a gap in which charon's IKE could leave as UDP.
"""

from __future__ import annotations


class SteeringRefs:
    def __init__(self) -> None:
        self._reasons: dict[bytes, set[str]] = {}

    def add(self, peer: bytes, reason: str) -> bool:
        """Record ``reason``; True when ``peer`` was not steered before."""
        reasons = self._reasons.get(peer)
        if reasons is None:
            self._reasons[peer] = {reason}
            return True
        reasons.add(reason)
        return False

    def remove(self, peer: bytes, reason: str) -> bool:
        """Drop ``reason``; True when ``peer`` has no reason left (stop steering it)."""
        reasons = self._reasons.get(peer)
        if reasons is None or reason not in reasons:
            return False
        reasons.discard(reason)
        if reasons:
            return False
        del self._reasons[peer]
        return True

    def has(self, peer: bytes, reason: str) -> bool:
        return reason in self._reasons.get(peer, ())

    def reasons(self, peer: bytes) -> frozenset[str]:
        return frozenset(self._reasons.get(peer, ()))

    def __contains__(self, peer: object) -> bool:
        return peer in self._reasons

    def __len__(self) -> int:
        return len(self._reasons)

    def peers(self) -> list[bytes]:
        return list(self._reasons)
