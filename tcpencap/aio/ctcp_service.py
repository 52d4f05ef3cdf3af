"""The cTCP (Cisco "IPsec over TCP") data path: NFQUEUE in, raw socket out.

cTCP is a packet transform, not a stream (protocols.md A.1, A.13), so no kernel TCP socket
is involved. Two NFQUEUEs, so what strangers send cannot crowd out what charon sends:
- ``queue_num + queues + 1``: TCP segments from the wire (gateway listen ports, for local
  addresses only; the client's cTCP peers), queued in the raw table before the host stack
  sees them (nfq/ctcp_rules.py). Its kernel queue is short and each turn of the event loop
  reads at most :data:`INBOUND_BUDGET` of it;
- ``queue_num + queues``: charon's UDP 500/4500 packets to cTCP peers, queued in mangle
  OUTPUT.
Segments leave through an IPPROTO_RAW socket marked with SO_MARK = CTCP_MARK, the only TCP
on those 5-tuples that the rules let out. Decapsulated packets go to charon through
:class:`nfq.inject.RawInjector`.

What is carried (A.13): the lab's charon uses kernel-libipsec, which always sends ESP as
ESP-in-UDP on 4500. So inside cTCP we carry exactly what charon sends: the UDP packet
(IKE on 500, IKE behind the non-ESP marker or ESP-in-UDP on 4500) with inner protocol 17
in the trailer, and inbound inner-UDP packets are delivered back unchanged (outer
addresses, the sender's original UDP ports). Raw ESP (inner protocol 50) from a peer is
delivered as ESP too, for a kernel that has the ESP transform.

:class:`CtcpEngine` holds every decision (no I/O: it takes packets, reload plans and
``now`` and returns outputs), the packet-size ones included; :class:`CtcpService` feeds it
with ``loop.time()``, reads the route MTU for it (:func:`route_mtu`) and executes its
outputs through the executor both shells share (:mod:`tcpencap.aio.executor`). Run alone
with ``python3 -m tcpencap.aio.ctcp_service --config FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from nfq.ctcp_rules import CTCP_MARK

from tcpencap.aio.engine_timer import EngineTimer
from tcpencap.aio.executor import Executor
from tcpencap.core.ctcp_engine import CtcpEngine
from tcpencap.core.outputs import (
    Inject,
    Output,
    Query,
    SendRaw,
    Steer,
    SteerSegments,
    bracket,
    count,
)
from tcpencap.core.ports import PortAllocator
from tcpencap.core.reload import CtcpPeers, Operation
from tcpencap.core.timers import LogLimiter
from tcpencap.wire.packet import addr_text

log = logging.getLogger("tcpencap.ctcp")

SO_MARK = getattr(socket, "SO_MARK", 36)
IP_NODEFRAG = getattr(socket, "IP_NODEFRAG", 22)
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
PMTUDISC_PROBE = 3  # IP_PMTUDISC_PROBE / IPV6_PMTUDISC_PROBE: device MTU, not the PMTU cache
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
INBOUND_QUEUE_MAXLEN = 1024  # segments from the wire the kernel holds for us
INBOUND_BUDGET = 256  # netlink reads of the inbound queue per turn of the event loop


# The counter and log names of a failed output (stable metric labels).
_KIND: dict[type, str] = {
    SendRaw: "transmit",
    Inject: "inject",
    Steer: "steer",
    SteerSegments: "steersegments",
    Query: "query",
}


# --- I/O --------------------------------------------------------------------------------


class RawSender:
    """IPPROTO_RAW sockets (header included) whose packets carry SO_MARK = ``mark``, so
    the rules let them out while dropping any other TCP on the cTCP 5-tuples."""

    def __init__(self, mark: int = CTCP_MARK) -> None:
        self._socks: dict[int, socket.socket] = {}
        for fam, length in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
            sock = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            # The PMTU the kernel caches for a peer is the one tcpencap told charon (path MTU
            # minus the cTCP overhead); our segments must be held to the device MTU instead.
            if fam == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, PMTUDISC_PROBE)
                # our own outer fragments must not be gathered by OUTPUT defrag
                sock.setsockopt(socket.IPPROTO_IP, IP_NODEFRAG, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, PMTUDISC_PROBE)
            sock.setblocking(False)
            self._socks[length] = sock

    def send(self, data: bytes, dst: bytes) -> None:
        self._socks[len(dst)].sendto(data, (addr_text(dst), 0))

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()


def route_mtu(dst: bytes) -> int:
    """The path MTU towards ``dst`` as the kernel knows it (route MTU, a cached PMTU
    exception, else the outgoing link's MTU): a connected UDP socket's IP_MTU/IPV6_MTU,
    which sends nothing. The engine caches it (:mod:`tcpencap.core.ctcp_mtu`)."""
    v4 = len(dst) == 4
    fallback = 1500 if v4 else 1280
    fam = socket.AF_INET if v4 else socket.AF_INET6
    level, opt = (socket.IPPROTO_IP, IP_MTU) if v4 else (socket.IPPROTO_IPV6, IPV6_MTU)
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as sock:
            sock.connect((addr_text(dst), 9))
            return int(sock.getsockopt(level, opt))
    except OSError as exc:
        log.warning("path MTU to %s: %s; assuming %d", addr_text(dst), exc, fallback)
        return fallback


class CtcpService:
    """Runs the cTCP engine in the daemon's asyncio loop."""

    def __init__(
        self,
        config: Any,
        injector: Any,
        log_limited: Callable[..., None],
        ports: PortAllocator | None = None,
    ) -> None:
        self.config = config
        self.ports = ports
        self.injector = injector
        self.log_limited = log_limited
        self.queue_num = config.ctcp_queue
        self.inbound_queue_num = config.ctcp_segment_queue
        self.engine: CtcpEngine | None = None
        self.rules: Any = None
        self.queue: Any = None
        self.inbound_queue: Any = None
        self.sender: RawSender | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: EngineTimer | None = None
        self.counters: dict[str, int] = {}
        self._queries: set[asyncio.Task[None]] = set()
        self.executor = Executor(
            {
                SendRaw: self._send_raw,
                Inject: self._inject,
                Steer: self._steer,
                SteerSegments: self._steer_segments,
                Query: self._query,
            },
            on_error=self._failed,
        )

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Listeners from the configuration; client peers come with :meth:`apply` (CtcpPeers)."""
        from nfq.ctcp_rules import CtcpRules
        from nfq.queue import QueueReader

        self._loop = loop
        self._timer = EngineTimer(self._fire, loop.time)
        cfg = self.config
        gw = cfg.gateway
        self.engine = CtcpEngine(cfg, loop.time(), ports=self.ports, route_mtu=route_mtu)
        self.sender = RawSender()
        self.rules = CtcpRules(self.queue_num, inbound_queue=self.inbound_queue_num)
        try:
            self.rules.install(gw.ctcp_listen)
            self.queue = QueueReader(self.queue_num, self._on_queued)
            self.queue.start(loop)
            self.inbound_queue = QueueReader(
                self.inbound_queue_num,
                self._on_segment,
                max_len=INBOUND_QUEUE_MAXLEN,
                budget=INBOUND_BUDGET,
            )
            self.inbound_queue.start(loop)
        except BaseException:
            await self.stop()
            raise
        for host, port in cfg.gateway.ctcp_listen:
            log.info("cTCP listening on %s:%d", bracket(host), port)

    @property
    def peers(self) -> dict[bytes, int]:
        """The cTCP client peers now (address -> TCP port)."""
        return dict(self.engine.peers) if self.engine is not None else {}

    def apply(self, ops: list[Operation]) -> None:
        """The cTCP part of a reload plan: the engine decides, the rules follow."""
        assert self.engine is not None and self._loop is not None
        self.engine.apply(self._loop.time(), ops)
        self._execute()

    def linger(self, endpoints: list[tuple[bytes, int]]) -> None:
        """A previous run's gateway endpoints that charon still holds SAs with."""
        assert self.engine is not None and self._loop is not None
        self.engine.linger(self._loop.time(), endpoints)
        self._execute()

    async def stop(self, remove_rules: bool = False) -> None:
        """Rules and sets stay (a queue nobody reads drops) unless ``remove_rules``."""
        if self.engine is not None:
            self.engine.stop()
        for task in self._queries:
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        for q in (self.queue, self.inbound_queue):
            if q is not None:
                with contextlib.suppress(Exception):
                    q.stop()
        self.queue = self.inbound_queue = None
        if self.rules is not None:
            if remove_rules:
                self.rules.remove()
            else:
                self.rules.release()
            self.rules = None
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    def status(self) -> list[dict[str, Any]]:
        if self.engine is None or self._loop is None:
            return []
        return self.engine.status(self._loop.time())

    def summary(self) -> dict[str, Any]:
        """Service-wide counters (refusals, strays, queue), for the daemon's status."""
        eng = self.engine
        return {
            "queue": self.queue_num,
            "inbound_queue": self.inbound_queue_num,
            "packets": self.queue.packets if self.queue else 0,
            "segments": self.inbound_queue.packets if self.inbound_queue else 0,
            "mtu_cache": len(eng.mtus) if eng else 0,
            "steered_endpoints": sorted(
                f"{bracket(a)}:{p}" for a, p in self.rules.steering.steered_endpoints
            )
            if self.rules is not None
            else [],
            "flows": len(eng.flows) if eng else 0,
            "counters": {**(eng.counters if eng else {}), **self.counters},
            "totals": eng.totals if eng else {},
        }

    # --- packet path ------------------------------------------------------------------------

    def _on_queued(self, packet: bytes) -> None:
        """charon's UDP to a cTCP peer (the mangle OUTPUT queue)."""
        assert self.engine is not None and self._loop is not None
        self.engine.outbound(self._loop.time(), packet)
        self._execute()

    def _on_segment(self, packet: bytes) -> None:
        """A TCP segment from the wire (the raw PREROUTING queue)."""
        assert self.engine is not None and self._loop is not None
        self.engine.inbound(self._loop.time(), packet)
        self._execute()

    def _execute(self) -> None:
        """Do what the engine asked, in order, through the shared executor; nothing here
        decides. Carrying out an output may feed the engine (a segment the kernel refuses
        as too big goes back to be sized once more), so the executor pulls until it is
        quiet."""
        assert self.engine is not None and self._timer is not None
        self.executor.drain(self.engine)
        self._timer.arm(self.engine.get_timer())

    def _failed(self, o: Output, exc: OSError) -> None:
        """An output the kernel refused: counted and logged, the rest carry on."""
        assert self.engine is not None and self._loop is not None
        if type(o) is SendRaw and exc.errno == errno.EMSGSIZE and o.first_try:
            self.engine.send_too_big(self._loop.time(), o)
            return
        count(self.counters, f"{_KIND.get(type(o), 'output')}-failed")
        self.log_limited("ctcp-io", "cTCP: %s failed: %s", type(o).__name__, exc)

    def _send_raw(self, o: SendRaw) -> None:
        assert self.sender is not None
        for piece in o.pieces:
            self.sender.send(piece, o.dst)

    def _inject(self, o: Inject) -> None:
        self.injector.inject(o.packet, o.dst)

    def _steer(self, o: Steer) -> None:
        self.rules.steer(addr_text(o.peer), o.port, o.on)

    def _steer_segments(self, o: SteerSegments) -> None:
        if o.on:
            self.rules.add_peer_endpoint(addr_text(o.peer), o.port)
        else:
            self.rules.remove_peer_endpoint(addr_text(o.peer), o.port)

    def _query(self, o: Query) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._ask(o.purpose))
        self._queries.add(task)
        task.add_done_callback(self._queries.discard)

    async def _ask(self, purpose: str) -> None:
        """charon's IKE SAs for the engine (None when charon cannot be asked)."""
        from vici_bridge.resolve import list_sas

        try:
            sas = await asyncio.to_thread(list_sas, self.config.vici_socket)
        except OSError as exc:  # the engine keeps steering: without charon's word, fail closed
            self.log_limited("ctcp-list-sas", "cTCP: cannot list SAs: %s", exc)
            sas = None
        if self.engine is not None and self._loop is not None:
            self.engine.sas_listed(self._loop.time(), purpose, sas)
            self._execute()

    def _fire(self) -> None:
        assert self.engine is not None and self._loop is not None
        try:
            self.engine.handle_timer(self._loop.time())
            self._execute()
        except Exception:
            log.exception("cTCP timer")


