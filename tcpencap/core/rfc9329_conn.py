"""One RFC 9329 connection: its states, the one table that moves it between them, and
the rules that concern it alone.

Like :mod:`tcpencap.core.ctcp_conn` (and h11's state machine), the next state is looked up
in :data:`TRANSITIONS` by (state, event) in :meth:`Conn.handle`, the only place a state
changes; a pair not in the table is a bug and raises :class:`TransitionError`. CLOSED is
final: a client's reconnect is a new connection (:meth:`Conn.next_generation`) under the
same table entry, not a move back.

The rules here depend on nothing but the connection and the time, passed in: the frame-rate
window and budget, invalid frames, what is held while connecting (and the outstanding
request resent after a reconnect), the deadlines (first message, no SA, retire), reconnect
and its backoff, and whether the native worker may read it. Host rules (admission, orphans,
steering, VICI facts) are the engine's; it executes what these methods decide.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tcpencap.core.outputs import bracket, count, describe, status_row
from tcpencap.core.role import Role
from tcpencap.core.router import ConnView
from tcpencap.core.table import Entry
from tcpencap.wire import rfc9329
from tcpencap.wire.ike import check_first_ike

CLIENT_CLOSE_DELAY = 0.5  # after the last IKE SA is gone
GATEWAY_CLOSE_DELAY = 5.0  # the client (TCP originator) should close first
RECONNECT_BASE = 0.2
RECONNECT_MAX = 10.0
MAX_RECONNECTS = 40
PENDING_LIMIT = 64  # frames held while a client connection is being opened
LEND_AFTER_FRAMES = 64  # a connection is read by the native inbound worker once it carries ESP
UNLIMITED = 1 << 62  # the frame budget of a connection max_frame_rate does not hold


class State(enum.Enum):
    CONNECTING = "connecting"  # client: the TCP connect is under way
    ACCEPTED = "accepted"  # gateway: waiting for the prefix
    PREFIX_RECEIVED = "prefix-received"  # gateway: waiting for the first message
    OPEN = "open"
    CLOSING = "closing"  # Close was output; the shell reports the loss
    CLOSED = "closed"  # final: the socket is gone


class Event(enum.Enum):
    CONNECTED = "connected"  # client: the TCP connect succeeded (the prefix is sent)
    PREFIX = "prefix"  # gateway: the peer's prefix arrived
    FIRST_MESSAGE = "first-message"  # gateway: a well-formed first message arrived
    CLOSE = "close"  # the engine closes it (Close output)
    LOST = "lost"  # the socket is gone, or the connect failed


# Every state change a connection makes; Conn.handle raises for any other pair.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.CONNECTING, Event.CONNECTED): State.OPEN,
    (State.CONNECTING, Event.CLOSE): State.CLOSING,
    (State.CONNECTING, Event.LOST): State.CLOSED,
    (State.ACCEPTED, Event.PREFIX): State.PREFIX_RECEIVED,
    (State.ACCEPTED, Event.CLOSE): State.CLOSING,
    (State.ACCEPTED, Event.LOST): State.CLOSED,
    (State.PREFIX_RECEIVED, Event.FIRST_MESSAGE): State.OPEN,
    (State.PREFIX_RECEIVED, Event.CLOSE): State.CLOSING,
    (State.PREFIX_RECEIVED, Event.LOST): State.CLOSED,
    (State.OPEN, Event.CLOSE): State.CLOSING,
    (State.OPEN, Event.LOST): State.CLOSED,
    (State.CLOSING, Event.LOST): State.CLOSED,
}
INITIAL = {Role.CLIENT: State.CONNECTING, Role.GATEWAY: State.ACCEPTED}
WAITING = (State.ACCEPTED, State.PREFIX_RECEIVED)
ENDING = (State.CLOSING, State.CLOSED)


class TransitionError(AssertionError):
    """An event the table has no move for in the connection's state: a bug in the engine."""


