"""The asyncio daemon: wires the NFQUEUE reader, RFC 9329 TCP connections, the router,
the injector, VICI and the control socket together. Decisions live in the sans-I/O core
(router, table, codec); this module only moves bytes and keeps counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nfq.inject import RawInjector
from nfq.queue import QueueReader
from nfq.rules import SteeringRules
from tcpencap.aio.ctcp_service import CtcpService
from tcpencap.aio.sockopts import set_ipsec_bypass, set_nodelay
from tcpencap.config import Config
from tcpencap.confparse import ConfError
from tcpencap.core.fallback import FallbackMonitor
from tcpencap.core.ports import PortAllocator, PortsExhausted
from tcpencap.core.router import ConnView, Drop, Inject, Open, Router, Send, Side
from tcpencap.core.sa_sync import ExpireOld, Retire, SaSync, SpiLimit
from tcpencap.core.table import ConnectionTable
from tcpencap.metrics import add_closed, new_totals
from tcpencap.wire import rfc9329
from tcpencap.wire.packet import addr_bytes, addr_text
from vici_bridge.bridge import ViciBridge
from vici_bridge.resolve import list_sas

log = logging.getLogger("tcpencap")

CLIENT_CLOSE_DELAY = 0.5  # after the last IKE SA is gone
GATEWAY_CLOSE_DELAY = 5.0  # the client (TCP originator) should close first
RECONNECT_BASE = 0.2
RECONNECT_MAX = 10.0
MAX_RECONNECTS = 40
FALLBACK_POLL = 1.0
PEER_RELEASE_DELAY = 30.0  # a gateway peer without connection stays steered at least this long
PEER_RELEASE_POLL = 5.0
ORPHAN_GRACE = 30.0  # how long a closed gateway connection's SAs wait for its client
RECONCILE_AFTER_EVENT = 2.0  # check ESP SPIs against list-sas this long after a rekey
RECONCILE_PERIOD = 60.0
PENDING_LIMIT = 64  # frames held while a client connection is being opened
IKE_HARD_LIMIT_FACTOR = 4  # IKE may overshoot the send buffer bound this many times


def _count(d: dict[str, int], key: str) -> None:
    d[key] = d.get(key, 0) + 1


class TcpConnection(asyncio.Protocol):
    """One RFC 9329 TCP connection, either side."""

    def __init__(self, daemon: Daemon, side: Side) -> None:
        self.daemon = daemon
        self.side = side
        role = rfc9329.Role.ORIGINATOR if side is Side.CLIENT else rfc9329.Role.RESPONDER
        self.codec = rfc9329.StreamCodec(role, max_frame=daemon.config.max_frame)
        self.view: ConnView | None = None
        self.transport: asyncio.Transport | None = None
        self.state = "connecting" if side is Side.CLIENT else "accepted"
        self.created = time.monotonic()
        self.local_port = 0
        self.peer_port = 0
        self.local_text = ""
        self.peer_text = ""
        self.frames_in = self.frames_out = 0
        self.bytes_in = self.bytes_out = 0
        self.reads_in = 0  # data_received calls: frames_in / reads_in is the batching
        self.drops: dict[str, int] = {}
        self.pending: list[tuple[bytes, bool]] = []
        self.deadline: asyncio.TimerHandle | None = None
        self.got_ike = False
        self.got_message = False
        self.close_reason = ""
        self.retiring = False  # closed on purpose: no reconnect
        self.outstanding: bytes | None = None  # last IKEv2 request sent, for a reconnect
        self.attempt = 0
        self.pending_counted = False  # counted in the gateway's pending connections
        self.uncounted = False  # removed from the gateway's counts
        self._win_start = time.monotonic()  # frame-rate window
        self._win_frames = 0
        self._wbuf: list[bytes] = []  # frames of the current queue batch
        self._wlen = 0

    @property
    def conn_id(self) -> int:
        return self.view.conn_id if self.view else 0

    def describe(self) -> str:
        return (
            f"conn {self.conn_id} {self.side.value} "
            f"{self.local_text}:{self.local_port} <-> {self.peer_text}:{self.peer_port}"
        )

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        local = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        self.local_text, self.local_port = _host(local[0]), local[1]
        self.peer_text, self.peer_port = _host(peer[0]), peer[1]
        if sock is not None:
            with contextlib.suppress(OSError):
                set_nodelay(sock)
                set_ipsec_bypass(sock)
        if self.side is Side.GATEWAY:
            self.daemon.accepted(self)
        else:
            self.daemon.connected(self)

    def data_received(self, data: bytes) -> None:
        self.reads_in += 1
        self.bytes_in += len(data)
        self.codec.receive_data(data)
        self._drain_events()
        if self.side is Side.GATEWAY:
            self._check_rate()

    def _check_rate(self) -> None:
        """Cut a connection that receives frames faster than max_frame_rate per second."""
        now = time.monotonic()
        if now - self._win_start >= 1.0:
            self._win_start, self._win_frames = now, self.frames_in
        elif self.frames_in - self._win_frames > self.daemon.config.gateway.max_frame_rate:
            self.daemon.log_limited(
                "limit-frame-rate", "%s: over max_frame_rate frames/s, closing", self
            )
            self.close("frame rate limit")

    def eof_received(self) -> bool | None:
        self.codec.receive_data(b"")
        self._drain_events()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        if not self.close_reason:
            self.close_reason = f"error: {exc}" if exc else "closed by peer"
        self.state = "closed"
        self.daemon.closed(self)

    def pause_writing(self) -> None:  # backpressure is handled by the buffer checks in send()
        pass

    def resume_writing(self) -> None:
        pass

    # --- receive ----------------------------------------------------------------------

    def _drain_events(self) -> None:
        codec = self.codec
        router = self.daemon.router
        injector = self.daemon.injector
        while True:
            ev = codec.next_event()
            t = type(ev)
            if t is rfc9329.ESPPacket:
                self.frames_in += 1
                if not self.got_message:
                    self._first_message(None)
                res = router.inbound_esp(self.conn_id, ev.data)  # type: ignore[union-attr]
            elif t is rfc9329.IKEMessage:
                self.frames_in += 1
                msg = ev.data  # type: ignore[union-attr]
                if self.outstanding is not None and len(msg) > 19 and msg[19] & 0x20:
                    self.outstanding = None  # the response to our request arrived
                self.got_ike = True
                if not self.got_message:
                    self._first_message(msg)
                res = router.inbound_ike(self.conn_id, ev.data)  # type: ignore[union-attr]
            elif t is rfc9329.NeedData:
                return
            elif t is rfc9329.PrefixReceived:
                self.state = "prefix-received"
                continue
            elif t is rfc9329.Keepalive:
                _count(self.drops, "keepalive")
                continue
            elif t is rfc9329.InvalidFrame:
                _count(self.drops, "invalid-frame")
                self.daemon.log_limited("invalid-frame", "%s: dropped frame: %s", self, ev)
                continue
            elif t is rfc9329.ConnectionClosed:
                self.close("peer closed the connection")
                return
            else:  # ProtocolError
                _count(self.drops, "protocol-error")
                self.close(f"protocol error: {ev.reason}")  # type: ignore[union-attr]
                return
            if type(res) is Inject:
                try:
                    injector.inject(res.packet, res.dst)
                except OSError as exc:
                    _count(self.drops, "inject-failed")
                    self.daemon.log_limited("inject", "%s: injection failed: %s", self, exc)
            else:
                _count(self.drops, res.reason)  # type: ignore[union-attr]

    def _first_message(self, ike: bytes | None) -> None:
        """The first complete IKE (``ike``) or ESP (None) frame: the connection is past its
        deadline (an existing SA may resume on a new connection with ESP alone, §6.1)."""
        self.got_message = True
        self.state = "open"
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.daemon.first_message(self, ike)

    def __str__(self) -> str:
        return self.describe()

    # --- send -------------------------------------------------------------------------

    def send(self, frame: bytes, is_ike: bool, request: bool = False) -> None:
        if request:
            self.outstanding = frame
        tr = self.transport
        if tr is None or self.state == "connecting":
            if len(self.pending) >= PENDING_LIMIT and not is_ike:
                _count(self.drops, "esp-while-connecting")
                return
            self.pending.append((frame, is_ike))
            return
        if tr.is_closing():
            _count(self.drops, "ike-on-closed" if is_ike else "esp-on-closed")
            if is_ike:
                self.daemon.log_limited("ike-closed", "%s: IKE dropped: connection closing", self)
            return
        size = tr.get_write_buffer_size() + self._wlen
        limit = self.daemon.config.gateway.max_buffer
        if size > limit:
            if not is_ike:
                _count(self.drops, "esp-congested")
                return
            if size > limit * IKE_HARD_LIMIT_FACTOR:
                _count(self.drops, "ike-congested")
                self.daemon.log_limited("ike-congested", "%s: IKE dropped: send buffer full", self)
                return
        self.frames_out += 1
        self.bytes_out += len(frame)
        if self.daemon.batching:
            if not self._wbuf:
                self.daemon.dirty.append(self)
            self._wbuf.append(frame)
            self._wlen += len(frame)
        else:
            tr.write(frame)

    def flush_writes(self) -> None:
        """One write (one send syscall) for all frames of a queue batch."""
        buf, self._wbuf, self._wlen = self._wbuf, [], 0
        tr = self.transport
        if buf and tr is not None and not tr.is_closing():
            tr.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def flush_pending(self) -> None:
        assert self.transport is not None
        self.transport.write(self.codec.send_prefix())
        self.bytes_out += len(rfc9329.PREFIX)
        self.state = "open"
        pending, self.pending = self.pending, []
        for frame, is_ike in pending:
            self.send(frame, is_ike)

    def close(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def status(self, now: float) -> dict[str, Any]:
        e = self.view.entry if self.view else None
        return {
            "id": self.conn_id,
            "encapsulation": "rfc9329",
            "side": self.side.value,
            "state": self.state,
            "local": f"{_bracket(self.local_text)}:{self.local_port}",
            "peer": f"{_bracket(self.peer_text)}:{self.peer_port}",
            "ike_spis": sorted(s.hex() for s in e.ike_spis) if e else [],
            "ike_spis_old": sorted(s.hex() for s in e.ike_spis_old) if e else [],
            "esp_spis": sorted(f"{s:08x}" for s in e.esp_spis) if e else [],
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "reads_in": self.reads_in,
            "drops": {**(self.view.drops if self.view else {}), **self.drops},
            "age": round(now - self.created, 1),
        }


def _host(text: str) -> str:
    return str(ipaddress.ip_address(text.split("%")[0]))


def _bracket(text: str) -> str:
    return f"[{text}]" if ":" in text else text


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.table = ConnectionTable(max_spis=config.max_spis)
        self.router = Router(self.table, self._is_tcp_peer)
        self.rules = SteeringRules(config.queue_num)
        self.injector: RawInjector | None = None
        self.queue: QueueReader | None = None
        self.conns: dict[int, TcpConnection] = {}
        self.client_peers: set[bytes] = set()
        self.peer_ports: dict[bytes, int] = {}
        self.gateway_peer_refs: dict[str, int] = {}
        self.ports = PortAllocator(
            config.client.port, config.client.port_range[0], config.client.port_range[1]
        )
        self.servers: dict[tuple[str, int], asyncio.base_events.Server] = {}
        self.metrics_server: asyncio.base_events.Server | None = None
        self.conn_peers: dict[str, list[str]] = {}  # client connection name -> peers
        # Counters of closed connections, so metrics never go backwards.
        self.totals: dict[str, Any] = new_totals(closed={}, connect_failures=0)
        self.control: asyncio.base_events.Server | None = None
        self.started = time.monotonic()
        self.events: dict[str, int] = {}
        self._log_times: dict[str, float] = {}
        self._stop = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.vici_state = "not connected"
        self.sync = SaSync(self.router)
        self.fallback = FallbackMonitor()
        self.n_gateway = 0  # accepted gateway connections
        self.n_pending = 0  # ... of which have not delivered a first message yet
        self.per_source: dict[str, int] = {}
        self._unsteer_at: dict[str, float] = {}
        # SPIs of gateway connections that closed before their client reconnected:
        # (local, peer) -> (deadline, IKE SPIs, ESP SPIs)
        self._orphans: dict[tuple[bytes, bytes], tuple[float, list[bytes], list[int]]] = {}
        self.batching = False
        self._reconcile_handle: asyncio.TimerHandle | None = None
        self.dirty: list[TcpConnection] = []  # gateway peers without a connection
        self.bridge: ViciBridge | None = None
        self.ctcp: CtcpService | None = None

    # --- helpers ----------------------------------------------------------------------

    def _is_tcp_peer(self, addr: bytes) -> bool:
        return addr in self.client_peers

    def log_limited(self, key: str, fmt: str, *args: object) -> None:
        """Log at most once per second per kind, so a flood cannot flood the log."""
        _count(self.events, key)
        now = time.monotonic()
        if now - self._log_times.get(key, -10.0) >= 1.0:
            self._log_times[key] = now
            log.warning(fmt, *args)

    # --- queue ------------------------------------------------------------------------

    def _batch(self, start: bool) -> None:
        self.batching = start
        if not start and self.dirty:
            dirty, self.dirty = self.dirty, []
            for conn in dirty:
                conn.flush_writes()

    def on_queued(self, packet: bytes) -> None:
        res = self.router.outbound(packet)
        t = type(res)
        if t is Send:
            conn = self.conns.get(res.conn_id)  # type: ignore[union-attr]
            if conn is None:
                _count(self.router.drops, "connection-gone")
                return
            conn.send(res.frame, res.is_ike, res.request)  # type: ignore[union-attr]
        elif t is Open:
            self._open_client(res)  # type: ignore[arg-type]
        else:
            assert isinstance(res, Drop)
            if res.reason not in ("nat-keepalive",):
                self.log_limited(res.reason, "dropped outbound packet: %s", res.reason)
        if self.router.emptied:
            emptied, self.router.emptied = self.router.emptied, []
            for cid in emptied:
                self.retire(cid, "its SAs moved to another connection")

    # --- VICI -------------------------------------------------------------------------

    def on_vici_event(self, label: str, event: dict[str, Any]) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("VICI %s: %s", label, json.dumps(event, sort_keys=True)[:2000])
        if label == "ike-updown" and event.get("up") != "yes" and self._orphans:
            self._forget_orphans(event)
        self._apply(self.sync.handle(label, event))
        if label in ("child-rekey", "ike-update", "ike-rekey"):
            self._schedule_reconcile(RECONCILE_AFTER_EVENT)

    def _forget_orphans(self, event: dict[str, Any]) -> None:
        """charon deleted these IKE SAs: no reconnect will resume them."""
        gone: set[bytes] = set()
        for sa in event.values():
            spi = sa.get("initiator-spi") if isinstance(sa, dict) else None
            if isinstance(spi, str):
                with contextlib.suppress(ValueError):
                    gone.add(bytes.fromhex(spi))
        for pair, (deadline, ike, esp) in list(self._orphans.items()):
            left = [spi for spi in ike if spi not in gone]
            if left:
                self._orphans[pair] = (deadline, left, esp)
            else:
                del self._orphans[pair]

    def _schedule_reconcile(self, delay: float) -> None:
        """Check the ESP SPIs against list-sas soon (debounced)."""
        if self._reconcile_handle is not None:
            return
        loop = asyncio.get_running_loop()
        self._reconcile_handle = loop.call_later(delay, self._start_reconcile)

    def _start_reconcile(self) -> None:
        self._reconcile_handle = None
        task = asyncio.get_running_loop().create_task(self._reconcile())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _list_sas(self, purpose: str) -> list[dict[str, Any]] | None:
        """charon's IKE SAs over a command session (in a thread: vici blocks); None, with
        a rate-limited log line naming ``purpose``, when charon cannot be asked."""
        try:
            return await asyncio.to_thread(list_sas, self.config.vici_socket)
        except OSError as exc:
            self.log_limited(f"list-sas-{purpose}", "cannot list SAs (%s): %s", purpose, exc)
            return None

    async def _reconcile(self) -> None:
        sas = await self._list_sas("reconcile")
        if sas is not None:
            self.sync.reconcile_esp(sas)

    async def _reconcile_periodically(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_PERIOD)
            if self.vici_state == "connected" and len(self.table):
                self._schedule_reconcile(0.0)

    def on_vici_resync(self, sas: list[dict[str, Any]]) -> None:
        self._apply(self.sync.resync(sas))

    def on_vici_state(self, state: str) -> None:
        self.vici_state = state
        # While charon reports CHILD SAs, only VICI binds ESP SPIs (so retired SPIs stay
        # gone); without it, charon's own outbound packets teach the table.
        self.router.learn_esp = state != "connected"

    def _apply(self, effects: list[Any]) -> None:
        for eff in effects:
            if isinstance(eff, Retire):
                self.retire(eff.conn_id, eff.reason, eff.graceful)
            elif isinstance(eff, Open):
                self._open_client(eff)
            elif isinstance(eff, SpiLimit):
                conn = self.conns.get(eff.conn_id)
                if conn is not None:
                    _count(conn.drops, "spi-limit")
                log.warning(
                    "conn %d: CHILD SA with SPI %08x not indexed: max_spis (%d) reached; "
                    "it is carried on the connection of its address pair",
                    eff.conn_id,
                    eff.spi,
                    self.config.max_spis,
                )
            elif isinstance(eff, ExpireOld):
                asyncio.get_running_loop().call_later(
                    eff.delay, lambda e=eff: self._apply(self.sync.expire_old(e.conn_id, e.spi))
                )

    def retire(self, conn_id: int, reason: str, graceful: bool = True) -> None:
        """Close a connection that carries no IKE SA any more. The TCP originator closes
        (RFC 9329 §6.1) shortly after, so the last IKE message can still leave; a gateway
        gives the client time to do so first."""
        conn = self.conns.get(conn_id)
        if conn is None:
            self.router.remove(conn_id)
            return
        if conn.side is Side.CLIENT:
            delay = CLIENT_CLOSE_DELAY if graceful else 0.0
        else:
            delay = GATEWAY_CLOSE_DELAY if graceful else 0.0

        def close() -> None:
            entry = conn.view.entry if conn.view else None
            if entry is not None and (entry.ike_spis or entry.ike_spis_old):
                return  # a new SA arrived meanwhile
            conn.retiring = True
            conn.close(reason)

        asyncio.get_running_loop().call_later(delay, close)

    # --- client connections -----------------------------------------------------------

    def _open_client(self, req: Open) -> None:
        view = self.router.views[req.conn_id]
        conn = TcpConnection(self, Side.CLIENT)
        conn.view = view
        conn.local_text, conn.peer_text = addr_text(req.local), addr_text(req.peer)
        conn.peer_port = self._remote_port(req.peer)
        if req.frame:
            conn.pending.append((req.frame, req.frame_is_ike))
        self.conns[req.conn_id] = conn
        spis = ", ".join(s.hex() for s in view.entry.ike_spis)
        log.info("%s: opening for IKE SA %s", conn, spis)
        self._start_connect(conn)

    def _start_connect(self, conn: TcpConnection) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _remote_port(self, peer: bytes) -> int:
        return self.peer_ports.get(peer, 4500)

    async def _connect(self, conn: TcpConnection) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in conn.local_text else socket.AF_INET
        refused: set[int] = set()
        sock: socket.socket | None = None
        try:
            for _ in range(8):
                port = self.ports.allocate(refused)
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                set_ipsec_bypass(sock)
                set_nodelay(sock)
                if self.config.client.port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((conn.local_text, port))
                    break
                except OSError:
                    sock.close()
                    sock = None
                    self.ports.release(port)
                    refused.add(port)
            if sock is None:
                raise PortsExhausted("no local port could be bound")
            conn.local_port = port
            await asyncio.wait_for(
                loop.sock_connect(sock, (conn.peer_text, conn.peer_port)),
                self.config.client.connect_timeout,
            )
            await loop.create_connection(lambda: conn, sock=sock)
        except (OSError, TimeoutError, PortsExhausted) as exc:
            if sock is not None:
                sock.close()
            conn.close_reason = f"connect failed: {exc or type(exc).__name__}"
            log.warning("%s: %s", conn, conn.close_reason)
            conn.state = "closed"
            self.closed(conn)

    def _fold_totals(self, conn: TcpConnection) -> None:
        t = self.totals
        drops = {**(conn.view.drops if conn.view else {}), **conn.drops}
        add_closed(t, conn.frames_in, conn.frames_out, conn.bytes_in, conn.bytes_out, drops)
        key = conn.close_reason.split(":")[0].strip().replace(" ", "-") or "unknown"
        t["closed"][key] = t["closed"].get(key, 0) + 1
        if conn.close_reason.startswith("connect failed"):
            t["connect_failures"] += 1

    def _hand_over(self, conn: TcpConnection) -> None:
        """A gateway connection that carried SAs is gone. Its client (the TCP originator)
        is expected back on a new connection: the newest connection of the same address
        pair that carries no SA of its own takes the SPIs, now or, if it has not arrived
        yet, when its first frame arrives within ORPHAN_GRACE. Routing does not depend on
        this (charon's packets for a vanished endpoint fall back to the newest connection
        of the pair); it keeps the table and status exact until charon's next
        authenticated exchange names the new endpoint (ike-update)."""
        assert conn.view is not None
        old = conn.view.entry
        ike, esp = self.table.release(old.conn_id)
        newer = [e for e in self.table.for_pair(old.local, old.peer) if not e.carries_sa]
        newer = [e for e in newer if e.conn_id != old.conn_id]
        if newer:
            self._adopt(newer[-1].conn_id, ike, esp, conn)
        else:
            deadline = time.monotonic() + ORPHAN_GRACE
            self._orphans[(old.local, old.peer)] = (deadline, ike, esp)

    def _adopt(self, conn_id: int, ike: list[bytes], esp: list[int], old: object) -> None:
        # First come: an SPI charon has meanwhile placed on another connection stays there.
        self.table.bind_all(conn_id, ike, esp)
        log.info("%s: SAs handed over to conn %d (reconnect)", old, conn_id)

    def _reconnect(self, old: TcpConnection) -> None:
        """The TCP originator re-establishes a broken connection while its SA lives
        (RFC 9329 §6.1); an outstanding request is resent on the new one (§6.2)."""
        assert old.view is not None
        conn = TcpConnection(self, Side.CLIENT)
        conn.view = old.view
        conn.local_text, conn.peer_text, conn.peer_port = (
            old.local_text,
            old.peer_text,
            old.peer_port,
        )
        conn.attempt = old.attempt + 1
        conn.got_ike = old.got_ike
        if old.outstanding is not None:
            conn.pending.append((old.outstanding, True))
            conn.outstanding = old.outstanding
        self.conns[conn.conn_id] = conn
        delay = min(RECONNECT_BASE * (2 ** (conn.attempt - 1)), RECONNECT_MAX)
        log.info(
            "%s: lost (%s), reconnecting in %.1fs (attempt %d)",
            old,
            old.close_reason,
            delay,
            conn.attempt,
        )
        asyncio.get_running_loop().call_later(delay, self._start_connect, conn)

    def connected(self, conn: TcpConnection) -> None:
        conn.attempt = 0
        log.info("%s: connected, sending prefix and %d held frame(s)", conn, len(conn.pending))
        conn.flush_pending()

    # --- gateway connections ----------------------------------------------------------

    def accepted(self, conn: TcpConnection) -> None:
        gw = self.config.gateway
        peer = conn.peer_text
        refusal = None
        if self.n_gateway >= gw.max_connections:
            refusal = ("limit-connections", f"{self.n_gateway} connections")
        elif self.per_source.get(peer, 0) >= gw.max_per_source:
            refusal = ("limit-per-source", f"{self.per_source[peer]} connections from {peer}")
        elif self.n_pending >= gw.max_pending:
            refusal = ("limit-pending", f"{self.n_pending} connections without a first message")
        if refusal is not None:
            self.log_limited(refusal[0], "refused %s: %s", conn, refusal[1])
            conn.close(refusal[0])
            return
        self.n_gateway += 1
        self.n_pending += 1
        conn.pending_counted = True
        self.per_source[peer] = self.per_source.get(peer, 0) + 1
        view = self.router.add_gateway_conn(
            addr_bytes(conn.local_text), addr_bytes(conn.peer_text), conn.peer_port
        )
        conn.view = view
        self.conns[view.conn_id] = conn
        conn.deadline = asyncio.get_running_loop().call_later(
            gw.first_message_timeout, self._deadline, conn
        )
        log.info("%s: accepted", conn)

    def _deadline(self, conn: TcpConnection) -> None:
        conn.deadline = None
        if not conn.got_message:
            _count(conn.drops, "first-message-timeout")
            what = "first message" if conn.codec.prefix_received else "prefix"
            self.log_limited(
                "deadline", "%s: no complete %s within the deadline, closing", conn, what
            )
            conn.close("first-message deadline")

    async def _release_peers(self) -> None:
        """Stop steering gateway peers that have no connection and no IKE SA in charon."""
        while True:
            await asyncio.sleep(PEER_RELEASE_POLL)
            now = time.monotonic()
            for pair in [p for p, o in self._orphans.items() if o[0] < now]:
                del self._orphans[pair]
            due = [p for p, t in self._unsteer_at.items() if t <= now]
            if not due:
                continue
            sas = await self._list_sas("peer-release")
            if sas is None:
                continue  # without charon's word, keep steering (fail-closed)
            busy = {sa.get("remote-host") for item in sas for sa in item.values()}
            for peer in due:
                if peer in self.gateway_peer_refs:
                    self._unsteer_at.pop(peer, None)
                elif peer in busy:
                    self._unsteer_at[peer] = now + PEER_RELEASE_DELAY
                else:
                    self._unsteer_at.pop(peer, None)
                    self.rules.remove_peer(peer)

    def first_message(self, conn: TcpConnection, ike: bytes | None = None) -> None:
        if conn.pending_counted:
            conn.pending_counted = False
            self.n_pending -= 1
        if conn.side is Side.GATEWAY and self._orphans and conn.view is not None:
            e = conn.view.entry
            orphan = self._orphans.pop((e.local, e.peer), None)
            # A reconnect resumes an existing SA: ESP, or IKE of one of the orphaned SAs.
            # An IKE_SA_INIT (or another SA's message) means a new SA: the orphan is stale.
            resumes = ike is None or (len(ike) >= 8 and ike[:8] in (orphan or (0, [], []))[1])
            if orphan is not None and resumes and orphan[0] >= time.monotonic():
                if not e.carries_sa:
                    self._adopt(e.conn_id, orphan[1], orphan[2], f"conn of {conn.peer_text}")
        if conn.side is Side.GATEWAY:
            peer = conn.peer_text
            self.gateway_peer_refs[peer] = self.gateway_peer_refs.get(peer, 0) + 1
            self._unsteer_at.pop(peer, None)
            if self.gateway_peer_refs[peer] == 1 and peer not in self.rules.peers:
                if len(self.rules.peers) >= self.config.gateway.max_connections:
                    # Each steered peer is one rule; released peers linger (for charon's
                    # last words), so cap them like the connections themselves.
                    self.log_limited("limit-steered", "refused %s: steering set full", conn)
                    conn.close("limit-steered")
                    return
                self.rules.add_peer(peer)

    def closed(self, conn: TcpConnection) -> None:
        self._fold_totals(conn)
        if conn.side is Side.GATEWAY and conn.view is not None and not conn.uncounted:
            conn.uncounted = True
            self.n_gateway -= 1
            if conn.pending_counted:
                conn.pending_counted = False
                self.n_pending -= 1
            left = self.per_source.get(conn.peer_text, 1) - 1
            if left > 0:
                self.per_source[conn.peer_text] = left
            else:
                self.per_source.pop(conn.peer_text, None)
        if conn.view is None or self.conns.get(conn.conn_id) is not conn:
            if conn.close_reason and conn.side is Side.GATEWAY:
                log.info("%s: closed (%s)", conn, conn.close_reason)
            return
        if conn.side is Side.CLIENT and conn.local_port:
            self.ports.release(conn.local_port)
        entry = conn.view.entry
        if (
            conn.side is Side.CLIENT
            and not conn.retiring
            and not self._stopping
            and (conn.got_ike or conn.attempt)
            and (entry.ike_spis or entry.ike_spis_old)
            and conn.attempt < MAX_RECONNECTS
        ):
            self._reconnect(conn)
            return
        if conn.side is Side.GATEWAY and entry.carries_sa:
            self._hand_over(conn)
        del self.conns[conn.conn_id]
        self.router.remove(conn.conn_id)
        if conn.side is Side.GATEWAY and conn.got_message:
            peer = conn.peer_text
            left = self.gateway_peer_refs.get(peer, 1) - 1
            if left <= 0:
                # Keep steering: charon may still talk to this peer (DPD, rekey, a client
                # about to reconnect), and that must not leave as UDP. The peer is
                # released once charon has no IKE SA with it (see _release_peers).
                self.gateway_peer_refs.pop(peer, None)
                self._unsteer_at[peer] = time.monotonic() + PEER_RELEASE_DELAY
            else:
                self.gateway_peer_refs[peer] = left
        log.info(
            "%s: closed (%s) after %.1fs, frames in/out %d/%d",
            conn,
            conn.close_reason,
            time.monotonic() - conn.created,
            conn.frames_in,
            conn.frames_out,
        )

    # --- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "pid": os.getpid(),
            "uptime": round(now - self.started, 1),
            "config": self.config.source,
            "vici": self.vici_state,
            "capabilities": f"{_cap_eff():x}",
            "listening": [f"{_bracket(h)}:{p}" for h, p in self.config.gateway.listen],
            "steered_peers": sorted(self.rules.peers),
            "client_peers": sorted(addr_text(p) for p in self.client_peers),
            "queue": {
                "num": self.config.queue_num,
                "packets": self.queue.packets if self.queue else 0,
                "errors": self.queue.errors if self.queue else 0,
                "reads": self.queue.batches if self.queue else 0,
                "verdict_errors": self.queue.verdict_errors if self.queue else 0,
            },
            "drops": dict(self.router.drops),
            "events": dict(self.events),
            "connections": [c.status(now) for c in sorted(self.conns.values(), key=_cid)]
            + (self.ctcp.status() if self.ctcp else []),
            "ctcp": self.ctcp.summary() if self.ctcp else None,
        }

    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            cmd = line.decode(errors="replace").strip()
            if cmd == "status":
                reply: dict[str, Any] = self.status()
            elif cmd == "reload":
                reply = await self.reload()
            else:
                reply = {"error": f"unknown command {cmd!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    # --- start and stop ---------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Threads keep the capabilities they were created with: set-up runs on a pool
        # that is emptied before the drop, and a fresh one serves everything after it.
        setup_pool = ThreadPoolExecutor(thread_name_prefix="setup")
        loop.set_default_executor(setup_pool)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            await self._start(loop)
            setup_pool.shutdown(wait=True)
            loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="worker"))
            if self.config.drop_capabilities:
                from tcpencap.aio.privileges import keep_only

                try:
                    keep_only()
                    log.info("capabilities reduced to NET_ADMIN, NET_RAW, NET_BIND_SERVICE")
                except OSError as exc:
                    log.warning("could not drop capabilities: %s", exc)
            # Started after the drop, so its thread inherits the reduced capabilities.
            assert self.bridge is not None
            self.bridge.start()
            log.info("tcpencap running (pid %d)", os.getpid())
            await self._stop.wait()
            log.info("stopping")
        finally:
            await self._shutdown()

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.injector = RawInjector()
        svc = CtcpService(self.config, self.injector, self.log_limited)
        if svc.enabled:  # gateway.ctcp_listen, or connections with encapsulation = ctcp
            self.ctcp = svc
            await svc.start(loop)
        self.rules.install()
        self.queue = QueueReader(self.config.queue_num, self.on_queued, self._batch)
        self.queue.start(loop)
        await self._start_control()
        await self._start_metrics()
        for host, port in self.config.gateway.listen:
            await self._listen(host, port)
        await self._resolve_client_peers()
        self.bridge = ViciBridge(
            self.config.vici_socket,
            loop,
            self.on_vici_event,
            self.on_vici_resync,
            self.on_vici_state,
        )
        task = loop.create_task(self._reconcile_periodically())
        self._tasks.add(task)
        if self.config.gateway.listen:
            task = loop.create_task(self._release_peers())
            self._tasks.add(task)
        if self.fallback.conns:
            task = loop.create_task(self._watch_fallback())
            self._tasks.add(task)

    async def _listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: TcpConnection(self, Side.GATEWAY),
            host=host,
            port=port,
            reuse_address=True,
            backlog=1024,
        )
        for sock in server.sockets:
            with contextlib.suppress(OSError):
                set_ipsec_bypass(sock)
        self.servers[(host, port)] = server
        log.info("listening on %s:%d", _bracket(host), port)

    async def _start_metrics(self) -> None:
        if not self.config.metrics_listen:
            return
        host, port = self.config.metrics_listen
        self.metrics_server = await asyncio.start_server(self._metrics_client, host, port)
        log.info("metrics on http://%s:%d/metrics", _bracket(host), port)

    async def _metrics_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        from tcpencap.metrics import render

        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = head.split(b" ", 2)
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                body = render(self.status(), self.totals).encode()
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    # --- reload -----------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the configuration: new listeners and peers take effect, removed ones
        stop, and existing TCP connections are kept."""
        from tcpencap.config import load_config

        path = None if self.config.source == "(defaults)" else self.config.source
        try:
            new = load_config(path)
        except ConfError as exc:
            log.error("reload refused: %s", exc)
            return {"error": str(exc)}
        old = self.config
        changes: list[str] = []
        for key in ("queue_num", "status_socket", "vici_socket", "metrics_listen"):
            if getattr(old, key) != getattr(new, key):
                changes.append(f"{key} changes only on restart")
        if old.gateway.ctcp_listen != new.gateway.ctcp_listen:
            changes.append("ctcp_listen changes only on restart")
        self.config = new
        for ep in [ep for ep in self.servers if ep not in new.gateway.listen]:
            self.servers.pop(ep).close()
            changes.append(f"stopped listening on {_bracket(ep[0])}:{ep[1]}")
        for host, port in new.gateway.listen:
            if (host, port) not in self.servers:
                try:
                    await self._listen(host, port)
                    changes.append(f"listening on {_bracket(host)}:{port}")
                except OSError as exc:
                    changes.append(f"cannot listen on {_bracket(host)}:{port}: {exc}")
        removed = [n for n in self.conn_peers if n not in new.connections]
        for name in removed:
            peers = self.conn_peers.pop(name)
            self.fallback.conns.pop(name, None)
            still = {p for ps in self.conn_peers.values() for p in ps}
            self._steer([p for p in peers if p not in still], False)
            changes.append(f"connection {name} removed")
        changed = [
            n
            for n, c in new.connections.items()
            if n not in old.connections or old.connections[n] != c
        ]
        if changed:
            await self._resolve_client_peers(changed)
            changes += [f"connection {n} (re)configured" for n in changed]
        for line in changes:
            log.info("reload: %s", line)
        return {"ok": True, "changes": changes}

    async def _start_control(self) -> None:
        path = self.config.status_socket
        if not path:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o077)  # root-only control socket
        try:
            self.control = await asyncio.start_unix_server(self._control_client, path=path)
        finally:
            os.umask(old)

    async def _resolve_client_peers(self, names: list[str] | None = None) -> None:
        """Find the TCP peers' addresses: from the config, else charon's get-conns."""
        from vici_bridge.resolve import resolve_remote_addrs

        wanted = {
            name: c
            for name, c in self.config.connections.items()
            if c.transport != "udp"
            and c.encapsulation == "rfc9329"
            and (names is None or name in names)
        }
        if not wanted:
            return
        needs_vici = [n for n, c in wanted.items() if not c.remote_addrs]
        resolved: dict[str, list[str]] = {}
        if needs_vici:
            resolved = await resolve_remote_addrs(self.config.vici_socket, needs_vici, self)
        for name, c in wanted.items():
            addrs = list(c.remote_addrs) or resolved.get(name, [])
            if not addrs:
                log.warning("connection %s: no remote address known, not steered", name)
            peers: list[str] = []
            for text in addrs:
                try:
                    addr = ipaddress.ip_address(text)
                except ValueError:
                    log.warning("connection %s: remote %r is not an address, skipped", name, text)
                    continue
                self.peer_ports[addr.packed] = c.remote_port
                peers.append(str(addr))
            self.conn_peers[name] = peers
            if c.transport == "fallback":
                timeout = c.fallback_timeout
                self.fallback.add(name, peers, timeout)
                log.info(
                    "connection %s: UDP first, TCP port %d after %.1fs without an answer",
                    name,
                    c.remote_port,
                    timeout,
                )
                continue
            self._steer(peers, True)
            log.info("connection %s: peers %s over TCP port %d", name, peers, c.remote_port)

    def _steer(self, peers: list[str], tcp: bool) -> None:
        for peer in peers:
            packed = ipaddress.ip_address(peer).packed
            if tcp:
                self.client_peers.add(packed)
                self.rules.add_peer(peer)
            else:
                self.client_peers.discard(packed)
                self.rules.remove_peer(peer)

    async def _watch_fallback(self) -> None:
        """Poll charon's IKE SAs for fallback connections stuck in CONNECTING."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(FALLBACK_POLL)
            sas = await self._list_sas("fallback")
            if sas is None:
                continue
            for sw in self.fallback.update(loop.time(), sas):
                if sw.tcp:
                    log.warning(
                        "connection %s: no answer over UDP, falling back to TCP for %s",
                        sw.name,
                        ", ".join(sw.peers),
                    )
                else:
                    log.info("connection %s: no SA left, back to UDP first", sw.name)
                self._steer(list(sw.peers), sw.tcp)

    async def _shutdown(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        if self.bridge is not None:
            await asyncio.to_thread(self.bridge.stop)
        for server in self.servers.values():
            server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        for conn in list(self.conns.values()):
            conn.close("tcpencap stopping")
        if self.queue is not None:
            with contextlib.suppress(Exception):
                self.queue.stop()
        self.rules.remove()
        if self.ctcp is not None:
            with contextlib.suppress(Exception):
                await self.ctcp.stop()
        if self.injector is not None:
            self.injector.close()
        if self.control is not None:
            self.control.close()
            with contextlib.suppress(OSError):
                os.unlink(self.config.status_socket)
        await asyncio.sleep(0)


def _cap_eff() -> int:
    from tcpencap.aio.privileges import effective_caps

    try:
        return effective_caps()
    except OSError:
        return -1


def _cid(conn: TcpConnection) -> int:
    return conn.conn_id


async def query_status(path: str, timeout: float = 5.0, command: str = "status") -> dict[str, Any]:
    """Send one command (``status`` or ``reload``) to the control socket; its JSON reply."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    writer.write(command.encode() + b"\n")
    await writer.drain()
    # The daemon closes after its one reply, which grows with the connections (about
    # 300 octets each): read to EOF, not a line, so no stream limit applies.
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    return json.loads(data)
