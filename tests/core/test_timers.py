"""tcpencap.core.timers: the engine's timer queue (time is an argument; the shell arms one
OS timer for next_due()) and the log limiter (one line a second per kind, every event counted)."""

from __future__ import annotations

from tcpencap.core.timers import LogLimiter, TimerQueue


def test_due_callbacks_run_in_time_order_with_now_and_their_args():
    q = TimerQueue()
    ran: list[tuple[float, str]] = []
    q.call_at(2.0, lambda now, tag: ran.append((now, tag)), "b")
    q.call_at(1.0, lambda now, tag: ran.append((now, tag)), "a")
    q.call_at(5.0, lambda now, tag: ran.append((now, tag)), "later")
    assert q.next_due() == 1.0 and len(q) == 3
    assert q.run_due(0.5) == 0 and ran == []
    assert q.run_due(3.0) == 2
    assert ran == [(3.0, "a"), (3.0, "b")]
    assert q.next_due() == 5.0 and len(q) == 1


def test_callbacks_due_at_the_same_time_run_in_the_order_they_were_set():
    q = TimerQueue()
    ran: list[int] = []
    for i in range(5):
        q.call_at(1.0, lambda now, i: ran.append(i), i)
    q.run_due(1.0)
    assert ran == [0, 1, 2, 3, 4]


def test_a_callback_that_sets_one_for_now_has_it_run_in_the_same_pass():
    q = TimerQueue()
    ran: list[str] = []

    def first(now: float) -> None:
        ran.append("first")
        q.call_at(now, lambda now: ran.append("again"))
        q.call_at(now + 1, lambda now: ran.append("next second"))

    q.call_at(1.0, first)
    assert q.run_due(1.0) == 2
    assert ran == ["first", "again"]
    assert q.next_due() == 2.0


def test_an_empty_queue_has_nothing_due():
    q = TimerQueue()
    assert q.next_due() is None and len(q) == 0 and q.run_due(1e9) == 0


def test_the_log_limiter_emits_one_line_a_second_per_kind_and_counts_all():
    lines: list[tuple[object, ...]] = []
    limit = LogLimiter(lambda fmt, *args: lines.append((fmt, *args)), interval=1.0)
    for i in range(10):
        limit(100.0 + i * 0.1, "flood", "flood from %s", "198.18.1.2")
    limit(100.5, "other", "other %d", 7)  # its own kind: not held back by "flood"
    limit(101.0, "flood", "flood from %s", "198.18.1.2")  # a second after the first line
    assert lines == [
        ("flood from %s", "198.18.1.2"),
        ("other %d", 7),
        ("flood from %s", "198.18.1.2"),
    ]
    assert limit.events == {"flood": 11, "other": 1}
