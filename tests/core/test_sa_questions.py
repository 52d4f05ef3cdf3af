"""When the engine asks charon for its SAs, on its own (tcpencap.core.sa_questions), with a
real timer queue as the clock and fakes for the engine's answers: a periodic reconcile
only when worth asking, one reconcile question at a time, housekeeping every
PEER_RELEASE_POLL, and a fallback poll only while a fallback connection is watched."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.core.outputs import Query
from tcpencap.core.sa_questions import (
    FALLBACK_POLL,
    PEER_RELEASE_POLL,
    RECONCILE_PERIOD,
    SaQuestions,
)
from tcpencap.core.timers import TimerQueue


class Rig:
    """SaQuestions with its engine's answers as plain fields, and what it asked, when."""

    def __init__(self, now: float = 0.0) -> None:
        self.timers = TimerQueue()
        self.now = now
        self.asked: list[tuple[float, str]] = []
        self.housekept: list[float] = []
        self.worth_reconciling = True
        self.watched = False
        self.q = SaQuestions(
            now,
            self.timers,
            self._emit,
            lambda: self.worth_reconciling,
            self.housekept.append,
            lambda: self.watched,
        )

    def _emit(self, out: Any) -> None:
        assert isinstance(out, Query)
        self.asked.append((self.now, out.purpose))

    def advance_to(self, end: float) -> None:
        """Run each timer at its own time, as the engine's handle_timer does."""
        while (due := self.timers.next_due()) is not None and due <= end:
            self.now = due
            self.timers.run_due(due)
        self.now = end

    def purposes(self, purpose: str) -> list[float]:
        return [t for t, p in self.asked if p == purpose]


def test_housekeeping_runs_every_peer_release_poll() -> None:
    rig = Rig(10.0)
    rig.advance_to(10.0 + 3 * PEER_RELEASE_POLL + 0.1)
    assert rig.housekept == [10.0 + k * PEER_RELEASE_POLL for k in (1, 2, 3)]
    assert rig.asked == []


def test_the_periodic_reconcile_asks_only_when_worth_it() -> None:
    rig = Rig()
    rig.advance_to(RECONCILE_PERIOD - 0.1)
    assert rig.purposes("reconcile") == []
    rig.advance_to(RECONCILE_PERIOD)
    assert rig.purposes("reconcile") == [RECONCILE_PERIOD]
    rig.worth_reconciling = False  # VICI down or nothing to check: the tick stays, silent
    rig.advance_to(2 * RECONCILE_PERIOD)
    assert rig.purposes("reconcile") == [RECONCILE_PERIOD]
    rig.worth_reconciling = True
    rig.advance_to(3 * RECONCILE_PERIOD)
    assert rig.purposes("reconcile") == [RECONCILE_PERIOD, 3 * RECONCILE_PERIOD]


def test_reconcile_soon_asks_once_for_every_request_before_its_question() -> None:
    rig = Rig()
    rig.q.reconcile_soon(1.0, 2.0)
    rig.q.reconcile_soon(1.5, 0.1)  # one is already due: no second question, none earlier
    rig.advance_to(2.9)
    assert rig.asked == []
    rig.advance_to(3.0)
    assert rig.asked == [(3.0, "reconcile")]
    rig.q.reconcile_soon(4.0, 2.0)  # asked: the next request schedules a new question
    rig.advance_to(10.0)
    assert rig.purposes("reconcile") == [3.0, 6.0]


def test_the_fallback_poll_runs_only_while_a_connection_is_watched() -> None:
    rig = Rig()
    rig.q.poll_fallback_soon(0.0)  # nothing watched: no poll (none pending either)
    rig.watched = True
    rig.q.poll_fallback_soon(0.5)
    rig.advance_to(1.4)
    assert rig.purposes("fallback") == []
    rig.advance_to(1.5)
    assert rig.purposes("fallback") == [0.5 + FALLBACK_POLL]
    rig.watched = False
    rig.advance_to(3.0)
    rig.watched = True
    rig.q.poll_fallback_soon(3.0)
    rig.q.poll_fallback_soon(3.2)  # one poll at a time
    rig.advance_to(3.0 + 3 * FALLBACK_POLL)
    assert rig.purposes("fallback")[1:] == [3.0 + k * FALLBACK_POLL for k in (1, 2, 3)]
    rig.watched = False  # the watch ended: the poll stops by itself
    rig.advance_to(20.0)
    assert len(rig.purposes("fallback")) == 4
    rig.watched = True  # and a new watch may start it again
    rig.q.poll_fallback_soon(20.0)
    rig.advance_to(20.0 + FALLBACK_POLL)
    assert rig.purposes("fallback")[-1] == 20.0 + FALLBACK_POLL


@settings(deadline=None)  # a shared 2-vCPU host: timing is not the rule under test
@given(st.lists(st.tuples(st.floats(0.0, 2.5), st.floats(0.0, 5.0)), max_size=20))
def test_reconcile_questions_follow_the_one_at_a_time_rule(
    calls: list[tuple[float, float]],
) -> None:
    """Whatever requests come (each ``gap`` after the last, asking in ``delay``), a
    question is asked at the first request's due time, and a request while one is due
    adds nothing; the periodic tick is out of reach (all before RECONCILE_PERIOD)."""
    rig = Rig()
    due: float | None = None
    expected: list[float] = []
    now = 0.0
    for gap, delay in calls:
        now += gap
        rig.advance_to(now)
        if due is not None and due <= now:
            expected.append(due)
            due = None
        rig.q.reconcile_soon(now, delay)
        if due is None:
            due = now + delay
    rig.advance_to(now + 5.0)
    if due is not None:
        expected.append(due)
    assert now + 5.0 < RECONCILE_PERIOD
    assert rig.purposes("reconcile") == expected
