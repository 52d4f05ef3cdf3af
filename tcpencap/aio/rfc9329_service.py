"""The RFC 9329 shell: runs the RFC 9329 engine in the asyncio loop.

It feeds the engine what the queue readers, the VICI bridge and the TCP connections
deliver, with the loop's time; carries out what the engine outputs (through the shared
:class:`tcpencap.aio.executor.Executor`), and arms the engine's one timer. It decides
nothing: admission, deadlines, steering, reconnects and the send-buffer bound are the
core's. The daemon (the composition root) builds it and wires the adapters to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from tcpencap.aio.connect import connect
from tcpencap.aio.engine_timer import EngineTimer, LoopClock
from tcpencap.aio.executor import Executor
from tcpencap.aio.sockopts import set_ipsec_bypass
from tcpencap.aio.tcp import TcpProtocol
from tcpencap.aio.tcp_host import WriteBatch
from tcpencap.aio.tls import Fronts
from tcpencap.core.front import StreamFront
from tcpencap.core.outputs import Close, Connect, Inject, Query, Steer, Transmit
from tcpencap.core.reload import Settings
from tcpencap.wire.packet import addr_text

ListSas = Callable[[str], Awaitable["list[dict[str, Any]] | None"]]


class Rfc9329Service:
    """``rules``: the steering rules (nfq.rules.SteeringRules); ``connections``: the
    configured connections' intents now (which of them speak TLS); ``spawn`` runs a
    coroutine as a task the daemon cancels at stop; ``list_sas`` asks charon. The injector
    and the native inbound worker are given once the daemon has opened them."""

    def __init__(
        self,
        engine: Any,
        clock: LoopClock,
        config: Any,
        rules: Any,
        fronts: Fronts,
        connections: Callable[[], dict[str, Any]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        list_sas: ListSas,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.config = config  # the daemon's, replaced on reload
        self.rules = rules
        self.fronts = fronts
        self.injector: Any = None  # nfq.inject.RawInjector
        self.inbound: Any = None  # the native InboundWorker
        self.protocols: dict[int, TcpProtocol] = {}
        self.servers: dict[tuple[str, int], asyncio.base_events.Server] = {}
        self.batch = WriteBatch()
        self.timer = EngineTimer(self._fire)
        self._connections = connections
        self._spawn = spawn
        self._list_sas = list_sas
        self.executor = Executor(
            {
                Transmit: self._transmit,
                Inject: self._inject,
                Steer: self._steer,
                Connect: self._connect,
                Close: self._close,
                Query: self._on_query,
            }
        )

    # --- carrying out the engine's outputs ----------------------------------------------

    def after(self) -> None:
        """Run what the engine asked for, then re-arm its timer."""
        engine = self.engine
        self.executor.drain(engine)
        batch = engine.datapath.inject_batch
        if batch is not None and len(batch) and self.injector is not None:
            _, failed = batch.send(*self.injector.fds())
            if failed:
                engine.shell_dropped(0, "inject-failed", failed)
                self.log_limited("inject", "injection failed: %s", os.strerror(batch.last_errno))
        self.timer.arm(engine.get_timer())

    def _transmit(self, o: Transmit) -> None:
        proto = self.protocols.get(o.conn_id)
        if proto is not None:
            proto.send(o.data, o.is_ike, o.frames)

    def _inject(self, o: Inject) -> None:
        try:
            self.injector.inject(o.packet, o.dst)
        except OSError as exc:
            self.engine.shell_dropped(0, "inject-failed")
            self.log_limited("inject", "injection failed: %s", exc)

    def _steer(self, o: Steer) -> None:
        self.rules.steer(addr_text(o.peer), o.port, o.on)

    def _connect(self, o: Connect) -> None:
        client = self.config.client
        self._spawn(connect(self, o, bool(client.port), client.connect_timeout))

    def _close(self, o: Close) -> None:
        proto = self.protocols.get(o.conn_id)
        if proto is not None:
            proto.close()
            return
        conn = self.engine.conn(o.conn_id)  # still connecting: it is lost now
        if conn is not None:
            self.engine.connection_lost(self.clock.now(), o.conn_id, conn.generation, o.reason)

    def _on_query(self, o: Query) -> None:
        self._spawn(self._query(o.purpose))

    async def _query(self, purpose: str) -> None:
        sas = await self._list_sas(purpose)
        self.engine.sas_listed(self.clock.now(), purpose, sas)
        self.after()

    def _fire(self) -> None:
        self.engine.handle_timer(self.clock.now())
        self.after()

    def log_limited(self, key: str, fmt: str, *args: object) -> None:
        self.engine.log_limited(self.clock.now(), key, fmt, *args)

    # --- what a connection sees of this service (tcpencap.aio.tcp_host.TcpHost) ---------

    @property
    def max_buffer(self) -> int:
        return int(self.config.gateway.max_buffer)

    def register(self, proto: TcpProtocol) -> None:
        self.protocols[proto.conn_id] = proto

    def unregister(self, proto: TcpProtocol) -> None:
        if self.protocols.get(proto.conn_id) is proto:
            del self.protocols[proto.conn_id]

    def client_front(self, now: float, peer: bytes) -> StreamFront | None:
        return self.fronts.client_front(now, peer, self._connections())

    def server_front(
        self, now: float, peer_host: str, tls_listener: bool
    ) -> tuple[StreamFront | None, bool]:
        return self.fronts.server_front(now, peer_host, tls_listener)

    # --- inputs: charon's packets, the native path, VICI, the configuration --------------

    def on_queued(self, packet: bytes) -> None:
        self.engine.outbound(self.clock.now(), packet)
        self.after()

    def on_queue_batch(self, misses: list[bytes], hits: list[tuple[int, bytes, int]]) -> None:
        self.engine.outbound_batch(self.clock.now(), misses, hits)
        self.after()

    def on_stalled(self, conn_ids: list[int]) -> None:
        """Writers the native path filled beyond what their sockets took."""
        for cid in conn_ids:
            proto = self.protocols.get(cid)
            if proto is not None:
                proto.want_write()

    def given_back(self, items: list[tuple[Any, ...]]) -> None:
        """Connections the native inbound worker stopped reading (on the loop)."""
        for cid, reason, *counts in items:  # counts: frames, bytes, reads, keepalives
            proto = self.protocols.get(cid)
            if proto is not None:
                proto.given_back(reason, tuple(counts))

    def vici_event(self, label: str, event: dict[str, Any]) -> None:
        self.engine.vici_event(self.clock.now(), label, event)
        self.after()

    def vici_resync(self, sas: list[dict[str, Any]]) -> None:
        self.engine.vici_resync(self.clock.now(), sas)
        self.after()

    def vici_state(self, connected: bool) -> None:
        self.engine.vici_state(self.clock.now(), connected)

    def apply(self, ops: list[Any]) -> None:
        """A reload's (or the start's) plan, for the engine; its settings for the shell's
        own connect timeout and send bound as well."""
        for op in ops:
            if isinstance(op, Settings):
                self.config = op.config
        self.engine.apply(self.clock.now(), ops)

    def linger(self, peers: list[bytes], endpoints: list[tuple[bytes, int]]) -> None:
        """A previous run's steered peers that charon still holds SAs with."""
        self.engine.linger(self.clock.now(), peers, endpoints)
        self.after()

    # --- listeners ------------------------------------------------------------------------

    async def listen(self, host: str, port: int, tls: bool = False) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: TcpProtocol(self, tls_listener=tls),
            host=host,
            port=port,
            reuse_address=True,
            backlog=1024,
        )
        for sock in server.sockets:
            with contextlib.suppress(OSError):
                set_ipsec_bypass(sock)
        self.servers[(host, port)] = server

    def stop_listening(self, host: str, port: int) -> None:
        server = self.servers.pop((host, port), None)
        if server is not None:
            server.close()

    def stop(self) -> None:
        """Listeners closed, the engine's connections closed (their outputs carried out)."""
        for server in self.servers.values():
            server.close()
        self.engine.stop()
        with contextlib.suppress(RuntimeError):
            self.after()
        self.timer.cancel()

    # --- status ---------------------------------------------------------------------------

    def report_counts(self) -> None:
        """Hand the engine what the native path wrote and read for each connection."""
        for proto in list(self.protocols.values()):
            proto.report_writer()
            proto.report_lent()

    def rows(self, now: float) -> list[dict[str, Any]]:
        """The engine's connection rows, each saying whether TLS carries it (the front is
        the shell's)."""
        rows = self.engine.status(now)
        for row in rows:
            proto = self.protocols.get(row["id"])
            front = proto.front if proto is not None else None
            row["tls"] = front.secured.version if front is not None and front.secured else None
        return rows
