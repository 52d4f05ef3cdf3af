"""Draining a connection's received frames, on its own (tcpencap.core.frame_drain), with a
real codec, router and connections and fakes for the rest of the engine (the gateway's
door, closing, the rate-limited log): where each kind of frame goes, what is counted,
when the frame-rate budget cuts a connection, and what a data path that sinks ESP
itself is given and gives back."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.core.datapath import PythonDataPath
from tcpencap.core.frame_drain import FrameDrain
from tcpencap.core.outputs import Inject, Output
from tcpencap.core.rfc9329_conn import Conn, Event, State
from tcpencap.core.role import Role
from tcpencap.core.router import Router
from tcpencap.core.table import ConnectionTable
from tcpencap.wire import rfc9329
from tcpencap.wire.ike import NON_ESP_MARKER
from tcpencap.wire.packet import addr_bytes, parse_ip, parse_udp
from tests.core.test_rfc9329_engine import esp, ike

LOCAL, PEER = "198.19.0.2", "198.18.1.2"


class FakeDoor:
    """The gateway's rules for a first message, invalid frames and floods: what it was
    asked; a first message it admits opens the connection, as the real door does."""

    def __init__(self) -> None:
        self.admit = True
        self.asked: list[tuple[str, float, Any]] = []
        self.invalid_frames: list[tuple[float, str]] = []
        self.cut: list[float] = []

    def _first(self, kind: str, now: float, conn: Conn, data: bytes) -> bool:
        self.asked.append((kind, now, data))
        if self.admit:
            conn.handle(Event.FIRST_MESSAGE)
        return self.admit

    def admit_esp(self, now: float, conn: Conn, data: bytes) -> bool:
        return self._first("esp", now, conn, data)

    def admit_ike(self, now: float, conn: Conn, data: bytes) -> bool:
        return self._first("ike", now, conn, data)

    def invalid(self, now: float, conn: Conn, reason: str) -> None:
        self.invalid_frames.append((now, reason))

    def over_rate(self, now: float, conn: Conn) -> None:
        self.cut.append(now)
        conn.handle(Event.CLOSE)  # the real door closes it


class Host:
    """The engine as the drain sees it: a real router and data path, fakes for the rest."""

    def __init__(self, max_frame_rate: int = 1000, datapath: Any = None) -> None:
        self.config = SimpleNamespace(gateway=SimpleNamespace(max_frame_rate=max_frame_rate))
        self.router = Router(ConnectionTable(), lambda addr: True)
        self.datapath = datapath or PythonDataPath()
        self.logged: list[str] = []
        self.door = FakeDoor()
        self.fast = SimpleNamespace(esp_template=lambda view: ("template", view.entry.conn_id))
        self.closed: list[str] = []
        self.out: list[Output] = []
        self.drain = FrameDrain(self, self.out.append)  # type: ignore[arg-type]

    def log_limited(self, now: float, key: str, fmt: str, *args: object) -> None:
        self.logged.append(key)

    def close(self, conn: Conn, reason: str) -> None:
        self.closed.append(reason)
        conn.handle(Event.CLOSE)

    def conn(self, *, prefix: bool = True, opened: bool = True) -> Conn:
        """A gateway connection whose prefix came (and was read), open unless not."""
        view = self.router.add_gateway_conn(addr_bytes(LOCAL), addr_bytes(PEER), 50000)
        codec = rfc9329.StreamCodec(rfc9329.Role.RESPONDER)
        conn = Conn.new(0.0, view, Role.GATEWAY, codec, LOCAL, PEER)
        if prefix:
            codec.receive_data(rfc9329.PREFIX)
            assert isinstance(codec.next_event(), rfc9329.PrefixReceived)
            conn.handle(Event.PREFIX)
            if opened:
                conn.handle(Event.FIRST_MESSAGE)
        return conn

    def receive(self, now: float, conn: Conn, data: bytes) -> None:
        conn.codec.receive_data(data)
        self.drain.drain(now, conn)

    def charon_got(self) -> list[bytes]:
        """The UDP payloads handed to charon, in order."""
        return [
            parse_udp(parse_ip(o.packet).payload).payload for o in self.out if isinstance(o, Inject)
        ]


def frames(*payloads: bytes) -> bytes:
    return b"".join((len(p) + 2).to_bytes(2, "big") + p for p in payloads)


IKE = NON_ESP_MARKER + ike()
ESP = esp(0xC0FFEE01)
KEEPALIVE = b"\xff"
EMPTY = b""  # an invalid frame


def test_the_prefix_moves_an_accepted_connection_on_and_tells_the_data_path() -> None:
    host = Host()
    conn = host.conn(prefix=False)
    host.receive(1.0, conn, rfc9329.PREFIX)
    assert conn.state is State.PREFIX_RECEIVED and host.datapath.epoch == 1
    assert host.out == [] and host.door.asked == []


def test_a_first_message_goes_through_the_door() -> None:
    host = Host()
    conn = host.conn(opened=False)
    host.door.admit = False
    host.receive(1.0, conn, frames(IKE, ESP))
    assert host.door.asked == [("ike", 1.0, ike()), ("esp", 1.0, ESP)]
    assert host.out == [] and conn.state is State.PREFIX_RECEIVED and not conn.got_ike
    assert conn.frames_in == 2  # refused, but received
    host.door.admit = True
    host.receive(2.0, conn, frames(IKE, IKE))  # the door is asked for the first only
    assert host.door.asked[2:] == [("ike", 2.0, ike())]
    assert host.charon_got() == [IKE, IKE] and conn.got_ike


def test_an_open_connections_ike_and_esp_reach_charon_and_are_counted() -> None:
    host = Host()
    conn = host.conn()
    host.receive(1.0, conn, frames(IKE, ESP, ESP))
    assert host.charon_got() == [IKE, ESP, ESP] and host.door.asked == []
    assert (conn.frames_in, conn.esp_frames) == (3, 2)
    assert conn.drops == {}


def test_keepalives_are_counted_and_go_nowhere() -> None:
    host = Host()
    conn = host.conn()
    host.receive(1.0, conn, frames(KEEPALIVE, KEEPALIVE))
    assert conn.drops == {"keepalive": 2} and host.out == [] and conn.frames_in == 0


def test_invalid_frames_go_to_the_door_and_the_log() -> None:
    host = Host()
    conn = host.conn()
    host.receive(1.0, conn, frames(EMPTY, IKE))
    assert host.door.invalid_frames == [(1.0, "invalid-frame")]
    assert host.logged == ["invalid-frame"] and host.charon_got() == [IKE]  # reading goes on


def test_a_frame_no_udp_datagram_can_carry_is_invalid() -> None:
    host = Host()
    conn = host.conn()
    host.receive(1.0, conn, frames(esp(0xC0FFEE01, rfc9329.MAX_FRAME - 2 - 8)))
    assert host.door.invalid_frames == [(1.0, "frame-too-big")]
    assert host.logged == ["frame-too-big"] and host.out == []


def test_a_routers_other_drops_are_counted_on_the_connection() -> None:
    host = Host()
    conn = host.conn()
    del host.router.views[conn.conn_id]  # the router no longer knows the connection
    host.receive(1.0, conn, frames(ESP, IKE))
    assert conn.drops == {"unknown-connection": 2} and host.out == []
    assert host.door.invalid_frames == []


def test_the_peer_closing_or_breaking_the_framing_closes() -> None:
    host = Host()
    conn = host.conn()
    host.receive(1.0, conn, frames(IKE))
    conn.codec.receive_data(b"")  # EOF
    host.drain.drain(1.0, conn)
    assert host.closed == ["peer closed the connection"] and host.charon_got() == [IKE]
    broken = host.conn()
    host.receive(1.0, broken, b"\x00\x01")  # a frame length below its own two octets
    assert host.closed[1] == "protocol error: frame length 1"
    assert broken.drops == {"protocol-error": 1}


def test_a_closing_connection_is_not_read() -> None:
    host = Host()
    conn = host.conn()
    conn.handle(Event.CLOSE)
    host.receive(1.0, conn, frames(IKE, ESP))
    assert host.out == [] and conn.codec.frames_in == 0


def test_frames_over_the_rate_cut_the_connection_but_vouched_esp_does_not_count() -> None:
    host = Host(max_frame_rate=3)
    conn = host.conn()
    host.receive(1.0, conn, frames(IKE, IKE, IKE, IKE, IKE))
    assert host.door.cut == [1.0] and host.charon_got() == [IKE] * 3
    host = Host(max_frame_rate=3)
    stranger = host.conn()  # ESP of an SA charon has not vouched for counts
    host.receive(1.0, stranger, frames(*[ESP] * 5))
    assert host.door.cut == [1.0] and len(host.charon_got()) == 3
    host = Host(max_frame_rate=3)
    tunnel = host.conn()
    tunnel.sa_seen = True
    host.receive(1.0, tunnel, frames(*[ESP] * 50, IKE, IKE))
    assert host.door.cut == [] and len(host.charon_got()) == 52
    host.config.gateway.max_frame_rate = 1  # read at each drain: a reload may change it
    host.receive(2.0, tunnel, frames(IKE, IKE))
    assert host.door.cut == [2.0]


KINDS = {"ike": IKE, "esp": ESP, "keepalive": KEEPALIVE, "invalid": EMPTY}


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.sampled_from(sorted(KINDS)), max_size=30),
    st.integers(1, 20),
    st.booleans(),
)
def test_what_reaches_charon_follows_the_frame_rate_rule(
    kinds: list[str], rate: int, vouched: bool
) -> None:
    """Whatever frames arrive in one drain, those before the frame that goes over the
    budget are handled (IKE and ESP to charon, keepalives counted, invalid ones to the
    door), and that frame cuts the connection; ESP counts only until charon vouches."""
    host = Host(max_frame_rate=rate)
    conn = host.conn()
    conn.sa_seen = vouched
    host.receive(1.0, conn, frames(*(KINDS[k] for k in kinds)))
    counted, handled = 0, []
    for k in kinds:
        counted += not (vouched and k == "esp")
        if counted > rate:
            break
        handled.append(k)
    assert host.door.cut == ([1.0] if len(handled) < len(kinds) else [])
    assert host.charon_got() == [KINDS[k] for k in handled if k in ("ike", "esp")]
    assert conn.drops.get("keepalive", 0) == handled.count("keepalive")
    assert len(host.door.invalid_frames) == handled.count("invalid")


class SinkingPath(PythonDataPath):
    """A data path that sinks an open connection's ESP itself (as the native one does):
    what it was given to sink with, and a scripted count of frames it took."""

    sinks_esp = True

    def __init__(self, esp: int, kept: int) -> None:
        super().__init__()
        self.script = [(esp, kept)]
        self.given: list[Any] = []

    def read(self, codec: Any, esp_to: Any) -> tuple[Any, int, int]:
        self.given.append(esp_to)
        esp, kept = self.script.pop() if self.script else (0, 0)
        return codec.next_event(), esp, kept


def test_a_data_path_that_sinks_esp_is_given_an_open_connections_template() -> None:
    path = SinkingPath(esp=7, kept=2)
    host = Host(datapath=path)
    conn = host.conn()
    host.receive(1.0, conn, frames(IKE))
    assert path.given == [("template", conn.conn_id)] * 2  # the IKE, then NeedData
    assert (conn.frames_in, conn.esp_frames) == (8, 7) and conn.drops == {"keepalive": 2}
    waiting = host.conn(opened=False)  # not open: its ESP is the door's, not the path's
    host.door.admit = False
    host.receive(2.0, waiting, frames(ESP))
    assert path.given[2:] == [None, None]
    gone = host.conn()
    del host.router.views[gone.conn_id]  # no view, nothing to build packets from
    host.receive(3.0, gone, frames(ESP))
    assert path.given[4:] == [None, None]
