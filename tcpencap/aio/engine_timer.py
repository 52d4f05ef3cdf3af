"""The shells' one clock and the one OS timer an engine needs: armed for
``engine.get_timer()`` after every input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def loop_time() -> float:
    """The shells' clock: the running event loop's. Before the loop runs (the daemon is
    built before ``asyncio.run`` starts it) it is the clock asyncio's loop reads, so that
    times taken then and later compare."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


class EngineTimer:
    """Re-arms only when the engine's next deadline changed (a compare per packet).
    Deadlines are in ``clock``'s time (the one the engine is fed); the loop's clock may
    differ, so they are converted."""

    def __init__(self, fire: Callable[[], None], clock: Callable[[], float] = loop_time) -> None:
        self._fire = fire
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def arm(self, due: float | None) -> None:
        if due == self._at:
            return
        self.cancel()
        self._at = due
        if due is not None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_at(due - self._clock() + loop.time(), self._run)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._at = None

    def _run(self) -> None:
        self._handle = self._at = None
        self._fire()
