"""The cTCP engine: every cTCP connection of this host, without I/O.

cTCP is a packet transform, not a stream (protocols.md A.1, A.13): the engine is fed TCP
segments from the wire (``inbound``) and charon's UDP packets to cTCP peers
(``outbound``), always with the current time, and queues :mod:`outputs` the shell pulls
(``pull()``); ``get_timer()`` / ``handle_timer(now)`` drive every connection's timers. The
same shape as :class:`tcpencap.core.rfc9329_engine.Rfc9329Engine`: built from the
configuration and the time, reloaded with ``apply(now, ops)``, ended with ``stop()``. Each
connection's TCP state machine is :class:`tcpencap.core.ctcp_conn.Connection`; what fits on
a path is :class:`tcpencap.core.ctcp_mtu.PathMtus`' to say; the steering (client peers,
gateway endpoints, and those that linger after their flow until charon lists no SA with
them) is the engine's, the rules are the shell's to change.

An IPsec SA counts as bound (which stops the 60 s no-SA reset of A.6) once our own charon
sends ESP on the connection: only charon's side counts, since anybody can send bytes that
look like ESP, and an encrypted IKE message from charon may be an authentication failure.

What a stranger can make a gateway do is bounded (DESIGN.md, trust boundaries): a SYN gets a
SYN+ACK with a cookie and creates nothing (:mod:`tcpencap.core.ctcp_cookie`); a connection
is made only from the ACK that returns the cookie, and only while its source address and
source prefix hold fewer than their share (:mod:`tcpencap.core.ctcp_limits`); replies to
strangers are limited in total; drops are counted under fixed names, their details logged at
most once a second per name.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tcpencap.core.ctcp_conn import (
    Closed,
    Connection,
    DeliverInner,
    Dropped,
    SegKind,
    Timers,
    TransmitSegment,
    seg_kind,
    stray_reply,
)
from tcpencap.core.ctcp_cookie import SynCookies
from tcpencap.core.ctcp_limits import PrefixBuckets, SourceSlots
from tcpencap.core.ctcp_mtu import PathMtus
from tcpencap.core.engine import Engine
from tcpencap.core.outputs import (
    Inject,
    Query,
    SendRaw,
    Steer,
    SteerSegments,
    bracket,
    count,
    describe,
    status_row,
)
from tcpencap.core.peers import SteeringRefs
from tcpencap.core.ports import PortAllocator, PortsExhausted
from tcpencap.core.reload import CtcpPeers, Operation
from tcpencap.core.restart import sa_hosts
from tcpencap.core.role import Role
from tcpencap.core.table import Bind, ConnectionTable, Entry
from tcpencap.core.timers import LogLimiter, TimerQueue
from tcpencap.core.totals import add_closed, new_totals
from tcpencap.wire.ctcp import CTCPError, Segment, build_control, read_segment
from tcpencap.wire.ike import Classified, Kind, Refused, classify_outbound, classify_udp_payload
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

REPLY_TOTAL_FACTOR = 250  # replies to all strangers: this many times those to one source
LINGER = "linger"  # steering reason of a gateway endpoint whose SAs no flow carries
RELEASE_POLL = 5.0  # how often charon is asked whether a lingering peer still has SAs
RELEASE_QUERY = "ctcp-release"
UNKNOWN_ROUTE_MTU = 65535  # no route MTU reader: nothing is ever too big


@dataclass(slots=True)
class Flow:
    """One cTCP connection plus its table entry and counters."""

    key: Key
    conn: Connection
    entry: Entry
    role: Role
    created: float
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    armed: float | None = None  # the deadline queued in the engine's timers
    ike_order: deque[bytes] = field(default_factory=deque)  # indexed IKE SPIs, oldest first
    steered: set[int] = field(default_factory=set)  # gateway: the peer's UDP ports steered


# The counter names of an outbound packet that is not carried (metric labels).
_REFUSED = {
    Refused.NOT_UDP: "outbound-not-udp",
    Refused.FRAGMENT: "outbound-fragment",
    Refused.MALFORMED: "outbound-malformed",
    Refused.KEEPALIVE: "nat-keepalive",
    Refused.INVALID: "outbound-invalid",
}


def _is_syn(flags: int) -> bool:
    """Exactly a SYN, ECN bits ignored (A.6 step 1)."""
    return flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN


class CtcpEngine(Engine):
    """All cTCP connections of this host, built like the RFC 9329 engine from the
    configuration (its ``gateway`` and ``client`` sections) and the time; client peers come
    with :meth:`apply`. ``ports`` is the local port allocator shared with the RFC 9329
    side (default: one of the configured range); ``route_mtu`` reads the route's MTU
    towards an address (the shell's I/O; the default knows no limit); ``rng`` and
    ``secret`` make tests repeatable.

    Gateway limits: ``max_connections`` in all, ``max_per_source`` for one source (a
    ``source_prefix_v4`` / ``_v6`` network), ``ctcp_reply_rate`` SYN+ACKs (and as many
    RSTs) a second to one source without a connection, 250 times that to all of them."""

    def __init__(
        self,
        config: Any,
        now: float,
        *,
        ports: PortAllocator | None = None,
        rng: random.Random | None = None,
        secret: bytes | None = None,
        route_mtu: Callable[[bytes], int] = lambda dst: UNKNOWN_ROUTE_MTU,
    ) -> None:
        super().__init__()
        gw, cl = config.gateway, config.client
        self.config = config
        self._listen_exact: set[tuple[bytes, int]] = set()
        self._listen_any: set[tuple[int, int]] = set()  # (address length, port)
        for host, port in gw.ctcp_listen:
            addr = ipaddress.ip_address(host)
            if addr.is_unspecified:
                self._listen_any.add((len(addr.packed), port))
            else:
                self._listen_exact.add((addr.packed, port))
        self.peers: dict[bytes, int] = {}
        self.ports = ports or PortAllocator(cl.port, *cl.port_range)
        self.max_connections = gw.max_connections
        self.timers = Timers(
            handshake=gw.ctcp_handshake_timeout,
            no_sa=gw.ctcp_no_sa_timeout,
            idle=gw.ctcp_idle_timeout,
            keepalive=cl.ctcp_keepalive,
        )
        self._rng = rng
        self.cookies = SynCookies(secret or secrets.token_bytes(32), self.timers.handshake)
        bits = (gw.source_prefix_v4, gw.source_prefix_v6)
        self.slots = SourceSlots(gw.max_per_source, *bits)
        rate = float(gw.ctcp_reply_rate)
        self._syn_acks = PrefixBuckets(rate, REPLY_TOTAL_FACTOR * rate, *bits)
        self._resets = PrefixBuckets(rate, REPLY_TOTAL_FACTOR * rate, *bits)
        self._ident = 0
        self.log_limited = LogLimiter(log.warning)
        self.table = ConnectionTable()
        self.flows: dict[Key, Flow] = {}
        self._gateway_flows = 0
        self.by_id: dict[int, Flow] = {}
        # gateway: the UDP endpoints (peer, inner source port) charon answers its flows at
        self.steering: SteeringRefs[tuple[bytes, int]] = SteeringRefs()
        self.lingering: set[tuple[bytes, int]] = set()  # steered for SAs no flow carries
        self._release_polling = False
        self.stopping = False
        self.counters: dict[str, int] = {}
        self.mtus = PathMtus(route_mtu, self.counters)
        self.totals: dict[str, Any] = new_totals()

    # --- configuration and life ---------------------------------------------------------

    def apply(self, now: float, ops: list[Operation]) -> None:
        """Run the cTCP part of a reload plan (:func:`tcpencap.core.reload.plan`): the
        client peers are now exactly those of the last CtcpPeers. A new or moved peer is
        queued before a removed one stops being; connections to a removed peer stay until
        their own timers end them (charon no longer sends to it)."""
        for op in ops:
            if isinstance(op, CtcpPeers):
                self._set_peers(op.peers)

    def _set_peers(self, peers: dict[bytes, int]) -> None:
        old, out = self.peers, self._out
        for p, port in peers.items():
            if old.get(p) != port:
                out.append(SteerSegments(p, port, True))
                out.append(Steer(p, True))
                log.info("cTCP peer %s port %d", addr_text(p), port)
        for p, port in old.items():
            if peers.get(p) != port:
                out.append(SteerSegments(p, port, False))
                if p not in peers:
                    out.append(Steer(p, False))
                log.info("cTCP peer %s port %d removed", addr_text(p), port)
        self.peers = dict(peers)

    def linger(self, now: float, endpoints: list[tuple[bytes, int]]) -> None:
        """Gateway endpoints charon may still send to with no flow to carry it (a previous
        run's, or one whose flow closed) stay steered, their packets dropped (never UDP),
        until charon lists no IKE SA with their address (asked every RELEASE_POLL)."""
        for ep in endpoints:
            self.lingering.add(ep)
            if self.steering.add(ep, LINGER):
                self._out.append(Steer(ep[0], True, ep[1]))
        if self.lingering and not self._release_polling and not self.stopping:
            self._release_polling = True
            self.timer_queue.call_at(now + RELEASE_POLL, self._ask_release)

    def _ask_release(self, now: float) -> None:
        if self.stopping:
            return
        self._out.append(Query(RELEASE_QUERY))

    def sas_listed(self, now: float, purpose: str, sas: list[dict[str, Any]] | None) -> None:
        """charon's IKE SAs for a Query; None: charon could not be asked, so everything
        stays steered (fail closed) and it is asked again."""
        if purpose != RELEASE_QUERY:
            return
        self._release_polling = False
        if sas is not None:
            busy = sa_hosts(sas)
            for ep in sorted(e for e in self.lingering if e[0] not in busy):
                self.lingering.discard(ep)
                if self.steering.remove(ep, LINGER):
                    self._out.append(Steer(ep[0], False, ep[1]))
        self.linger(now, [])

    def stop(self) -> None:
        """tcpencap is stopping: nothing more is sent or asked. The flows are left as they
        are: the rules outlive the daemon, and the next run answers their segments with a
        RST (A.6 step 6)."""
        self.stopping = True
        self.timer_queue = TimerQueue()

    # --- lookups ------------------------------------------------------------------------

    def _listening(self, addr: bytes, port: int) -> bool:
        return (addr, port) in self._listen_exact or (len(addr), port) in self._listen_any

    def _gatewaycount(self) -> int:
        return self._gateway_flows

    def _new_flow(self, conn: Connection, now: float) -> Flow:
        local, lport, peer, pport = conn.local, conn.local_port, conn.peer, conn.peer_port
        entry = self.table.add(local, peer)
        flow = Flow((local, lport, peer, pport), conn, entry, conn.role, now)
        self.flows[flow.key] = flow
        self.by_id[entry.conn_id] = flow
        if conn.role is Role.GATEWAY:
            self.slots.take(peer)
            self._gateway_flows += 1
        return flow

    # --- inputs ---------------------------------------------------------------------------

    def outbound(self, now: float, packet: bytes) -> None:
        """A UDP packet charon sent to a cTCP peer (queued in OUTPUT)."""
        too_big = self.mtus.too_big(now, packet)
        if too_big is not None:  # charon is told the MTU instead (IPv4 with DF)
            self._out.append(Inject(*too_big))
            return
        got = classify_outbound(packet)
        if isinstance(got, Refused):
            count(self.counters, _REFUSED[got])
            return
        ip, c = got.ip, got.what
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
        self._carry(now, flow, c, packet)

    def _carry(self, now: float, flow: Flow, c: Classified, packet: bytes) -> None:
        """charon's packet onto ``flow``: its SPI indexed, its ESP the proof of an SA."""
        if c.ike is not None:
            self._bind_ike(flow, c.ike.spi_i)
        else:
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
        conn = Connection(Role.CLIENT, local=local, peer=peer, local_port=lport,
                          peer_port=pport, rng=self._rng, timers=self.timers)  # fmt: skip
        return self._new_flow(conn, now)

    def inbound(self, now: float, packet: bytes) -> None:
        """A TCP segment from the wire (queued in raw PREROUTING)."""
        try:
            seg = read_segment(packet)
        except CTCPError as exc:
            count(self.counters, "inbound-malformed")
            self.log_limited(now, "inbound-malformed", "cTCP: malformed segment: %s", exc)
            return
        key = (seg.dst, seg.dport, seg.src, seg.sport)
        flow = self.flows.get(key)
        if flow is None:
            if self._listening(seg.dst, seg.dport):
                flow = self._handshake(now, seg)
            elif self.peers.get(seg.src) == seg.sport:
                # a client's gateway still sends on a connection this host no longer has
                # (tcpencap restarted): a RST at the gateway's RCV.NXT ends it there
                self._stray(now, seg)
            if flow is None:
                return
            if not seg.payload_len:  # the handshake's own ACK: nothing more to do
                self._drain(now, flow)
                return
        flow.conn.receive_segment(now, seg)
        self._drain(now, flow)

    def _handshake(self, now: float, seg: Segment) -> Flow | None:
        """A segment at a listen port without a connection: a SYN gets a cookie, the ACK
        that returns one makes the connection (also when it carries the first data),
        anything else a rate-limited RST. Nothing is kept for the SYN."""
        refusal = self._refusal(seg.src)
        if _is_syn(seg.flags):
            if refusal is not None:
                self._refuse(now, refusal, seg)
            elif not self._syn_acks.allow(now, seg.src):
                count(self.counters, "syn-ack-limited")
            else:
                isn = self.cookies.make(now, seg.dst, seg.dport, seg.src, seg.sport)
                ack = (seg.seq + 1) & 0xFFFFFFFF
                data = build_control(seg.dst, seg.src, seg.dport, seg.sport, isn, ack,
                                     TCP_SYN | TCP_ACK, ident=self._take_ident())  # fmt: skip
                count(self.counters, "syn-cookie-sent")
                self._send_raw(now, data, seg.src)
            return None
        cookie = (seg.ack - 1) & 0xFFFFFFFF
        if (
            seg_kind(seg.flags) is SegKind.OTHER
            and seg.flags & TCP_ACK
            and self.cookies.check(now, seg.dst, seg.dport, seg.src, seg.sport, cookie)
        ):
            if refusal is not None:
                self._refuse(now, refusal, seg)
                return None
            count(self.counters, "accepted")
            conn = Connection.accept(now, local=seg.dst, peer=seg.src, local_port=seg.dport,
                                     peer_port=seg.sport, isn=cookie, peer_seq=seg.seq,
                                     rng=self._rng, timers=self.timers)  # fmt: skip
            return self._new_flow(conn, now)
        self._stray(now, seg)
        return None

    def _refusal(self, src: bytes) -> str | None:
        if self._gatewaycount() >= self.max_connections:
            return "refused-limit"
        return "refused-per-source" if self.slots.full(src) else None

    def _refuse(self, now: float, name: str, seg: Segment) -> None:
        """A source at its limit gets no answer at all (a SYN+ACK would only invite it to
        try again): counted and logged at most once a second."""
        count(self.counters, name)
        self.log_limited(now, name, "cTCP: %s from %s port %d", name, addr_text(seg.src),
                         seg.sport)  # fmt: skip

    def _stray(self, now: float, seg: Segment) -> None:
        reply = stray_reply(seg, ident=self._take_ident())
        if reply is None:
            count(self.counters, "stray-dropped")
        elif not self._resets.allow(now, seg.src):
            count(self.counters, "stray-reset-limited")
        else:
            count(self.counters, "stray-reset")
            self._send_raw(now, reply.data, seg.src)

    def _send_raw(self, now: float, data: bytes, dst: bytes, first_try: bool = True) -> None:
        """A segment for the raw socket, sized for the path (:mod:`core.ctcp_mtu`)."""
        pieces, signal = self.mtus.size(now, data, dst)
        if signal is not None:
            self._out.append(Inject(*signal))
        if pieces:
            self._out.append(SendRaw(data, dst, pieces, first_try))

    def send_too_big(self, now: float, sent: SendRaw) -> None:
        """The kernel refused ``sent`` as too big (EMSGSIZE): the route changed under the
        cache. It is sized once more against the route as the kernel knows it now."""
        self.mtus.forget(sent.dst)
        count(self.counters, "mtu-refresh")
        self._send_raw(now, sent.data, sent.dst, first_try=False)

    def _take_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

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
        while (act := conn.next_action()) is not None:
            t = type(act)
            if t is TransmitSegment:
                self._send_raw(now, act.data, flow.key[2])  # type: ignore[union-attr]
                if act.inner_proto is not None:  # type: ignore[union-attr]
                    flow.frames_out += 1
                    flow.bytes_out += len(act.data)  # type: ignore[union-attr]
            elif t is DeliverInner:
                packet = act.packet  # type: ignore[union-attr]
                flow.frames_in += 1
                flow.bytes_in += len(packet)
                self._learn(now, flow, packet)
                out.append(Inject(packet, flow.key[0]))
            elif t is Dropped:
                name = act.reason.value  # type: ignore[union-attr]
                count(flow.drops, name)
                if act.detail:  # type: ignore[union-attr]
                    self.log_limited(now, name, "cTCP %s: %s: %s", self._describe(flow), name,
                                     act.detail)  # type: ignore[union-attr]  # fmt: skip
            elif t is Closed:
                self._remove(now, flow, act.reason)  # type: ignore[union-attr]
        if flow.key in self.flows:
            self._arm(flow)

    def _learn(self, now: float, flow: Flow, packet: bytes) -> None:
        """Inbound IKE teaches the table its SPI (for this address pair only), and a gateway
        steers the UDP endpoint it came from. What the peer sends never counts as an SA:
        that is charon's to say (``outbound``)."""
        try:
            ip = parse_ip(packet)
            if ip.proto != PROTO_UDP:
                return
            udp = parse_udp(ip.payload)
        except PacketError:
            return
        if flow.role is Role.GATEWAY and udp.sport not in flow.steered:
            # charon answers the peer at the UDP endpoint it sent from (its own inner ports,
            # 500 or 4500, A.2): queue that endpoint, never the whole address, which a
            # plain-UDP or RFC 9329 client behind the same NAT may share; before the Inject
            flow.steered.add(udp.sport)
            if self.steering.add((ip.src, udp.sport), f"conn:{flow.entry.conn_id}"):
                self._out.append(Steer(ip.src, True, udp.sport))
        c = classify_udp_payload(udp.dport, udp.payload)
        if c.kind is Kind.IKE and c.ike is not None:
            self._bind_ike(flow, c.ike.spi_i)

    def _remove(self, now: float, flow: Flow, reason: str) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
            if flow.role is Role.GATEWAY:
                self.slots.give_back(flow.key[2])
                self._gateway_flows -= 1
            # Keep closed flows' figures so the daemon's metrics never go backwards.
            f = flow
            add_closed(self.totals, f.frames_in, f.frames_out, f.bytes_in, f.bytes_out, f.drops)
        self.by_id.pop(flow.entry.conn_id, None)
        self.table.remove(flow.entry.conn_id)
        if flow.role is Role.CLIENT:
            self.ports.release(flow.key[1])
        else:
            # The flow is gone, charon's SAs with the peer may not be: an endpoint no other
            # flow holds stays steered (dropped, never UDP) until charon lists none.
            peer, why = flow.key[2], f"conn:{flow.entry.conn_id}"
            for port in sorted(flow.steered):
                if self.steering.reasons((peer, port)) == {why}:  # the last flow on it
                    self.linger(now, [(peer, port)])
                self.steering.remove((peer, port), why)
        log.info("cTCP %s closed: %s", self._describe(flow), reason)

    # --- status -----------------------------------------------------------------------------

    @staticmethod
    def _describe(flow: Flow) -> str:
        local, lport, peer, pport = flow.key
        return describe(flow.entry.conn_id, flow.role.value, addr_text(local), lport,
                        addr_text(peer), pport)  # fmt: skip

    def status(self, now: float) -> list[dict[str, Any]]:
        rows = []
        for flow in sorted(self.flows.values(), key=lambda f: f.entry.conn_id):
            local, lport, peer, pport = flow.key
            rows.append(
                status_row(
                    flow.entry.conn_id,
                    "ctcp",
                    flow.role.value,
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
