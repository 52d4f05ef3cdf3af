"""What the accelerated data path reports, on its own (tcpencap.core.fast_path), with a
real router and connections and fakes for the rest of the engine: hits counted or
stale, where a connection's ESP goes, which connections are lent (and at what rate), and
what a lent connection's reports do."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tcpencap.core.datapath import EspTemplate, PythonDataPath
from tcpencap.core.fast_path import FastPath
from tcpencap.core.outputs import Inject, Output, Transmit
from tcpencap.core.rfc9329_conn import LEND_AFTER_FRAMES, Conn, Event, State
from tcpencap.core.role import Role
from tcpencap.core.router import Router
from tcpencap.core.table import ConnectionTable
from tcpencap.wire import rfc9329
from tcpencap.wire.packet import addr_bytes, parse_ip, parse_udp

LOCAL, PEER = "198.19.0.2", "198.18.1.2"
ESP = (0x1234).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"e" * 40


TO_OPEN = {
    Role.CLIENT: (Event.CONNECTED,),
    Role.GATEWAY: (Event.PREFIX, Event.FIRST_MESSAGE),
}


class LendingPath(PythonDataPath):
    """The reference path, but one that lends (as the native one does): what it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.lent: list[tuple[Any, EspTemplate, int]] = []

    def lend(self, codec: Any, esp_to: EspTemplate, max_rate: int) -> tuple[Any, ...] | None:
        self.lent.append((codec, esp_to, max_rate))
        return (codec, *esp_to, max_rate)


class Rig:
    """A FastPath whose host has a real router and connections; the frame drain and the
    gateway's door are fakes that record what they are asked."""

    def __init__(self) -> None:
        self.router = Router(ConnectionTable(), lambda addr: True)
        self.conns: dict[int, Conn] = {}
        self.drained: list[Conn] = []
        self.cut: list[Conn] = []
        self.out: list[Output] = []
        self.config = SimpleNamespace(gateway=SimpleNamespace(max_frame_rate=500))
        self.datapath = LendingPath()
        self.frames = SimpleNamespace(drain=lambda now, conn: self.drained.append(conn))
        self.door = SimpleNamespace(over_rate=lambda now, conn: self.cut.append(conn))
        self.fast = FastPath(self, self.out.append)  # type: ignore[arg-type]

    def conn(self, side: Role, state: State = State.OPEN, port: int = 50000) -> Conn:
        local, peer = addr_bytes(LOCAL), addr_bytes(PEER)
        if side is Role.GATEWAY:
            view = self.router.add_gateway_conn(local, peer, port)
        else:
            view = self.router.add_client_conn(local, peer)
        codec = rfc9329.StreamCodec(rfc9329.Role.RESPONDER)
        conn = Conn.new(0.0, view, side, codec, LOCAL, PEER)
        for event in TO_OPEN[side]:  # by the connection's table, as the engine moves it
            conn.handle(event)
        if state is State.CLOSING:
            conn.handle(Event.CLOSE)
        self.conns[conn.conn_id] = conn
        return conn


def test_hits_of_open_connections_are_sent_and_counted() -> None:
    rig = Rig()
    conn = rig.conn(Role.CLIENT)
    rig.fast.hits([(conn.conn_id, b"x" * 100, 3)])
    [sent] = rig.out
    assert isinstance(sent, Transmit)
    assert (sent.conn_id, sent.data, sent.is_ike, sent.frames) == (
        conn.conn_id,
        b"x" * 100,
        False,
        3,
    )
    assert (conn.frames_out, conn.bytes_out) == (3, 100)


def test_hits_of_a_closing_or_gone_connection_are_stale() -> None:
    rig = Rig()
    closing = rig.conn(Role.CLIENT, State.CLOSING)
    rig.fast.hits([(closing.conn_id, b"x", 1), (999, b"y", 1)])
    assert rig.out == [] and rig.router.drops == {"flow-stale": 2}
    assert closing.frames_out == 0


def test_the_esp_template_is_what_the_router_injects() -> None:
    """The native path builds the packets itself: they must be the router's, to the port."""
    rig = Rig()
    for conn in (rig.conn(Role.GATEWAY), rig.conn(Role.CLIENT)):
        res = rig.router.inbound_esp(conn.conn_id, ESP)
        assert isinstance(res, Inject)
        ip = parse_ip(res.packet)
        udp = parse_udp(ip.payload)
        src, dst, sport, dport = rig.fast.esp_template(rig.router.views[conn.conn_id])
        assert (src, dst, sport, dport) == (ip.src, ip.dst, udp.sport, udp.dport)
        assert udp.payload == ESP


def lendable(conn: Conn) -> Conn:
    conn.frames_in = LEND_AFTER_FRAMES
    conn.sa_seen = True
    return conn


def test_only_a_lendable_connection_is_lent_and_a_gateway_keeps_its_rate() -> None:
    rig = Rig()
    gw, client = lendable(rig.conn(Role.GATEWAY)), lendable(rig.conn(Role.CLIENT))
    young = rig.conn(Role.CLIENT)  # too few frames yet
    without_sa = rig.conn(Role.GATEWAY, port=50001)
    without_sa.frames_in = LEND_AFTER_FRAMES
    assert rig.fast.lend_args(young.conn_id) is None
    assert rig.fast.lend_args(without_sa.conn_id) is None
    assert rig.fast.lend_args(999) is None
    assert rig.fast.lend_args(gw.conn_id) is not None
    assert rig.fast.lend_args(client.conn_id) is not None
    rates = [(codec, rate) for codec, _, rate in rig.datapath.lent]
    assert rates == [(gw.codec, 500), (client.codec, 0)]


def test_a_connection_gone_from_the_router_is_not_lent() -> None:
    rig = Rig()
    conn = lendable(rig.conn(Role.CLIENT))
    rig.router.remove(conn.conn_id)
    assert rig.fast.lend_args(conn.conn_id) is None


@given(
    st.tuples(st.integers(0, 1000), st.integers(0, 10**6), st.integers(0, 100)),
    st.integers(0, 50),
    st.booleans(),
    st.booleans(),
)
def test_lent_reads_count_as_the_engines_and_route_what_follows(
    counts: tuple[int, int, int], keepalives: int, drain: bool, over_rate: bool
) -> None:
    rig = Rig()
    conn = rig.conn(Role.GATEWAY)
    rig.fast.received(1.0, conn, (*counts, keepalives), drain, over_rate)
    frames, nbytes, reads = counts
    assert (conn.frames_in, conn.esp_frames, conn.bytes_in, conn.reads_in) == (
        frames,
        frames,
        nbytes,
        reads,
    )
    assert conn.drops.get("keepalive", 0) == keepalives
    assert rig.cut == ([conn] if over_rate else [])  # the rate cut wins over a drain
    assert rig.drained == ([conn] if drain and not over_rate else [])


def test_a_closing_connection_is_counted_but_neither_cut_nor_drained() -> None:
    rig = Rig()
    conn = rig.conn(Role.GATEWAY)
    conn.handle(Event.CLOSE)
    rig.fast.received(1.0, conn, (2, 200, 1), True, True)
    assert conn.frames_in == 2 and rig.cut == [] and rig.drained == []


def test_native_writes_count_as_the_engines() -> None:
    rig = Rig()
    conn = rig.conn(Role.CLIENT)
    rig.fast.sent(conn.conn_id, 5, 500, 2, 0)
    rig.fast.sent(999, 5, 500, 2, 0)  # gone meanwhile: nothing to count on
    assert (conn.frames_out, conn.bytes_out, conn.drops) == (5, 500, {"esp-congested": 2})
