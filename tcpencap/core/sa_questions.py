"""When the RFC 9329 engine asks charon for its SAs (``list-sas``), and what for.

charon's events can be missed or arrive out of order, so the engine checks its SPIs
against a listing: periodically, and soon after a rekey. Steered endpoints and fallback
peers are released only on charon's word, so those have polls of their own. This module
only schedules the questions (:class:`~tcpencap.core.outputs.Query` outputs); the engine
routes the answers (``sas_listed``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tcpencap.core.outputs import Query
from tcpencap.core.timers import TimerQueue

FALLBACK_POLL = 1.0  # while a fallback connection is watched
PEER_RELEASE_POLL = 5.0  # the host's housekeeping (orphans, cool-downs, lingering)
RECONCILE_AFTER_EVENT = 2.0  # check SPIs against list-sas this long after a rekey
RECONCILE_PERIOD = 60.0


class SaQuestions:
    """``may_reconcile``: whether a periodic reconcile is worth asking (VICI up and some
    connection to check); ``housekeeping(now)`` runs every PEER_RELEASE_POLL;
    ``fallback_watched``: whether a fallback connection still needs its poll."""

    def __init__(
        self,
        now: float,
        timer_queue: TimerQueue,
        emit: Callable[[Any], None],
        may_reconcile: Callable[[], bool],
        housekeeping: Callable[[float], None],
        fallback_watched: Callable[[], bool],
    ) -> None:
        self._timers = timer_queue
        self._emit = emit
        self._may_reconcile = may_reconcile
        self._housekeeping = housekeeping
        self._fallback_watched = fallback_watched
        self._reconcile_due = False  # one reconcile question scheduled at a time
        self._fallback_polling = False
        timer_queue.call_at(now + RECONCILE_PERIOD, self._reconcile_tick)
        timer_queue.call_at(now + PEER_RELEASE_POLL, self._release_tick)

    def reconcile_soon(self, now: float, delay: float) -> None:
        if not self._reconcile_due:
            self._reconcile_due = True
            self._timers.call_at(now + delay, self._ask, "reconcile")

    def poll_fallback_soon(self, now: float) -> None:
        if not self._fallback_polling and self._fallback_watched():
            self._fallback_polling = True
            self._timers.call_at(now + FALLBACK_POLL, self._fallback_tick)

    def _ask(self, now: float, purpose: str) -> None:
        if purpose == "reconcile":
            self._reconcile_due = False
        self._emit(Query(purpose))

    def _reconcile_tick(self, now: float) -> None:
        self._timers.call_at(now + RECONCILE_PERIOD, self._reconcile_tick)
        if self._may_reconcile():
            self.reconcile_soon(now, 0.0)

    def _release_tick(self, now: float) -> None:
        self._timers.call_at(now + PEER_RELEASE_POLL, self._release_tick)
        self._housekeeping(now)

    def _fallback_tick(self, now: float) -> None:
        self._fallback_polling = False
        if self._fallback_watched():
            self._emit(Query("fallback"))
            self.poll_fallback_soon(now)
