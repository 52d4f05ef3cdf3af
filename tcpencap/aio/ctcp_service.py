"""The cTCP (Cisco "IPsec over TCP") data path: NFQUEUE in, raw socket out.

cTCP is a packet transform, not a stream (protocols.md A.1, A.13), so no kernel TCP socket
is involved. One NFQUEUE (``queue_num + 1``) receives both directions:
- TCP segments from the wire (gateway listen ports; the client's cTCP peers), queued in
  the raw table before the host stack sees them (nfq/ctcp_rules.py);
- charon's UDP 500/4500 packets to cTCP peers, queued in mangle OUTPUT.
Segments leave through an IPPROTO_RAW socket marked with SO_MARK = CTCP_MARK, the only TCP
on those 5-tuples that the rules let out. Decapsulated packets go to charon through
:class:`nfq.inject.RawInjector`.

What is carried (A.13): the lab's charon uses kernel-libipsec, which always sends ESP as
ESP-in-UDP on 4500. So inside cTCP we carry exactly what charon sends: the UDP packet
(IKE on 500, IKE behind the non-ESP marker or ESP-in-UDP on 4500) with inner protocol 17
in the trailer, and inbound inner-UDP packets are delivered back unchanged (outer
addresses, the sender's original UDP ports). Raw ESP (inner protocol 50) from a peer is
delivered as ESP too, for a kernel that has the ESP transform.

:class:`CtcpEngine` holds the decisions (no I/O: it takes packets and ``now`` and returns
outputs); :class:`CtcpService` is the thin asyncio wrapper; run alone with
``python3 -m tcpencap.aio.ctcp_service --config FILE``.

An IPsec SA counts as bound (which stops the 60 s no-SA reset of A.6) once ESP flows in
either direction or our own charon sends an encrypted IKE message on the connection
(without VICI that is the best local evidence that charon has keys with this peer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tcpencap.core.ctcp_conn import (
    Closed,
    Connection,
    DeliverInner,
    Dropped,
    Role,
    State,
    Timers,
    TransmitSegment,
    stray_reply,
)
from tcpencap.core.ports import PortAllocator, PortsExhausted
from tcpencap.core.table import ConnectionTable, Entry
from tcpencap.metrics import add_closed, new_totals
from tcpencap.wire.ctcp import CTCPError, read_segment
from tcpencap.wire.ike import IKEV2_SA_INIT, Kind, classify_udp_payload
from tcpencap.wire.mtu import CTCP_OVERHEAD, check_inner, ctcp_original, plan
from tcpencap.wire.packet import (
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    PacketError,
    addr_text,
    parse_ip,
    parse_udp,
)

log = logging.getLogger("tcpencap.wire.ctcp")

CTCP_MARK = 0x63746370  # same value as nfq.ctcp_rules.CTCP_MARK (core must not import nfq)
SO_MARK = getattr(socket, "SO_MARK", 36)
IP_NODEFRAG = getattr(socket, "IP_NODEFRAG", 22)
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
PMTUDISC_PROBE = 3  # IP_PMTUDISC_PROBE / IPV6_PMTUDISC_PROBE: device MTU, not the PMTU cache
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
MTU_CACHE_SECONDS = 10.0
Key = tuple[bytes, int, bytes, int]  # local address, local port, peer address, peer port


def _count(d: dict[str, int], key: str) -> None:
    d[key] = d.get(key, 0) + 1


# --- engine outputs -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send this cTCP segment (a whole IP packet) to ``dst``."""

    data: bytes
    dst: bytes


@dataclass(frozen=True, slots=True)
class Inject:
    """Hand this decapsulated IKE/ESP packet to the local stack (``dst`` is local)."""

    packet: bytes
    dst: bytes


@dataclass(frozen=True, slots=True)
class Steer:
    """Start (``on``) or stop queueing charon's UDP to ``peer``."""

    peer: bytes
    on: bool


Output = Send | Inject | Steer


@dataclass(slots=True)
class Flow:
    """One cTCP connection plus its table entry and counters."""

    key: Key
    conn: Connection
    entry: Entry
    side: str  # "gateway" | "client"
    created: float
    steered: bool = False
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    drops: dict[str, int] = field(default_factory=dict)


def _bracket(text: str) -> str:
    return f"[{text}]" if ":" in text else text


