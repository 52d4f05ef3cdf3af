"""Local TCP port choice for client connections: fixed, or random in a range.

Pure: the caller supplies the random source and says which ports are in use (the ones
tcpencap holds itself); the kernel's own view is checked by the bind that follows, and a
failed bind is reported back with :meth:`PortAllocator.release` plus a new :meth:`allocate`.
"""

from __future__ import annotations

import random


class PortsExhausted(RuntimeError):
    """No free port in the range."""


class PortAllocator:
    def __init__(
        self,
        fixed: int = 0,
        low: int = 32768,
        high: int = 60999,
        rng: random.Random | None = None,
    ) -> None:
        if fixed and not 1 <= fixed <= 65535:
            raise ValueError(f"port {fixed} out of range")
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {low}-{high}")
        self.fixed = fixed
        self.low = low
        self.high = high
        self._rng = rng or random.SystemRandom()
        self._used: set[int] = set()

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._used)

    def allocate(self, exclude: frozenset[int] | set[int] = frozenset()) -> int:
        """A port not held by this allocator nor in ``exclude`` (e.g. ports the kernel refused).

        A fixed port is shared by every connection (each has a different peer), so it is
        returned as is; random ports are unique among live connections.
        """
        if self.fixed:
            if self.fixed in exclude:
                raise PortsExhausted(f"fixed port {self.fixed} is not available")
            return self.fixed
        size = self.high - self.low + 1
        # Random probes first (cheap while the range is mostly free), then a full sweep
        # from a random start so an almost-full range still finds its last free port.
        for _ in range(min(32, size)):
            port = self._rng.randint(self.low, self.high)
            if port not in self._used and port not in exclude:
                self._used.add(port)
                return port
        start = self._rng.randint(0, size - 1)
        for i in range(size):
            port = self.low + (start + i) % size
            if port not in self._used and port not in exclude:
                self._used.add(port)
                return port
        raise PortsExhausted(f"all ports {self.low}-{self.high} are in use")

    def release(self, port: int) -> None:
        self._used.discard(port)
