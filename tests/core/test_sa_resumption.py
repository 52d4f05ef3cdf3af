"""ESP that opens a gateway connection, on its own (tcpencap.core.sa_resumption), with a
real table, real lingering endpoints and charon's inbound SAs from a list-sas answer:
which ESP may open a connection with and without VICI, and the endpoint such a
connection takes over from the SA's old port, at once or once VICI is back."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tcpencap.core.inbound_sas import InboundSas
from tcpencap.core.lingering import Lingering
from tcpencap.core.outputs import Steer
from tcpencap.core.peers import SteeringRefs
from tcpencap.core.rfc9329_conn import Conn, Event
from tcpencap.core.role import Role
from tcpencap.core.router import Router
from tcpencap.core.sa_resumption import SaResumption
from tcpencap.core.table import ConnectionTable
from tcpencap.core.timers import TimerQueue
from tcpencap.wire import rfc9329
from tcpencap.wire.packet import addr_bytes

LOCAL, PEER, OTHER = "198.19.0.2", "198.18.1.2", "198.18.9.9"
PB = addr_bytes(PEER)
SPI = 0xC0FFEE01
OLD_PORT = 40000  # the port charon knows the SA by (the connection before a restart)


def listed(spi: int = SPI, peer: str = PEER, port: int = OLD_PORT) -> list[dict[str, Any]]:
    """A list-sas answer: one IKE SA of ``peer``:``port`` with one inbound CHILD SA."""
    child = {"spi-in": f"{spi:08x}", "spi-out": "beef0001", "state": "INSTALLED"}
    sa = {"remote-host": peer, "remote-port": str(port), "child-sas": {"c-1": child}}
    return [{"c": sa}]


class Rig:
    def __init__(self, sas: list[dict[str, Any]] | None = None) -> None:
        self.router = Router(ConnectionTable(), lambda addr: True)
        self.table = self.router.table
        self.inbound = InboundSas()
        self.inbound.replace(sas if sas is not None else listed())
        self.out: list[Any] = []
        self.lingering = Lingering(SteeringRefs(), self.out.append, TimerQueue())
        self.conns: dict[int, Conn] = {}
        self.res = SaResumption(self.table, self.inbound, self.lingering, self.conns)

    def conn(self, port: int = 50000, peer: str = PEER, opened: bool = True) -> Conn:
        view = self.router.add_gateway_conn(addr_bytes(LOCAL), addr_bytes(peer), port)
        codec = rfc9329.StreamCodec(rfc9329.Role.RESPONDER)
        conn = Conn.new(0.0, view, Role.GATEWAY, codec, LOCAL, peer)
        conn.peer_port = port
        conn.handle(Event.PREFIX)
        if opened:
            conn.handle(Event.FIRST_MESSAGE)
        self.conns[conn.conn_id] = conn
        return conn

    def takes_over(self, conn: Conn, port: int = OLD_PORT) -> bool:
        """The connection is found by the old endpoint, which is steered to it."""
        entry = self.table.by_endpoint(conn.entry.peer, port)
        steered = Steer(conn.entry.peer, True, port) in self.out
        assert (entry is not None and entry.conn_id == conn.conn_id) == steered
        return steered


def test_with_vici_only_an_spi_charon_has_with_this_peer_may_open() -> None:
    rig = Rig()
    assert rig.res.esp_known(SPI, PB, vici_connected=True)
    assert not rig.res.esp_known(SPI + 1, PB, vici_connected=True)  # no such SA
    assert not rig.res.esp_known(SPI, addr_bytes(OTHER), vici_connected=True)  # not its peer


@settings(deadline=None)  # a shared 2-vCPU host: timing is not the rule under test
@given(st.integers(0, 2**32 - 1))
@example(255)
@example(256)
def test_without_vici_any_unreserved_spi_may_open(spi: int) -> None:
    """RFC 4303 §2.1 reserves SPIs 1-255 (and 0): without charon's list, only they fail."""
    rig = Rig(sas=[])
    assert rig.res.esp_known(spi, PB, vici_connected=False) is (spi >= 256)


def test_a_resumed_sa_brings_its_old_endpoint_to_the_new_connection() -> None:
    rig = Rig()
    conn = rig.conn(50000)
    rig.res.resumed(conn, SPI, vici_connected=True)
    assert rig.takes_over(conn) and conn.entry.aliases == [OLD_PORT]
    assert conn.resume_spi == 0


def test_nothing_is_taken_over_when_charon_knows_the_sa_by_this_port() -> None:
    rig = Rig(listed(port=50000))
    conn = rig.conn(50000)
    rig.res.resumed(conn, SPI, vici_connected=True)
    assert rig.out == [] and conn.entry.aliases == []


def test_an_endpoint_another_connection_holds_stays_with_it() -> None:
    rig = Rig()
    holder = rig.conn(OLD_PORT)  # the old connection is still there
    conn = rig.conn(50000)
    rig.res.resumed(conn, SPI, vici_connected=True)
    assert not rig.takes_over(conn) and rig.out == []
    assert rig.table.by_endpoint(PB, OLD_PORT).conn_id == holder.conn_id  # type: ignore[union-attr]


def test_without_vici_the_spi_waits_and_is_resumed_once_vici_is_back() -> None:
    rig = Rig(sas=[])  # VICI down: charon's SAs unknown
    conn = rig.conn(50000)
    rig.res.resumed(conn, SPI, vici_connected=False)
    assert conn.resume_spi == SPI and rig.out == []
    rig.inbound.replace(listed())  # VICI is back, its list-sas answered
    rig.res.resume_pending()
    assert rig.takes_over(conn) and conn.resume_spi == 0
    rig.out.clear()
    rig.res.resume_pending()  # asked once: nothing more
    assert rig.out == []


def test_pending_spis_of_another_peer_or_a_closing_connection_are_dropped() -> None:
    rig = Rig(sas=[])
    stranger = rig.conn(50000, peer=OTHER)  # its ESP is of an SA of another peer
    closing = rig.conn(50001)
    for conn in (stranger, closing):
        rig.res.resumed(conn, SPI, vici_connected=False)
    closing.handle(Event.CLOSE)
    rig.inbound.replace(listed())
    rig.res.resume_pending()
    assert rig.out == [] and (stranger.resume_spi, closing.resume_spi) == (0, 0)
    assert not rig.takes_over(stranger) and not rig.takes_over(closing)
