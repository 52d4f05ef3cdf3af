"""The RFC 9329 engine: every TCP connection of this host, without I/O.

The shell feeds it what happens - a queued packet from charon, bytes read from a TCP
connection, a connection accepted, made, failed or lost, a VICI event, an answer from
``list-sas`` - always with the current time, and pulls :mod:`outputs` (``pull()``). It
arms one timer for ``get_timer()`` and calls ``handle_timer(now)`` when it fires. The same
shape as :class:`tcpencap.core.ctcp_engine.CtcpEngine`.

Here live the rules that change a connection's state: admission and the first-message
deadline, the no-SA deadline, reconnect with backoff (the TCP originator only, RFC 9329
§6.1, resending an outstanding request, §6.2), retire delays, orphaned SAs waiting for
their client, gateway peers that stay steered while charon may still talk to them, and
the UDP-first fallback.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from tcpencap.core.engine import Engine
from tcpencap.core.fallback import FallbackMonitor
from tcpencap.core.outputs import (
    Close,
    Connect,
    Inject,
    Query,
    Steer,
    Transmit,
    bracket,
    count,
)
from tcpencap.core.peers import SteeringRefs
from tcpencap.core.ports import PortAllocator, PortsExhausted
from tcpencap.core.reload import (
    Operation,
    SteerTcp,
    UnsteerTcp,
    UnwatchFallback,
    WatchFallback,
)
from tcpencap.core.rfc9329_conn import TRANSITIONS, WAITING, Conn, Orphan, State, status_of
from tcpencap.core.router import ConnView, Drop, Open, Router, Send, Side
from tcpencap.core.sa_sync import UNLISTED_GRACE, ExpireOld, Retire, SaSync, SpiLimit
from tcpencap.core.table import ConnectionTable
from tcpencap.core.timers import LogLimiter
from tcpencap.core.totals import add_closed, new_totals
from tcpencap.core.vici_facts import (
    address,
    children,
    dicts,
    esp_spi,
    ike_spis,
    inbound_changes,
    inbound_spis,
)
from tcpencap.core.vici_facts import port as vici_port
from tcpencap.wire import rfc9329
from tcpencap.wire.ike import check_first_ike
from tcpencap.wire.packet import addr_text

log = logging.getLogger("tcpencap")

CLIENT_CLOSE_DELAY = 0.5  # after the last IKE SA is gone
GATEWAY_CLOSE_DELAY = 5.0  # the client (TCP originator) should close first
RECONNECT_BASE = 0.2
RECONNECT_MAX = 10.0
MAX_RECONNECTS = 40
FALLBACK_POLL = 1.0
PEER_RELEASE_DELAY = 30.0  # a gateway endpoint without connection stays steered at least this long
PEER_RELEASE_POLL = 5.0
# An endpoint whose connection never carried an SA: charon, the IKE responder there, sends
# nothing on its own, so charon is asked about it after this (not PEER_RELEASE_DELAY), and
# such endpoints are bounded apart from the steering limit (max_pending, oldest out first).
BRIEF_LINGER = 2.0
# A source whose connection was cut for flooding (frame rate, invalid frames) is refused new
# connections this long, so a flood is not simply resumed at once on a new connection (each
# costs an accept, charon's IKE_SA_INIT work, steering); at most COOL_DOWN_MAX sources kept.
COOL_DOWN = 2.0
COOL_DOWN_MAX = 4096
ORPHAN_GRACE = 30.0  # how long a closed gateway connection's SAs wait for its client
RECONCILE_AFTER_EVENT = 2.0  # check SPIs against list-sas this long after a rekey
RECONCILE_PERIOD = 60.0
PENDING_LIMIT = 64  # frames held while a client connection is being opened
LEND_AFTER_FRAMES = 64  # a connection is read by the native inbound worker once it carries ESP
LINGER = "linger"  # steering reason of a gateway endpoint whose connection is gone
BRIEF = "brief"  # ... of one whose connection never carried an SA

Endpoint = tuple[bytes, int]  # (peer address, port): the UDP endpoint charon sees


class Rfc9329Engine(Engine):
    """``native``: the extension of :mod:`tcpencap.native` (or None for the Python path).
    With it, ESP frames of open connections become packets in ``inject_batch`` (sent by the
    shell) instead of Inject outputs, and the shell reads the queue through ``flows``."""

    def __init__(self, config: Any, now: float, native: Any = None) -> None:
        super().__init__()
        self.config = config
        self.native = native
        self.flows = native.FlowCache() if native is not None else None
        self.inject_batch = native.InjectBatch() if native is not None else None
        self.epoch = 0  # bumped when a connection changes state (see _flows_key)
        self._flows_at: tuple[int, int] = (-1, -1)
        self.table = ConnectionTable(max_spis=config.max_spis)
        self.router = Router(self.table, self._is_client_peer, self._is_live)
        self.sync = SaSync(self.router)
        self.fallback = FallbackMonitor()
        self.steering: SteeringRefs[bytes] = SteeringRefs()  # whole addresses (client)
        self.endpoints: SteeringRefs[Endpoint] = SteeringRefs()  # gateway peers' endpoints
        self.ports = PortAllocator(
            config.client.port, config.client.port_range[0], config.client.port_range[1]
        )
        self.conns: dict[int, Conn] = {}
        self.client_peers: dict[bytes, int] = {}  # steered client peer -> TCP port
        self.peer_ports: dict[bytes, int] = {}  # every configured peer -> TCP port
        self.orphans: dict[tuple[bytes, bytes], Orphan] = {}
        self.release_at: dict[Endpoint, float] = {}  # lingering endpoint -> next check
        self.release_peer_at: dict[bytes, float] = {}  # a previous run's whole addresses
        self.brief: dict[Endpoint, None] = {}  # lingering endpoints of SA-less connections
        self.n_gateway = 0  # admitted gateway connections
        self.n_pending = 0  # ... without a first message yet
        self.n_proxied = 0  # connections of a proxy whose PROXY header has not arrived
        self.per_source: dict[str, int] = {}  # source prefix -> admitted connections
        self.pending_per_source: dict[str, int] = {}  # ... of them without a first message
        self.cooling: dict[str, float] = {}  # source prefix cut for a flood -> refused until
        self.vici_connected = False
        self.inbound_spis: dict[int, bytes] = {}  # charon's inbound ESP SPI -> peer (VICI)
        self.inbound_ports: dict[int, int] = {}  # ... -> the peer port of its IKE SA
        self.stopping = False
        self.log_limited = LogLimiter(log.warning)
        self.totals: dict[str, Any] = new_totals(closed={}, connect_failures=0)
        self._fallback_polling = False
        self._release_asked_for = 0.0  # when the next brief-linger question is due
        self._reconcile_due = False
        self.timer_queue.call_at(now + RECONCILE_PERIOD, self._reconcile_tick)
        self.timer_queue.call_at(now + PEER_RELEASE_POLL, self._release_tick)

    # --- the shell's side -------------------------------------------------------------

    @property
    def events(self) -> dict[str, int]:
        return self.log_limited.events

    def pull(self) -> list[Any]:
        self._sync_flows()
        return super().pull()

    # --- the native flow cache ----------------------------------------------------------
    # An entry repeats one decision of Router's fast path plus "the connection is open",
    # which depend only on the table (its version) and connection states (the epoch).

    def _flows_key(self) -> tuple[int, int]:
        return (self.table.version, self.epoch)

    def _sync_flows(self) -> None:
        if self.flows is not None and self._flows_at != self._flows_key():
            self.flows.clear()
            self._flows_at = self._flows_key()

    def ready_flows(self) -> Any:
        """The flow cache, valid now: what the shell reads the queue with (None: the
        Python path)."""
        self._sync_flows()
        return self.flows

    def _codec(self, role: rfc9329.Role) -> Any:
        if self.native is not None:
            return self.native.Deframer(role, max_frame=self.config.max_frame)
        return rfc9329.StreamCodec(role, max_frame=self.config.max_frame)

    def outbound_batch(
        self, now: float, misses: list[bytes], hits: list[tuple[int, bytes, int]]
    ) -> None:
        """One read of the queue by the native path: ``hits`` are framed already, by
        flows installed at this cache's version; ``misses`` take the Python path."""
        out = self._out
        conns = self.conns
        for cid, data, frames in hits:
            conn = conns.get(cid)
            if conn is None or conn.state is not State.OPEN:
                # The entry was made before this connection closed (the cache is cleared at
                # the next pull): its frames have nowhere to go.
                count(self.router.drops, "flow-stale")
                continue
            conn.frames_out += frames
            conn.bytes_out += len(data)
            out.append(Transmit(cid, data, False, frames=frames))
        for packet in misses:
            self.outbound(now, packet)

    # --- configuration (reload plans) -------------------------------------------------

    def apply(self, now: float, ops: list[Operation]) -> None:
        """Run the steering part of a reload plan (tcpencap.core.reload.plan)."""
        for op in ops:
            if isinstance(op, SteerTcp):
                self._set_reason(f"tcp:{op.name}", op.peers, op.port)
            elif isinstance(op, UnsteerTcp):
                self._set_reason(f"tcp:{op.name}", (), 0)
            elif isinstance(op, WatchFallback):
                old = self.fallback.conns.get(op.name)
                self.fallback.add(op.name, [addr_text(p) for p in op.peers], op.timeout)
                for p in op.peers:
                    self.peer_ports[p] = op.port
                if old is not None and old.on_tcp:
                    # Already on TCP: it stays there (with its new peers) while its SAs
                    # live, as if it had just fallen back; the poll brings it back to UDP.
                    self.fallback.conns[op.name].on_tcp = True
                    self._set_reason(f"fallback:{op.name}", op.peers, op.port)
                self._poll_fallback_soon(now)
            elif isinstance(op, UnwatchFallback):
                self.fallback.conns.pop(op.name, None)
                self._set_reason(f"fallback:{op.name}", (), 0)

    def _set_reason(self, reason: str, peers: tuple[bytes, ...], port: int) -> None:
        """Steer exactly ``peers`` for ``reason``: new ones first, then the others stop."""
        for p in peers:
            if port:
                self.peer_ports[p] = port
            self.client_peers[p] = self.peer_ports.get(p, 4500)
            if self.steering.add(p, reason):
                self._out.append(Steer(p, True))
        for p in [p for p in self.steering.peers() if p not in peers]:
            if self.steering.has(p, reason) and self.steering.remove(p, reason):
                self._out.append(Steer(p, False))
        for p in list(self.client_peers):
            if not any(r.startswith(("tcp:", "fallback:")) for r in self.steering.reasons(p)):
                del self.client_peers[p]

    def _is_client_peer(self, addr: bytes) -> bool:
        return addr in self.client_peers

    def _is_live(self, conn_id: int) -> bool:
        conn = self.conns.get(conn_id)
        return conn is not None and conn.state not in (State.CLOSING, State.CLOSED)

    # --- charon's packets -------------------------------------------------------------

    def outbound(self, now: float, packet: bytes) -> None:
        """A UDP packet charon sent to a steered peer (queued in OUTPUT)."""
        before = self._flows_key()
        res = self.router.outbound(packet)
        t = type(res)
        if t is Send:
            conn = self.conns.get(res.conn_id)  # type: ignore[union-attr]
            if conn is None:
                count(self.router.drops, "connection-gone")
            else:
                if not res.is_ike:  # type: ignore[union-attr]
                    conn.sa_seen = True  # charon sends ESP only with a CHILD SA
                elif res.protected and not self.vici_connected:  # type: ignore[union-attr]
                    # Without VICI, charon encrypting IKE on this connection is the best
                    # local evidence that an IKE SA with keys exists.
                    conn.sa_seen = True
                if res.request:  # type: ignore[union-attr]
                    conn.outstanding = res.frame  # type: ignore[union-attr]
                self._send(conn, res.frame, res.is_ike)  # type: ignore[union-attr]
                if (
                    self.flows is not None
                    and self.router.fast_hit
                    and conn.state is State.OPEN
                    and self._flows_key() == before
                ):
                    self._sync_flows()
                    self.flows.install(packet, conn.conn_id)
        elif t is Open:
            self._open_client(now, res)  # type: ignore[arg-type]
        else:
            assert isinstance(res, Drop)
            if res.reason != "nat-keepalive":
                self.log_limited(now, res.reason, "dropped outbound packet: %s", res.reason)
        if self.router.emptied:
            emptied, self.router.emptied = self.router.emptied, []
            for cid in emptied:
                self.retire(now, cid, "its SAs moved to another connection")

    def _send(self, conn: Conn, frame: bytes, is_ike: bool) -> None:
        state = conn.state
        if state is State.OPEN:
            conn.frames_out += 1
            conn.bytes_out += len(frame)
            self._out.append(Transmit(conn.conn_id, frame, is_ike))
        elif state is State.CONNECTING:
            if len(conn.pending) >= PENDING_LIMIT and not is_ike:
                count(conn.drops, "esp-while-connecting")
            else:
                conn.pending.append((frame, is_ike))
        elif is_ike:
            count(conn.drops, "ike-on-closed")
        else:
            count(conn.drops, "esp-on-closed")

    # --- client connections -----------------------------------------------------------

    def _open_client(self, now: float, req: Open) -> None:
        view = self.router.views[req.conn_id]
        conn = self._new_conn(now, view, Side.CLIENT, addr_text(req.local), addr_text(req.peer))
        conn.peer_port = self.peer_ports.get(req.peer, 4500)
        if req.frame:
            conn.pending.append((req.frame, req.frame_is_ike))
        self._connect(conn)
        spis = ", ".join(s.hex() for s in view.entry.ike_spis)
        log.info("%s: opening for IKE SA %s", conn, spis)

    def _new_conn(self, now: float, view: ConnView, side: Side, local: str, peer: str) -> Conn:
        role = rfc9329.Role.ORIGINATOR if side is Side.CLIENT else rfc9329.Role.RESPONDER
        state = State.CONNECTING if side is Side.CLIENT else State.ACCEPTED
        conn = Conn(
            view,
            side,
            state,
            self._codec(role),
            now,
            local,
            peer,
            win_start=now,
        )
        self.conns[view.entry.conn_id] = conn
        return conn

    def _connect(self, conn: Conn) -> None:
        try:
            conn.local_port = self.ports.allocate()
        except PortsExhausted:
            conn.local_port = 0
        e = conn.entry
        self._out.append(
            Connect(conn.conn_id, conn.generation, e.local, conn.local_port, e.peer, conn.peer_port)
        )

    def connect_port_refused(self, conn_id: int, generation: int) -> int | None:
        """The shell could not bind the port it was given: another one (None: none left)."""
        conn = self._current(conn_id, generation)
        if conn is None:
            return None
        refused = {conn.local_port}
        self.ports.release(conn.local_port)
        try:
            conn.local_port = self.ports.allocate(refused)
        except PortsExhausted:
            conn.local_port = 0
            return None
        return conn.local_port

    def local_port(self, conn_id: int) -> int:
        conn = self.conns.get(conn_id)
        return conn.local_port if conn else 0

    def connected(self, now: float, conn_id: int, generation: int) -> bool:
        """The TCP connect succeeded. False: the connection was closed or replaced while
        connecting, and the shell must close this socket."""
        conn = self._current(conn_id, generation)
        if conn is None or conn.state is not State.CONNECTING:
            return False
        conn.attempt = 0
        log.info("%s: connected, sending prefix and %d held frame(s)", conn, len(conn.pending))
        self._goto(conn, State.OPEN)
        self._out.append(Transmit(conn.conn_id, conn.codec.send_prefix(), True))
        conn.bytes_out += len(rfc9329.PREFIX)
        pending, conn.pending = conn.pending, []
        for frame, is_ike in pending:
            self._send(conn, frame, is_ike)
        return True

    def connect_failed(self, now: float, conn_id: int, generation: int, reason: str) -> None:
        conn = self._current(conn_id, generation)
        if conn is None:
            return
        conn.close_reason = f"connect failed: {reason}"
        log.warning("%s: %s", conn, conn.close_reason)
        self._lost(now, conn)

    def _reconnect(self, now: float, conn: Conn) -> None:
        """The TCP originator re-establishes a broken connection while its SA lives."""
        conn.attempt += 1
        conn.generation += 1
        reason, conn.close_reason = conn.close_reason, ""
        conn.codec = self._codec(rfc9329.Role.ORIGINATOR)
        self._set_state(conn, State.CONNECTING)
        conn.pending = [(conn.outstanding, True)] if conn.outstanding is not None else []
        delay = min(RECONNECT_BASE * (2 ** (conn.attempt - 1)), RECONNECT_MAX)
        log.info(
            "%s: lost (%s), reconnecting in %.1fs (attempt %d)", conn, reason, delay, conn.attempt
        )
        self.timer_queue.call_at(now + delay, self._reconnect_due, conn, conn.generation)

    def _reconnect_due(self, now: float, conn: Conn, generation: int) -> None:
        if self.conns.get(conn.conn_id) is conn and conn.generation == generation:
            self._connect(conn)

    # --- gateway connections ----------------------------------------------------------

    def accept(
        self, now: float, local: str, local_port: int, peer: str, peer_port: int
    ) -> int | None:
        """A TCP connection arrived on a listener: its connection id, or None when a
        limit refuses it (the shell closes the socket)."""
        gw = self.config.gateway
        source = self.source_of(peer)
        peer_b = ipaddress.ip_address(peer).packed
        refusal = self._refusal(self.n_gateway, source)
        if refusal is None and self.cooling.get(source, 0.0) > now:
            refusal = ("limit-cool-down", f"{source} flooded a connection, cooling down")
        if refusal is None and self.table.by_endpoint(peer_b, peer_port) is not None:
            # Its endpoint is what charon names the connection by: a second connection from
            # the same address and port (a port-preserving NAT, another listener, a proxy's
            # client) would take the first one's packets.
            refusal = ("endpoint-in-use", f"{bracket(peer)}:{peer_port} has a connection")
        if refusal is not None:
            name = f"{bracket(local)}:{local_port} <-> {bracket(peer)}:{peer_port}"
            self.log_limited(now, refusal[0], "refused %s: %s", name, refusal[1])
            return None
        view = self.router.add_gateway_conn(ipaddress.ip_address(local).packed, peer_b, peer_port)
        conn = self._new_conn(now, view, Side.GATEWAY, local, peer)
        conn.local_port, conn.peer_port = local_port, peer_port
        conn.counted = True
        conn.source = source
        self.n_gateway += 1
        self.n_pending += 1
        self.per_source[source] = self.per_source.get(source, 0) + 1
        self.pending_per_source[source] = self.pending_per_source.get(source, 0) + 1
        self.timer_queue.call_at(now + gw.first_message_timeout, self._first_deadline, conn)
        log.info("%s: accepted", conn)
        return conn.conn_id

    def source_of(self, peer: str) -> str:
        """The source prefix ``peer`` counts under (source_prefix_v4 / _v6)."""
        gw = self.config.gateway
        addr = ipaddress.ip_address(peer)
        bits = gw.source_prefix_v4 if addr.version == 4 else gw.source_prefix_v6
        return str(ipaddress.ip_network((addr, bits), strict=False))

    def _refusal(self, connections: int, source: str | None) -> tuple[str, str] | None:
        """The gateway limit a new connection would break (the per-source ones only for a
        known ``source`` prefix): its event key and what to log, or None."""
        gw = self.config.gateway
        pending = self.n_pending + self.n_proxied
        if connections >= gw.max_connections:
            return ("limit-connections", f"{connections} connections")
        if source is not None:
            if self.per_source.get(source, 0) >= gw.max_per_source:
                return ("limit-per-source", f"{self.per_source[source]} connections from {source}")
            waiting = self.pending_per_source.get(source, 0)
            if waiting >= gw.max_pending_per_source:
                return (
                    "limit-pending-per-source",
                    f"{waiting} connections from {source} without a first message",
                )
        if pending >= gw.max_pending:
            return ("limit-pending", f"{pending} connections without a first message")
        return None

    def _unpend(self, conn: Conn) -> None:
        """A counted gateway connection no longer waits for its first message."""
        self.n_pending -= 1
        _decrement(self.pending_per_source, conn.source)

    def admit_proxied(self, now: float, name: str) -> bool:
        """A load balancer's connection, before its PROXY header names the client: it
        takes a pending slot, and the per-source limit applies to the client later."""
        refusal = self._refusal(self.n_gateway + self.n_proxied, None)
        if refusal is not None:
            self.log_limited(now, refusal[0], "refused %s: %s", name, refusal[1])
            return False
        self.n_proxied += 1
        return True

    def proxied_done(self) -> None:
        """The PROXY header arrived (``accept`` follows) or the connection went."""
        self.n_proxied -= 1

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

    def _first_deadline(self, now: float, conn: Conn) -> None:
        if conn.state in WAITING and self.conns.get(conn.conn_id) is conn:
            count(conn.drops, "first-message-timeout")
            what = "message" if conn.codec.prefix_received else "prefix"
            self.log_limited(
                now, "deadline", "%s: no well-formed first %s within the deadline", conn, what
            )
            self.close(conn, "first-message deadline")

    def _sa_deadline(self, now: float, conn: Conn) -> None:
        """A gateway connection must carry an IKE SA soon after its first message; one
        that only ever exchanges unauthenticated messages would pin a connection slot."""
        if conn.sa_seen or self.conns.get(conn.conn_id) is not conn:
            return
        if conn.state is State.OPEN:
            count(conn.drops, "no-sa-timeout")
            self.log_limited(
                now, "limit-no-sa", "%s: no IKE SA %gs after its first message, closing",
                conn, self.config.gateway.no_sa_timeout,
            )  # fmt: skip
            self.close(conn, "no IKE SA")

    def _first_message(self, now: float, conn: Conn) -> None:
        """The first well-formed message: past the first-message deadline."""
        self._goto(conn, State.OPEN)
        conn.first_at = now
        if conn.side is not Side.GATEWAY:
            return
        if conn.counted:
            self._unpend(conn)
        e = conn.entry
        orphan = self.orphans.pop((e.local, e.peer), None) if self.orphans else None
        if orphan is not None and orphan.deadline >= now and not e.carries_sa:
            # A reconnect resumes an existing SA: ESP, or IKE of one of the orphaned SAs.
            # An IKE_SA_INIT (or another SA's message) means a new SA: the orphan is stale.
            first = conn.first_spi
            if first is None or first in orphan.ike:
                self._adopt(conn, orphan.ike, orphan.esp, orphan.sa_seen)
        ep = (e.peer, e.peer_port)
        if self.endpoints.add(ep, f"conn:{conn.conn_id}"):
            if len(self.endpoints) - len(self.brief) > self.config.gateway.max_connections:
                self.endpoints.remove(ep, f"conn:{conn.conn_id}")
                self.log_limited(now, "limit-steered", "refused %s: steering set full", conn)
                self.close(conn, "limit-steered")
                return
            self._out.append(Steer(e.peer, True, e.peer_port))
        self.release_at.pop(ep, None)
        if ep in self.brief:
            del self.brief[ep]
            self.endpoints.remove(ep, BRIEF)
        if not conn.sa_seen:
            self.timer_queue.call_at(
                now + self.config.gateway.no_sa_timeout, self._sa_deadline, conn
            )

    def _adopt(self, conn: Conn, ike: list[bytes], esp: list[int], sa_seen: bool) -> None:
        # First come: an SPI charon has meanwhile placed on another connection stays there.
        self.table.bind_all(conn.conn_id, ike, esp)
        conn.sa_seen = conn.sa_seen or sa_seen
        log.info("%s: SAs of an earlier connection handed over (reconnect)", conn)

    # --- bytes from a connection ------------------------------------------------------

    def receive_data(self, now: float, conn_id: int, generation: int, data: bytes) -> None:
        conn = self._current(conn_id, generation)
        if conn is None or conn.state is State.CLOSING or conn.state is State.CLOSED:
            return  # what a closing connection still receives is not delivered
        conn.reads_in += 1
        conn.bytes_in += len(data)
        codec = conn.codec
        codec.receive_data(data)
        self._drain(now, conn)

    @staticmethod
    def _other_frames(conn: Conn) -> int:
        """The frames that count toward max_frame_rate: IKE, keepalives, invalid ones, and
        ESP too until charon has vouched for an SA on the connection (``sa_seen``): what a
        peer can send to cost the event loop without carrying anything of a tunnel's."""
        return conn.codec.frames_in - (conn.esp_frames if conn.sa_seen else 0)

    def _frame_budget(self, now: float, conn: Conn) -> int:
        """The count of :meth:`_other_frames` at which a gateway connection goes over
        max_frame_rate in the current one-second window. The ESP of a connection charon
        has an SA on does not count: it is what the tunnel carries, as fast as TCP takes
        it (a 1 Gbit/s tunnel is 90,000 frames a second)."""
        if conn.side is not Side.GATEWAY:
            return 1 << 62
        if now - conn.win_start >= 1.0:
            conn.win_start, conn.win_frames = now, self._other_frames(conn)
        return conn.win_frames + self.config.gateway.max_frame_rate

    def _over_rate(self, now: float, conn: Conn) -> None:
        count(conn.drops, "frame-rate")
        self.log_limited(now, "limit-frame-rate", "%s: over max_frame_rate frames/s, closing", conn)
        self._cool_down(now, conn)
        self.close(conn, "frame rate limit")

    def _cool_down(self, now: float, conn: Conn) -> None:
        """Refuse the source of a connection cut for flooding for COOL_DOWN."""
        if not conn.source:
            return
        self.cooling.pop(conn.source, None)
        self.cooling[conn.source] = now + COOL_DOWN
        while len(self.cooling) > COOL_DOWN_MAX:
            del self.cooling[next(iter(self.cooling))]

    def _invalid(self, now: float, conn: Conn, reason: str) -> None:
        """A frame that carries nothing usable: counted (``reason``, a fixed name), and
        max_invalid_frames of them close the connection (RFC 9329 §6.1 allows it)."""
        count(conn.drops, reason)
        conn.invalid += 1
        if conn.side is Side.GATEWAY and conn.invalid >= self.config.gateway.max_invalid_frames:
            self.log_limited(
                now, "limit-invalid-frames", "%s: %d invalid frames, closing", conn, conn.invalid
            )
            self._cool_down(now, conn)
            self.close(conn, "too many invalid frames")

    # --- connections lent to the native inbound worker ---------------------------------

    def lend_args(self, conn_id: int) -> tuple[Any, ...] | None:
        """(deframer, peer, local, sport, dport, max_rate) of an open connection the
        native inbound worker may read for us, or None."""
        conn = self.conns.get(conn_id)
        view = self.router.views.get(conn_id)
        if self.native is None or conn is None or view is None or conn.state is not State.OPEN:
            return None
        if conn.frames_in < LEND_AFTER_FRAMES:
            return None  # IKE alone (set-up, DPD) is cheaper on the loop than a thread hand-off
        if conn.side is Side.GATEWAY and not conn.sa_seen:
            return None  # its ESP still counts toward the frame rate, on the loop
        rate = self.config.gateway.max_frame_rate if conn.side is Side.GATEWAY else 0
        return (conn.codec, *self._esp_template(view), rate)

    def _esp_template(self, view: ConnView) -> tuple[bytes, bytes, int, int]:
        """(source, destination, source port, destination port) of the packets a
        connection's ESP becomes, as router.inbound_esp builds them."""
        return (view.entry.peer, view.entry.local, *self.router.ports_of(view, False))

    def lent_received(
        self,
        now: float,
        conn_id: int,
        generation: int,
        counts: tuple[int, ...],
        drain: bool = True,
        over_rate: bool = False,
    ) -> None:
        """The inbound worker read (frames ESP frames injected, bytes, reads, keepalives it
        dropped) for us; with ``drain`` it stopped before a frame the engine must see,
        which is handled now; ``over_rate``: it counted more than max_frame_rate frames
        (of every kind) in a second."""
        conn = self._current(conn_id, generation)
        if conn is None:
            return
        frames, nbytes, reads, *rest = counts
        conn.frames_in += frames
        conn.esp_frames += frames
        conn.bytes_in += nbytes
        conn.reads_in += reads
        if rest and rest[0]:
            conn.drops["keepalive"] = conn.drops.get("keepalive", 0) + rest[0]
        if over_rate and conn.state is not State.CLOSING and conn.state is not State.CLOSED:
            self._over_rate(now, conn)
        elif drain and conn.state is not State.CLOSING and conn.state is not State.CLOSED:
            self._drain(now, conn)

    def eof_received(self, now: float, conn_id: int, generation: int) -> None:
        conn = self._current(conn_id, generation)
        if conn is not None:
            conn.codec.receive_data(b"")
            self._drain(now, conn)

    def _drain(self, now: float, conn: Conn) -> None:
        codec = conn.codec
        router = self.router
        out = self._out
        cid = conn.conn_id
        batch = self.inject_batch
        view = router.views.get(cid)
        pump_args: tuple[Any, ...] | None = None
        budget = self._frame_budget(now, conn)
        while conn.state is not State.CLOSING:
            if batch is not None and conn.state is State.OPEN and view is not None:
                # The native path: ESP frames become packets as router.inbound_esp builds
                # them; what else arrives comes back as the event next_event() would give.
                if pump_args is None:
                    pump_args = (batch, *self._esp_template(view))
                ev, esp = codec.pump(*pump_args)
                conn.frames_in += esp
                conn.esp_frames += esp
                if codec.keepalives:  # dropped in C, counted here
                    drops = conn.drops
                    drops["keepalive"] = drops.get("keepalive", 0) + codec.keepalives
                    codec.keepalives = 0
            else:
                ev = codec.next_event()
            t = type(ev)
            if t is rfc9329.ESPPacket:
                conn.esp_frames += 1
            if self._other_frames(conn) > budget:  # every frame but ESP counts
                self._over_rate(now, conn)
                return
            if t is rfc9329.ESPPacket:
                conn.frames_in += 1
                if conn.state is not State.OPEN and not self._admit_esp(now, conn, ev.data):  # type: ignore[union-attr]
                    continue
                res = router.inbound_esp(cid, ev.data)  # type: ignore[union-attr]
            elif t is rfc9329.IKEMessage:
                conn.frames_in += 1
                msg = ev.data  # type: ignore[union-attr]
                if conn.state is not State.OPEN and not self._admit_ike(now, conn, msg):
                    continue
                if conn.outstanding is not None and len(msg) > 19 and msg[19] & 0x20:
                    conn.outstanding = None  # the response to our request arrived
                conn.got_ike = True
                res = router.inbound_ike(cid, msg)
            elif t is rfc9329.NeedData:
                return
            elif t is rfc9329.PrefixReceived:
                if conn.state is State.ACCEPTED:
                    self._goto(conn, State.PREFIX_RECEIVED)
                continue
            elif t is rfc9329.Keepalive:
                count(conn.drops, "keepalive")
                continue
            elif t is rfc9329.InvalidFrame:
                self.log_limited(now, "invalid-frame", "%s: dropped frame: %s", conn, ev)
                self._invalid(now, conn, "invalid-frame")
                continue
            elif t is rfc9329.ConnectionClosed:
                self.close(conn, "peer closed the connection")
                return
            else:  # ProtocolError
                count(conn.drops, "protocol-error")
                self.close(conn, f"protocol error: {ev.reason}")  # type: ignore[union-attr]
                return
            if type(res) is Inject:
                out.append(res)
            elif res.reason == "frame-too-big":  # type: ignore[union-attr]
                self.log_limited(
                    now, "frame-too-big", "%s: dropped a frame no UDP datagram can carry", conn
                )
                self._invalid(now, conn, "frame-too-big")
            else:
                count(conn.drops, res.reason)  # type: ignore[union-attr]

    def _admit_ike(self, now: float, conn: Conn, msg: bytes) -> bool:
        """Before its first message, a connection passes only a well-formed IKE message
        (header consistent with the frame, a known exchange type)."""
        problem = check_first_ike(msg)
        if problem:
            self.log_limited(now, "malformed-first", "%s: first message refused: %s", conn, problem)
            self._invalid(now, conn, "malformed-first-ike")
            return False
        conn.first_spi = msg[:8]  # (not the message: an IKE_SA_INIT is ~1 KB per connection)
        self._first_message(now, conn)
        return conn.state is State.OPEN

    def _admit_esp(self, now: float, conn: Conn, packet: bytes) -> bool:
        """... or ESP for an SPI charon has an inbound CHILD SA for with this peer (an SA
        resuming on a new connection, §6.1): a stranger's ESP is dropped and the deadline
        keeps running. Without VICI there is no such list: plausible ESP passes, and the
        no-SA deadline then asks for charon's own traffic on the connection."""
        spi = int.from_bytes(packet[:4], "big") if len(packet) >= 8 else 0
        if self.vici_connected:
            known = self.inbound_spis.get(spi) == conn.entry.peer
        else:
            known = spi >= 256  # 1-255 are reserved (RFC 4303 §2.1)
        if not known:
            count(conn.drops, "esp-unknown-spi-first")
            self.log_limited(
                now, "unknown-esp-first", "%s: first message refused: ESP for unknown SPI", conn
            )
            return False
        conn.sa_seen = self.vici_connected
        self._first_message(now, conn)
        if conn.state is State.OPEN and self.vici_connected:
            self._resume_endpoint(now, conn, self.inbound_ports.get(spi, 0))
        elif conn.state is State.OPEN:
            conn.resume_spi = spi  # charon's word comes with VICI (_resume_pending)
        return conn.state is State.OPEN

    def _resume_pending(self, now: float) -> None:
        """Connections whose first message was ESP while VICI was down (a client that came
        back at once after a restart of tcpencap): now that charon's SAs are known, the
        one that resumes an SA of its address takes that SA's endpoint too."""
        for conn in list(self.conns.values()):
            spi, conn.resume_spi = conn.resume_spi, 0
            if spi and conn.state is State.OPEN and self.inbound_spis.get(spi) == conn.entry.peer:
                self._resume_endpoint(now, conn, self.inbound_ports.get(spi, 0))

    def _resume_endpoint(self, now: float, conn: Conn, port: int) -> None:
        """A connection resumes an SA of charon's (its first message was that SA's ESP)
        whose charon endpoint is another port of the same address, e.g. the connection
        before a restart of tcpencap: until charon follows the new port, what it sends to
        the old one is this connection's, so that endpoint is steered and routed to it."""
        e = conn.entry
        if port == e.peer_port or not self.table.alias(conn.conn_id, port):
            return
        ep = (e.peer, port)
        if self.endpoints.add(ep, f"conn:{conn.conn_id}"):
            self._out.append(Steer(e.peer, True, port))
        self.release_at.pop(ep, None)
        if ep in self.brief:
            del self.brief[ep]
            self.endpoints.remove(ep, BRIEF)
        log.info("%s: resumes an SA charon has with port %d", conn, port)

    # --- closing ----------------------------------------------------------------------

    def close(self, conn: Conn, reason: str) -> None:
        if not conn.close_reason:
            conn.close_reason = reason
        if conn.state not in (State.CLOSING, State.CLOSED):
            self._set_state(conn, State.CLOSING)
            self._out.append(Close(conn.conn_id, reason))

    def retire(self, now: float, conn_id: int, reason: str, graceful: bool = True) -> None:
        """Close a connection that carries no IKE SA any more. The TCP originator closes
        (RFC 9329 §6.1) shortly after, so the last IKE message can still leave; a gateway
        gives the client time to do so first."""
        conn = self.conns.get(conn_id)
        if conn is None:
            self.router.remove(conn_id)
            return
        delay = 0.0
        if graceful:
            delay = CLIENT_CLOSE_DELAY if conn.side is Side.CLIENT else GATEWAY_CLOSE_DELAY
        self.timer_queue.call_at(now + delay, self._retire_due, conn, reason)

    def _retire_due(self, now: float, conn: Conn, reason: str) -> None:
        if self.conns.get(conn.conn_id) is not conn:
            return
        if conn.entry.ike_spis or conn.entry.ike_spis_old:
            return  # a new SA arrived meanwhile
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
        self._set_state(conn, State.CLOSED)
        if conn.side is Side.CLIENT and conn.local_port:
            self.ports.release(conn.local_port)
        if conn.counted:
            conn.counted = False
            self.n_gateway -= 1
            if conn.first_at is None:
                self._unpend(conn)
            _decrement(self.per_source, conn.source)
        entry = conn.entry
        carried = conn.sa_seen
        if (
            conn.side is Side.CLIENT
            and not conn.retiring
            and not self.stopping
            and (conn.got_ike or conn.attempt)
            and (entry.ike_spis or entry.ike_spis_old)
            and conn.attempt < MAX_RECONNECTS
        ):
            self._reconnect(now, conn)
            return
        if conn.side is Side.GATEWAY and entry.carries_sa:
            self._hand_over(now, conn)
        del self.conns[conn.conn_id]
        self.router.remove(conn.conn_id)
        if conn.side is Side.GATEWAY and conn.first_at is not None:
            for port in (entry.peer_port, *entry.aliases):
                self._linger(now, (entry.peer, port), conn.conn_id, carried)
        log.info(
            "%s: closed (%s) after %.1fs, frames in/out %d/%d",
            conn,
            conn.close_reason,
            now - conn.created,
            conn.frames_in,
            conn.frames_out,
        )

    def _linger(self, now: float, ep: Endpoint, conn_id: int, carried: bool) -> None:
        """Keep steering the endpoint of a gateway connection that closed: charon may
        still talk to it (DPD, rekey, a client about to reconnect), and that must not
        leave as UDP. It is released once charon has no established IKE SA with it (see
        _release_tick); one whose connection never carried an SA is asked about sooner
        and does not count against the steering limit."""
        if ep not in self.endpoints:
            return  # never steered (refused at the steering limit)
        real = carried or self.endpoints.has(ep, LINGER)
        self.endpoints.add(ep, LINGER if real else BRIEF)
        self.endpoints.remove(ep, f"conn:{conn_id}")
        if real and ep in self.brief:
            del self.brief[ep]
            self.endpoints.remove(ep, BRIEF)
        if any(r.startswith("conn:") for r in self.endpoints.reasons(ep)):
            return
        if real:
            self.release_at[ep] = now + PEER_RELEASE_DELAY
            return
        self.brief.pop(ep, None)
        self.brief[ep] = None
        self.release_at[ep] = now + BRIEF_LINGER
        if self._release_asked_for <= now:  # one question at a time, not one per connection
            self._release_asked_for = now + BRIEF_LINGER
            self.timer_queue.call_at(now + BRIEF_LINGER, self._release_check)
        while len(self.brief) > self.config.gateway.max_pending:
            self._unsteer(next(iter(self.brief)))

    def _unsteer(self, ep: Endpoint) -> None:
        """Stop steering a lingering endpoint."""
        self.brief.pop(ep, None)
        self.release_at.pop(ep, None)
        if self.endpoints.remove(ep, BRIEF) | self.endpoints.remove(ep, LINGER):
            self._out.append(Steer(ep[0], False, ep[1]))

    def _hand_over(self, now: float, conn: Conn) -> None:
        """A gateway connection that carried SAs is gone. Its client is expected back on a
        new connection: the newest connection of the same pair that carries no SA of its
        own takes the SPIs, now or when its first message arrives within ORPHAN_GRACE."""
        old = conn.entry
        ike, esp = self.table.release(old.conn_id)
        newer = [
            e
            for e in self.table.for_pair(old.local, old.peer)
            if not e.carries_sa and e.conn_id != old.conn_id
        ]
        target = self.conns.get(newer[-1].conn_id) if newer else None
        if (
            target is not None
            and target.state is State.OPEN
            and (target.first_spi is None or target.first_spi in ike)
        ):
            # Only a connection that resumed one of these SAs (its first message was their
            # ESP or IKE) takes them now; any other waits as an orphan, like _first_message.
            self._adopt(target, ike, esp, conn.sa_seen)
        else:
            self.orphans[(old.local, old.peer)] = Orphan(now + ORPHAN_GRACE, ike, esp, conn.sa_seen)

    def fast_path_sent(
        self, conn_id: int, frames: int, nbytes: int, esp_dropped: int, ike_dropped: int
    ) -> None:
        """The native path wrote (or dropped, over the send bound) this much on a
        connection since its last report: counted as if the engine had sent it."""
        conn = self.conns.get(conn_id)
        if conn is None:
            return
        conn.frames_out += frames
        conn.bytes_out += nbytes
        for key, n in (("esp-congested", esp_dropped), ("ike-congested", ike_dropped)):
            if n:
                conn.drops[key] = conn.drops.get(key, 0) + n

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
        for ep in endpoints:
            if self.endpoints.add(ep, LINGER):
                self._out.append(Steer(ep[0], True, ep[1]))
            self.release_at[ep] = now + PEER_RELEASE_DELAY
        for peer in peers:
            if self.steering.add(peer, LINGER):
                self._out.append(Steer(peer, True))
            self.release_peer_at[peer] = now + PEER_RELEASE_DELAY

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
        self.epoch += 1

    def vici_event(self, now: float, label: str, event: dict[str, Any]) -> None:
        up = event.get("up") == "yes"
        if label == "ike-updown" and not up and self.orphans:
            self._forget_orphans(event)
        self._apply_effects(now, self.sync.handle(label, event))
        self._learn_inbound(label, up, event)
        if label in ("ike-updown", "child-updown") and up or label == "ike-rekey":
            self._mark_sa_seen(event)
        if label in ("child-rekey", "ike-update", "ike-rekey"):
            self._reconcile_soon(now, RECONCILE_AFTER_EVENT)

    def vici_resync(self, now: float, sas: list[dict[str, Any]]) -> None:
        self._apply_effects(now, self.sync.resync(sas))
        self.inbound_spis = inbound_spis(sas)
        self.inbound_ports = inbound_ports(sas)
        for item in sas:
            self._mark_sa_seen(item)
        self._resume_pending(now)

    def _learn_inbound(self, label: str, up: bool, event: dict[str, Any]) -> None:
        """charon's inbound ESP SPIs by peer: what a resuming client may send first."""
        for spi, peer in inbound_changes(label, up, event):
            if peer is None:
                self.inbound_spis.pop(spi, None)
                self.inbound_ports.pop(spi, None)
            else:
                self.inbound_spis[spi] = peer
        if up or label == "child-rekey":
            self.inbound_ports.update(inbound_ports([event]))

    def _mark_sa_seen(self, event: dict[str, Any]) -> None:
        """charon's word that an IKE SA exists: the connections carrying it pass the
        no-SA deadline."""
        for spi in ike_spis(event):
            entry = self.table.find_ike_spi(spi)
            conn = self.conns.get(entry.conn_id) if entry else None
            if conn is not None:
                conn.sa_seen = True

    def _forget_orphans(self, event: dict[str, Any]) -> None:
        """charon deleted these IKE SAs: no reconnect will resume them."""
        gone = set(ike_spis(event))
        for pair, orphan in list(self.orphans.items()):
            orphan.ike = [spi for spi in orphan.ike if spi not in gone]
            if not orphan.ike:
                del self.orphans[pair]

    def _apply_effects(self, now: float, effects: list[Any]) -> None:
        for eff in effects:
            if isinstance(eff, Retire):
                self.retire(now, eff.conn_id, eff.reason, eff.graceful)
            elif isinstance(eff, Open):
                self._open_client(now, eff)
            elif isinstance(eff, SpiLimit):
                conn = self.conns.get(eff.conn_id)
                if conn is not None:
                    count(conn.drops, "spi-limit")
                log.warning(
                    "conn %d: CHILD SA with SPI %08x not indexed: max_spis (%d) reached; "
                    "it is carried on the connection of its address pair",
                    eff.conn_id,
                    eff.spi,
                    self.config.max_spis,
                )
            elif isinstance(eff, ExpireOld):
                self.timer_queue.call_at(now + eff.delay, self._expire_old, eff.conn_id, eff.spi)

    def _expire_old(self, now: float, conn_id: int, spi: bytes) -> None:
        self._apply_effects(now, self.sync.expire_old(conn_id, spi))

    # --- questions to charon (list-sas) -----------------------------------------------

    def _reconcile_soon(self, now: float, delay: float) -> None:
        if not self._reconcile_due:
            self._reconcile_due = True
            self.timer_queue.call_at(now + delay, self._ask, "reconcile")

    def _ask(self, now: float, purpose: str) -> None:
        if purpose == "reconcile":
            self._reconcile_due = False
        self._out.append(Query(purpose))

    def _reconcile_tick(self, now: float) -> None:
        self.timer_queue.call_at(now + RECONCILE_PERIOD, self._reconcile_tick)
        if self.vici_connected and len(self.table):
            self._reconcile_soon(now, 0.0)

    def _release_tick(self, now: float) -> None:
        self.timer_queue.call_at(now + PEER_RELEASE_POLL, self._release_tick)
        for pair in [p for p, o in self.orphans.items() if o.deadline < now]:
            del self.orphans[pair]
        for source in [s for s, until in self.cooling.items() if until <= now]:
            del self.cooling[source]
        self._release_check(now)

    def _release_check(self, now: float) -> None:
        due = (*self.release_at.values(), *self.release_peer_at.values())
        if any(t <= now for t in due):
            self._out.append(Query("peer-release"))

    def _poll_fallback_soon(self, now: float) -> None:
        if not self._fallback_polling and self.fallback.conns:
            self._fallback_polling = True
            self.timer_queue.call_at(now + FALLBACK_POLL, self._fallback_tick)

    def _fallback_tick(self, now: float) -> None:
        self._fallback_polling = False
        if self.fallback.conns:
            self._out.append(Query("fallback"))
            self._poll_fallback_soon(now)

    def sas_listed(self, now: float, purpose: str, sas: list[dict[str, Any]] | None) -> None:
        """charon's IKE SAs for a Query; None: charon could not be asked."""
        if sas is None:
            return  # without charon's word, keep everything as it is (fail-closed)
        if purpose == "reconcile":
            self.sync.reconcile_esp(sas)
            self._apply_effects(now, self.sync.reconcile_ike(now, sas))
            if self.sync.unlisted_ike:  # ask again once their grace is over
                self._reconcile_soon(now, UNLISTED_GRACE)
            self.inbound_spis = inbound_spis(sas)
            self.inbound_ports = inbound_ports(sas)
        elif purpose == "peer-release":
            self._release_peers(now, sas)
        elif purpose == "fallback":
            self._fallback_update(now, sas)

    def _release_peers(self, now: float, sas: list[dict[str, Any]]) -> None:
        """Stop steering gateway endpoints that have no connection and no IKE SA in
        charon with that remote host and port, other than one still being set up
        (CONNECTING: as its responder charon sends nothing unasked; a stranger's
        IKE_SA_INIT leaves one behind for charon's half-open timeout)."""
        busy: set[Endpoint] = set()
        for item in sas:
            for sa in item.values():
                if not isinstance(sa, dict) or sa.get("state") == "CONNECTING":
                    continue
                host = address(sa.get("remote-host"))
                if host is not None:
                    busy.add((host, vici_port(sa.get("remote-port"), 0)))
        hosts = {host for host, _port in busy}
        for peer in [p for p, t in self.release_peer_at.items() if t <= now]:
            if peer in hosts:
                self.release_peer_at[peer] = now + PEER_RELEASE_DELAY
            else:
                del self.release_peer_at[peer]
                if self.steering.remove(peer, LINGER):
                    self._out.append(Steer(peer, False))
        for ep in [p for p, t in self.release_at.items() if t <= now]:
            if any(r.startswith("conn:") for r in self.endpoints.reasons(ep)):
                del self.release_at[ep]
            elif ep in busy:
                self.release_at[ep] = now + PEER_RELEASE_DELAY
                if ep in self.brief:  # charon has an SA there after all: a real peer
                    del self.brief[ep]
                    self.endpoints.add(ep, LINGER)
                    self.endpoints.remove(ep, BRIEF)
            else:
                self._unsteer(ep)

    def _fallback_update(self, now: float, sas: list[dict[str, Any]]) -> None:
        for sw in self.fallback.update(now, sas):
            peers = tuple(ipaddress.ip_address(p).packed for p in sw.peers)
            if sw.tcp:
                log.warning(
                    "connection %s: no answer over UDP, falling back to TCP for %s",
                    sw.name,
                    ", ".join(sw.peers),
                )
                self._set_reason(f"fallback:{sw.name}", peers, 0)
            else:
                log.info("connection %s: no SA left, back to UDP first", sw.name)
                self._set_reason(f"fallback:{sw.name}", (), 0)

    # --- helpers and status -----------------------------------------------------------

    def _current(self, conn_id: int, generation: int) -> Conn | None:
        conn = self.conns.get(conn_id)
        return conn if conn is not None and conn.generation == generation else None

    def _goto(self, conn: Conn, new: State) -> None:
        if new not in TRANSITIONS[conn.state]:
            raise AssertionError(f"{conn}: {conn.state.value} -> {new.value}")
        self._set_state(conn, new)

    def _set_state(self, conn: Conn, new: State) -> None:
        """Every state change goes here: the native flow cache is valid for one epoch."""
        conn.state = new
        self.epoch += 1

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


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 1) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def inbound_ports(items: list[dict[str, Any]]) -> dict[int, int]:
    """charon's inbound ESP SPI -> the remote port of its IKE SA, from list-sas items or
    events (a child-rekey's new SPIs included)."""
    ports: dict[int, int] = {}
    for item in items:
        for sa in dicts(item):
            port = vici_port(sa.get("remote-port"), 0)
            for child in children(sa):
                for c in (child, child.get("new")):
                    spi = esp_spi(c.get("spi-in")) if isinstance(c, dict) else None
                    if spi is not None and port:
                        ports[spi] = port
    return ports
