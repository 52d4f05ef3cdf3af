"""The shells' one clock and the one OS timer an engine needs: armed for
``engine.get_timer()`` after every input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LoopClock:
    """The shells' one clock: the event loop's time, which they feed the engines and in
    which the engines' deadlines are armed. Until it is bound to the loop (the daemon is
    built before ``asyncio.run`` starts its loop) it reads the clock asyncio's loop reads,
    so times taken then and later compare."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now: Callable[[], float] = time.monotonic

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = loop.time


class EngineTimer:
    """Re-arms only when the engine's next deadline changed (a compare per packet).
    Deadlines are in the loop's time, or in ``clock``'s (then converted)."""

    def __init__(self, fire: Callable[[], None], clock: Callable[[], float] | None = None) -> None:
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
            at = due if self._clock is None else due - self._clock() + loop.time()
            self._handle = loop.call_at(at, self._run)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._at = None

    def _run(self) -> None:
        self._handle = self._at = None
        self._fire()
