"""The fake-TCP state machine of one cTCP connection (protocols.md A.6, A.7).

cTCP only looks like TCP: a 3-way handshake, seq/ack numbers that follow the bytes sent,
and RST to close. Nothing is retransmitted, reassembled or acknowledged on its own.

Sans-I/O in the aioquic style: every input takes the current time, ``get_timer()`` says
when ``handle_timer(now)`` wants to run, and outputs are queued actions drained with
``next_action()``. The allowed state changes are data (:data:`TRANSITIONS`), and inbound
segments are dispatched on (state, segment kind) through :data:`_ON_SEGMENT`.

The gateway side is hostile ground (DESIGN.md, trust boundaries), so unlike QuickSec:
- a gateway connection exists only once the handshake is complete: the engine answers
  SYNs statelessly (:mod:`tcpencap.core.ctcp_cookie`) and builds the connection with
  :meth:`Connection.accept` from the ACK that returns the cookie;
- once established, segments are checked as RFC 5961 asks: a RST only at exactly the next
  expected sequence number, anything else only with its seq inside the receive window and
  its ack inside what we sent;
- only IKE for charon leaves as an injection: inner UDP to port 500/4500 from 500/4500 or
  the connection's own port, never to any other local service;
- a gateway connection that hears nothing valid for ``Timers.idle`` is reset, so a peer
  that went away (its close RST can carry seq 0, which the check above refuses) frees its
  slot; clients send a keepalive (a bare ACK, A.6 step 5) when they have been quiet for
  ``Timers.keepalive``, so a live tunnel is never idle on the gateway.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tcpencap.core.role import Role
from tcpencap.wire.ctcp import CTCPError, Segment, build_control, encapsulate_info
from tcpencap.wire.packet import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

_MASK = 0xFFFFFFFF
# How far a peer's seq may lie from the next one we expect (either way: cTCP accepts gaps
# and reordering, A.7). A blind attacker must hit it and ACK_WINDOW at once.
RECV_WINDOW = 1 << 20
# How far below the highest ack seen a peer's ack may lie (reordering); above, it may go
# up to what we sent.
ACK_WINDOW = 1 << 16
IKE_PORTS = frozenset({500, 4500})


class State(enum.Enum):
    CLOSED = "closed"  # client only: no connection, the next packet sends a SYN
    SYN_SENT = "syn-sent"  # client only
    ESTABLISHED = "established"
    DELETED = "deleted"  # terminal: the entry is to be removed


# Every state change a real input can make, and no other (tests/test_ctcp_conn.py walks
# every (state, input) pair). cTCP follows no VICI event, so nothing tells a connection that
# its last SA is gone: it ends by RST, FIN, the no-SA deadline or the idle limit.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.CLOSED: frozenset({State.SYN_SENT}),  # charon's packet: SYN
    State.SYN_SENT: frozenset({State.CLOSED, State.ESTABLISHED}),  # timeout or RST; SYN+ACK
    State.ESTABLISHED: frozenset({State.DELETED}),  # RST, FIN, no SA, idle
    State.DELETED: frozenset(),
}


class Drop(enum.Enum):
    """Why a segment or packet was discarded: a fixed set, so counters and metric labels
    never grow with what a peer sends (the details go to the rate-limited log)."""

    HANDSHAKE_BUSY = "handshake-in-progress"
    NOT_CONNECTED = "not-connected"
    UNEXPECTED = "unexpected-segment"
    HANDSHAKE_TIMEOUT = "handshake-timeout"
    BAD_SYNACK = "synack-bad-ack"
    REFUSED = "connection-refused"
    RST_BAD_SEQ = "rst-bad-seq"
    OUT_OF_WINDOW = "out-of-window"
    NO_ACK = "no-ack-flag"
    SYN_ESTABLISHED = "syn-on-established"
    KEEPALIVE = "keepalive"
    BAD_SEGMENT = "bad-segment"
    INNER_PORT = "inner-port-refused"
    CANNOT_ENCAPSULATE = "cannot-encapsulate"


class SegKind(enum.Enum):
    """An inbound segment by its control flags; ECN, PSH and URG bits are ignored."""

    SYN = "syn"
    SYN_ACK = "syn-ack"
    RST = "rst"
    FIN = "fin"
    OTHER = "other"  # ACK, data or keepalive


def seg_kind(flags: int) -> SegKind:
    if flags & TCP_RST:
        return SegKind.RST
    if flags & TCP_SYN:
        return SegKind.SYN_ACK if flags & TCP_ACK else SegKind.SYN
    if flags & TCP_FIN:
        return SegKind.FIN
    return SegKind.OTHER


@dataclass(frozen=True, slots=True)
class Timers:
    handshake: float = 3.0  # SYN_SENT; a SYN cookie's lifetime on the gateway
    no_sa: float = 60.0  # ESTABLISHED without an IPsec SA bound -> RST
    idle: float = 300.0  # gateway: nothing valid from the peer for this long -> RST
    keepalive: float = 20.0  # client: nothing sent for this long -> a bare ACK


# --- actions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransmitSegment:
    """Send this IP packet (a cTCP segment) to the peer."""

    data: bytes
    seq: int
    ack: int
    flags: int
    inner_proto: int | None = None  # set for data segments


@dataclass(frozen=True, slots=True)
class DeliverInner:
    """Inject this restored IKE/ESP packet into the local stack."""

    packet: bytes
    proto: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is gone; remove it from the table."""

    reason: str


