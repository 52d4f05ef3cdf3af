"""The fake-TCP state machine of one cTCP connection (protocols.md A.6, A.7).

cTCP only looks like TCP: a 3-way handshake, seq/ack numbers that follow the bytes sent,
and RST to close. Nothing is retransmitted, reassembled or acknowledged on its own.

Sans-I/O in the aioquic style: every input takes the current time, ``get_timer()`` says
when ``handle_timer(now)`` wants to run, and outputs are queued actions drained with
``next_action()``. The allowed state changes are data (:data:`TRANSITIONS`), and inbound
segments are dispatched on (state, segment kind) through :data:`_ON_SEGMENT`.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tcpencap.wire.ctcp import CTCPError, Segment, build_control, encapsulate_info
from tcpencap.wire.packet import PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

_MASK = 0xFFFFFFFF


class Role(enum.Enum):
    LISTENER = "listener"  # the gateway: answers SYN
    CLIENT = "client"  # opens the connection when the first packet is queued


class State(enum.Enum):
    CLOSED = "closed"  # client only: no connection, the next packet sends a SYN
    LISTEN = "listen"  # listener only: waiting for the SYN that created this entry
    SYN_SENT = "syn-sent"
    SYN_RCVD = "syn-rcvd"
    ESTABLISHED = "established"
    CLOSE_WAIT = "close-wait"  # last SA gone: only IKE still carried, RST after a delay
    DELETED = "deleted"  # terminal: the entry is to be removed


TRANSITIONS: dict[State, frozenset[State]] = {
    State.CLOSED: frozenset({State.SYN_SENT}),
    State.LISTEN: frozenset({State.SYN_RCVD, State.DELETED}),
    State.SYN_SENT: frozenset({State.CLOSED, State.ESTABLISHED}),
    State.SYN_RCVD: frozenset({State.ESTABLISHED, State.DELETED}),
    State.ESTABLISHED: frozenset({State.CLOSE_WAIT, State.DELETED}),
    # A new SA bound during the close delay (a rekey race) keeps the connection.
    State.CLOSE_WAIT: frozenset({State.ESTABLISHED, State.DELETED}),
    State.DELETED: frozenset(),
}


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
    handshake: float = 3.0  # SYN_SENT / SYN_RCVD
    no_sa: float = 60.0  # ESTABLISHED without an IPsec SA bound -> RST
    close_delay: float = 0.5  # CLOSE_WAIT -> bare RST


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
    """A packet or segment was discarded (for logs and counters; nothing is sent)."""

    reason: str


Action = TransmitSegment | DeliverInner | Closed | Dropped


def _after(a: int, b: int) -> bool:
    """a is later than b in 32-bit sequence space."""
    return 0 < ((a - b) & _MASK) < 0x80000000


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


class Connection:
    """One cTCP connection between (local, local_port) and (peer, peer_port).

    ``rng`` supplies ISNs and the IPv4 ID counter of control segments (inject a seeded
    ``random.Random`` in tests); ``isn`` fixes the first ISN.
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
        self.state = State.CLOSED if role is Role.CLIENT else State.LISTEN
        self.isn = 0
        self.peer_isn = 0
        self.seq = 0  # next sequence number we send
        self.ack = 0  # highest seq+len seen from the peer
        self.has_sa = False
        self.close_reason: str | None = None
        self._trigger: bytes | None = None
        self._deadline: float | None = None
        self._ident = self._rng.getrandbits(16)
        self._actions: deque[Action] = deque()

    # --- outputs ------------------------------------------------------------------------

    def next_action(self) -> Action | None:
        return self._actions.popleft() if self._actions else None

    def get_timer(self) -> float | None:
        return self._deadline

    # --- inputs -------------------------------------------------------------------------

    def connect(self, now: float) -> None:
        """Client: send a SYN (without a trigger packet)."""
        if self.role is not Role.CLIENT or self.state is not State.CLOSED:
            self._drop(f"connect in {self.state.value}")
            return
        self._send_syn(now)

    def send_packet(self, now: float, inner: bytes) -> None:
        """Carry an outbound IKE or ESP IP packet (A.6: client trigger, CLOSE_WAIT rule)."""
        st = self.state
        if st is State.CLOSED and self.role is Role.CLIENT:
            self._trigger = inner
            self._send_syn(now)
        elif st is State.ESTABLISHED:
            self._send_data(inner)
        elif st is State.CLOSE_WAIT:
            self._send_data(inner, ike_only=True)
        elif st in (State.SYN_SENT, State.SYN_RCVD):
            self._drop("handshake in progress")
        else:
            self._drop(f"not connected ({st.value})")

    def receive_segment(self, now: float, seg: Segment) -> None:
        """Process one inbound segment addressed to this connection."""
        kind = seg_kind(seg.flags)
        handler = _ON_SEGMENT.get((self.state, kind))
        if handler is None:
            self._drop(f"{kind.value} in {self.state.value}")
            return
        handler(self, now, seg)

    def sa_bound(self, now: float) -> None:
        """An IPsec SA now uses this connection: the 60 s no-SA limit no longer applies."""
        self.has_sa = True
        if self.state is State.ESTABLISHED:
            self._deadline = None
        elif self.state is State.CLOSE_WAIT:
            self._goto(State.ESTABLISHED)
            self._deadline = None

    def last_sa_gone(self, now: float) -> None:
        """The last SA/IKE mapping went away: close with RST after the close delay."""
        self.has_sa = False
        if self.state is State.ESTABLISHED:
            self._goto(State.CLOSE_WAIT)
            self._deadline = now + self.timers.close_delay

    def handle_timer(self, now: float) -> None:
        if self._deadline is None or now < self._deadline:
            return
        self._deadline = None
        st = self.state
        if st is State.SYN_SENT:
            # The SYN is never retransmitted: the next packet starts a new handshake.
            self._goto(State.CLOSED)
            self._trigger = None
            self._drop("handshake timeout")
        elif st is State.SYN_RCVD:
            self._delete("handshake timeout")  # silently, no RST (A.6 step 3)
        elif st is State.ESTABLISHED and not self.has_sa:
            self._control(self.seq, 0, TCP_RST)
            self._delete("no IPsec SA bound")
        elif st is State.CLOSE_WAIT:
            self._control(0, 0, TCP_RST)
            self._delete("last SA gone")

    # --- segment handlers ---------------------------------------------------------------

    def _on_listen_syn(self, now: float, seg: Segment) -> None:
        self.peer_isn = seg.seq
        self.ack = (seg.seq + 1) & _MASK
        self.isn = self._new_isn()
        self.seq = (self.isn + 1) & _MASK
        self._goto(State.SYN_RCVD)
        self._control(self.isn, self.ack, TCP_SYN | TCP_ACK)
        self._deadline = now + self.timers.handshake

    def _on_listen_other(self, now: float, seg: Segment) -> None:
        reply = stray_reply(seg, ident=self._take_ident())
        if reply is not None:
            self._actions.append(reply)
        self._delete("no handshake")

    def _on_synrcvd_syn(self, now: float, seg: Segment) -> None:
        # A duplicate SYN (or a client's new attempt): answer again with the same ISN.
        self.peer_isn = seg.seq
        self.ack = (seg.seq + 1) & _MASK
        self._control(self.isn, self.ack, TCP_SYN | TCP_ACK)
        self._deadline = now + self.timers.handshake

    def _on_synrcvd_other(self, now: float, seg: Segment) -> None:
        if not seg.flags & TCP_ACK or seg.ack != self.seq:
            self._drop("unexpected segment in syn-rcvd")
            return
        self.ack = seg.seq
        self._establish(now)
        if seg.payload_len:
            self._on_est_other(now, seg)

    def _on_synsent_synack(self, now: float, seg: Segment) -> None:
        if seg.ack != self.seq:
            self._drop("SYN+ACK acknowledges the wrong ISN")
            return
        self.peer_isn = seg.seq
        self.ack = (seg.seq + 1) & _MASK
        self._control(self.seq, self.ack, TCP_ACK)
        self._establish(now)
        trigger, self._trigger = self._trigger, None
        if trigger is not None:
            self._send_data(trigger)

    def _on_synsent_rst(self, now: float, seg: Segment) -> None:
        if seg.flags & TCP_ACK and seg.ack == self.seq:
            self._deadline = None
            self._goto(State.CLOSED)
            self._trigger = None
            self._drop("connection refused")
        else:
            self._drop("RST not for our SYN")

    def _on_reset(self, now: float, seg: Segment) -> None:
        self._delete("reset by peer")

    def _on_est_fin(self, now: float, seg: Segment) -> None:
        seq = seg.ack if seg.flags & TCP_ACK else 0
        self._control(seq, 0, TCP_RST)
        self._delete("FIN from peer")

    def _on_est_syn(self, now: float, seg: Segment) -> None:
        self._drop("SYN on an established connection")

    def _on_est_other(self, now: float, seg: Segment) -> None:
        if seg.is_short:
            self._drop("keepalive")  # no reply, no ACK (A.6 step 5)
            return
        decap = seg.decap
        if decap is None:
            self._drop(f"bad segment: {seg.error}")
            return
        end = (seg.seq + seg.payload_len) & _MASK
        if seg.seq == self.ack or _after(end, self.ack):
            self.ack = end
        if self.state is State.CLOSE_WAIT and decap.proto != PROTO_UDP:
            self._drop("ESP while closing")
            return
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
        self.seq = (self.isn + 1) & _MASK
        self.ack = 0
        self._goto(State.SYN_SENT)
        self._control(self.isn, 0, TCP_SYN)
        self._deadline = now + self.timers.handshake

    def _establish(self, now: float) -> None:
        self._goto(State.ESTABLISHED)
        self._deadline = None if self.has_sa else now + self.timers.no_sa

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

    def _send_data(self, inner: bytes, *, ike_only: bool = False) -> None:
        try:
            data, plen, proto = encapsulate_info(
                inner, sport=self.local_port, dport=self.peer_port, seq=self.seq, ack=self.ack
            )
        except CTCPError as exc:
            self._drop(f"cannot encapsulate: {exc.reason}")
            return
        if ike_only and proto != PROTO_UDP:
            self._drop("ESP while closing")
            return
        seq = self.seq
        self.seq = (seq + plen) & _MASK
        self._actions.append(TransmitSegment(data, seq, self.ack, TCP_ACK, proto))

    def _drop(self, reason: str) -> None:
        self._actions.append(Dropped(reason))

    def _delete(self, reason: str) -> None:
        self._goto(State.DELETED)
        self._deadline = None
        self._trigger = None
        self.close_reason = reason
        self._actions.append(Closed(reason))


