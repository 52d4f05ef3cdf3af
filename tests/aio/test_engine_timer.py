"""The shells' one clock and the engine timer (tcpencap/aio/engine_timer.py)."""

from __future__ import annotations

import asyncio

from tcpencap.aio.engine_timer import EngineTimer, LoopClock


class SteppedLoopTime:
    """A loop clock that runs 1000 s ahead of time.monotonic: binding must switch to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def time(self) -> float:
        return self.loop.time() + 1000.0


def test_the_clock_is_the_loops_once_bound() -> None:
    async def body() -> None:
        clock = LoopClock()
        before = clock.now()
        loop = asyncio.get_running_loop()
        assert abs(before - loop.time()) < 1.0  # asyncio's loop reads the same clock
        clock.bind(SteppedLoopTime(loop))  # type: ignore[arg-type]
        assert clock.now() - loop.time() > 999.0

    asyncio.run(body())


def test_the_timer_fires_at_a_deadline_in_the_loops_time() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        timer = EngineTimer(lambda: fired.append(loop.time()))
        due = loop.time() + 0.05
        timer.arm(due)
        timer.arm(due)  # the same deadline: nothing re-armed
        await asyncio.sleep(0.02)
        assert fired == []
        await asyncio.sleep(0.1)
        assert len(fired) == 1 and fired[0] >= due - 0.001
        timer.arm(loop.time() + 0.01)
        timer.arm(None)  # no deadline any more: cancelled
        await asyncio.sleep(0.05)
        assert len(fired) == 1

    asyncio.run(body())


def test_a_deadline_in_another_clock_is_converted() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        timer = EngineTimer(lambda: fired.append(loop.time()), clock=lambda: loop.time() + 1000)
        timer.arm(loop.time() + 1000 + 0.03)  # 30 ms from now, in the other clock
        await asyncio.sleep(0.1)
        assert len(fired) == 1

    asyncio.run(body())
