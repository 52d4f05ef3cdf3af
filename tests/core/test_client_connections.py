"""The TCP originator's connections on their own (tcpencap.core.client_connections), with a
real router, port allocator and timer queue and a fake clock: what opening, a refused
port, the connect's success and a loss do, and when the next generation connects."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpencap.core.client_connections import ClientConnections
from tcpencap.core.datapath import PythonDataPath
from tcpencap.core.outputs import Connect, Output, Transmit
from tcpencap.core.ports import PortAllocator
from tcpencap.core.rfc9329_conn import RECONNECT_BASE, Conn, Event, State
from tcpencap.core.role import Role
from tcpencap.core.router import ConnView, Open, Router
from tcpencap.core.table import ConnectionTable
from tcpencap.core.timers import TimerQueue
from tcpencap.wire import rfc9329
from tcpencap.wire.packet import addr_bytes

LOCAL, PEER = addr_bytes("198.18.0.1"), addr_bytes("198.19.0.2")
SPI = bytes.fromhex("1122334455667788")
IKE_FRAME = b"ike-request"


class Rig:
    """ClientConnections wired to real parts, as the engine wires them."""

    def __init__(self, low: int = 40000, high: int = 40009) -> None:
        self.table = ConnectionTable()
        self.router = Router(self.table, lambda addr: True)
        self.ports = PortAllocator(0, low, high, random.Random(1))
        self.conns: dict[int, Conn] = {}
        self.datapath = PythonDataPath()
        self.timers = TimerQueue()
        self.out: list[Output] = []
        self.clients = ClientConnections(
            self.router,
            lambda peer: 4500,
            self.ports,
            self.conns,
            self.datapath,
            self.timers,
            self.new_conn,
            lambda role: rfc9329.StreamCodec(role),
            self.send,
            self.emit,
        )

    def new_conn(self, now: float, view: ConnView, side: Role, local: str, peer: str) -> Conn:
        codec = rfc9329.StreamCodec(rfc9329.Role.ORIGINATOR)
        conn = self.conns[view.entry.conn_id] = Conn.new(now, view, side, codec, local, peer)
        return conn

    def emit(self, output: Output) -> None:
        self.out.append(output)

    def send(self, conn: Conn, frame: bytes, is_ike: bool) -> None:
        if conn.send(frame, is_ike):
            self.emit(Transmit(conn.conn_id, frame, is_ike))

    def open(self, now: float = 0.0, frame: bytes = IKE_FRAME) -> Conn:
        view = self.router.add_client_conn(LOCAL, PEER)
        self.clients.open(now, Open(view.entry.conn_id, LOCAL, PEER, frame))
        return self.conns[view.entry.conn_id]

    def pull(self) -> list[Output]:
        out, self.out = self.out, []
        return out


def carrying_ike(rig: Rig, conn: Conn) -> Conn:
    """A connection that carried IKE for an SA charon holds: it reconnects when lost."""
    rig.table.bind_ike(conn.conn_id, SPI)
    conn.got_ike = True
    return conn


def test_open_asks_for_a_connect_from_the_client_range_and_holds_the_frame() -> None:
    rig = Rig()
    conn = rig.open()
    [connect] = rig.pull()
    assert isinstance(connect, Connect)
    assert (connect.conn_id, connect.generation, connect.local, connect.peer, connect.port) == (
        conn.conn_id,
        0,
        LOCAL,
        PEER,
        4500,
    )
    assert connect.local_port == conn.local_port
    assert 40000 <= conn.local_port <= 40009 and conn.local_port in rig.ports.in_use
    assert conn.state is State.CONNECTING and conn.pending == [(IKE_FRAME, True)]


def test_without_a_free_port_the_connect_names_port_0() -> None:
    rig = Rig(40000, 40000)
    first, second = rig.open(), rig.open()
    assert first.local_port == 40000 and second.local_port == 0
    assert rig.pull()[1].local_port == 0  # type: ignore[union-attr]


def test_a_refused_port_is_released_and_not_given_again_at_once() -> None:
    rig = Rig(40000, 40001)
    conn = rig.open()
    refused = conn.local_port
    other = rig.clients.port_refused(conn)
    assert other is not None and other != refused and conn.local_port == other
    assert rig.ports.in_use == {other}
    assert rig.clients.port_refused(conn) == refused  # free again, and not just refused


def test_no_port_left_but_the_refused_one() -> None:
    rig = Rig(40000, 40000)
    conn = rig.open()
    assert rig.clients.port_refused(conn) is None
    assert conn.local_port == 0 and rig.ports.in_use == frozenset()


@given(st.lists(st.booleans(), min_size=1, max_size=12))
def test_refusals_keep_ports_in_the_range_and_counted_once(refuse: list[bool]) -> None:
    rig = Rig(40000, 40003)
    conns = [rig.open() for _ in refuse]
    for conn, again in zip(conns, refuse, strict=True):
        if again and conn.local_port:
            rig.clients.port_refused(conn)
    held = [c.local_port for c in conns if c.local_port]
    assert len(held) == len(set(held)) and set(held) == rig.ports.in_use
    assert all(40000 <= p <= 40003 for p in held)


def test_connected_sends_the_prefix_then_what_was_held_once() -> None:
    rig = Rig()
    conn = rig.open()
    rig.pull()
    epoch = rig.datapath.epoch
    assert rig.clients.connected(conn)
    sent = [(o.conn_id, o.data, o.is_ike) for o in rig.pull() if isinstance(o, Transmit)]
    assert sent == [(conn.conn_id, rfc9329.PREFIX, True), (conn.conn_id, IKE_FRAME, True)]
    assert conn.state is State.OPEN and rig.datapath.epoch == epoch + 1
    assert not rig.clients.connected(conn)  # a second report changes nothing
    assert rig.pull() == []


def test_a_closed_connection_that_connects_is_refused() -> None:
    rig = Rig()
    conn = rig.open()
    conn.handle(Event.CLOSE)
    assert not rig.clients.connected(conn) and conn.state is State.CLOSING


def test_a_lost_connection_without_ike_frees_its_port_and_stays_gone() -> None:
    rig = Rig()
    conn = rig.open()
    conn.handle(Event.LOST)
    assert not rig.clients.lost(0.0, conn, stopping=False)
    assert rig.ports.in_use == frozenset() and rig.conns[conn.conn_id] is conn
    assert rig.timers.next_due() is None


def test_a_lost_connection_with_its_sa_alive_reconnects_after_the_backoff() -> None:
    rig = Rig()
    conn = carrying_ike(rig, rig.open())
    rig.clients.connected(conn)
    conn.outstanding = IKE_FRAME
    rig.pull()
    conn.handle(Event.LOST)
    assert rig.clients.lost(10.0, conn, stopping=False)
    nxt = rig.conns[conn.conn_id]
    assert nxt is not conn and nxt.generation == 1 and nxt.state is State.CONNECTING
    assert nxt.pending == [(IKE_FRAME, True)]  # the outstanding request is resent
    assert rig.timers.next_due() == 10.0 + RECONNECT_BASE
    rig.timers.run_due(10.0 + RECONNECT_BASE / 2)
    assert rig.pull() == []
    rig.timers.run_due(10.0 + RECONNECT_BASE)
    [connect] = rig.pull()
    assert isinstance(connect, Connect) and connect.generation == 1
    assert connect.local_port == nxt.local_port != 0


def test_backoff_doubles_while_the_reconnects_fail() -> None:
    rig = Rig()
    conn = carrying_ike(rig, rig.open())
    now, delays = 0.0, []
    for _ in range(4):
        conn.handle(Event.LOST)
        assert rig.clients.lost(now, conn, stopping=False)
        conn = rig.conns[conn.conn_id]
        due = rig.timers.next_due()
        assert due is not None
        delays.append(due - now)
        now = due
        rig.timers.run_due(now)
    assert delays == pytest.approx([RECONNECT_BASE * 2**k for k in range(4)])


def test_a_replaced_generation_does_not_connect() -> None:
    rig = Rig()
    conn = carrying_ike(rig, rig.open())
    conn.handle(Event.LOST)
    rig.clients.lost(0.0, conn, stopping=False)
    rig.pull()
    del rig.conns[conn.conn_id]  # closed for good meanwhile
    rig.timers.run_due(60.0)
    assert rig.pull() == []


def test_nothing_reconnects_while_stopping() -> None:
    rig = Rig()
    conn = carrying_ike(rig, rig.open())
    conn.handle(Event.LOST)
    assert not rig.clients.lost(0.0, conn, stopping=True)
    assert rig.conns[conn.conn_id] is conn and rig.timers.next_due() is None