@dataclass(frozen=True, slots=True)
class Dropped:
    """A packet or segment was discarded (counted under ``reason``; ``detail`` is for the
    rate-limited log only)."""

    reason: Drop
    detail: str = ""


Action = TransmitSegment | DeliverInner | Closed | Dropped


def seq_diff(a: int, b: int) -> int:
    """a - b in 32-bit sequence space, as a signed number."""
    d = (a - b) & _MASK
    return d - (1 << 32) if d & 0x80000000 else d


def stray_reply(seg: Segment, *, ident: int = 0) -> TransmitSegment | None:
    """The reply to a segment at a listen port with no connection (A.6 step 6): RST+ACK as
    in STD 7 for anything but a SYN (a SYN opens a connection) or a RST (dropped)."""
    kind = seg_kind(seg.flags)
    if kind in (SegKind.RST, SegKind.SYN):
        return None
    seq = seg.ack if seg.flags & TCP_ACK else 0
    ack = (
        seg.seq + seg.payload_len + bool(seg.flags & TCP_SYN) + bool(seg.flags & TCP_FIN)
    ) & _MASK
    flags = TCP_RST | TCP_ACK
    data = build_control(seg.dst, seg.src, seg.dport, seg.sport, seq, ack, flags, ident=ident)
    return TransmitSegment(data, seq, ack, flags)


def inner_ports_ok(ports: tuple[int, int] | None, peer_port: int) -> bool:
    """Inner UDP a peer may have injected: to charon's 500/4500, from 500/4500 or the
    connection's own port. ``None`` (raw ESP) goes to the kernel's ESP input."""
    if ports is None:
        return True
    sport, dport = ports
    return dport in IKE_PORTS and (sport in IKE_PORTS or sport == peer_port)