@dataclass(slots=True, eq=False)
class Conn:
    """One TCP connection of the RFC 9329 engine. A client's reconnect is the next
    ``generation``: a new Conn under the same table entry (and conn_id)."""

    view: ConnView
    side: Role
    state: State
    codec: Any  # rfc9329.StreamCodec, or the data path's equivalent
    created: float
    local_text: str
    peer_text: str
    local_port: int = 0
    peer_port: int = 0
    generation: int = 0
    frames_in: int = 0
    esp_frames: int = 0  # of the codec's frames, those that were ESP (not rate-limited)
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reads_in: int = 0  # data_received calls: frames_in / reads_in is the batching
    drops: dict[str, int] = field(default_factory=dict)
    pending: list[tuple[bytes, bool]] = field(default_factory=list)
    outstanding: bytes | None = None  # last IKEv2 request sent, resent after a reconnect
    attempt: int = 0
    got_ike: bool = False
    first_at: float | None = None  # when the first complete message arrived
    sa_seen: bool = False  # evidence of an IKE SA on this connection (see charon_sent)
    first_spi: bytes | None = None  # the initiator SPI of the first message, if IKE
    resume_spi: int = 0  # the SPI of a first ESP taken before charon could be asked
    counted: bool = False  # in the gateway's admission counts
    source: str = ""  # the source prefix the gateway's per-source limits count it under
    invalid: int = 0  # invalid frames received (max_invalid_frames closes)
    retiring: bool = False  # closed on purpose: no reconnect
    close_reason: str = ""
    win_start: float = 0.0  # the frame-rate window: when it began and
    win_frames: int = 0  # ... the codec's frame count (frames of every kind) then

    @classmethod
    def new(cls, now: float, view: ConnView, side: Role, codec: Any, local: str, peer: str) -> Conn:
        return cls(view, side, INITIAL[side], codec, now, local, peer, win_start=now)

    @property
    def conn_id(self) -> int:
        return self.view.entry.conn_id

    @property
    def entry(self) -> Entry:
        return self.view.entry

    @property
    def ending(self) -> bool:
        """Closing or closed: what it still receives is not delivered."""
        return self.state is State.CLOSING or self.state is State.CLOSED

    def __str__(self) -> str:
        return describe(
            self.conn_id,
            self.side.value,
            self.local_text,
            self.local_port,
            self.peer_text,
            self.peer_port,
        )

    # --- the state machine ------------------------------------------------------------

    def handle(self, event: Event) -> State:
        """Move by the table: the one place a connection's state changes."""
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise TransitionError(f"{self}: no move for {event.value} in {self.state.value}")
        self.state = new
        return new

    def next_generation(self, codec: Any) -> Conn:
        """The client's next connection after this one was lost (RFC 9329 §6.1): the same
        entry and figures, a new socket, the outstanding request held to be resent (§6.2)."""
        if self.state is not State.CLOSED:
            raise TransitionError(f"{self}: reconnect from {self.state.value}")
        nxt = Conn(
            self.view,
            self.side,
            INITIAL[self.side],
            codec,
            self.created,
            self.local_text,
            self.peer_text,
        )
        for name in _CARRIED:
            setattr(nxt, name, getattr(self, name))
        nxt.generation = self.generation + 1
        nxt.attempt = self.attempt + 1
        nxt.pending = [(self.outstanding, True)] if self.outstanding is not None else []
        return nxt

    # --- sending ----------------------------------------------------------------------

    def send(self, frame: bytes, is_ike: bool) -> bool:
        """A frame for the peer: True to transmit it now; while connecting it is held
        (ESP only up to PENDING_LIMIT frames); on a closing connection it is dropped."""
        state = self.state
        if state is State.OPEN:
            self.frames_out += 1
            self.bytes_out += len(frame)
            return True
        if state is State.CONNECTING:
            if len(self.pending) >= PENDING_LIMIT and not is_ike:
                count(self.drops, "esp-while-connecting")
            else:
                self.pending.append((frame, is_ike))
        elif is_ike:
            count(self.drops, "ike-on-closed")
        else:
            count(self.drops, "esp-on-closed")
        return False

    def connected(self) -> list[tuple[bytes, bool]]:
        """The TCP connect succeeded: the prefix goes first (counted here), then what was
        held, returned to be sent."""
        self.handle(Event.CONNECTED)
        self.attempt = 0
        self.bytes_out += len(rfc9329.PREFIX)
        pending, self.pending = self.pending, []
        return pending

    def charon_sent(self, is_ike: bool, protected: bool, vici: bool) -> None:
        """What charon sending on this connection says: ESP means a CHILD SA; without
        VICI, encrypted IKE is the best local evidence of an IKE SA with keys."""
        if not is_ike or (protected and not vici):
            self.sa_seen = True

    def ike_received(self, msg: bytes) -> None:
        """An IKE message from the peer: a response (flag R) answers the outstanding request."""
        if self.outstanding is not None and len(msg) > 19 and msg[19] & 0x20:
            self.outstanding = None
        self.got_ike = True

    # --- the first message and the deadlines ------------------------------------------

    def first_ike_problem(self, msg: bytes) -> str:
        """Why ``msg`` cannot be a first message ("" when it can; its SPI is kept, not the
        message: an IKE_SA_INIT is ~1 KB per connection)."""
        problem = check_first_ike(msg)
        if not problem:
            self.first_spi = msg[:8]
        return problem

    def first_message(self, now: float) -> None:
        """A well-formed first message: past the first-message deadline."""
        self.handle(Event.FIRST_MESSAGE)
        self.first_at = now

    def first_message_overdue(self) -> bool:
        return self.state in WAITING

    def sa_overdue(self) -> bool:
        """Open without any evidence of an IKE SA (the no-SA deadline closes it)."""
        return self.state is State.OPEN and not self.sa_seen

    def retire_delay(self, graceful: bool) -> float:
        """The TCP originator closes (RFC 9329 §6.1) shortly after its last SA, so the last
        IKE message can still leave; a gateway gives the client time to close first."""
        if not graceful:
            return 0.0
        return CLIENT_CLOSE_DELAY if self.side is Role.CLIENT else GATEWAY_CLOSE_DELAY

    def may_retire(self) -> bool:
        """No IKE SA arrived since retiring was decided."""
        return not (self.entry.ike_spis or self.entry.ike_spis_old)

    def reconnects(self, stopping: bool) -> bool:
        """After a loss: only the TCP originator re-establishes (§6.1), while an IKE SA of
        its lives, once it carried IKE (or was already reconnecting), within MAX_RECONNECTS."""
        entry = self.entry
        return (
            self.side is Role.CLIENT
            and not self.retiring
            and not stopping
            and bool(self.got_ike or self.attempt)
            and bool(entry.ike_spis or entry.ike_spis_old)
            and self.attempt < MAX_RECONNECTS
        )

    def reconnect_delay(self) -> float:
        """Exponential backoff of this (reconnecting) generation."""
        return min(RECONNECT_BASE * (2 ** (self.attempt - 1)), RECONNECT_MAX)

    # --- receiving: frame rate, invalid frames, lending ---------------------------------

    def other_frames(self) -> int:
        """The frames that count toward max_frame_rate: IKE, keepalives, invalid ones, and
        ESP too until charon has vouched for an SA on the connection (``sa_seen``): what a
        peer can send to cost the event loop without carrying anything of a tunnel's."""
        return self.codec.frames_in - (self.esp_frames if self.sa_seen else 0)

    def frame_budget(self, now: float, max_frame_rate: int) -> int:
        """The count of :meth:`other_frames` at which a gateway connection goes over
        ``max_frame_rate`` in the current one-second window. The ESP of a connection charon
        has an SA on does not count: it is what the tunnel carries, as fast as TCP takes
        it (a 1 Gbit/s tunnel is 90,000 frames a second)."""
        if self.side is not Role.GATEWAY:
            return UNLIMITED
        if now - self.win_start >= 1.0:
            self.win_start, self.win_frames = now, self.other_frames()
        return self.win_frames + max_frame_rate

    def invalid_frame(self, reason: str, max_invalid: int) -> bool:
        """A frame that carries nothing usable, counted under ``reason`` (a fixed name):
        True when it is a gateway connection's ``max_invalid``-th (§6.1 allows closing)."""
        count(self.drops, reason)
        self.invalid += 1
        return self.side is Role.GATEWAY and self.invalid >= max_invalid

    def lendable(self) -> bool:
        """The native inbound worker may read it: open, past its set-up (IKE alone is
        cheaper on the loop than a thread hand-off), and, on a gateway, with an SA (until
        then its ESP counts toward the frame rate, on the loop)."""
        if self.state is not State.OPEN or self.frames_in < LEND_AFTER_FRAMES:
            return False
        return self.side is not Role.GATEWAY or self.sa_seen

    def received_elsewhere(self, frames: int, nbytes: int, reads: int, keepalives: int) -> None:
        """ESP the data path read and delivered for this connection (and keepalives it
        dropped): counted as if read here."""
        self.frames_in += frames
        self.esp_frames += frames
        self.bytes_in += nbytes
        self.reads_in += reads
        if keepalives:
            self.drops["keepalive"] = self.drops.get("keepalive", 0) + keepalives

    def sent_elsewhere(self, frames: int, nbytes: int, esp_dropped: int, ike_dropped: int) -> None:
        """What the data path wrote (or dropped over the send bound) for this connection."""
        self.frames_out += frames
        self.bytes_out += nbytes
        for key, n in (("esp-congested", esp_dropped), ("ike-congested", ike_dropped)):
            if n:
                self.drops[key] = self.drops.get(key, 0) + n


# What a reconnect carries over from the lost generation (the rest starts afresh).
_CARRIED = (
    "local_port",
    "peer_port",
    "frames_in",
    "esp_frames",
    "frames_out",
    "bytes_in",
    "bytes_out",
    "reads_in",
    "drops",
    "outstanding",
    "got_ike",
    "first_at",
    "sa_seen",
    "first_spi",
    "resume_spi",
    "counted",
    "source",
    "invalid",
    "win_start",
    "win_frames",
)


def status_of(c: Conn, now: float) -> dict[str, Any]:
    """One connection's line of ``tcpencap status``."""
    return status_row(
        c.conn_id,
        "rfc9329",
        c.side.value,
        c.state.value,
        f"{bracket(c.local_text)}:{c.local_port}",
        f"{bracket(c.peer_text)}:{c.peer_port}",
        c.entry,
        {
            "frames_in": c.frames_in,
            "frames_out": c.frames_out,
            "bytes_in": c.bytes_in,
            "bytes_out": c.bytes_out,
            "reads_in": c.reads_in,
            "drops": {**c.view.drops, **c.drops},
            "age": round(now - c.created, 1),
        },
    )
