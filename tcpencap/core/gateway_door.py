"""The gateway's door: which TCP connections it takes, what a connection must show
before it counts as a peer's, and what it costs a connection to abuse that.

A host rule of the RFC 9329 engine (the gateway is on the internet). A connection is
taken within :mod:`admission`'s limits and while its endpoint is free; it must send a
well-formed first message - an IKE message, or ESP that resumes an SA charon holds
(:mod:`sa_resumption`) - within ``first_message_timeout``, and carry an IKE SA within
``no_sa_timeout`` after that. Its first message steers its endpoint (within the steering
limit) and hands it the SAs of its predecessor (:mod:`sa_handover`); a flood (frame
rate, invalid frames) closes it and cools its source down. When it goes, the counts
come back, its SAs wait for the client's next connection and its endpoint lingers
(:mod:`lingering`). Limits are read from the engine's config at each use, so a
reload's values hold at once.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any, Protocol

from tcpencap.core.admission import Admission
from tcpencap.core.datapath import DataPath
from tcpencap.core.lingering import Lingering
from tcpencap.core.outputs import bracket, count
from tcpencap.core.rfc9329_conn import Conn, State
from tcpencap.core.role import Role
from tcpencap.core.router import ConnView, Router
from tcpencap.core.sa_handover import SaHandover
from tcpencap.core.sa_resumption import SaResumption
from tcpencap.core.table import ConnectionTable
from tcpencap.core.timers import LogLimiter, TimerQueue

log = logging.getLogger("tcpencap")

NewConn = Callable[[float, ConnView, Role, str, str], Conn]


class Host(Protocol):
    """What the door uses of the engine: its state and parts, and ``close``."""

    config: Any
    vici_connected: bool
    conns: dict[int, Conn]
    table: ConnectionTable
    router: Router
    datapath: DataPath
    timer_queue: TimerQueue
    log_limited: LogLimiter
    admission: Admission
    lingering: Lingering
    handover: SaHandover
    resumption: SaResumption

    def close(self, conn: Conn, reason: str) -> None: ...


class GatewayDoor:
    """``new_conn`` registers a connection with the engine (its codec, its place in
    ``conns``)."""

    def __init__(self, host: Host, new_conn: NewConn) -> None:
        self._host = host
        self._new_conn = new_conn

    # --- coming in --------------------------------------------------------------------

    def accept(
        self, now: float, local: str, local_port: int, peer: str, peer_port: int
    ) -> int | None:
        """A TCP connection arrived on a listener: its connection id, or None when a
        limit refuses it."""
        h = self._host
        gw = h.config.gateway
        source = h.admission.source_of(gw, peer)
        peer_b = ipaddress.ip_address(peer).packed
        refusal = h.admission.refuse_accept(gw, now, source)
        if refusal is None and h.table.by_endpoint(peer_b, peer_port) is not None:
            # Its endpoint is what charon names the connection by: a second connection from
            # the same address and port (a port-preserving NAT, another listener, a proxy's
            # client) would take the first one's packets.
            refusal = ("endpoint-in-use", f"{bracket(peer)}:{peer_port} has a connection")
        if refusal is not None:
            name = f"{bracket(local)}:{local_port} <-> {bracket(peer)}:{peer_port}"
            h.log_limited(now, refusal[0], "refused %s: %s", name, refusal[1])
            return None
        view = h.router.add_gateway_conn(ipaddress.ip_address(local).packed, peer_b, peer_port)
        conn = self._new_conn(now, view, Role.GATEWAY, local, peer)
        conn.local_port, conn.peer_port = local_port, peer_port
        conn.counted = True
        conn.source = source
        h.admission.admit(source)
        h.timer_queue.call_at(now + gw.first_message_timeout, self._first_deadline, conn)
        log.info("%s: accepted", conn)
        return conn.conn_id

    def admit_proxied(self, now: float, name: str) -> bool:
        """A load balancer's connection, before its PROXY header names the client: it
        takes a pending slot, and the per-source limit applies to the client later."""
        h = self._host
        refusal = h.admission.admit_proxied(h.config.gateway)
        if refusal is not None:
            h.log_limited(now, refusal[0], "refused %s: %s", name, refusal[1])
        return refusal is None

    # --- the first message ------------------------------------------------------------

    def admit_ike(self, now: float, conn: Conn, msg: bytes) -> bool:
        """Before its first message, a connection passes only a well-formed IKE message
        (header consistent with the frame, a known exchange type)."""
        problem = conn.first_ike_problem(msg)
        if problem:
            self._host.log_limited(
                now, "malformed-first", "%s: first message refused: %s", conn, problem
            )
            self.invalid(now, conn, "malformed-first-ike")
            return False
        self._first_message(now, conn)
        return conn.state is State.OPEN

    def admit_esp(self, now: float, conn: Conn, packet: bytes) -> bool:
        """... or ESP that resumes an SA (:mod:`sa_resumption`): a stranger's ESP is
        dropped and the deadline keeps running."""
        h = self._host
        vici = h.vici_connected
        spi = int.from_bytes(packet[:4], "big") if len(packet) >= 8 else 0
        if not h.resumption.esp_known(spi, conn.entry.peer, vici):
            count(conn.drops, "esp-unknown-spi-first")
            h.log_limited(
                now, "unknown-esp-first", "%s: first message refused: ESP for unknown SPI", conn
            )
            return False
        conn.sa_seen = vici
        self._first_message(now, conn)
        if conn.state is State.OPEN:
            h.resumption.resumed(conn, spi, vici)
        return conn.state is State.OPEN

    def _first_message(self, now: float, conn: Conn) -> None:
        """The first well-formed message: past the first-message deadline; its endpoint
        steered (within max_connections real peers) and the no-SA deadline running."""
        h = self._host
        conn.first_message(now)
        h.datapath.changed()
        if conn.side is not Role.GATEWAY:
            return
        if conn.counted:
            h.admission.first_message(conn.source)
        h.handover.first_message(now, conn)
        e = conn.entry
        gw = h.config.gateway
        if not h.lingering.steer((e.peer, e.peer_port), conn.conn_id, gw.max_connections):
            h.log_limited(now, "limit-steered", "refused %s: steering set full", conn)
            h.close(conn, "limit-steered")
            return
        if not conn.sa_seen:
            h.timer_queue.call_at(now + gw.no_sa_timeout, self._sa_deadline, conn)

    def _first_deadline(self, now: float, conn: Conn) -> None:
        h = self._host
        if conn.first_message_overdue() and h.conns.get(conn.conn_id) is conn:
            count(conn.drops, "first-message-timeout")
            what = "message" if conn.codec.prefix_received else "prefix"
            h.log_limited(
                now, "deadline", "%s: no well-formed first %s within the deadline", conn, what
            )
            h.close(conn, "first-message deadline")

    def _sa_deadline(self, now: float, conn: Conn) -> None:
        """A gateway connection must carry an IKE SA soon after its first message; one
        that only ever exchanges unauthenticated messages would pin a connection slot."""
        h = self._host
        if h.conns.get(conn.conn_id) is conn and conn.sa_overdue():
            count(conn.drops, "no-sa-timeout")
            h.log_limited(
                now, "limit-no-sa", "%s: no IKE SA %gs after its first message, closing",
                conn, h.config.gateway.no_sa_timeout,
            )  # fmt: skip
            h.close(conn, "no IKE SA")

    # --- abuse ------------------------------------------------------------------------

    def over_rate(self, now: float, conn: Conn) -> None:
        """More than max_frame_rate frames a second: closed, and its source cools down."""
        h = self._host
        count(conn.drops, "frame-rate")
        h.log_limited(now, "limit-frame-rate", "%s: over max_frame_rate frames/s, closing", conn)
        h.admission.cool_down(now, conn.source)
        h.close(conn, "frame rate limit")

    def invalid(self, now: float, conn: Conn, reason: str) -> None:
        """A frame that carries nothing usable: max_invalid_frames close the connection."""
        h = self._host
        if conn.invalid_frame(reason, h.config.gateway.max_invalid_frames):
            h.log_limited(
                now, "limit-invalid-frames", "%s: %d invalid frames, closing", conn, conn.invalid
            )
            h.admission.cool_down(now, conn.source)
            h.close(conn, "too many invalid frames")

    # --- going ------------------------------------------------------------------------

    def lost(self, now: float, conn: Conn) -> None:
        """A gateway connection is gone (still in the table): the counts come back, its
        SAs wait for the client's next connection and its endpoint lingers."""
        h = self._host
        if conn.counted:
            conn.counted = False
            h.admission.gone(conn.source, conn.first_at is None)
        entry = conn.entry
        if entry.carries_sa:
            h.handover.lost(now, conn)
        if conn.first_at is not None:
            brief = h.config.gateway.max_pending
            for port in (entry.peer_port, *entry.aliases):
                h.lingering.linger(now, (entry.peer, port), conn.conn_id, conn.sa_seen, brief)
