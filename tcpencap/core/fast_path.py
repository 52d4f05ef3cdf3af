"""What an accelerated data path does in the engine's place, and how the engine hears of it.

The native path frames charon's ESP for connections its flow cache knows (the queue
reader's hits), writes to sockets, and reads lent connections in its inbound worker,
turning their ESP into packets for charon. Each of these reports back here in batches:
what was sent and received is counted on the connection as if the engine had done it,
a frame the engine must see is drained, and a lent connection over the frame rate is
cut by the gateway's rule. Which connection may be lent, and where its ESP goes, is
decided here too. With the Python data path nothing reports, and nothing is lent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from tcpencap.core.datapath import DataPath, EspTemplate
from tcpencap.core.gateway_door import GatewayDoor
from tcpencap.core.outputs import Output, Transmit, count
from tcpencap.core.rfc9329_conn import Conn, State
from tcpencap.core.role import Role
from tcpencap.core.router import ConnView, Router


class Drain(Protocol):
    """:class:`tcpencap.core.frame_drain.FrameDrain` (which reads ``esp_template`` here)."""

    def drain(self, now: float, conn: Conn) -> None: ...


class Host(Protocol):
    """What the fast path uses of the engine."""

    config: Any
    conns: dict[int, Conn]
    router: Router
    datapath: DataPath
    frames: Drain
    door: GatewayDoor


class FastPath:
    """``emit`` queues an output of the engine."""

    def __init__(self, host: Host, emit: Callable[[Output], None]) -> None:
        self._host = host
        self._emit = emit

    def hits(self, hits: list[tuple[int, bytes, int]]) -> None:
        """Charon's packets the queue reader framed already (conn_id, data, frames), by
        flows installed at this cache's version: sent if their connection is still open."""
        h = self._host
        conns, emit = h.conns, self._emit
        for cid, data, frames in hits:
            conn = conns.get(cid)
            if conn is None or conn.state is not State.OPEN:
                # The entry was made before this connection closed (the cache is cleared at
                # the next pull): its frames have nowhere to go.
                count(h.router.drops, "flow-stale")
                continue
            conn.frames_out += frames
            conn.bytes_out += len(data)
            emit(Transmit(cid, data, False, frames=frames))

    def esp_template(self, view: ConnView) -> EspTemplate:
        """(source, destination, source port, destination port) of the packets a
        connection's ESP becomes, as router.inbound_esp builds them."""
        return (view.entry.peer, view.entry.local, *self._host.router.ports_of(view, False))

    def lend_args(self, conn_id: int) -> tuple[Any, ...] | None:
        """(deframer, peer, local, sport, dport, max_rate) of an open connection the
        inbound worker may read for the engine, or None. A gateway connection keeps its
        frame-rate limit there."""
        h = self._host
        conn = h.conns.get(conn_id)
        view = h.router.views.get(conn_id)
        if conn is None or view is None or not conn.lendable():
            return None
        rate = h.config.gateway.max_frame_rate if conn.side is Role.GATEWAY else 0
        return h.datapath.lend(conn.codec, self.esp_template(view), rate)

    def received(
        self, now: float, conn: Conn, counts: tuple[int, ...], drain: bool, over_rate: bool
    ) -> None:
        """The inbound worker read (ESP frames injected, bytes, reads, keepalives
        dropped) on ``conn``; with ``drain`` it stopped before a frame the engine must
        see; ``over_rate``: more than max_frame_rate frames (of every kind) in a second."""
        frames, nbytes, reads, *rest = counts
        conn.received_elsewhere(frames, nbytes, reads, rest[0] if rest else 0)
        if over_rate and not conn.ending:
            self._host.door.over_rate(now, conn)
        elif drain and not conn.ending:
            self._host.frames.drain(now, conn)

    def sent(
        self, conn_id: int, frames: int, nbytes: int, esp_dropped: int, ike_dropped: int
    ) -> None:
        """The native writer wrote (or dropped, over the send bound) this much on a
        connection since its last report."""
        conn = self._host.conns.get(conn_id)
        if conn is not None:
            conn.sent_elsewhere(frames, nbytes, esp_dropped, ike_dropped)
