"""The IKE guard's shell (tcpencap/aio/ike_guard.py) with a fake daemon: which SPIs count as a
TCP peer's (charon's word and the engines' tables), the verdict on charon's IKE to an
unsteered address, and where a drop is counted and logged (the engine's shell_dropped)."""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace
from typing import Any

from tcpencap.aio.ike_guard import IkeGuard, packet_dst
from tcpencap.core.table import ConnectionTable
from tcpencap.wire.packet import addr_bytes, build_udp_packet

CLIENT, GW, MOVED = "198.18.1.2", "198.19.0.2", "198.19.5.5"
SPI_TCP = bytes.fromhex("1111111111111111")
SPI_UDP = bytes.fromhex("2222222222222222")


def ike(spi_i: bytes, dst: str = MOVED, port: int = 4500) -> bytes:
    """charon's IKEv2 INFORMATIONAL (MOBIKE's address check) of SA ``spi_i``, as UDP."""
    header = spi_i + bytes(8) + struct.pack("!BBBBII", 46, 0x20, 37, 0x08, 2, 28)
    body = (b"\x00\x00\x00\x00" if port == 4500 else b"") + header
    return build_udp_packet(addr_bytes(CLIENT), addr_bytes(dst), port, port, body)


class FakeEngine:
    """The two things the guard reads of the RFC 9329 engine, and the one it calls."""

    def __init__(self) -> None:
        self.table = ConnectionTable()
        self.steering = SimpleNamespace(peers=lambda: [addr_bytes(GW)])
        self.dropped: list[tuple[int, str]] = []

    def shell_dropped(self, conn_id: int, reason: str, n: int = 1) -> None:
        self.dropped += [(conn_id, reason)] * n


class FakeDaemon:
    def __init__(self, transports: tuple[str, ...] = ("tcp",)) -> None:
        self.config = SimpleNamespace(
            connections={f"c{i}": SimpleNamespace(transport=t) for i, t in enumerate(transports)},
            ike_guard_queue=7,
        )
        self.rules = SimpleNamespace(classify=None)
        self.engine = FakeEngine()
        self.ctcp: Any = None
        self.logged: list[tuple[str, tuple[object, ...]]] = []
        self.sas: list[dict[str, Any]] | None = []

    def _spawn(self, coro: Any) -> None:
        coro.close()

    async def _list_sas(self, purpose: str) -> list[dict[str, Any]] | None:
        return self.sas

    def log_limited(self, key: str, fmt: str, *args: object) -> None:
        self.logged.append((key, args))


def sa(spi: bytes, remote: str) -> dict[str, Any]:
    return {"c0": {"initiator-spi": spi.hex(), "remote-host": remote}}


def test_it_is_wanted_while_any_connection_may_use_tcp() -> None:
    assert IkeGuard(FakeDaemon(("udp", "tcp"))).wanted()
    assert IkeGuard(FakeDaemon(("udp", "fallback"))).wanted()
    assert not IkeGuard(FakeDaemon(("udp",))).wanted()
    assert not IkeGuard(FakeDaemon(())).wanted()


def test_ike_of_a_tcp_peers_sa_to_an_unsteered_address_is_dropped_and_counted() -> None:
    d = FakeDaemon()
    guard = IkeGuard(d)
    guard.tcp_ike = {SPI_TCP}
    assert guard.may_leave(ike(SPI_TCP)) is False
    assert d.engine.dropped == [(0, "ike-off-tcp")]  # the host's drops: no connection
    [(key, args)] = d.logged
    assert key == "ike-off-tcp" and args == (MOVED,)


def test_ike_of_a_udp_sa_and_what_is_not_ike_may_leave() -> None:
    d = FakeDaemon()
    guard = IkeGuard(d)
    guard.tcp_ike = {SPI_TCP}
    assert guard.may_leave(ike(SPI_UDP)) is True
    assert guard.may_leave(ike(SPI_UDP, port=500)) is True
    assert guard.may_leave(b"\x45garbage") is True  # not IKE: not the guard's to judge
    assert d.engine.dropped == [] and d.logged == []


def test_an_sa_the_engines_tables_know_is_a_tcp_peers_sa() -> None:
    d = FakeDaemon()
    guard = IkeGuard(d)
    assert not guard.is_tcp_sa(SPI_TCP)
    entry = d.engine.table.add(addr_bytes(CLIENT), addr_bytes(GW))
    d.engine.table.bind_ike(entry.conn_id, SPI_TCP)
    assert guard.is_tcp_sa(SPI_TCP)
    assert guard.may_leave(ike(SPI_TCP)) is False
    # and a cTCP engine's table as well
    ctcp_table = ConnectionTable()
    d.ctcp = SimpleNamespace(engine=SimpleNamespace(table=ctcp_table), peers={}, lingering=())
    assert not guard.is_tcp_sa(SPI_UDP)
    centry = ctcp_table.add(addr_bytes(CLIENT), addr_bytes(GW))
    ctcp_table.bind_ike(centry.conn_id, SPI_UDP)
    assert guard.is_tcp_sa(SPI_UDP)


def test_charons_sas_with_tcp_peers_are_learned_and_others_are_not() -> None:
    d = FakeDaemon()
    d.sas = [sa(SPI_TCP, GW), sa(SPI_UDP, "198.19.9.9")]
    guard = IkeGuard(d)
    asyncio.run(guard.learn())
    assert guard.tcp_ike == {SPI_TCP}
    d.sas = None  # charon cannot be asked: what was learned stays
    asyncio.run(guard.learn())
    assert guard.tcp_ike == {SPI_TCP}


def test_ctcp_peers_and_lingering_endpoints_are_tcp_peers() -> None:
    d = FakeDaemon()
    d.ctcp = SimpleNamespace(
        peers={addr_bytes("198.19.1.1"): 10000}, lingering={addr_bytes("198.19.1.2")}
    )
    assert IkeGuard(d).tcp_peers() == {addr_bytes(a) for a in (GW, "198.19.1.1", "198.19.1.2")}


def test_packet_dst_names_the_destination_or_a_question_mark() -> None:
    assert packet_dst(ike(SPI_TCP)) == MOVED
    assert packet_dst(b"\x45") == "?"
