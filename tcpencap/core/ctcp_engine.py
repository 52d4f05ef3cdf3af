"""The cTCP engine: every cTCP connection of this host, without I/O.

cTCP is a packet transform, not a stream (protocols.md A.1, A.13): the engine is fed TCP
segments from the wire (``inbound``) and charon's UDP packets to cTCP peers
(``outbound``), always with the current time, and queues :mod:`outputs` the shell pulls
(``pull()``); ``get_timer()`` / ``handle_timer(now)`` drive every connection's timers. The
same shape as :class:`tcpencap.core.rfc9329_engine.Rfc9329Engine`. Each connection's TCP
state machine is :class:`tcpencap.core.ctcp_conn.Connection`.

An IPsec SA counts as bound (which stops the 60 s no-SA reset of A.6) once ESP flows in
either direction or our own charon sends an encrypted IKE message on the connection
(without VICI that is the best local evidence that charon has keys with this peer).
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections import deque
from collections.abc import Iterable
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
from tcpencap.core.engine import Engine
from tcpencap.core.outputs import (
    Inject,
    Steer,
    Transmit,
    bracket,
    count,
    describe,
    status_row,
)
from tcpencap.core.peers import SteeringRefs
from tcpencap.core.ports import PortAllocator, PortsExhausted
from tcpencap.core.table import Bind, ConnectionTable, Entry
from tcpencap.core.totals import add_closed, new_totals
from tcpencap.wire.ctcp import CTCPError, read_segment
from tcpencap.wire.ike import IKEV2_SA_INIT, Kind, classify_udp_payload
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

log = logging.getLogger("tcpencap.ctcp")

Key = tuple[bytes, int, bytes, int]  # local address, local port, peer address, peer port


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
    armed: float | None = None  # the deadline queued in the engine's timers
    ike_order: deque[bytes] = field(default_factory=deque)  # indexed IKE SPIs, oldest first


def _is_syn(flags: int) -> bool:
    """Exactly a SYN, ECN bits ignored (A.6 step 1)."""
    return flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN


class CtcpEngine(Engine):
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
        super().__init__()
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
        self.steering = SteeringRefs()  # gateway peers with an established connection
        self.counters: dict[str, int] = {}
        self.totals: dict[str, Any] = new_totals()

    def set_peers(self, peers: dict[bytes, int]) -> None:
        """The client peers are now exactly these (reload). Connections to a removed peer
        stay until their own timers end them; charon no longer sends to it."""
        self.peers = dict(peers)

    # --- lookups ------------------------------------------------------------------------

    def listening(self, addr: bytes, port: int) -> bool:
        return (addr, port) in self._listen_exact or (len(addr), port) in self._listen_any

    def _gatewaycount(self) -> int:
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

    def outbound(self, now: float, packet: bytes) -> None:
        """A UDP packet charon sent to a cTCP peer (queued in OUTPUT)."""
        try:
            ip = parse_ip(packet)
            if ip.proto != PROTO_UDP:
                count(self.counters, "outbound-not-udp")
                return
            udp = parse_udp(ip.payload)
        except PacketError:
            count(self.counters, "outbound-malformed")
            return
        c = classify_udp_payload(udp.sport, udp.payload)
        if c.kind is Kind.KEEPALIVE:
            count(self.counters, "nat-keepalive")
            return
        if c.kind is Kind.INVALID:
            count(self.counters, "outbound-invalid")
            return
        flow: Flow | None = None
        if c.kind is Kind.IKE:
            assert c.ike is not None
            entry = self.table.lookup_ike(ip.src, ip.dst, c.ike.spi_i)
            entry = entry or self.table.newest_for_pair(ip.src, ip.dst)
            if entry is None:
                flow = self._open_client(now, ip.src, ip.dst)
                if flow is None:
                    return
            else:
                flow = self.by_id[entry.conn_id]
            self._bind_ike(flow, c.ike.spi_i)
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
                    return
            else:
                count(self.counters, "esp-no-connection")
                return
            self.table.bind_esp(flow.entry.conn_id, c.spi)
            flow.conn.sa_bound(now)
        flow.conn.send_packet(now, packet)
        self._drain(now, flow)

    def _bind_ike(self, flow: Flow, spi: bytes) -> None:
        """Index an IKE SPI seen on the flow. cTCP follows no VICI event, so nothing says
        when a rekeyed or redundant SA is gone: once a flow holds max_spis, the SPI seen
        least recently leaves. The index only chooses a flow; an unindexed SPI goes to
        the flow of its address pair."""
        order = flow.ike_order
        if self.table.bind_ike(flow.entry.conn_id, spi) is Bind.NEW:
            order.append(spi)
            while len(order) > self.table.max_spis:
                self.table.unbind_ike(flow.entry.conn_id, order.popleft())
        elif order and order[-1] != spi and spi in order:
            order.remove(spi)
            order.append(spi)

    def _open_client(self, now: float, local: bytes, peer: bytes) -> Flow | None:
        pport = self.peers.get(peer)
        if pport is None:
            count(self.counters, "not-a-ctcp-peer")
            return None
        in_use = {f.key[1] for f in self.flows.values() if f.key[2] == peer}
        try:
            lport = self.ports.allocate(in_use)
        except PortsExhausted:
            count(self.counters, "ports-exhausted")
            return None
        return self._new_flow(Role.CLIENT, local, lport, peer, pport, now)

    def inbound(self, now: float, packet: bytes) -> None:
        """A TCP segment from the wire (queued in raw PREROUTING)."""
        try:
            seg = read_segment(packet)
        except CTCPError:
            count(self.counters, "inbound-malformed")
            return
        key = (seg.dst, seg.dport, seg.src, seg.sport)
        flow = self.flows.get(key)
        if flow is None:
            if _is_syn(seg.flags) and self.listening(seg.dst, seg.dport):
                if self._gatewaycount() >= self.max_connections:
                    count(self.counters, "refused-limit")
                    return
                flow = self._new_flow(Role.LISTENER, seg.dst, seg.dport, seg.src, seg.sport, now)
            else:
                reply = stray_reply(seg)
                if reply is None:
                    count(self.counters, "stray-dropped")
                    return
                count(self.counters, "stray-reset")
                self._out.append(Transmit(0, reply.data, dst=seg.src))
                return
        flow.conn.receive_segment(now, seg)
        self._drain(now, flow)

    # --- the shell's side -------------------------------------------------------------

    def _arm(self, flow: Flow) -> None:
        """Queue the flow's next deadline once (the per-packet cost is one compare)."""
        due = flow.conn.get_timer()
        if due is not None and due != flow.armed:
            flow.armed = due
            self.timer_queue.call_at(due, self._flow_due, flow)

    def _flow_due(self, now: float, flow: Flow) -> None:
        if self.flows.get(flow.key) is not flow:
            return
        due = flow.conn.get_timer()
        if due is None or due > now:
            if due != flow.armed:
                flow.armed = None
                self._arm(flow)
            return
        flow.armed = None
        flow.conn.handle_timer(now)
        self._drain(now, flow)

    # --- outputs --------------------------------------------------------------------------

    def _drain(self, now: float, flow: Flow) -> None:
        out = self._out
        conn = flow.conn
        if flow.side == "gateway" and not flow.steered and conn.state is State.ESTABLISHED:
            flow.steered = True  # before the first Inject: charon's reply must be queued
            if self.steering.add(flow.key[2], f"conn:{flow.entry.conn_id}"):
                out.append(Steer(flow.key[2], True))
        while (act := conn.next_action()) is not None:
            t = type(act)
            if t is TransmitSegment:
                out.append(Transmit(flow.entry.conn_id, act.data, dst=flow.key[2]))  # type: ignore[union-attr]
                if act.inner_proto is not None:  # type: ignore[union-attr]
                    flow.frames_out += 1
                    flow.bytes_out += len(act.data)  # type: ignore[union-attr]
            elif t is DeliverInner:
                flow.frames_in += 1
                flow.bytes_in += len(act.packet)  # type: ignore[union-attr]
                self._learn(now, flow, act.packet)  # type: ignore[union-attr]
                out.append(Inject(act.packet, flow.key[0]))  # type: ignore[union-attr]
            elif t is Dropped:
                count(flow.drops, act.reason)  # type: ignore[union-attr]
            elif t is Closed:
                self._remove(flow, act.reason)  # type: ignore[union-attr]
        if flow.key in self.flows:
            self._arm(flow)

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
            self._bind_ike(flow, c.ike.spi_i)
        elif c.kind is Kind.ESP:
            flow.conn.sa_bound(now)

    def _remove(self, flow: Flow, reason: str) -> None:
        out = self._out
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
            # Keep closed flows' figures so the daemon's metrics never go backwards.
            f = flow
            add_closed(self.totals, f.frames_in, f.frames_out, f.bytes_in, f.bytes_out, f.drops)
        self.by_id.pop(flow.entry.conn_id, None)
        self.table.remove(flow.entry.conn_id)
        if flow.side == "client":
            self.ports.release(flow.key[1])
        elif flow.steered and self.steering.remove(flow.key[2], f"conn:{flow.entry.conn_id}"):
            out.append(Steer(flow.key[2], False))
        log.info("cTCP %s closed: %s", self.describe(flow), reason)

    # --- status -----------------------------------------------------------------------------

    @staticmethod
    def describe(flow: Flow) -> str:
        local, lport, peer, pport = flow.key
        return describe(flow.entry.conn_id, flow.side, addr_text(local), lport,
                        addr_text(peer), pport)  # fmt: skip

    def status(self, now: float) -> list[dict[str, Any]]:
        rows = []
        for flow in sorted(self.flows.values(), key=lambda f: f.entry.conn_id):
            local, lport, peer, pport = flow.key
            rows.append(
                status_row(
                    flow.entry.conn_id,
                    "ctcp",
                    flow.side,
                    flow.conn.state.value,
                    f"{bracket(addr_text(local))}:{lport}",
                    f"{bracket(addr_text(peer))}:{pport}",
                    flow.entry,
                    {
                        "frames_in": flow.frames_in,
                        "frames_out": flow.frames_out,
                        "bytes_in": flow.bytes_in,
                        "bytes_out": flow.bytes_out,
                        "drops": dict(flow.drops),
                        "age": round(now - flow.created, 1),
                    },
                )
            )
        return rows