class Connection:
    """One cTCP connection between (local, local_port) and (peer, peer_port).

    ``rng`` supplies ISNs and the IPv4 ID counter of control segments (inject a seeded
    ``random.Random`` in tests); ``isn`` fixes the first ISN. Gateway connections are
    made by :meth:`accept`.
    """

    def __init__(
        self,
        role: Role,
        *,
        local: bytes,
        peer: bytes,
        local_port: int,
        peer_port: int,
        rng: random.Random | None = None,
        isn: int | None = None,
        timers: Timers | None = None,
    ) -> None:
        self.role = role
        self.local = local
        self.peer = peer
        self.local_port = local_port
        self.peer_port = peer_port
        self.timers = timers or Timers()
        self._rng = rng or random.SystemRandom()
        self._next_isn = isn
        self.state = State.CLOSED
        self.isn = 0
        self.peer_isn = 0
        self.seq = 0  # next sequence number we send (SND.NXT)
        self.acked = 0  # the highest ack the peer sent (SND.UNA)
        self.ack = 0  # highest seq+len seen from the peer (RCV.NXT)
        self.has_sa = False
        self.close_reason: str | None = None
        self._trigger: bytes | None = None
        self._deadline: float | None = None  # handshake or no-SA
        self._idle_check: float | None = None  # gateway: when to look at last_heard
        self._keepalive_check: float | None = None  # client: when to look at last_sent
        self.last_heard = 0.0
        self.last_sent = 0.0
        self._ident = self._rng.getrandbits(16)
        self._actions: deque[Action] = deque()

    @classmethod
    def accept(
        cls,
        now: float,
        *,
        local: bytes,
        peer: bytes,
        local_port: int,
        peer_port: int,
        isn: int,
        peer_seq: int,
        rng: random.Random | None = None,
        timers: Timers | None = None,
    ) -> Connection:
        """A gateway connection from the ACK that completed a stateless handshake: ``isn``
        is the cookie our SYN+ACK carried, ``peer_seq`` the ACK's sequence number."""
        conn = cls(Role.GATEWAY, local=local, peer=peer, local_port=local_port,
                   peer_port=peer_port, rng=rng, timers=timers)  # fmt: skip
        conn.isn = isn & _MASK
        conn.seq = conn.acked = (isn + 1) & _MASK
        conn.peer_isn = (peer_seq - 1) & _MASK
        conn.ack = peer_seq & _MASK
        conn.state = State.ESTABLISHED
        conn.last_heard = now
        conn._deadline = now + conn.timers.no_sa
        conn._idle_check = now + conn.timers.idle
        return conn

    # --- outputs ------------------------------------------------------------------------

    def next_action(self) -> Action | None:
        return self._actions.popleft() if self._actions else None

    def get_timer(self) -> float | None:
        timers = (self._deadline, self._idle_check, self._keepalive_check)
        due = [t for t in timers if t is not None]
        return min(due) if due else None

    # --- inputs -------------------------------------------------------------------------

    def send_packet(self, now: float, inner: bytes) -> None:
        """Carry an outbound IKE or ESP IP packet (A.6: a client's first one is the trigger)."""
        st = self.state
        if st is State.CLOSED and self.role is Role.CLIENT:
            self._trigger = inner
            self._send_syn(now)
        elif st is State.ESTABLISHED:
            self._send_data(now, inner)
        elif st is State.SYN_SENT:
            self._drop(Drop.HANDSHAKE_BUSY)
        else:
            self._drop(Drop.NOT_CONNECTED, st.value)

    def receive_segment(self, now: float, seg: Segment) -> None:
        """Process one inbound segment addressed to this connection."""
        kind = seg_kind(seg.flags)
        handler = _ON_SEGMENT.get((self.state, kind))
        if handler is None:
            self._drop(Drop.UNEXPECTED, f"{kind.value} in {self.state.value}")
            return
        handler(self, now, seg)

    def sa_bound(self, now: float) -> None:
        """Our charon uses an IPsec SA on this connection: the no-SA limit no longer
        applies. Only ever called for what charon sends, never for what the peer sends."""
        self.has_sa = True
        if self.state is State.ESTABLISHED:
            self._deadline = None

    def handle_timer(self, now: float) -> None:
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            self._on_deadline(now)
        if self._idle_check is not None and now >= self._idle_check:
            due = self.last_heard + self.timers.idle
            if due > now:
                self._idle_check = due
            else:
                self._reset("idle")
        if self._keepalive_check is not None and now >= self._keepalive_check:
            due = self.last_sent + self.timers.keepalive
            if due <= now and self.state is State.ESTABLISHED:
                self._control(self.seq, self.ack, TCP_ACK)
                self.last_sent = now
                due = now + self.timers.keepalive
            self._keepalive_check = due if self.state is State.ESTABLISHED else None

    def _on_deadline(self, now: float) -> None:
        st = self.state
        if st is State.SYN_SENT:
            # The SYN is never retransmitted: the next packet starts a new handshake.
            self._goto(State.CLOSED)
            self._trigger = None
            self._drop(Drop.HANDSHAKE_TIMEOUT)
        elif st is State.ESTABLISHED and not self.has_sa:
            self._reset("no IPsec SA bound")

    # --- segment handlers ---------------------------------------------------------------

    def _on_synsent_synack(self, now: float, seg: Segment) -> None:
        if seg.ack != self.seq:
            self._drop(Drop.BAD_SYNACK)
            return
        self.peer_isn = seg.seq
        self.ack = (seg.seq + 1) & _MASK
        self.acked = seg.ack
        self.last_heard = now
        self._goto(State.ESTABLISHED)
        self._deadline = None if self.has_sa else now + self.timers.no_sa
        self._control(self.seq, self.ack, TCP_ACK)
        trigger, self._trigger = self._trigger, None
        if trigger is not None:
            self._send_data(now, trigger)
        self.last_sent = now
        self._keepalive_check = now + self.timers.keepalive

    def _on_synsent_rst(self, now: float, seg: Segment) -> None:
        if seg.flags & TCP_ACK and seg.ack == self.seq:
            self._deadline = None
            self._goto(State.CLOSED)
            self._trigger = None
            self._drop(Drop.REFUSED)
        else:
            self._drop(Drop.RST_BAD_SEQ, "RST not for our SYN")

    def _on_reset(self, now: float, seg: Segment) -> None:
        # RFC 5961 3.2: only a RST at exactly RCV.NXT ends the connection, so an off-path
        # host has one chance in 2**32 per guess, not one in a window's worth.
        if seg.seq != self.ack:
            self._drop(Drop.RST_BAD_SEQ, f"RST seq {seg.seq}, expected {self.ack}")
            return
        self._delete("reset by peer")

    def _acceptable(self, seg: Segment) -> bool:
        """RFC 5961 4 and 5 for a non-RST segment: seq near RCV.NXT and an ack between
        what the peer acknowledged before (less a reordering margin) and SND.NXT."""
        if not seg.flags & TCP_ACK:
            self._drop(Drop.NO_ACK)
            return False
        if not -RECV_WINDOW <= seq_diff(seg.seq, self.ack) < RECV_WINDOW:
            self._drop(Drop.OUT_OF_WINDOW, f"seq {seg.seq}, expected near {self.ack}")
            return False
        if seq_diff(seg.ack, self.seq) > 0 or seq_diff(seg.ack, self.acked) < -ACK_WINDOW:
            self._drop(Drop.OUT_OF_WINDOW, f"ack {seg.ack}, sent up to {self.seq}")
            return False
        if seq_diff(seg.ack, self.acked) > 0:
            self.acked = seg.ack
        return True

    def _on_est_fin(self, now: float, seg: Segment) -> None:
        if not self._acceptable(seg):
            return
        self._control(seg.ack, 0, TCP_RST)
        self._delete("FIN from peer")

    def _on_est_syn(self, now: float, seg: Segment) -> None:
        self._drop(Drop.SYN_ESTABLISHED)

    def _on_est_other(self, now: float, seg: Segment) -> None:
        if not self._acceptable(seg):
            return
        self.last_heard = now
        if seg.is_short:
            self._drop(Drop.KEEPALIVE)  # no reply, no ACK (A.6 step 5)
            return
        decap = seg.decap
        if decap is None:
            self._drop(Drop.BAD_SEGMENT, seg.error or "")
            return
        if not inner_ports_ok(decap.inner_ports, self.peer_port):
            self._drop(Drop.INNER_PORT, f"inner UDP ports {decap.inner_ports}")
            return
        end = (seg.seq + seg.payload_len) & _MASK
        if seq_diff(end, self.ack) > 0:
            self.ack = end
        self._actions.append(DeliverInner(decap.packet, decap.proto))

    # --- helpers ------------------------------------------------------------------------

    def _goto(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"cTCP transition {self.state.value} -> {new.value}")
        self.state = new

    def _new_isn(self) -> int:
        if self._next_isn is not None:
            isn, self._next_isn = self._next_isn & _MASK, None
            return isn
        return self._rng.getrandbits(32)

    def _take_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    def _send_syn(self, now: float) -> None:
        self.isn = self._new_isn()
        self.seq = self.acked = (self.isn + 1) & _MASK
        self.ack = 0
        self._goto(State.SYN_SENT)
        self._control(self.isn, 0, TCP_SYN)
        self._deadline = now + self.timers.handshake

    def _control(self, seq: int, ack: int, flags: int) -> None:
        data = build_control(
            self.local,
            self.peer,
            self.local_port,
            self.peer_port,
            seq,
            ack,
            flags,
            ident=self._take_ident(),
        )
        self._actions.append(TransmitSegment(data, seq, ack, flags))

    def _send_data(self, now: float, inner: bytes) -> None:
        try:
            data, plen, proto = encapsulate_info(
                inner, sport=self.local_port, dport=self.peer_port, seq=self.seq, ack=self.ack
            )
        except CTCPError as exc:
            self._drop(Drop.CANNOT_ENCAPSULATE, exc.reason)
            return
        seq = self.seq
        self.seq = (seq + plen) & _MASK
        self.last_sent = now
        self._actions.append(TransmitSegment(data, seq, self.ack, TCP_ACK, proto))

    def _drop(self, reason: Drop, detail: str = "") -> None:
        self._actions.append(Dropped(reason, detail))

    def _reset(self, reason: str) -> None:
        """End the connection with a RST the peer accepts (at its RCV.NXT, our SND.NXT)."""
        self._control(self.seq, 0, TCP_RST)
        self._delete(reason)

    def _delete(self, reason: str) -> None:
        self._goto(State.DELETED)
        self._deadline = self._idle_check = self._keepalive_check = None
        self._trigger = None
        self.close_reason = reason
        self._actions.append(Closed(reason))


_Handler = Callable[[Connection, float, Segment], None]
_C = Connection
# (state, segment kind) -> handler. Pairs not listed are dropped with a reason.
_ON_SEGMENT: dict[tuple[State, SegKind], _Handler] = {
    (State.SYN_SENT, SegKind.SYN_ACK): _C._on_synsent_synack,
    (State.SYN_SENT, SegKind.RST): _C._on_synsent_rst,
    (State.ESTABLISHED, SegKind.RST): _C._on_reset,
    (State.ESTABLISHED, SegKind.FIN): _C._on_est_fin,
    (State.ESTABLISHED, SegKind.SYN): _C._on_est_syn,
    (State.ESTABLISHED, SegKind.SYN_ACK): _C._on_est_syn,
    (State.ESTABLISHED, SegKind.OTHER): _C._on_est_other,
}
