"""What the engines ask the shell to do: one vocabulary for RFC 9329 and cTCP.

Each engine takes inputs (bytes, packets, VICI events) with the current time, queues these
records, and the shell pulls them (``engine.pull()``) and executes them in order. They are
plain slotted classes, not frozen dataclasses: the data path creates one per packet.
"""

from __future__ import annotations

from typing import Any


class Transmit:
    """Send ``data`` on connection ``conn_id``'s TCP stream (RFC 9329 frames; cTCP's
    segments are :class:`SendRaw`). ``is_ike`` frames are never dropped silently; ESP may
    be dropped when the connection is congested."""

    __slots__ = ("conn_id", "data", "is_ike", "frames")

    def __init__(self, conn_id: int, data: bytes, is_ike: bool = False, frames: int = 1) -> None:
        self.conn_id = conn_id
        self.data = data
        self.is_ike = is_ike
        self.frames = frames  # ESP frames in data (the native path frames a batch at once)

    def __repr__(self) -> str:
        return f"Transmit({self.conn_id}, {len(self.data)} octets, ike={self.is_ike})"


class SendRaw:
    """Send ``data``, a whole IP packet built by the engine (a cTCP segment, a reset to a
    stranger), to ``dst`` through the raw socket: it belongs to no connection's stream.
    What goes on the wire is ``pieces``, in order: ``data`` itself, or its fragments when
    it is larger than the path. When the kernel refuses them as too big (the route changed
    under the engine's cache) and ``first_try``, the shell reports it to the engine, which
    sizes ``data`` once more."""

    __slots__ = ("data", "dst", "pieces", "first_try")

    def __init__(
        self,
        data: bytes,
        dst: bytes,
        pieces: tuple[bytes, ...] | None = None,
        first_try: bool = True,
    ) -> None:
        self.data = data
        self.dst = dst
        self.pieces = (data,) if pieces is None else pieces
        self.first_try = first_try

    def __repr__(self) -> str:
        return f"SendRaw({len(self.data)} octets)"


class Inject:
    """Hand this packet (IKE or ESP-in-UDP, as charon expects it) to the local stack;
    ``dst`` is the local address it is for."""

    __slots__ = ("packet", "dst")

    def __init__(self, packet: bytes, dst: bytes) -> None:
        self.packet = packet
        self.dst = dst

    def __repr__(self) -> str:
        return f"Inject({len(self.packet)} octets)"


class Steer:
    """Start (``on``) or stop queueing charon's UDP to ``peer`` (packed address): the whole
    address, or with ``port`` only that UDP endpoint (a gateway's TCP peer, whose address
    other hosts behind the same NAT may share over plain UDP)."""

    __slots__ = ("peer", "on", "port")

    def __init__(self, peer: bytes, on: bool, port: int = 0) -> None:
        self.peer = peer
        self.on = on
        self.port = port

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Steer) and (other.peer, other.on, other.port) == (
            self.peer,
            self.on,
            self.port,
        )

    def __repr__(self) -> str:
        at = f":{self.port}" if self.port else ""
        return f"Steer({self.peer.hex()}{at}, {self.on})"


class SteerSegments:
    """Start (``on``) or stop taking the TCP segments cTCP peer ``peer`` sends from
    ``port`` (a client's gateway) away from the host stack, to the engine; only the
    engine's own segments may then go to that endpoint."""

    __slots__ = ("peer", "port", "on")

    def __init__(self, peer: bytes, port: int, on: bool) -> None:
        self.peer = peer
        self.port = port
        self.on = on

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SteerSegments) and (other.peer, other.port, other.on) == (
            self.peer,
            self.port,
            self.on,
        )

    def __repr__(self) -> str:
        return f"SteerSegments({self.peer.hex()}:{self.port}, {self.on})"


class Connect:
    """Open a TCP connection from ``local``:``local_port`` (0: none was free, fail it) to
    ``peer``:``port`` for connection ``conn_id``; report back with ``connected`` or
    ``connect_failed`` naming ``generation`` (each reconnect has a new one)."""

    __slots__ = ("conn_id", "generation", "local", "local_port", "peer", "port")

    def __init__(
        self, conn_id: int, generation: int, local: bytes, local_port: int, peer: bytes, port: int
    ) -> None:
        self.conn_id = conn_id
        self.generation = generation
        self.local = local
        self.local_port = local_port
        self.peer = peer
        self.port = port

    def __repr__(self) -> str:
        return f"Connect({self.conn_id}/{self.generation}, port {self.port})"


class Close:
    """Close connection ``conn_id`` (its current generation); the shell reports the loss."""

    __slots__ = ("conn_id", "reason")

    def __init__(self, conn_id: int, reason: str) -> None:
        self.conn_id = conn_id
        self.reason = reason

    def __repr__(self) -> str:
        return f"Close({self.conn_id}, {self.reason!r})"


class Query:
    """Ask charon for its IKE SAs (``list-sas``) and hand the answer to
    ``sas_listed(now, purpose, sas)``; None there means charon could not be asked."""

    __slots__ = ("purpose",)

    def __init__(self, purpose: str) -> None:
        self.purpose = purpose

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Query) and other.purpose == self.purpose

    def __repr__(self) -> str:
        return f"Query({self.purpose!r})"


Output = Transmit | SendRaw | Inject | Steer | SteerSegments | Connect | Close | Query


def count(counters: dict[str, int], key: str) -> None:
    counters[key] = counters.get(key, 0) + 1


def describe(conn_id: int, side: str, local: str, lport: int, peer: str, pport: int) -> str:
    """The one way both engines name a connection in logs."""
    return f"conn {conn_id} {side} {bracket(local)}:{lport} <-> {bracket(peer)}:{pport}"


def bracket(text: str) -> str:
    return f"[{text}]" if ":" in text else text


def status_row(
    conn_id: int,
    encapsulation: str,
    side: str,
    state: str,
    local: str,
    peer: str,
    entry: Any,
    figures: dict[str, Any],
) -> dict[str, Any]:
    """One row of ``tcpencap status`` (same keys for both encapsulations)."""
    return {
        "id": conn_id,
        "encapsulation": encapsulation,
        "side": side,
        "state": state,
        "local": local,
        "peer": peer,
        "ike_spis": sorted(s.hex() for s in entry.ike_spis) if entry else [],
        "ike_spis_old": sorted(s.hex() for s in entry.ike_spis_old) if entry else [],
        "esp_spis": sorted(f"{s:08x}" for s in entry.esp_spis) if entry else [],
        **figures,
    }
