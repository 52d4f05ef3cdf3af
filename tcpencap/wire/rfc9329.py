"""RFC 9329 (TCP encapsulation of IKE and ESP) stream codec, sans-I/O in the h11/wsproto style.

The caller owns the socket: it hands received octets to :meth:`StreamCodec.receive_data`
(``b""`` for EOF), then calls :meth:`StreamCodec.next_event` until it returns
:class:`NeedData` (or a terminal event). Outgoing frames are plain ``bytes`` from the
``send_*`` methods or the stateless :func:`frame_ike` / :func:`frame_esp` helpers.

Wire format (RFC 9329 §3, §4): the TCP Originator sends the 6-octet prefix ``IKETCP`` once at
the start of the connection (the Responder never sends one); then both directions carry
frames ``Length(2, network order, counts itself) + payload``. A payload whose first 32-bit
word is zero is the non-ESP marker followed by an IKE message; anything else is an ESP packet
(SPI first, never zero). A 1-octet payload ``FF`` is a NAT keepalive (§6.6): dropped silently,
never counted as an error.

Reactions (the three kinds the caller sees):

* wait -> :class:`NeedData`: the connection is kept; the caller's own timer decides how long.
* drop -> :class:`InvalidFrame`: the frame is skipped, the connection is kept; the caller may
  count these (§6.1 lets a peer close after "too many" unparsable messages - the caller's
  policy, not ours).
* close -> :class:`ProtocolError`: fatal; every later ``next_event()`` returns it again.

Frame rules (``n`` = payload octets = Length - 2):

* Length 0 or 1 -> close (RFC 9329 §3 makes these fatal).
* Length > ``max_frame`` -> close as soon as the two length octets are in (we refuse to
  buffer it; the default 65535 is the protocol maximum, so nothing valid is refused).
* n = 0 (empty) -> drop. n = 1: ``FF`` -> :class:`Keepalive`, any other octet -> drop.
* n = 2..4 -> drop: too short to hold a whole non-ESP marker plus a message, or an SPI plus
  anything; includes the marker-only frame ``00 06 00000000``. Linux espintcp drops these too.
* n >= 5, marker zero -> :class:`IKEMessage` with the marker removed, whatever its length.
  RFC 9329 defines no framing-level minimum for IKE; a truncated or malformed IKE message is
  an IKE syntax error that the IKE layer answers with INVALID_SYNTAX while the TCP connection
  stays (§6.1), so it is charon's to judge, not the framer's.
* n >= 5, first word non-zero -> ESP. Fewer than 8 octets (SPI + Sequence Number, RFC 4303
  §2) cannot be an ESP packet, so n = 5..7 is dropped; otherwise :class:`ESPPacket`.

Prefix (Responder only): checked octet by octet as it arrives. A wrong octet at any position
closes at once; a correct but incomplete prefix waits (unlike libreswan, which closes on a
short first read: RFC 9329 §4 only asks to wait for all six octets).

EOF: at a frame boundary (or before any octet) -> :class:`ConnectionClosed`; inside the
prefix, the length or a frame -> close (§6.1: a partial message is discarded). Data after EOF
is a caller bug -> close.

Libreswan's ``ikev2-tcp-09`` negative vectors (protocols.md Part D), Responder side:

====  ==========================  ==================================================
 #    bytes                       events
====  ==========================  ==================================================
 1    (nothing)                   NeedData (caller's accept timer closes)
 2    ``I``                       NeedData (partial prefix waits)
 3    ``123456``                  ProtocolError at the first octet
 4    ``IKETCP``                  PrefixReceived, NeedData
 5    ``IKETCP 00``               PrefixReceived, NeedData
 6    ``IKETCP 00 00``            PrefixReceived, ProtocolError (length 0)
 7    ``IKETCP 00 02``            PrefixReceived, InvalidFrame (empty), NeedData
 8    ``IKETCP 00 06 00000000``   PrefixReceived, InvalidFrame (marker only), NeedData
 9    ``IKETCP 00 07 00000000 FF``  PrefixReceived, IKEMessage(b"\\xff"), NeedData
 10   ``IKETCP 00 22 ...`` (28)   PrefixReceived, IKEMessage(header), NeedData
 11   ``IKETCP 00 FF``            PrefixReceived, NeedData (253 octets missing)
 12   ``IKETCP FF FF``            PrefixReceived, NeedData (default max_frame)
====  ==========================  ==================================================

Memory: one ``bytearray`` plus a read offset; consumed octets are dropped on the next
``receive_data`` (one cheap front deletion per call, never per frame, so many small frames
cost O(n)). After ``next_event()`` returns NeedData, fewer than ``max_frame`` octets
(or fewer than 6 while the prefix is pending) stay buffered, so memory is bounded by that
plus whatever one ``receive_data`` call hands in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeAlias

PREFIX = b"IKETCP"
NON_ESP_MARKER = b"\x00\x00\x00\x00"
KEEPALIVE_FRAME = b"\x00\x03\xff"
LENGTH_SIZE = 2
MAX_FRAME = 0xFFFF
MAX_PAYLOAD = MAX_FRAME - LENGTH_SIZE  # 65533
MAX_IKE_MESSAGE = MAX_PAYLOAD - len(NON_ESP_MARKER)  # 65529
ESP_MIN_LEN = 8  # SPI + Sequence Number (RFC 4303 §2)


class Role(enum.Enum):
    """TCP role: fixed for the connection, independent of the IKE initiator/responder roles."""

    ORIGINATOR = "originator"
    RESPONDER = "responder"


@dataclass(frozen=True, slots=True)
class PrefixReceived:
    """The Responder has seen the whole ``IKETCP`` prefix."""


@dataclass(frozen=True, slots=True)
class IKEMessage:
    """An IKE message, non-ESP marker removed."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ESPPacket:
    """A whole ESP packet, SPI first."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Keepalive:
    """A NAT keepalive (``00 03 FF``): drop it silently, it is not an error."""


@dataclass(frozen=True, slots=True)
class InvalidFrame:
    """A well-delimited frame that carries nothing usable; skipped, the connection stays."""

    reason: str


@dataclass(frozen=True, slots=True)
class NeedData:
    """Nothing complete is buffered; feed more data."""


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The stream cannot go on: the caller must close the connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the stream at a frame boundary."""


