"""The RFC 9329 engine: every TCP connection of this host, without I/O.

The shell feeds it what happens - a queued packet from charon, bytes read from a TCP
connection, a connection accepted, made, failed or lost, a VICI event, an answer from
``list-sas`` - always with the current time, and pulls :mod:`outputs` (``pull()``). It
arms one timer for ``get_timer()`` and calls ``handle_timer(now)`` when it fires. The same
shape as :class:`tcpencap.core.ctcp_engine.CtcpEngine`.

The engine is the one door for the shell's inputs; it routes each to whoever decides. A
connection's own rules and its (state, event) table are :mod:`rfc9329_conn`'s; the host's
are small modules it composes - :mod:`gateway_door` (who is taken, the first message, the
deadlines, what a flood costs; its counts in :mod:`admission`), :mod:`client_connections`
(opening, binding, reconnecting), :mod:`lingering` (endpoints steered after their
connection), :mod:`orphans` and :mod:`sa_handover` (SAs waiting for their client),
:mod:`sa_resumption` (ESP that opens a connection), :mod:`inbound_sas` (charon's inbound
SPIs), :mod:`client_steering` (reasons and the UDP-first fallback), :mod:`sa_questions`
(when to ask list-sas), :mod:`sa_effects` (what charon's SA events do),
:mod:`frame_drain` (a connection's received frames) and :mod:`fast_path` (what the native
data path did in its place). Here: charon's packets, closing and losing a connection,
routing VICI events and list-sas answers, and the data path (:mod:`datapath`) that moves
ESP, which the shell reads as ``engine.datapath``.
"""

from __future__ import annotations

import logging
from typing import Any

from tcpencap.core.admission import Admission
from tcpencap.core.client_connections import ClientConnections
from tcpencap.core.client_steering import ClientSteering
from tcpencap.core.datapath import DataPath, PythonDataPath
from tcpencap.core.engine import Engine
from tcpencap.core.fast_path import FastPath
from tcpencap.core.frame_drain import FrameDrain
from tcpencap.core.gateway_door import GatewayDoor
from tcpencap.core.inbound_sas import InboundSas
from tcpencap.core.lingering import Endpoint, Lingering
from tcpencap.core.orphans import Orphans
from tcpencap.core.outputs import (
    Close,
    Transmit,
    count,
)
from tcpencap.core.ports import PortAllocator
from tcpencap.core.reload import (
    Operation,
    Settings,
    WatchFallback,
)
from tcpencap.core.rfc9329_conn import (
    Conn,
    Event,
    State,
    status_of,
)
from tcpencap.core.role import Role
from tcpencap.core.router import ConnView, Drop, Open, Router, Send
from tcpencap.core.sa_effects import SaEffects
from tcpencap.core.sa_handover import SaHandover
from tcpencap.core.sa_questions import RECONCILE_AFTER_EVENT, SaQuestions
from tcpencap.core.sa_resumption import SaResumption
from tcpencap.core.sa_sync import UNLISTED_GRACE, SaSync
from tcpencap.core.table import ConnectionTable
from tcpencap.core.timers import LogLimiter
from tcpencap.core.totals import add_closed, new_totals
from tcpencap.core.vici_facts import ike_spis
from tcpencap.wire import rfc9329

log = logging.getLogger("tcpencap")