_Handler = Callable[[Connection, float, Segment], None]
_C = Connection
_ESTABLISHED_HANDLERS: dict[SegKind, _Handler] = {
    SegKind.RST: _C._on_reset,
    SegKind.FIN: _C._on_est_fin,
    SegKind.SYN: _C._on_est_syn,
    SegKind.SYN_ACK: _C._on_est_syn,
    SegKind.OTHER: _C._on_est_other,
}

# (state, segment kind) -> handler. Pairs not listed are dropped with a reason.
_ON_SEGMENT: dict[tuple[State, SegKind], _Handler] = {
    (State.LISTEN, SegKind.SYN): _C._on_listen_syn,
    (State.LISTEN, SegKind.SYN_ACK): _C._on_listen_other,
    (State.LISTEN, SegKind.FIN): _C._on_listen_other,
    (State.LISTEN, SegKind.RST): _C._on_listen_other,
    (State.LISTEN, SegKind.OTHER): _C._on_listen_other,
    (State.SYN_RCVD, SegKind.SYN): _C._on_synrcvd_syn,
    (State.SYN_RCVD, SegKind.OTHER): _C._on_synrcvd_other,
    (State.SYN_RCVD, SegKind.RST): _C._on_reset,
    (State.SYN_SENT, SegKind.SYN_ACK): _C._on_synsent_synack,
    (State.SYN_SENT, SegKind.RST): _C._on_synsent_rst,
    **{(State.ESTABLISHED, k): h for k, h in _ESTABLISHED_HANDLERS.items()},
    **{(State.CLOSE_WAIT, k): h for k, h in _ESTABLISHED_HANDLERS.items()},
}
