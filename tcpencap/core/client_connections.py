"""The TCP originator's connections (RFC 9329 §6.1): this host opens one when charon
sends to a client peer that has none, and opens it again after a loss while its IKE SA
lives.

A host rule of the RFC 9329 engine: which local port a connection binds (and another
when the shell cannot bind it), what the connect's success sends (the prefix, then the
frames held while connecting) and when the next generation connects (the backoff is the
connection's own, :meth:`Conn.reconnect_delay`). How a connection's state moves is
:mod:`rfc9329_conn`'s; the engine routes the shell's inputs here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tcpencap.core.datapath import DataPath
from tcpencap.core.outputs import Connect, Output, Transmit
from tcpencap.core.ports import PortAllocator, PortsExhausted
from tcpencap.core.rfc9329_conn import Conn, State
from tcpencap.core.role import Role
from tcpencap.core.router import ConnView, Open, Router
from tcpencap.core.timers import TimerQueue
from tcpencap.wire import rfc9329
from tcpencap.wire.packet import addr_text

log = logging.getLogger("tcpencap")

NewConn = Callable[[float, ConnView, Role, str, str], Conn]


class ClientConnections:
    """``conns`` is the engine's own dict (a reconnect puts the next generation in the
    lost one's place); ``new_conn`` registers a connection there, ``codec`` makes a
    stream codec, ``send`` sends a frame by the send-buffer rule and ``emit`` queues an
    output: the engine's."""

    def __init__(
        self,
        router: Router,
        port_of: Callable[[bytes], int],
        ports: PortAllocator,
        conns: dict[int, Conn],
        datapath: DataPath,
        timers: TimerQueue,
        new_conn: NewConn,
        codec: Callable[[rfc9329.Role], Any],
        send: Callable[[Conn, bytes, bool], None],
        emit: Callable[[Output], None],
    ) -> None:
        self._router = router
        self._port_of = port_of
        self._ports = ports
        self._conns = conns
        self._datapath = datapath
        self._timers = timers
        self._new_conn = new_conn
        self._codec = codec
        self._send = send
        self._emit = emit

    def open(self, now: float, req: Open) -> None:
        """charon sent to a client peer without a connection: one is made, holding the
        packet that asked for it until it is connected."""
        view = self._router.views[req.conn_id]
        conn = self._new_conn(now, view, Role.CLIENT, addr_text(req.local), addr_text(req.peer))
        conn.peer_port = self._port_of(req.peer)
        if req.frame:
            conn.pending.append((req.frame, req.frame_is_ike))
        self._connect(conn)
        spis = ", ".join(s.hex() for s in view.entry.ike_spis)
        log.info("%s: opening for IKE SA %s", conn, spis)

    def _connect(self, conn: Conn) -> None:
        """Ask the shell to connect from a port of the client range (0: none was free,
        and the shell reports the connect failed)."""
        try:
            conn.local_port = self._ports.allocate()
        except PortsExhausted:
            conn.local_port = 0
        e = conn.entry
        self._emit(
            Connect(conn.conn_id, conn.generation, e.local, conn.local_port, e.peer, conn.peer_port)
        )

    def port_refused(self, conn: Conn) -> int | None:
        """The shell could not bind ``conn``'s port: another one (None: none left)."""
        refused = {conn.local_port}
        self._ports.release(conn.local_port)
        try:
            conn.local_port = self._ports.allocate(refused)
        except PortsExhausted:
            conn.local_port = 0
            return None
        return conn.local_port

    def connected(self, conn: Conn) -> bool:
        """The TCP connect succeeded: the prefix, then what was held. False: the
        connection was closed meanwhile, and the shell must close this socket."""
        if conn.state is not State.CONNECTING:
            return False
        log.info("%s: connected, sending prefix and %d held frame(s)", conn, len(conn.pending))
        pending = conn.connected()
        self._datapath.changed()
        self._emit(Transmit(conn.conn_id, conn.codec.send_prefix(), True))
        for frame, is_ike in pending:
            self._send(conn, frame, is_ike)
        return True

    def lost(self, now: float, conn: Conn, stopping: bool) -> bool:
        """A client connection is gone (already CLOSED): its port is free again. True:
        it reconnects, and its next generation has taken its place."""
        if conn.local_port:
            self._ports.release(conn.local_port)
        if not conn.reconnects(stopping):
            return False
        self._reconnect(now, conn)
        return True

    def _reconnect(self, now: float, lost: Conn) -> None:
        conn = lost.next_generation(self._codec(rfc9329.Role.ORIGINATOR))
        self._conns[lost.conn_id] = conn
        self._datapath.changed()
        delay = conn.reconnect_delay()
        log.info(
            "%s: lost (%s), reconnecting in %.1fs (attempt %d)",
            conn, lost.close_reason, delay, conn.attempt,
        )  # fmt: skip
        self._timers.call_at(now + delay, self._reconnect_due, conn, conn.generation)

    def _reconnect_due(self, now: float, conn: Conn, generation: int) -> None:
        if self._conns.get(conn.conn_id) is conn and conn.generation == generation:
            self._connect(conn)
