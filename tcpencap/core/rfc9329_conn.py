"""One RFC 9329 connection as the engine keeps it: its state, the transitions it may
make, its figures. The rules that move it between states are the engine's."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tcpencap.core.outputs import bracket, describe, status_row
from tcpencap.core.router import ConnView, Side
from tcpencap.core.table import Entry
from tcpencap.wire import rfc9329


class State(enum.Enum):
    CONNECTING = "connecting"  # client: the TCP connect is under way
    ACCEPTED = "accepted"  # gateway: waiting for the prefix
    PREFIX_RECEIVED = "prefix-received"  # gateway: waiting for the first message
    OPEN = "open"
    CLOSING = "closing"  # Close was output; the shell reports the loss
    CLOSED = "closed"


# Every transition a connection may make; _goto refuses anything else.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.CONNECTING: frozenset({State.OPEN, State.CLOSING, State.CLOSED}),
    State.ACCEPTED: frozenset({State.PREFIX_RECEIVED, State.CLOSING, State.CLOSED}),
    State.PREFIX_RECEIVED: frozenset({State.OPEN, State.CLOSING, State.CLOSED}),
    State.OPEN: frozenset({State.CLOSING, State.CLOSED}),
    State.CLOSING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}
WAITING = (State.ACCEPTED, State.PREFIX_RECEIVED)


@dataclass(slots=True, eq=False)
class Conn:
    """One RFC 9329 connection (one TCP connection at a time: a reconnect is a new
    ``generation`` of the same connection, keeping its table entry)."""

    view: ConnView
    side: Side
    state: State
    codec: rfc9329.StreamCodec
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
    sa_seen: bool = False  # evidence of an IKE SA on this connection (see _sa_evidence)
    first_spi: bytes | None = None  # the initiator SPI of the first message, if IKE
    resume_spi: int = 0  # the SPI of a first ESP taken before charon could be asked
    counted: bool = False  # in the gateway's admission counts
    source: str = ""  # the source prefix the gateway's per-source limits count it under
    invalid: int = 0  # invalid frames received (max_invalid_frames closes)
    retiring: bool = False  # closed on purpose: no reconnect
    close_reason: str = ""
    win_start: float = 0.0  # the frame-rate window: when it began and
    win_frames: int = 0  # ... the codec's frame count (frames of every kind) then

    @property
    def conn_id(self) -> int:
        return self.view.entry.conn_id

    @property
    def entry(self) -> Entry:
        return self.view.entry

    def __str__(self) -> str:
        return describe(
            self.conn_id,
            self.side.value,
            self.local_text,
            self.local_port,
            self.peer_text,
            self.peer_port,
        )


@dataclass(slots=True)
class Orphan:
    """SAs of a gateway connection that closed, waiting for their client's reconnect."""

    deadline: float
    ike: list[bytes]
    esp: list[int]
    sa_seen: bool


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
