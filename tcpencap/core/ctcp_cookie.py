"""Stateless cTCP handshakes: the gateway's ISN is a keyed hash, so a SYN creates no state.

A spoofed SYN flood must not fill the connection table (DESIGN.md: a spoofed packet creates
no state), and the host's own SYN cookies never see these segments (they are queued before
the TCP stack). So the gateway answers a SYN with a SYN+ACK whose ISN is a keyed BLAKE2s of
the 4-tuple and a time slot, and keeps nothing; the connection is made from the ACK that
acknowledges ISN+1, which only a host that received the SYN+ACK can send.

A cookie is good for the slot it was made in and the next one, so between ``lifetime`` and
twice that, like the SYN_RCVD deadline it replaces. cTCP sends no options, so nothing else
(MSS, window scale) needs to be carried in the cookie.
"""

from __future__ import annotations

import hashlib
import math
import secrets


class SynCookies:
    """Makes and checks the ISN of the gateway's SYN+ACK."""

    def __init__(self, secret: bytes | None = None, lifetime: float = 3.0) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.lifetime = lifetime

    def _slot(self, now: float) -> int:
        return math.floor(now / self.lifetime)

    def _isn(self, slot: int, local: bytes, lport: int, peer: bytes, pport: int) -> int:
        h = hashlib.blake2s(key=self._secret, digest_size=4)
        h.update(slot.to_bytes(8, "big", signed=True))
        h.update(local + lport.to_bytes(2, "big") + peer + pport.to_bytes(2, "big"))
        return int.from_bytes(h.digest(), "big")

    def make(self, now: float, local: bytes, lport: int, peer: bytes, pport: int) -> int:
        return self._isn(self._slot(now), local, lport, peer, pport)

    def check(self, now: float, local: bytes, lport: int, peer: bytes, pport: int,
              isn: int) -> bool:  # fmt: skip
        """Whether ``isn`` is a cookie made for this 4-tuple in this slot or the last."""
        slot = self._slot(now)
        return any(self._isn(s, local, lport, peer, pport) == isn for s in (slot, slot - 1))