Event: TypeAlias = (
    PrefixReceived
    | IKEMessage
    | ESPPacket
    | Keepalive
    | InvalidFrame
    | NeedData
    | ProtocolError
    | ConnectionClosed
)

# Field-less events are immutable: share one instance each instead of allocating per frame.
_NEED_DATA = NeedData()
_KEEPALIVE = Keepalive()
_PREFIX_RECEIVED = PrefixReceived()
_CLOSED = ConnectionClosed()

_new = object.__new__
_set = object.__setattr__


def _ike_event(data: bytes) -> IKEMessage:
    """IKEMessage(data) without the frozen-dataclass __init__ (1 us of a ~5 us frame)."""
    ev = _new(IKEMessage)
    _set(ev, "data", data)
    return ev


def _esp_event(data: bytes) -> ESPPacket:
    """ESPPacket(data), built like _ike_event."""
    ev = _new(ESPPacket)
    _set(ev, "data", data)
    return ev


def frame_ike(message: bytes | bytearray | memoryview) -> bytes:
    """Frame one IKE message: length, non-ESP marker, message."""
    n = len(message)
    if n == 0:
        raise ValueError("empty IKE message (a marker-only frame is dropped by receivers)")
    if n > MAX_IKE_MESSAGE:
        raise ValueError(f"IKE message of {n} octets, at most {MAX_IKE_MESSAGE} fit a frame")
    return (n + 6).to_bytes(2, "big") + NON_ESP_MARKER + message


def frame_esp(packet: bytes | bytearray | memoryview) -> bytes:
    """Frame one ESP packet: length, packet. The SPI must be non-zero (RFC 9329 §3)."""
    n = len(packet)
    if n < ESP_MIN_LEN:
        raise ValueError(f"ESP packet of {n} octets, needs at least {ESP_MIN_LEN}")
    if n > MAX_PAYLOAD:
        raise ValueError(f"ESP packet of {n} octets, at most {MAX_PAYLOAD} fit a frame")
    if packet[:4] == NON_ESP_MARKER:
        raise ValueError("ESP SPI 0 would read as the non-ESP marker")
    return (n + 2).to_bytes(2, "big") + packet