class Rfc9329Engine(Engine):
    """``datapath`` moves the ESP (:mod:`tcpencap.core.datapath`; None: the Python
    reference). The native one turns ESP frames of open connections into packets in its
    ``inject_batch`` (sent by the shell) instead of Inject outputs, and the shell reads the
    queue through its ``flows`` (``ready_flows()``)."""

    def __init__(self, config: Any, now: float, datapath: DataPath | None = None) -> None:
        super().__init__()
        self.config = config
        self.datapath: DataPath = datapath if datapath is not None else PythonDataPath()
        self.table = ConnectionTable(max_spis=config.max_spis)
        self.client = ClientSteering(self._emit)
        # (the same objects, where the shell and tests read them)
        self.steering, self.fallback = self.client.steering, self.client.fallback
        self.client_peers = self.client.client_peers
        self.router = Router(self.table, self.client.is_client_peer, self._is_live)
        self.sync = SaSync(self.router)
        self.ports = PortAllocator(
            config.client.port, config.client.port_range[0], config.client.port_range[1]
        )
        self.conns: dict[int, Conn] = {}
        self.orphans = Orphans()
        self.lingering = Lingering(self.steering, self._emit, self.timer_queue)
        self.admission = Admission()
        self.vici_connected = False
        self.inbound = InboundSas()  # charon's inbound ESP SPIs (VICI)
        self.stopping = False
        self.log_limited = LogLimiter(log.warning)
        self.totals: dict[str, Any] = new_totals(closed={}, connect_failures=0)
        self.clients = ClientConnections(
            self.router,
            self.client.port_of,
            self.ports,
            self.conns,
            self.datapath,
            self.timer_queue,
            self._new_conn,
            self._codec,
            self._send,
            self._emit,
        )
        self.handover = SaHandover(self.table, self.orphans, self.conns)
        self.resumption = SaResumption(self.table, self.inbound, self.lingering, self.conns)
        self.door = GatewayDoor(self, self._new_conn)
        self.fast = FastPath(self, self._emit)
        self.frames = FrameDrain(self, self._emit)
        self.effects = SaEffects(
            self.sync,
            self.table,
            self.conns,
            self.timer_queue,
            lambda: self.config.max_spis,
            self.retire,
            self.clients.open,
        )
        self.questions = SaQuestions(
            now,
            self.timer_queue,
            self._emit,
            lambda: self.vici_connected and len(self.table) > 0,
            self._housekeeping,
            lambda: bool(self.fallback.conns),
        )

    # --- the shell's side -------------------------------------------------------------

    def _emit(self, output: Any) -> None:
        self._out.append(output)

    @property
    def events(self) -> dict[str, int]:
        return self.log_limited.events

    def pull(self) -> list[Any]:
        self.datapath.sync(self.table.version)
        return super().pull()

    # --- the data path, as the shell sees it ---------------------------------------------

    def ready_flows(self) -> Any:
        """The flow cache, valid now: what the shell reads the queue with (None: the
        Python path)."""
        self.datapath.sync(self.table.version)
        return self.datapath.flows

    def _codec(self, role: rfc9329.Role) -> Any:
        return self.datapath.codec(role, self.config.max_frame)

    def outbound_batch(
        self, now: float, misses: list[bytes], hits: list[tuple[int, bytes, int]]
    ) -> None:
        """One read of the queue by the native path: ``hits`` are framed already
        (core/fast_path.py); ``misses`` take the Python path."""
        self.fast.hits(hits)
        for packet in misses:
            self.outbound(now, packet)

    # --- configuration (reload plans) -------------------------------------------------

    def apply(self, now: float, ops: list[Operation]) -> None:
        """Run the steering part of a reload plan (tcpencap.core.reload.plan), with the
        new live settings."""
        for op in ops:
            if isinstance(op, Settings):
                self.config = op.config
        self.client.apply(ops)
        if any(isinstance(op, WatchFallback) for op in ops):
            self.questions.poll_fallback_soon(now)

    def _is_live(self, conn_id: int) -> bool:
        conn = self.conns.get(conn_id)
        return conn is not None and not conn.ending

    # --- charon's packets -------------------------------------------------------------

    def outbound(self, now: float, packet: bytes) -> None:
        """A UDP packet charon sent to a steered peer (queued in OUTPUT)."""
        dp = self.datapath
        before = (self.table.version, dp.epoch)
        res = self.router.outbound(packet)
        t = type(res)
        if t is Send:
            conn = self.conns.get(res.conn_id)  # type: ignore[union-attr]
            if conn is None:
                count(self.router.drops, "connection-gone")
            else:
                conn.charon_sent(res.is_ike, res.protected, self.vici_connected)  # type: ignore[union-attr]
                if res.request:  # type: ignore[union-attr]
                    conn.outstanding = res.frame  # type: ignore[union-attr]
                self._send(conn, res.frame, res.is_ike)  # type: ignore[union-attr]
                if (
                    dp.sinks_esp
                    and self.router.fast_hit
                    and conn.state is State.OPEN
                    and (self.table.version, dp.epoch) == before
                ):
                    dp.learn(packet, conn.conn_id, self.table.version)
        elif t is Open:
            self.clients.open(now, res)  # type: ignore[arg-type]
        else:
            assert isinstance(res, Drop)
            if res.reason != "nat-keepalive":
                self.log_limited(now, res.reason, "dropped outbound packet: %s", res.reason)
        if self.router.emptied:
            emptied, self.router.emptied = self.router.emptied, []
            for cid in emptied:
                self.retire(now, cid, "its SAs moved to another connection")

    def _send(self, conn: Conn, frame: bytes, is_ike: bool) -> None:
        if conn.send(frame, is_ike):
            self._out.append(Transmit(conn.conn_id, frame, is_ike))

    # --- client connections (core/client_connections.py) -------------------------------

    def _new_conn(self, now: float, view: ConnView, side: Role, local: str, peer: str) -> Conn:
        wire_role = rfc9329.Role.ORIGINATOR if side is Role.CLIENT else rfc9329.Role.RESPONDER
        conn = Conn.new(now, view, side, self._codec(wire_role), local, peer)
        self.conns[view.entry.conn_id] = conn
        return conn

    def connect_port_refused(self, conn_id: int, generation: int) -> int | None:
        """The shell could not bind the port it was given: another one (None: none left)."""
        conn = self._current(conn_id, generation)
        return self.clients.port_refused(conn) if conn is not None else None

    def connected(self, now: float, conn_id: int, generation: int) -> bool:
        """The TCP connect succeeded. False: the connection was closed or replaced while
        connecting, and the shell must close this socket."""
        conn = self._current(conn_id, generation)
        return conn is not None and self.clients.connected(conn)

    def connect_failed(self, now: float, conn_id: int, generation: int, reason: str) -> None:
        conn = self._current(conn_id, generation)
        if conn is None:
            return
        conn.close_reason = f"connect failed: {reason}"
        log.warning("%s: %s", conn, conn.close_reason)
        self._lost(now, conn)

    # --- gateway connections (core/gateway_door.py) -------------------------------------

    def accept(
        self, now: float, local: str, local_port: int, peer: str, peer_port: int
    ) -> int | None:
        """A TCP connection arrived on a listener: its connection id, or None when a
        limit refuses it (the shell closes the socket)."""
        return self.door.accept(now, local, local_port, peer, peer_port)

    def admit_proxied(self, now: float, name: str) -> bool:
        """A load balancer's connection, before its PROXY header names the client: False
        when a limit refuses it."""
        return self.door.admit_proxied(now, name)

    def proxied_done(self) -> None:
        """The PROXY header arrived (``accept`` follows) or the connection went."""
        self.admission.proxied_done()

    def front_refused(self, now: float, reason: str, name: str, detail: str) -> None:
        """A connection refused before it was accepted: a bad or missing PROXY header."""
        self.log_limited(now, reason, "refused %s: %s", name, detail)

    def front_failed(
        self, now: float, conn_id: int, generation: int, reason: str, detail: str
    ) -> None:
        """TLS (or a PROXY header where none belongs) failed on an accepted or client
        connection: counted, logged (rate-limited) and closed; a client reconnects."""
        conn = self._current(conn_id, generation)
        if conn is None:
            return
        count(conn.drops, reason)
        self.log_limited(now, reason, "%s: %s", conn, detail)
        self.close(conn, reason)

    # --- bytes from a connection ------------------------------------------------------

    def receive_data(self, now: float, conn_id: int, generation: int, data: bytes) -> None:
        conn = self._current(conn_id, generation)
        if conn is None or conn.ending:
            return  # what a closing connection still receives is not delivered
        conn.reads_in += 1
        conn.bytes_in += len(data)
        codec = conn.codec
        codec.receive_data(data)
        self.frames.drain(now, conn)

    # --- what the native path did (core/fast_path.py) -----------------------------------

    def lend_args(self, conn_id: int) -> tuple[Any, ...] | None:
        """What the native inbound worker needs to read an open connection, or None."""
        return self.fast.lend_args(conn_id)

    def lent_received(
        self,
        now: float,
        conn_id: int,
        generation: int,
        counts: tuple[int, ...],
        drain: bool = True,
        over_rate: bool = False,
    ) -> None:
        """The inbound worker read this much on a lent connection (``FastPath.received``)."""
        conn = self._current(conn_id, generation)
        if conn is not None:
            self.fast.received(now, conn, counts, drain, over_rate)

    def fast_path_sent(
        self, conn_id: int, frames: int, nbytes: int, esp_dropped: int, ike_dropped: int
    ) -> None:
        """The native writer sent (or dropped) this much: counted as the engine's."""
        self.fast.sent(conn_id, frames, nbytes, esp_dropped, ike_dropped)

    def eof_received(self, now: float, conn_id: int, generation: int) -> None:
        conn = self._current(conn_id, generation)
        if conn is not None:
            conn.codec.receive_data(b"")
            self.frames.drain(now, conn)

    # --- closing ----------------------------------------------------------------------

    def close(self, conn: Conn, reason: str) -> None:
        if not conn.close_reason:
            conn.close_reason = reason
        if not conn.ending:
            conn.handle(Event.CLOSE)
            self.datapath.changed()
            self._out.append(Close(conn.conn_id, reason))

    def retire(self, now: float, conn_id: int, reason: str, graceful: bool = True) -> None:
        """Close a connection that carries no IKE SA any more. The TCP originator closes
        (RFC 9329 §6.1) shortly after, so the last IKE message can still leave; a gateway
        gives the client time to do so first."""
        conn = self.conns.get(conn_id)
        if conn is None:
            self.router.remove(conn_id)
            return
        delay = conn.retire_delay(graceful)
        self.timer_queue.call_at(now + delay, self._retire_due, conn_id, reason)

    def _retire_due(self, now: float, conn_id: int, reason: str) -> None:
        conn = self.conns.get(conn_id)  # (a reconnect's next generation retires as well)
        if conn is None or not conn.may_retire():
            return  # gone, or a new SA arrived meanwhile
        conn.retiring = True
        self.close(conn, reason)

    def connection_lost(
        self, now: float, conn_id: int, generation: int, error: str | None = None
    ) -> None:
        conn = self._current(conn_id, generation)
        if conn is None:
            return
        if not conn.close_reason:
            conn.close_reason = f"error: {error}" if error else "closed by peer"
        self._lost(now, conn)

    def _lost(self, now: float, conn: Conn) -> None:
        self.totals_fold(conn)
        conn.handle(Event.LOST)
        self.datapath.changed()
        if conn.side is Role.GATEWAY:
            self.door.lost(now, conn)
        elif self.clients.lost(now, conn, self.stopping):
            return  # its next generation took its place
        del self.conns[conn.conn_id]
        self.router.remove(conn.conn_id)
        log.info(
            "%s: closed (%s) after %.1fs, frames in/out %d/%d",
            conn,
            conn.close_reason,
            now - conn.created,
            conn.frames_in,
            conn.frames_out,
        )

    def totals_fold(self, conn: Conn) -> None:
        """Counters of closed connections, so metrics never go backwards."""
        t = self.totals
        drops = {**conn.view.drops, **conn.drops}
        add_closed(t, conn.frames_in, conn.frames_out, conn.bytes_in, conn.bytes_out, drops)
        key = conn.close_reason.split(":")[0].strip().replace(" ", "-") or "unknown"
        t["closed"][key] = t["closed"].get(key, 0) + 1
        if conn.close_reason.startswith("connect failed"):
            t["connect_failures"] += 1

    def linger(self, now: float, peers: list[bytes], endpoints: list[Endpoint]) -> None:
        """What a previous run steered that charon still holds SAs with: gateway endpoints
        (and whole addresses: a fallback's) stay steered, as after their connection
        closed, until the release poll finds no SA with them."""
        self.lingering.previous_run(now, peers, endpoints)

    def stop(self) -> None:
        """tcpencap is stopping: close everything, reconnect nothing."""
        self.stopping = True
        for conn in list(self.conns.values()):
            self.close(conn, "tcpencap stopping")

    # --- charon's view (VICI) ---------------------------------------------------------

    def vici_state(self, now: float, connected: bool) -> None:
        self.vici_connected = connected
        # While charon reports CHILD SAs, only VICI binds ESP SPIs (so retired SPIs stay
        # gone); without it, charon's own outbound packets teach the table.
        self.router.learn_esp = not connected
        self.datapath.changed()

    def vici_event(self, now: float, label: str, event: dict[str, Any]) -> None:
        up = event.get("up") == "yes"
        if label == "ike-updown" and not up and self.orphans:
            self.orphans.forget(set(ike_spis(event)))
        self.effects.apply(now, self.sync.handle(label, event))
        self.inbound.learn(label, up, event)
        if label in ("ike-updown", "child-updown") and up or label == "ike-rekey":
            self.effects.mark_sa_seen(event)
        if label in ("child-rekey", "ike-update", "ike-rekey"):
            self.questions.reconcile_soon(now, RECONCILE_AFTER_EVENT)

    def vici_resync(self, now: float, sas: list[dict[str, Any]]) -> None:
        self.effects.apply(now, self.sync.resync(sas))
        self.inbound.replace(sas)
        for item in sas:
            self.effects.mark_sa_seen(item)
        self.resumption.resume_pending()

    # --- questions to charon (list-sas) -----------------------------------------------

    def _housekeeping(self, now: float) -> None:
        """What expires with time among the host's rules (every PEER_RELEASE_POLL)."""
        self.orphans.expire(now)
        self.admission.expire(now)
        self.lingering.check(now)

    def sas_listed(self, now: float, purpose: str, sas: list[dict[str, Any]] | None) -> None:
        """charon's IKE SAs for a Query; None: charon could not be asked."""
        if sas is None:
            return  # without charon's word, keep everything as it is (fail-closed)
        if purpose == "reconcile":
            self.sync.reconcile_esp(sas)
            self.effects.apply(now, self.sync.reconcile_ike(now, sas))
            if self.sync.unlisted_ike:  # ask again once their grace is over
                self.questions.reconcile_soon(now, UNLISTED_GRACE)
            self.inbound.replace(sas)
        elif purpose == "peer-release":
            self.lingering.release(now, sas)
        elif purpose == "fallback":
            self.client.fallback_update(now, sas)

    # --- helpers and status -----------------------------------------------------------

    def _current(self, conn_id: int, generation: int) -> Conn | None:
        conn = self.conns.get(conn_id)
        return conn if conn is not None and conn.generation == generation else None

    def conn(self, conn_id: int) -> Conn | None:
        return self.conns.get(conn_id)

    def status(self, now: float) -> list[dict[str, Any]]:
        return [status_of(self.conns[cid], now) for cid in sorted(self.conns)]

    row = staticmethod(status_of)

    def shell_dropped(self, conn_id: int, reason: str, n: int = 1) -> None:
        """What the shell could not carry out (a congested send buffer, a failed
        injection) counts where the engine counts its own drops: on the connection, or the
        host's when there is none (``conn_id`` 0, or one already gone)."""
        conn = self.conns.get(conn_id)
        drops = conn.drops if conn is not None else self.router.drops
        drops[reason] = drops.get(reason, 0) + n
