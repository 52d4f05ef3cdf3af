"""tcpencap.core.engine: the shell's side of an engine (outputs pulled in order, one timer)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tcpencap.core.engine import Engine
from tcpencap.core.outputs import Close, Query


def test_pull_hands_out_each_output_once_in_order() -> None:
    e = Engine()
    first, second = Query("a"), Close(1, "x")
    e._out += [first, second]
    assert e.pull() == [first, second]
    assert e.pull() == []
    e._out.append(second)
    assert e.pull() == [second]


def test_no_timer_until_a_callback_is_due() -> None:
    assert Engine().get_timer() is None


@given(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=20), st.floats(0, 1e6))
def test_the_timer_is_the_earliest_due_and_handle_timer_runs_what_is_due(
    dues: list[float], now: float
) -> None:
    e = Engine()
    ran: list[float] = []
    for due in dues:
        e.timer_queue.call_at(due, lambda at, due=due: ran.append(due))
    assert e.get_timer() == min(dues)
    e.handle_timer(now)
    assert sorted(ran) == sorted(d for d in dues if d <= now)
    left = [d for d in dues if d > now]
    assert e.get_timer() == (min(left) if left else None)


def test_a_callback_gets_the_time_it_is_run_at() -> None:
    e = Engine()
    seen: list[float] = []
    e.timer_queue.call_at(5.0, seen.append)
    e.handle_timer(4.999)
    assert seen == []
    e.handle_timer(7.5)
    assert seen == [7.5]
