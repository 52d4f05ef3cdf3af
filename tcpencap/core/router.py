"""The packet path's decisions, without I/O: which TCP connection a queued UDP packet goes
to, and which UDP packet a frame from a TCP connection becomes.

What charon sees (DESIGN.md): RFC 9329 frames carry no UDP ports, so the router keeps
charon's view consistent.
- Client side (we opened the TCP connection): inbound packets mirror the ports charon last
  sent with on that connection (500/500, then 4500/4500 after the NAT-T float).
- Gateway side (we accepted it): the connection is presented to charon as the UDP endpoint
  (peer address, TCP source port of the peer), and everything is delivered to port 4500
  behind the non-ESP marker, like NAT-T. charon's replies name the connection by their
  destination, so several clients behind one NAT stay apart, and a reconnect from a new
  source port looks like a NAT rebinding, which charon follows only after authenticating.
Injected packets always carry the connection's own peer address as source.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from tcpencap.core.outputs import Inject
from tcpencap.core.role import Role
from tcpencap.core.table import Bind, ConnectionTable, Entry
from tcpencap.wire import rfc9329
from tcpencap.wire.ike import (
    IKE_PORT,
    NATT_PORT,
    NON_ESP_MARKER,
    IKEHeader,
    Kind,
    Refused,
    classify_outbound,
    parse_ike_header,
)
from tcpencap.wire.packet import PROTO_UDP, fold, word_sum

log = logging.getLogger("tcpencap.router")

_NATT_PORT_BYTES = NATT_PORT.to_bytes(2, "big")
_V4_UDP = struct.Struct("!BBHHHBBH4s4s")
_UDP_HDR = struct.Struct("!HHHH")
_V6_UDP = struct.Struct("!IHBB16s16s")
_V4_CONST_WORDS = 0x4500 + (64 << 8 | PROTO_UDP)  # version/IHL and TTL/protocol
# The most a UDP datagram carries in one packet: IPv4's total length (16 bits) covers the
# 20-octet IP and 8-octet UDP headers; IPv6's payload length (no jumbograms) covers UDP's.
# A frame whose payload (with the non-ESP marker, when one is added) is longer cannot be
# injected; the native path (inject.c) applies the same bounds.
MAX_UDP_PAYLOAD_V4 = 0xFFFF - 20 - 8  # 65507
MAX_UDP_PAYLOAD_V6 = 0xFFFF - 8  # 65527


# The counter names of an outbound packet that is not carried (metric labels).
_REFUSED = {
    Refused.NOT_UDP: "not-udp",
    Refused.FRAGMENT: "fragment",
    Refused.MALFORMED: "malformed-outbound",
    Refused.KEEPALIVE: "nat-keepalive",
    Refused.INVALID: "invalid-outbound",
}


def _protected(hdr: IKEHeader) -> bool:
    """Is the message encrypted with an IKE SA's keys (IKEv2 SK/SKF payload first, IKEv1
    encryption flag)?"""
    if hdr.major == 2:
        return hdr.next_payload in (46, 53)
    return bool(hdr.flags & 0x01)


@dataclass(slots=True)
class ConnView:
    """The router's per-connection state (the transport keeps sockets and counters)."""

    entry: Entry
    side: Role
    # Client side: the UDP ports charon last used towards this peer (its own, the peer's).
    charon_sport: int = IKE_PORT
    charon_dport: int = IKE_PORT
    drops: dict[str, int] = field(default_factory=dict)
    # packet.word_sum of both addresses, part of every checksum of injected packets.
    addr_sum: int = 0

    def __post_init__(self) -> None:
        self.addr_sum = word_sum(self.entry.peer) + word_sum(self.entry.local)

    @property
    def conn_id(self) -> int:
        return self.entry.conn_id

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``frame`` on connection ``conn_id``; ``is_ike`` frames must never be dropped
    silently, ESP frames may be dropped when the connection is congested."""

    conn_id: int
    frame: bytes
    is_ike: bool
    request: bool = False  # an IKEv2 request: resent if the connection is re-established
    protected: bool = False  # IKE encrypted with an IKE SA's keys: charon has that SA


@dataclass(frozen=True, slots=True)
class Open:
    """Open a new client connection ``conn_id`` and send ``frame`` once it is up."""

    conn_id: int
    local: bytes
    peer: bytes
    frame: bytes
    frame_is_ike: bool = True


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str


Outbound = Send | Open | Drop
Inbound = Inject | Drop


class Router:
    def __init__(
        self,
        table: ConnectionTable,
        is_tcp_peer: Callable[[bytes], bool],
        is_live: Callable[[int], bool] = lambda conn_id: True,
    ) -> None:
        self.table = table
        self.is_tcp_peer = is_tcp_peer
        # Is this connection still up (not closing)? SPIs move away from a live connection
        # only to the same endpoint: charon answering a replayed message at another
        # endpoint must not hand one peer's SAs to another connection.
        self.is_live = is_live
        self.views: dict[int, ConnView] = {}
        self.drops: dict[str, int] = {}
        # Learn ESP SPIs from charon's outbound packets; off while VICI reports them.
        self.learn_esp = True
        # Connections that lost their last SA to another connection (reconnect, MOBIKE);
        # the daemon drains this list and retires them.
        self.emptied: list[int] = []
        # The last outbound() was decided by the fast path alone (a function of source,
        # destination, port and SPI): the native flow cache may repeat that decision.
        self.fast_hit = False

    def _drop(self, reason: str) -> Drop:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return Drop(reason)

    # --- connection lifecycle ---------------------------------------------------------

    def add_gateway_conn(self, local: bytes, peer: bytes, peer_port: int) -> ConnView:
        entry = self.table.add(local, peer, peer_port)
        view = self.views[entry.conn_id] = ConnView(entry, Role.GATEWAY)
        return view

    def add_client_conn(self, local: bytes, peer: bytes) -> ConnView:
        entry = self.table.add(local, peer)
        view = self.views[entry.conn_id] = ConnView(entry, Role.CLIENT)
        return view

    def remove(self, conn_id: int) -> None:
        self.views.pop(conn_id, None)
        self.table.remove(conn_id)

    # --- outbound: a packet charon (or libipsec) sent to a TCP peer -------------------

    def outbound(self, packet: bytes) -> Outbound:
        self.fast_hit = False
        # Fast path for the bulk of the traffic: ESP-in-UDP from port 4500 in an IPv4
        # packet without options or fragmentation, to a connection already known.
        if (
            len(packet) >= 36
            and packet[0] == 0x45
            and packet[9] == PROTO_UDP
            and packet[20:22] == _NATT_PORT_BYTES
            and not (packet[6] & 0x3F or packet[7])
            and packet[28:32] != NON_ESP_MARKER
        ):
            total = (packet[2] << 8) | packet[3]
            if 36 <= total <= len(packet):
                res = self._esp_fast(packet, total, 12, 16, 20)
                if res is not None:
                    return res
        # The same for IPv6 without extension headers.
        elif (
            len(packet) >= 56
            and packet[0] >> 4 == 6
            and packet[6] == PROTO_UDP
            and packet[40:42] == _NATT_PORT_BYTES
            and packet[48:52] != NON_ESP_MARKER
        ):
            total = 40 + ((packet[4] << 8) | packet[5])
            if 56 <= total <= len(packet):
                res = self._esp_fast(packet, total, 8, 24, 40)
                if res is not None:
                    return res
        return self._outbound(packet)

    def _esp_fast(
        self, packet: bytes, total: int, src_at: int, dst_at: int, udp_at: int
    ) -> Send | None:
        dst = packet[dst_at : dst_at + (dst_at - src_at)]
        esp_at = udp_at + 8
        entry = self.table.by_endpoint(dst, (packet[udp_at + 2] << 8) | packet[udp_at + 3])
        if entry is None:
            src = packet[src_at:dst_at]
            spi = int.from_bytes(packet[esp_at : esp_at + 4])
            entry = self.table.lookup_esp(src, dst, spi)
            if entry is None:
                return None  # the general path decides (and may learn or open)
        elif self.learn_esp:
            return None
        frame = (total - esp_at + 2).to_bytes(2, "big") + packet[esp_at:total]
        self.fast_hit = True
        return Send(entry.conn_id, frame, False)

    def _outbound(self, packet: bytes) -> Outbound:
        got = classify_outbound(packet)
        if isinstance(got, Refused):
            return self._drop(_REFUSED[got])
        ip, udp, c = got.ip, got.udp, got.what
        view = self._gateway_view(ip.dst, udp.dport)
        if c.kind is Kind.IKE:
            assert c.ike is not None
            hdr = c.ike
            spi = hdr.spi_i
            frame = rfc9329.frame_ike(c.body)
            request = hdr.major == 2 and not hdr.is_response
            protected = _protected(hdr)
            if view is None:
                entry = self.table.lookup_ike(ip.src, ip.dst, spi)
                if entry is None:
                    if hdr.is_sa_init and self.is_tcp_peer(ip.dst):
                        view = self.add_client_conn(ip.src, ip.dst)
                        self.table.bind_ike(view.conn_id, spi)
                        view.charon_sport, view.charon_dport = udp.sport, udp.dport
                        return Open(view.conn_id, ip.src, ip.dst, frame)
                    moved = self._follow_moved_sa(ip.src, ip.dst, spi, udp.sport, udp.dport)
                    if moved is not None:
                        return Open(moved.conn_id, ip.src, ip.dst, frame)
                    entry = self._newest_client(ip.src, ip.dst)
                    if entry is None:
                        if not self.is_tcp_peer(ip.dst):
                            return self._drop("no-connection")
                        # An SA that outlived its connection (tcpencap restarted): the
                        # originator re-establishes the connection (RFC 9329 §6.1).
                        view = self.add_client_conn(ip.src, ip.dst)
                        self.table.bind_ike(view.conn_id, spi)
                        view.charon_sport, view.charon_dport = udp.sport, udp.dport
                        return Open(view.conn_id, ip.src, ip.dst, frame)
                view = self.views[entry.conn_id]
                if self.learn_esp:  # no VICI: packets are all we learn from
                    self.table.bind_ike(view.conn_id, spi)
                if view.side is Role.CLIENT:
                    view.charon_sport, view.charon_dport = udp.sport, udp.dport
                return Send(view.conn_id, frame, True, request, protected)
            if view.side is Role.CLIENT:
                view.charon_sport, view.charon_dport = udp.sport, udp.dport
            elif self.table.bind_ike(view.conn_id, spi) is Bind.CONFLICT and protected:
                # charon sends a message protected by the SA's keys to this endpoint: it
                # authenticated the peer there (reconnect from a new source port), so the
                # SA follows charon. An unprotected one (an IKE_SA_INIT answer echoing an
                # SPI anyone may quote) moves nothing.
                self._take_ike(view, spi)
            return Send(view.conn_id, frame, True, request, protected)
        # ESP-in-UDP
        if view is None:
            entry = self.table.lookup_esp(ip.src, ip.dst, c.spi)
            if entry is None:
                entry = self._newest_client(ip.src, ip.dst)
                if entry is None:
                    if not self.is_tcp_peer(ip.dst):
                        return self._drop("no-connection")
                    view = self.add_client_conn(ip.src, ip.dst)
                    view.charon_sport, view.charon_dport = udp.sport, udp.dport
                    self.table.bind_esp(view.conn_id, c.spi)
                    return Open(view.conn_id, ip.src, ip.dst, rfc9329.frame_esp(c.body), False)
                # Our own charon's outbound SPI: trusted, so it may teach the table.
                if self.learn_esp:
                    self.table.bind_esp(entry.conn_id, c.spi)
            view = self.views[entry.conn_id]
        elif self.learn_esp and self.table.bind_esp(view.conn_id, c.spi) is Bind.CONFLICT:
            self._take_esp(view, c.spi)
        return Send(view.conn_id, rfc9329.frame_esp(c.body), False)

    def _follow_moved_sa(
        self, local: bytes, peer: bytes, spi: bytes, sport: int, dport: int
    ) -> ConnView | None:
        """charon sends for a known IKE SA from or to new addresses (MOBIKE, including a
        change of address family): a new client connection takes over all of the old
        connection's SPIs; the old one is retired once empty."""
        old = self.table.find_ike_spi(spi)
        if old is None or not self.is_tcp_peer(peer):
            return None
        old_view = self.views.get(old.conn_id)
        if old_view is None or old_view.side is not Role.CLIENT:
            return None
        view = self.add_client_conn(local, peer)
        view.charon_sport, view.charon_dport = sport, dport
        self.table.bind_all(view.conn_id, *self.table.release(old.conn_id))
        self.emptied.append(old.conn_id)
        log.info(
            "IKE SA %s moved from conn %d to new conn %d (address change)",
            spi.hex(),
            old.conn_id,
            view.conn_id,
        )
        return view

    def _newest_client(self, local: bytes, peer: bytes) -> Entry | None:
        """The newest connection of an address pair, for traffic that names no known SPI,
        if it is a client connection. A gateway's connections are told apart by endpoint
        only: another peer's connection from the same address (a NAT) never gets it."""
        entry = self.table.newest_for_pair(local, peer)
        if entry is None:
            return None
        view = self.views.get(entry.conn_id)
        return entry if view is not None and view.side is Role.CLIENT else None

    def _may_take(self, view: ConnView, owner: Entry) -> bool:
        """May ``view`` take SPIs from ``owner``: it is closing, or the same endpoint."""
        e = view.entry
        if (owner.peer, owner.peer_port) == (e.peer, e.peer_port) or not self.is_live(
            owner.conn_id
        ):
            return True
        view.drop("spi-move-refused")
        return False

    def _take_ike(self, view: ConnView, spi: bytes) -> None:
        e = view.entry
        owner = self.table.lookup_ike(e.local, e.peer, spi)
        if owner is None or owner.conn_id == view.conn_id:
            self.table.move_ike(view.conn_id, spi)
            return
        if not self._may_take(view, owner):
            return
        # All of the old connection's SAs go with it: one IKE SA per connection.
        self.table.bind_all(view.conn_id, *self.table.release(owner.conn_id), move=True)
        self.emptied.append(owner.conn_id)

    def _take_esp(self, view: ConnView, spi: int) -> None:
        e = view.entry
        owner = self.table.lookup_esp(e.local, e.peer, spi)
        if owner is not None and owner.conn_id != view.conn_id and not self._may_take(view, owner):
            return
        self.table.move_esp(view.conn_id, spi)
        if owner is not None and not owner.carries_sa:
            self.emptied.append(owner.conn_id)

    def _gateway_view(self, peer: bytes, port: int) -> ConnView | None:
        entry = self.table.by_endpoint(peer, port)
        return None if entry is None else self.views.get(entry.conn_id)

    # --- inbound: a frame that arrived on a TCP connection ----------------------------

    def ports_of(self, view: ConnView, ike: bool) -> tuple[int, int]:
        """(source port, destination port) of the UDP packet charon will see."""
        if view.side is Role.GATEWAY:
            return view.entry.peer_port, NATT_PORT
        if ike:
            return view.charon_dport, view.charon_sport
        return NATT_PORT, NATT_PORT

    def inbound_ike(self, conn_id: int, message: bytes) -> Inbound:
        view = self.views.get(conn_id)
        if view is None:
            return self._drop("unknown-connection")
        try:
            hdr = parse_ike_header(message)
        except ValueError:
            hdr = None
        if hdr is not None:
            result = self.table.bind_ike(conn_id, hdr.spi_i)
            if result is Bind.CONFLICT:
                # Another connection holds this SPI: do not move it (only VICI may). charon
                # still judges the message; it follows a new endpoint only if authentic.
                view.drop("ike-spi-held-elsewhere")
        sport, dport = self.ports_of(view, True)
        payload = NON_ESP_MARKER + message if dport != IKE_PORT else message
        return self._inject(view, sport, dport, payload)

    def inbound_esp(self, conn_id: int, packet: bytes) -> Inbound:
        view = self.views.get(conn_id)
        if view is None:
            return self._drop("unknown-connection")
        sport, dport = self.ports_of(view, False)
        return self._inject(view, sport, dport, packet)

    def _inject(self, view: ConnView, sport: int, dport: int, payload: bytes) -> Inbound:
        e = view.entry
        if len(payload) > (MAX_UDP_PAYLOAD_V4 if len(e.local) == 4 else MAX_UDP_PAYLOAD_V6):
            return Drop("frame-too-big")  # no UDP datagram can carry it (counted by the caller)
        # Headers are packed directly (not through packet.build_*): the payload is copied
        # once, and the checksums are summed from their parts with packet.word_sum/fold.
        if len(e.local) == 4:
            # IPv4 allows UDP checksum 0, which saves a pass over every ESP packet.
            n = 28 + len(payload)
            csum = fold(_V4_CONST_WORDS + n + view.addr_sum)
            hdr = _V4_UDP.pack(0x45, 0, n, 0, 0, 64, PROTO_UDP, csum, e.peer, e.local)
            return Inject(hdr + _UDP_HDR.pack(sport, dport, n - 20, 0) + payload, e.local)
        # IPv6 needs the UDP checksum: pseudo-header (as packet.pseudo_sum adds it), UDP
        # header words, payload.
        n = 8 + len(payload)
        total = view.addr_sum + PROTO_UDP + n + sport + dport + n + word_sum(payload)
        csum = fold(total) or 0xFFFF  # a computed 0 is sent as 0xFFFF
        hdr = _V6_UDP.pack(0x60000000, n, PROTO_UDP, 64, e.peer, e.local)
        return Inject(hdr + _UDP_HDR.pack(sport, dport, n, csum) + payload, e.local)
