"""The SAs of a lost gateway connection go to its client's next connection.

A client whose TCP connection broke comes back on a new one (RFC 9329 §6.1): the SPIs the
lost connection carried are bound to that connection at once when it is already open
and resumed them, else parked with :mod:`orphans` until a connection of the same
address pair sends its first message.
"""

from __future__ import annotations

import logging

from tcpencap.core.orphans import Orphans
from tcpencap.core.rfc9329_conn import Conn, State
from tcpencap.core.table import ConnectionTable

log = logging.getLogger("tcpencap")


class SaHandover:
    """``conns`` is the engine's own dict (read here, never changed)."""

    def __init__(self, table: ConnectionTable, orphans: Orphans, conns: dict[int, Conn]) -> None:
        self._table = table
        self._orphans = orphans
        self._conns = conns

    def lost(self, now: float, conn: Conn) -> None:
        """A gateway connection that carried SAs is gone. Its client is expected back on a
        new connection: the newest connection of the same pair that carries no SA of its
        own takes the SPIs, now or when its first message arrives within ORPHAN_GRACE."""
        old = conn.entry
        ike, esp = self._table.release(old.conn_id)
        newer = [
            e
            for e in self._table.for_pair(old.local, old.peer)
            if not e.carries_sa and e.conn_id != old.conn_id
        ]
        target = self._conns.get(newer[-1].conn_id) if newer else None
        if (
            target is not None
            and target.state is State.OPEN
            and (target.first_spi is None or target.first_spi in ike)
        ):
            # Only a connection that resumed one of these SAs (its first message was their
            # ESP or IKE) takes them now; any other waits as an orphan (first_message).
            self._adopt(target, ike, esp, conn.sa_seen)
        else:
            self._orphans.park(now, (old.local, old.peer), ike, esp, conn.sa_seen)

    def first_message(self, now: float, conn: Conn) -> None:
        """A gateway connection's first message: the SAs parked for its pair (and, when
        that message was of an SA, for that SA) are its own now."""
        e = conn.entry
        orphan = self._orphans.claim(now, (e.local, e.peer), conn.first_spi)
        if orphan is not None and not e.carries_sa:
            self._adopt(conn, orphan.ike, orphan.esp, orphan.sa_seen)

    def _adopt(self, conn: Conn, ike: list[bytes], esp: list[int], sa_seen: bool) -> None:
        # First come: an SPI charon has meanwhile placed on another connection stays there.
        self._table.bind_all(conn.conn_id, ike, esp)
        conn.sa_seen = conn.sa_seen or sa_seen
        log.info("%s: SAs of an earlier connection handed over (reconnect)", conn)