# --- standalone runner --------------------------------------------------------------------


async def _configured_peers(cfg: Any) -> dict[bytes, int]:
    """The cTCP client peers: remote_addrs, else charon's get-conns."""
    from vici_bridge.resolve import ViciUnreachable, resolve_remote_addrs

    from tcpencap.core.reload import intent_of, unresolved

    names = [n for n in unresolved(cfg) if cfg.connections[n].encapsulation == "ctcp"]
    resolved: dict[str, list[str]] = {}
    if names:
        with contextlib.suppress(ViciUnreachable):
            resolved = await resolve_remote_addrs(cfg.vici_socket, names)
    return intent_of(cfg, resolved).ctcp_peers()


def _main(argv: list[str] | None = None) -> int:
    from nfq.inject import RawInjector

    from tcpencap.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python3 -m tcpencap.aio.ctcp_service")
    ap.add_argument("--config", required=True)
    ap.add_argument("--log-level", default=None)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(
        level=(args.log_level or cfg.log_level).upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        limiter = LogLimiter(log.warning)
        injector = RawInjector()
        svc = CtcpService(cfg, injector, lambda *a: limiter(loop.time(), *a))
        try:
            await svc.start(loop)
            svc.apply([CtcpPeers(await _configured_peers(cfg))])
            log.info("ctcp service running")
            await stop.wait()
        finally:
            for row in svc.status():
                log.info("cTCP status at exit: %s", row)
            log.info("cTCP summary at exit: %s", svc.summary())
            await svc.stop()
            injector.close()

    try:
        asyncio.run(run())
    except (OSError, RuntimeError) as exc:
        log.error("cannot run: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
