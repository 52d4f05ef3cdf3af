"""What one source may hold of a cTCP gateway, and how fast the gateway answers strangers.

A gateway on the internet must be fair between sources: one address, or one network an
attacker controls (an IPv6 /64, a few IPv4 addresses), must not take every slot. And what
the gateway sends to hosts it has no connection with (SYN+ACKs, RSTs for stray segments)
goes to addresses anybody can forge, so it is limited per source network (no network is
sent more than ``rate`` a second) and in total. A total limit alone would let a flood
spend the replies an honest client's SYN needs; per network, a flood from elsewhere leaves
the honest client's network its own share.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def source_prefix(addr: bytes, ipv4_bits: int) -> bytes:
    """The network a source address counts against: the first ``ipv4_bits`` of an IPv4
    address, the /64 of an IPv6 one (the smallest network an IPv6 host is given)."""
    if len(addr) == 16:
        return addr[:8]
    value = int.from_bytes(addr, "big") >> (32 - ipv4_bits) if ipv4_bits else 0
    return bytes([ipv4_bits]) + value.to_bytes(4, "big")


@dataclass(slots=True)
class SourceSlots:
    """Connections held per source address and per source prefix, with their limits."""

    per_address: int
    per_prefix: int
    ipv4_prefix: int = 24
    _by_addr: dict[bytes, int] = field(default_factory=dict)
    _by_prefix: dict[bytes, int] = field(default_factory=dict)

    def refusal(self, addr: bytes) -> str | None:
        """The counter name of the limit ``addr`` is at, or None when it may have one more."""
        if self._by_addr.get(addr, 0) >= self.per_address:
            return "refused-per-address"
        if self._by_prefix.get(source_prefix(addr, self.ipv4_prefix), 0) >= self.per_prefix:
            return "refused-per-prefix"
        return None

    def take(self, addr: bytes) -> None:
        pre = source_prefix(addr, self.ipv4_prefix)
        self._by_addr[addr] = self._by_addr.get(addr, 0) + 1
        self._by_prefix[pre] = self._by_prefix.get(pre, 0) + 1

    def give_back(self, addr: bytes) -> None:
        pre = source_prefix(addr, self.ipv4_prefix)
        for table, key in ((self._by_addr, addr), (self._by_prefix, pre)):
            n = table.get(key, 0) - 1
            if n > 0:
                table[key] = n
            else:
                table.pop(key, None)

    def __len__(self) -> int:
        """Sources holding a slot (the tables never hold a source with none)."""
        return len(self._by_addr)


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
    """A :class:`TokenBucket` per source network, at most ``networks`` of them (the oldest
    go first: a forgotten network starts again with a full burst, which can only favour it),
    and one for all of them together."""

    def __init__(self, rate: float, total: float, ipv4_prefix: int = 24,
                 networks: int = 65536) -> None:  # fmt: skip
        self.rate = rate
        self.ipv4_prefix = ipv4_prefix
        self.networks = networks
        self.total = TokenBucket(total, total)
        self._buckets: dict[bytes, TokenBucket] = {}

    def allow(self, now: float, addr: bytes) -> bool:
        key = source_prefix(addr, self.ipv4_prefix)
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.networks:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[key] = TokenBucket(self.rate, 2 * self.rate)
        return bucket.allow(now) and self.total.allow(now)

    def __len__(self) -> int:
        return len(self._buckets)
