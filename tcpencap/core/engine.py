"""What both engines share: the shell's side of them (outputs pulled, one timer)."""

from __future__ import annotations

from tcpencap.core.outputs import Output
from tcpencap.core.timers import TimerQueue


class Engine:
    """Inputs queue outputs in ``_out`` and callbacks in ``timer_queue``; the shell
    executes ``pull()`` after every input and arms one timer for ``get_timer()``."""

    def __init__(self) -> None:
        self._out: list[Output] = []
        self.timer_queue = TimerQueue()

    def pull(self) -> list[Output]:
        """Everything the engine asked for since the last pull, in order."""
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return self.timer_queue.next_due()

    def handle_timer(self, now: float) -> None:
        self.timer_queue.run_due(now)