def _is_syn(flags: int) -> bool:
    """Exactly a SYN, ECN bits ignored (A.6 step 1)."""
    return flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN


class CtcpEngine:
    """All cTCP connections of this host. ``listen`` are gateway (ADDR, PORT) endpoints
    (wildcards allowed), ``peers`` maps a client peer address to its TCP port."""

    def __init__(
        self,
        *,
        listen: Iterable[tuple[str, int]] = (),
        peers: dict[bytes, int] | None = None,
        ports: PortAllocator | None = None,
        max_connections: int = 1000,
        timers: Timers | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._listen_exact: set[tuple[bytes, int]] = set()
        self._listen_any: set[tuple[int, int]] = set()  # (address length, port)
        for host, port in listen:
            addr = ipaddress.ip_address(host)
            if addr.is_unspecified:
                self._listen_any.add((len(addr.packed), port))
            else:
                self._listen_exact.add((addr.packed, port))
        self.peers = dict(peers or {})
        self.ports = ports or PortAllocator()
        self.max_connections = max_connections
        self.timers = timers or Timers()
        self._rng = rng
        self.table = ConnectionTable()
        self.flows: dict[Key, Flow] = {}
        self.by_id: dict[int, Flow] = {}
        self.gateway_peers: dict[bytes, int] = {}
        self.counters: dict[str, int] = {}
        self.totals: dict[str, Any] = new_totals()
        self.touched: set[Key] = set()  # flows whose timer may have changed

    # --- lookups ------------------------------------------------------------------------

    def listening(self, addr: bytes, port: int) -> bool:
        return (addr, port) in self._listen_exact or (len(addr), port) in self._listen_any

    def _gateway_count(self) -> int:
        return sum(1 for f in self.flows.values() if f.side == "gateway")

    def _new_flow(self, role: Role, local: bytes, lport: int, peer: bytes, pport: int,
                  now: float) -> Flow:  # fmt: skip
        conn = Connection(
            role,
            local=local,
            peer=peer,
            local_port=lport,
            peer_port=pport,
            rng=self._rng,
            timers=self.timers,
        )
        entry = self.table.add(local, peer)
        side = "gateway" if role is Role.LISTENER else "client"
        flow = Flow((local, lport, peer, pport), conn, entry, side, now)
        self.flows[flow.key] = flow
        self.by_id[entry.conn_id] = flow
        return flow

    # --- inputs ---------------------------------------------------------------------------

    def outbound(self, now: float, packet: bytes) -> list[Output]:
        """A UDP packet charon sent to a cTCP peer (queued in OUTPUT)."""
        try:
            ip = parse_ip(packet)
            if ip.proto != PROTO_UDP:
                _count(self.counters, "outbound-not-udp")
                return []
            udp = parse_udp(ip.payload)
        except PacketError:
            _count(self.counters, "outbound-malformed")
            return []
        c = classify_udp_payload(udp.sport, udp.payload)
        if c.kind is Kind.KEEPALIVE:
            _count(self.counters, "nat-keepalive")
            return []
        if c.kind is Kind.INVALID:
            _count(self.counters, "outbound-invalid")
            return []
        flow: Flow | None = None
        if c.kind is Kind.IKE:
            assert c.ike is not None
            entry = self.table.lookup_ike(ip.src, ip.dst, c.ike.spi_i)
            entry = entry or self.table.newest_for_pair(ip.src, ip.dst)
            if entry is None:
                flow = self._open_client(now, ip.src, ip.dst)
                if flow is None:
                    return []
            else:
                flow = self.by_id[entry.conn_id]
            self.table.bind_ike(flow.entry.conn_id, c.ike.spi_i)
            encrypted = c.ike.exchange != IKEV2_SA_INIT if c.ike.major == 2 else c.ike.flags & 1
            if encrypted:
                flow.conn.sa_bound(now)
        else:
            entry = self.table.lookup_esp(ip.src, ip.dst, c.spi)
            entry = entry or self.table.newest_for_pair(ip.src, ip.dst)
            if entry is not None:
                flow = self.by_id[entry.conn_id]
            elif ip.dst in self.peers:
                # The client's SA outlived its connection (a restart of tcpencap, a reset):
                # like RFC 9329's originator, it opens a new one and sends the packet there.
                flow = self._open_client(now, ip.src, ip.dst)
                if flow is None:
                    return []
            else:
                _count(self.counters, "esp-no-connection")
                return []
            self.table.bind_esp(flow.entry.conn_id, c.spi)
            flow.conn.sa_bound(now)
        flow.conn.send_packet(now, packet)
        return self._drain(now, flow)

    def _open_client(self, now: float, local: bytes, peer: bytes) -> Flow | None:
        pport = self.peers.get(peer)
        if pport is None:
            _count(self.counters, "not-a-ctcp-peer")
            return None
        in_use = {f.key[1] for f in self.flows.values() if f.key[2] == peer}
        try:
            lport = self.ports.allocate(in_use)
        except PortsExhausted:
            _count(self.counters, "ports-exhausted")
            return None
        return self._new_flow(Role.CLIENT, local, lport, peer, pport, now)

    def inbound(self, now: float, packet: bytes) -> list[Output]:
        """A TCP segment from the wire (queued in raw PREROUTING)."""
        try:
            seg = read_segment(packet)
        except CTCPError:
            _count(self.counters, "inbound-malformed")
            return []
        key = (seg.dst, seg.dport, seg.src, seg.sport)
        flow = self.flows.get(key)
        if flow is None:
            if _is_syn(seg.flags) and self.listening(seg.dst, seg.dport):
                if self._gateway_count() >= self.max_connections:
                    _count(self.counters, "refused-limit")
                    return []
                flow = self._new_flow(Role.LISTENER, seg.dst, seg.dport, seg.src, seg.sport, now)
            else:
                reply = stray_reply(seg)
                if reply is None:
                    _count(self.counters, "stray-dropped")
                    return []
                _count(self.counters, "stray-reset")
                return [Send(reply.data, seg.src)]
        flow.conn.receive_segment(now, seg)
        return self._drain(now, flow)

    def handle_timer(self, now: float, key: Key) -> list[Output]:
        flow = self.flows.get(key)
        if flow is None:
            return []
        flow.conn.handle_timer(now)
        return self._drain(now, flow)

    # --- outputs --------------------------------------------------------------------------

    def _drain(self, now: float, flow: Flow) -> list[Output]:
        out: list[Output] = []
        conn = flow.conn
        if flow.side == "gateway" and not flow.steered and conn.state is State.ESTABLISHED:
            flow.steered = True  # before the first Inject: charon's reply must be queued
            refs = self.gateway_peers.get(flow.key[2], 0)
            self.gateway_peers[flow.key[2]] = refs + 1
            if not refs:
                out.append(Steer(flow.key[2], True))
        while (act := conn.next_action()) is not None:
            t = type(act)
            if t is TransmitSegment:
                out.append(Send(act.data, flow.key[2]))  # type: ignore[union-attr]
                if act.inner_proto is not None:  # type: ignore[union-attr]
                    flow.frames_out += 1
                    flow.bytes_out += len(act.data)  # type: ignore[union-attr]
            elif t is DeliverInner:
                flow.frames_in += 1
                flow.bytes_in += len(act.packet)  # type: ignore[union-attr]
                self._learn(now, flow, act.packet)  # type: ignore[union-attr]
                out.append(Inject(act.packet, flow.key[0]))  # type: ignore[union-attr]
            elif t is Dropped:
                _count(flow.drops, act.reason)  # type: ignore[union-attr]
            elif t is Closed:
                out.extend(self._remove(flow, act.reason))  # type: ignore[union-attr]
        if flow.key in self.flows:
            self.touched.add(flow.key)
        return out

    def _learn(self, now: float, flow: Flow, packet: bytes) -> None:
        """Inbound IKE teaches the table its SPI; inbound ESP means an SA is in use."""
        try:
            ip = parse_ip(packet)
            if ip.proto != PROTO_UDP:
                flow.conn.sa_bound(now)  # raw ESP
                return
            udp = parse_udp(ip.payload)
        except PacketError:
            return
        c = classify_udp_payload(udp.dport, udp.payload)
        if c.kind is Kind.IKE and c.ike is not None:
            self.table.bind_ike(flow.entry.conn_id, c.ike.spi_i)
        elif c.kind is Kind.ESP:
            flow.conn.sa_bound(now)

    def _remove(self, flow: Flow, reason: str) -> list[Output]:
        out: list[Output] = []
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
            # Keep closed flows' figures so the daemon's metrics never go backwards.
            f = flow
            add_closed(self.totals, f.frames_in, f.frames_out, f.bytes_in, f.bytes_out, f.drops)
        self.by_id.pop(flow.entry.conn_id, None)
        self.table.remove(flow.entry.conn_id)
        self.touched.add(flow.key)
        if flow.side == "client":
            self.ports.release(flow.key[1])
        elif flow.steered:
            peer = flow.key[2]
            left = self.gateway_peers.get(peer, 1) - 1
            if left <= 0:
                self.gateway_peers.pop(peer, None)
                out.append(Steer(peer, False))
            else:
                self.gateway_peers[peer] = left
        log.info("cTCP %s closed: %s", self.describe(flow), reason)
        return out

    # --- status -----------------------------------------------------------------------------

    @staticmethod
    def describe(flow: Flow) -> str:
        local, lport, peer, pport = flow.key
        return (
            f"conn {flow.entry.conn_id} {flow.side} "
            f"{_bracket(addr_text(local))}:{lport} <-> {_bracket(addr_text(peer))}:{pport}"
        )

    def status(self, now: float) -> list[dict[str, Any]]:
        rows = []
        for flow in sorted(self.flows.values(), key=lambda f: f.entry.conn_id):
            local, lport, peer, pport = flow.key
            e = flow.entry
            rows.append(
                {
                    "id": e.conn_id,
                    "side": flow.side,
                    "state": flow.conn.state.value,
                    "local": f"{_bracket(addr_text(local))}:{lport}",
                    "peer": f"{_bracket(addr_text(peer))}:{pport}",
                    "ike_spis": sorted(s.hex() for s in e.ike_spis),
                    "ike_spis_old": sorted(s.hex() for s in e.ike_spis_old),
                    "esp_spis": sorted(f"{s:08x}" for s in e.esp_spis),
                    "frames_in": flow.frames_in,
                    "frames_out": flow.frames_out,
                    "bytes_in": flow.bytes_in,
                    "bytes_out": flow.bytes_out,
                    "drops": dict(flow.drops),
                    "age": round(now - flow.created, 1),
                    "encapsulation": "ctcp",
                }
            )
        return rows


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


class RouteMtu:
    """The path MTU towards a destination as the kernel knows it (route MTU, a cached PMTU
    exception, else the outgoing link's MTU): a connected UDP socket's IP_MTU/IPV6_MTU,
    which sends nothing. Cached per destination for :data:`MTU_CACHE_SECONDS`."""

    def __init__(self, ttl: float = MTU_CACHE_SECONDS) -> None:
        self.ttl = ttl
        self._cache: dict[bytes, tuple[float, int]] = {}

    def get(self, dst: bytes, now: float) -> int:
        hit = self._cache.get(dst)
        if hit is not None and hit[0] > now:
            return hit[1]
        mtu = self.lookup(dst)
        self._cache[dst] = (now + self.ttl, mtu)
        return mtu

    def forget(self, dst: bytes) -> None:
        self._cache.pop(dst, None)

    @staticmethod
    def lookup(dst: bytes) -> int:
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

    def close(self) -> None:
        self._cache.clear()


class CtcpService:
    """Runs the cTCP engine in the daemon's asyncio loop."""

    def __init__(self, config: Any, injector: Any, log_limited: Callable[..., None]) -> None:
        self.config = config
        self.injector = injector
        self.log_limited = log_limited
        self.queue_num = config.queue_num + 1
        self.engine: CtcpEngine | None = None
        self.rules: Any = None
        self.queue: Any = None
        self.sender: RawSender | None = None
        self.mtus = RouteMtu()
        # dst -> (MTU we told the local stack, the path MTU it was derived from)
        self._told: dict[bytes, tuple[int, int]] = {}
        self._ptb_last: dict[bytes, float] = {}
        self._frag_ident = random.getrandbits(32)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: dict[Key, tuple[float, asyncio.TimerHandle]] = {}
        self.counters: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.config.gateway.ctcp_listen or self._ctcp_connections())

    def _ctcp_connections(self) -> dict[str, Any]:
        return {
            n: c
            for n, c in self.config.connections.items()
            if c.encapsulation == "ctcp" and c.transport != "udp"
        }

    async def _client_peers(self) -> dict[bytes, int]:
        wanted = self._ctcp_connections()
        needs = [n for n, c in wanted.items() if not c.remote_addrs]
        resolved: dict[str, list[str]] = {}
        if needs:
            from vici_bridge.resolve import resolve_remote_addrs

            resolved = await resolve_remote_addrs(self.config.vici_socket, needs)
        peers: dict[bytes, int] = {}
        for name, c in wanted.items():
            for text in list(c.remote_addrs) or resolved.get(name, []):
                try:
                    peers[ipaddress.ip_address(text).packed] = c.remote_port
                except ValueError:
                    log.warning("cTCP connection %s: remote %r is not an address", name, text)
            if not (c.remote_addrs or resolved.get(name)):
                log.warning("cTCP connection %s: no remote address known", name)
        return peers

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        from nfq.ctcp_rules import CtcpRules
        from nfq.queue import QueueReader

        self._loop = loop
        cfg = self.config
        peers = await self._client_peers()
        self.engine = CtcpEngine(
            listen=cfg.gateway.ctcp_listen,
            peers=peers,
            ports=PortAllocator(cfg.client.port, *cfg.client.port_range),
            max_connections=cfg.gateway.max_connections,
            timers=Timers(
                handshake=cfg.gateway.ctcp_handshake_timeout,
                no_sa=cfg.gateway.ctcp_no_sa_timeout,
            ),
        )
        self.sender = RawSender()
        self.rules = CtcpRules(self.queue_num)
        try:
            self.rules.install(
                cfg.gateway.ctcp_listen, [(addr_text(p), port) for p, port in peers.items()]
            )
            for p in peers:
                self.rules.add_peer(addr_text(p))
            self.queue = QueueReader(self.queue_num, self._on_queued)
            self.queue.start(loop)
        except BaseException:
            await self.stop()
            raise
        for host, port in cfg.gateway.ctcp_listen:
            log.info("cTCP listening on %s:%d", _bracket(host), port)
        for p, port in peers.items():
            log.info("cTCP peer %s port %d", addr_text(p), port)

    async def stop(self) -> None:
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self.queue is not None:
            with contextlib.suppress(Exception):
                self.queue.stop()
            self.queue = None
        if self.rules is not None:
            self.rules.remove()
            self.rules = None
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        self.mtus.close()

    def status(self) -> list[dict[str, Any]]:
        if self.engine is None or self._loop is None:
            return []
        return self.engine.status(self._loop.time())

    def summary(self) -> dict[str, Any]:
        """Service-wide counters (refusals, strays, queue), for the daemon's status."""
        eng = self.engine
        return {
            "queue": self.queue_num,
            "packets": self.queue.packets if self.queue else 0,
            "counters": {**(eng.counters if eng else {}), **self.counters},
            "totals": eng.totals if eng else {},
        }

    # --- packet path ------------------------------------------------------------------------

    def _on_queued(self, packet: bytes) -> None:
        assert self.engine is not None and self._loop is not None
        now = self._loop.time()
        version = packet[0] >> 4 if packet else 0
        proto = packet[9] if version == 4 and len(packet) > 9 else None
        if version == 6:
            try:
                proto = parse_ip(packet).proto
            except PacketError:
                proto = None
        if proto == PROTO_UDP:
            if self._too_big(now, packet):
                return
            out = self.engine.outbound(now, packet)
        else:
            out = self.engine.inbound(now, packet)
        self._execute(out)

    def _execute(self, out: list[Output]) -> None:
        assert self.engine is not None and self.sender is not None
        for o in out:
            try:
                if type(o) is Send:
                    self._send(o.data, o.dst)
                elif type(o) is Inject:
                    self.injector.inject(o.packet, o.dst)
                elif type(o) is Steer:
                    peer = addr_text(o.peer)
                    if o.on:
                        self.rules.add_peer(peer)
                    else:
                        self.rules.remove_peer(peer)
            except OSError as exc:
                _count(self.counters, f"{type(o).__name__.lower()}-failed")
                self.log_limited("ctcp-io", "cTCP: %s failed: %s", type(o).__name__, exc)
        touched, self.engine.touched = self.engine.touched, set()
        for key in touched:
            self._arm(key)

    # --- packet size (tcpencap/wire/mtu.py decides, docs/mtu.md explains) ------------------------

    def path_mtu(self, dst: bytes, now: float) -> int:
        """The route's MTU to ``dst``, not the smaller PMTU exception our own ICMP created
        (the kernel keeps one per destination, shared by charon's socket and ours)."""
        mtu = self.mtus.get(dst, now)
        told = self._told.get(dst)
        return told[1] if told is not None and mtu == told[0] else mtu

    def _tell(self, icmp: bytes, local: bytes, dst: bytes, told: int, base: int) -> None:
        self._told[dst] = (told, base)
        self.injector.inject(icmp, local)

    def _too_big(self, now: float, packet: bytes) -> bool:
        """charon's IPv4 packet with DF that will not fit once encapsulated: answer with
        ICMP "fragmentation needed" (MTU minus the cTCP overhead) instead of sending it."""
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return False
        dst = packet[16:20]
        base = self.path_mtu(dst, now)
        try:
            decision = check_inner(packet, base)
        except PacketError:
            return False
        if decision is None or decision.signal is None:
            return False
        _count(self.counters, "too-big-df")
        try:
            self._tell(decision.signal, packet[12:16], dst, base - CTCP_OVERHEAD, base)
            _count(self.counters, "icmp-frag-needed-sent")
        except OSError as exc:
            _count(self.counters, "icmp-failed")
            self.log_limited("ctcp-icmp", "cTCP: ICMP frag needed failed: %s", exc)
        return True

    def _send(self, data: bytes, dst: bytes) -> None:
        """Send one segment, fragmenting it (DF clear, IPv6) when it exceeds the route MTU;
        a header-included raw socket never fragments by itself."""
        assert self.sender is not None and self._loop is not None
        now = self._loop.time()
        for attempt in (0, 1):
            base = self.path_mtu(dst, now)
            if len(data) <= base:
                decision = plan(data, base)
            else:
                self._frag_ident = (self._frag_ident + 1) & 0xFFFFFFFF
                decision = plan(data, base, self._frag_ident, ctcp_original(data))
                _count(self.counters, decision.reason)
            if decision.signal is not None:
                self._signal(decision.signal, data, dst, base, now)
            try:
                for piece in decision.send:
                    self.sender.send(piece, dst)
                return
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE or attempt:
                    raise
                self.mtus.forget(dst)  # the route changed under the cache: look again
                _count(self.counters, "mtu-refresh")

    def _signal(self, icmp: bytes, data: bytes, dst: bytes, base: int, now: float) -> None:
        """ICMP for a segment already queued (IPv6 fragments; a DF race): at most once a
        second per destination, the packets themselves are fragmented or counted anyway."""
        if now - self._ptb_last.get(dst, -10.0) < 1.0:
            _count(self.counters, "icmp-suppressed")
            return
        self._ptb_last[dst] = now
        local = data[12:16] if data[0] >> 4 == 4 else data[8:24]
        try:
            self._tell(icmp, local, dst, base - CTCP_OVERHEAD, base)
            _count(self.counters, "icmp-too-big-sent")
        except OSError as exc:
            _count(self.counters, "icmp-failed")
            self.log_limited("ctcp-icmp", "cTCP: ICMP too big failed: %s", exc)

    def _arm(self, key: Key) -> None:
        assert self.engine is not None and self._loop is not None
        flow = self.engine.flows.get(key)
        deadline = flow.conn.get_timer() if flow else None
        old = self._timers.get(key)
        if old is not None and old[0] == deadline:
            return
        if old is not None:
            old[1].cancel()
            del self._timers[key]
        if deadline is not None:
            handle = self._loop.call_at(deadline, self._fire, key)
            self._timers[key] = (deadline, handle)

    def _fire(self, key: Key) -> None:
        assert self.engine is not None and self._loop is not None
        self._timers.pop(key, None)
        try:
            self._execute(self.engine.handle_timer(self._loop.time(), key))
        except Exception:
            log.exception("cTCP timer")


# --- standalone runner --------------------------------------------------------------------


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
    last: dict[str, float] = {}

    def log_limited(key: str, fmt: str, *a: object) -> None:
        now = time.monotonic()
        if now - last.get(key, -10.0) >= 1.0:
            last[key] = now
            log.warning(fmt, *a)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        injector = RawInjector()
        svc = CtcpService(cfg, injector, log_limited)
        try:
            await svc.start(loop)
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
