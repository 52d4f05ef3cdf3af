"""A gateway connection whose first message is ESP resumes an SA charon already has
(RFC 9329 §6.1: the client came back on a new TCP connection).

Which ESP may open a connection (an SPI charon has an inbound CHILD SA for with this
peer, or without VICI any plausible SPI), and the endpoint such a connection takes over:
charon still names the SA by the old connection's port until it follows the new one.
"""

from __future__ import annotations

import logging

from tcpencap.core.inbound_sas import InboundSas
from tcpencap.core.lingering import Lingering
from tcpencap.core.rfc9329_conn import Conn, State
from tcpencap.core.table import ConnectionTable

log = logging.getLogger("tcpencap")


class SaResumption:
    """``conns`` is the engine's own dict (read here; each connection's ``resume_spi``
    is the only thing changed)."""

    def __init__(
        self,
        table: ConnectionTable,
        inbound: InboundSas,
        lingering: Lingering,
        conns: dict[int, Conn],
    ) -> None:
        self._table = table
        self._inbound = inbound
        self._lingering = lingering
        self._conns = conns

    def esp_known(self, spi: int, peer: bytes, vici_connected: bool) -> bool:
        """Without VICI there is no list of charon's SAs: plausible ESP passes, and the
        no-SA deadline then asks for charon's own traffic on the connection."""
        if vici_connected:
            return self._inbound.of_peer(spi, peer)
        return spi >= 256  # 1-255 are reserved (RFC 4303 §2.1)

    def resumed(self, conn: Conn, spi: int, vici_connected: bool) -> None:
        """An open connection whose first message was ESP for ``spi``."""
        if vici_connected:
            self._resume_endpoint(conn, self._inbound.port(spi))
        else:
            conn.resume_spi = spi  # charon's word comes with VICI (resume_pending)

    def resume_pending(self) -> None:
        """Connections whose first message was ESP while VICI was down (a client that came
        back at once after a restart of tcpencap): now that charon's SAs are known, the
        one that resumes an SA of its address takes that SA's endpoint too."""
        for conn in list(self._conns.values()):
            spi, conn.resume_spi = conn.resume_spi, 0
            if spi and conn.state is State.OPEN and self._inbound.of_peer(spi, conn.entry.peer):
                self._resume_endpoint(conn, self._inbound.port(spi))

    def _resume_endpoint(self, conn: Conn, port: int) -> None:
        """The SA's charon endpoint is another port of the same address, e.g. the
        connection's before a restart of tcpencap: until charon follows the new port, what
        it sends to the old one is this connection's, so that endpoint is steered and
        routed to it."""
        e = conn.entry
        if port == e.peer_port or not self._table.alias(conn.conn_id, port):
            return
        self._lingering.steer((e.peer, port), conn.conn_id)
        log.info("%s: resumes an SA charon has with port %d", conn, port)
