"""What one source may hold of a cTCP gateway, and how fast the gateway answers strangers.

A gateway on the internet must be fair between sources: one source (an address, or the
network it is in: an IPv6 /64, an IPv4 prefix as the operator sets it) must not take every
slot. And what
the gateway sends to hosts it has no connection with (SYN+ACKs, RSTs for stray segments)
goes to addresses anybody can forge, so it is limited per source (none is sent more than
``rate`` a second) and in total. A total limit alone would let a flood spend the replies an
honest client's SYN needs; per source, a flood from elsewhere leaves the honest client its
own share.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def source_prefix(addr: bytes, v4_bits: int = 32, v6_bits: int = 64) -> bytes:
    """The source ``addr`` counts as: its first ``v4_bits`` (IPv4) or ``v6_bits`` (IPv6),
    as the gateway's ``source_prefix_v4`` / ``source_prefix_v6`` say (an IPv6 /64 is one
    subscriber), tagged with the family and length so no two prefixes look alike."""
    bits = v4_bits if len(addr) == 4 else v6_bits
    value = int.from_bytes(addr, "big") >> (len(addr) * 8 - bits) if bits else 0
    return bytes([len(addr), bits]) + value.to_bytes(len(addr), "big")


@dataclass(slots=True)
class SourceSlots:
    """Connections held per source (see :func:`source_prefix`), with their limit."""

    per_source: int
    v4_bits: int = 32
    v6_bits: int = 64
    _held: dict[bytes, int] = field(default_factory=dict)

    def _key(self, addr: bytes) -> bytes:
        return source_prefix(addr, self.v4_bits, self.v6_bits)

    def full(self, addr: bytes) -> bool:
        return self._held.get(self._key(addr), 0) >= self.per_source

    def take(self, addr: bytes) -> None:
        key = self._key(addr)
        self._held[key] = self._held.get(key, 0) + 1

    def give_back(self, addr: bytes) -> None:
        key = self._key(addr)
        n = self._held.get(key, 0) - 1
        if n > 0:
            self._held[key] = n
        else:
            self._held.pop(key, None)

    def __len__(self) -> int:
        """Sources holding a slot (the table never holds a source with none)."""
        return len(self._held)


@dataclass(slots=True)
class TokenBucket:
    """``rate`` events a second, bursts up to ``burst``; the time is an argument."""

    rate: float
    burst: float
    _tokens: float = -1.0
    _at: float = 0.0

    def allow(self, now: float) -> bool:
        if self._tokens < 0:
            self._tokens, self._at = self.burst, now
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class PrefixBuckets:
    """A :class:`TokenBucket` per source, at most ``networks`` of them (the oldest go first:
    a forgotten source starts again with a full burst, which can only favour it), and one
    for all of them together."""

    def __init__(self, rate: float, total: float, v4_bits: int = 32, v6_bits: int = 64,
                 networks: int = 65536) -> None:  # fmt: skip
        self.rate = rate
        self.bits = (v4_bits, v6_bits)
        self.networks = networks
        self.total = TokenBucket(total, total)
        self._buckets: dict[bytes, TokenBucket] = {}

    def allow(self, now: float, addr: bytes) -> bool:
        key = source_prefix(addr, *self.bits)
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.networks:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[key] = TokenBucket(self.rate, 2 * self.rate)
        return bucket.allow(now) and self.total.allow(now)

    def __len__(self) -> int:
        return len(self._buckets)
