"""One timer queue per engine: the shell arms a single OS timer for ``next_due()``."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class TimerQueue:
    """Callbacks due at a time. Cancelling is lazy: a callback re-checks its own
    conditions when it fires, so nothing has to be removed from the heap."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()

    def call_at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), fn, args))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float) -> int:
        """Run every callback due at ``now`` (also those a callback adds for ``now``)."""
        n = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, fn, args = heapq.heappop(heap)
            fn(now, *args)
            n += 1
        return n

    def __len__(self) -> int:
        return len(self._heap)


class LogLimiter:
    """At most one log line per second per kind, so a flood cannot flood the log; every
    occurrence is still counted in ``events``."""

    def __init__(self, emit: Callable[..., None], interval: float = 1.0) -> None:
        self.emit = emit
        self.interval = interval
        self.events: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def __call__(self, now: float, key: str, fmt: str, *args: object) -> None:
        self.events[key] = self.events.get(key, 0) + 1
        if now - self._last.get(key, -1e9) >= self.interval:
            self._last[key] = now
            self.emit(fmt, *args)