class StreamCodec:
    """One RFC 9329 TCP connection: parses what arrives, frames what leaves.

    ``max_frame`` bounds a received frame (length field included); sending is bounded only by
    the protocol maximum, since the peer's limit is not ours.
    """

    __slots__ = (
        "role",
        "max_frame",
        "prefix_received",
        "frames_in",
        "_buf",
        "_pos",
        "_eof",
        "_error",
        "_prefix_sent",
        "_awaiting_prefix",
    )

    def __init__(self, role: Role, *, max_frame: int = MAX_FRAME) -> None:
        if not LENGTH_SIZE <= max_frame <= MAX_FRAME:
            raise ValueError(f"max_frame {max_frame} outside {LENGTH_SIZE}..{MAX_FRAME}")
        self.role = role
        self.max_frame = max_frame
        # Always False on the Originator: it never receives a prefix.
        self.prefix_received = False
        self.frames_in = 0
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: ProtocolError | None = None
        self._prefix_sent = False
        self._awaiting_prefix = role is Role.RESPONDER

    @property
    def bytes_buffered(self) -> int:
        """Received octets not yet turned into events."""
        return len(self._buf) - self._pos

    # -- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append received octets; ``b""`` marks EOF. Never raises."""
        if self._error is not None:
            return
        if not data:
            self._eof = True
            return
        if self._eof:
            self._fail("data received after EOF")
            return
        buf = self._buf
        if self._pos:
            # Drop what next_event() consumed; cost is bounded by the < max_frame leftover.
            if self._pos >= len(buf):
                buf.clear()
            else:
                del buf[: self._pos]
            self._pos = 0
        buf += data

    def next_event(self) -> Event:
        """The next event from buffered data; NeedData when nothing complete is buffered."""
        if self._error is not None:
            return self._error
        if self._awaiting_prefix:
            return self._next_prefix()
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < LENGTH_SIZE:
            if not self._eof:
                return _NEED_DATA
            if avail == 0:
                return _CLOSED
            return self._fail("EOF inside a frame length")
        length = (buf[pos] << 8) | buf[pos + 1]
        if length < LENGTH_SIZE:
            return self._fail(f"frame length {length}")
        if length > self.max_frame:
            return self._fail(f"frame length {length} exceeds max_frame {self.max_frame}")
        if avail < length:
            if self._eof:
                return self._fail(f"EOF inside a {length}-octet frame ({avail} octets in)")
            return _NEED_DATA
        end = pos + length
        self._pos = end
        self.frames_in += 1
        start = pos + LENGTH_SIZE
        n = length - LENGTH_SIZE
        if n >= 5:
            # bytes(bytearray slice) measured faster than a memoryview for 300-1400 octets,
            # and a live memoryview would pin the bytearray against resizing.
            if buf.startswith(NON_ESP_MARKER, start):
                return _ike_event(bytes(buf[start + 4 : end]))
            if n < ESP_MIN_LEN:
                return InvalidFrame(f"ESP packet of {n} octets, shorter than SPI + sequence")
            return _esp_event(bytes(buf[start:end]))
        if n == 1:
            if buf[start] == 0xFF:
                return _KEEPALIVE
            return InvalidFrame(f"1-octet payload {buf[start]:02x}, not a keepalive")
        if n == 0:
            return InvalidFrame("empty frame")
        if n == 4 and buf.startswith(NON_ESP_MARKER, start):
            return InvalidFrame("non-ESP marker without an IKE message")
        return InvalidFrame(f"{n}-octet payload, too short for IKE or ESP")

    def _next_prefix(self) -> Event:
        avail = len(self._buf) - self._pos
        k = min(avail, len(PREFIX))
        if not self._buf.startswith(PREFIX[:k], self._pos):
            # Name only the first wrong octet, so the event does not depend on read sizes.
            i = next(i for i in range(k) if self._buf[self._pos + i] != PREFIX[i])
            got = self._buf[self._pos + i]
            return self._fail(
                f"stream prefix octet {i} is {got:#04x}, expected {PREFIX[i]:#04x} ({PREFIX!r})"
            )
        if k < len(PREFIX):
            if not self._eof:
                return _NEED_DATA
            if avail == 0:
                return _CLOSED
            return self._fail(f"EOF after {avail} of {len(PREFIX)} prefix octets")
        self._pos += len(PREFIX)
        self.prefix_received = True
        self._awaiting_prefix = False
        return _PREFIX_RECEIVED

    def _fail(self, reason: str) -> ProtocolError:
        self._error = ProtocolError(reason)
        self._buf = bytearray()
        self._pos = 0
        return self._error

    # -- sending ---------------------------------------------------------------------------

    def send_prefix(self) -> bytes:
        """The ``IKETCP`` prefix; only the Originator sends it, once per connection."""
        if self.role is not Role.ORIGINATOR:
            raise ValueError("only the TCP Originator sends the stream prefix")
        if self._prefix_sent:
            raise ValueError("stream prefix already sent on this connection")
        self._prefix_sent = True
        return PREFIX

    def send_ike(self, message: bytes | bytearray | memoryview) -> bytes:
        """Frame an IKE message (length + non-ESP marker)."""
        return frame_ike(message)

    def send_esp(self, packet: bytes | bytearray | memoryview) -> bytes:
        """Frame an ESP packet (length only); rejects SPI 0 and packets under 8 octets."""
        return frame_esp(packet)

    def send_keepalive(self) -> bytes:
        """``00 03 FF``. RFC 9329 §6.6 says not to send it over TCP; here for tests."""
        return KEEPALIVE_FRAME
