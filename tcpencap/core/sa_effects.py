"""What charon's word about its SAs does to this host's connections.

:mod:`sa_sync` turns VICI events and ``list-sas`` answers into effects (retire a
connection, open one, an SPI over the limit, an old SPI to expire later); this module
carries them out through the engine's callbacks, and marks the connections whose IKE SA
charon has confirmed (they pass the gateway's no-SA deadline).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tcpencap.core.outputs import count
from tcpencap.core.rfc9329_conn import Conn
from tcpencap.core.router import Open
from tcpencap.core.sa_sync import ExpireOld, Retire, SaSync, SpiLimit
from tcpencap.core.table import ConnectionTable
from tcpencap.core.timers import TimerQueue
from tcpencap.core.vici_facts import ike_spis

log = logging.getLogger("tcpencap")


class SaEffects:
    """``conns`` is the engine's own dict (read, never changed here); ``max_spis`` is
    read when needed, as a reload may change it; ``retire`` is the engine's and
    ``open_client`` :mod:`client_connections`'."""

    def __init__(
        self,
        sync: SaSync,
        table: ConnectionTable,
        conns: dict[int, Conn],
        timer_queue: TimerQueue,
        max_spis: Callable[[], int],
        retire: Callable[[float, int, str, bool], None],
        open_client: Callable[[float, Open], None],
    ) -> None:
        self._sync = sync
        self._table = table
        self._conns = conns
        self._timers = timer_queue
        self._max_spis = max_spis
        self._retire = retire
        self._open_client = open_client

    def apply(self, now: float, effects: list[Any]) -> None:
        for eff in effects:
            if isinstance(eff, Retire):
                self._retire(now, eff.conn_id, eff.reason, eff.graceful)
            elif isinstance(eff, Open):
                self._open_client(now, eff)
            elif isinstance(eff, SpiLimit):
                conn = self._conns.get(eff.conn_id)
                if conn is not None:
                    count(conn.drops, "spi-limit")
                log.warning(
                    "conn %d: CHILD SA with SPI %08x not indexed: max_spis (%d) reached; "
                    "it is carried on the connection of its address pair",
                    eff.conn_id,
                    eff.spi,
                    self._max_spis(),
                )
            elif isinstance(eff, ExpireOld):
                self._timers.call_at(now + eff.delay, self._expire_old, eff.conn_id, eff.spi)

    def _expire_old(self, now: float, conn_id: int, spi: bytes) -> None:
        self.apply(now, self._sync.expire_old(conn_id, spi))

    def mark_sa_seen(self, event: dict[str, Any]) -> None:
        """charon's word that an IKE SA exists: the connections carrying it pass the
        no-SA deadline."""
        for spi in ike_spis(event):
            entry = self._table.find_ike_spi(spi)
            conn = self._conns.get(entry.conn_id) if entry else None
            if conn is not None:
                conn.sa_seen = True
