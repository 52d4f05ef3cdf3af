"""What charon's word about its SAs does here, on its own (tcpencap.core.sa_effects), with
a real table and connections, a timer queue as the clock, and fakes for the engine's
callbacks and for sa_sync's delayed answer: each effect reaches its own callback, an SPI
over the limit is counted on its connection, an old SPI expires after its delay, and
charon's word that an IKE SA exists marks exactly the connections carrying it."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.core.rfc9329_conn import Conn
from tcpencap.core.role import Role
from tcpencap.core.router import Open, Router
from tcpencap.core.sa_effects import SaEffects
from tcpencap.core.sa_sync import ExpireOld, Retire, SpiLimit
from tcpencap.core.table import ConnectionTable
from tcpencap.core.timers import TimerQueue
from tcpencap.wire import rfc9329
from tcpencap.wire.packet import addr_bytes

LOCAL, PEER = "198.19.0.2", "198.18.1.2"
SPI_A = bytes.fromhex("1122334455667788")
SPI_B = bytes.fromhex("99aabbccddeeff00")


class FakeSync:
    """sa_sync's answer when an old SPI's time is up: what it was asked, and what it says."""

    def __init__(self) -> None:
        self.asked: list[tuple[float, int, bytes]] = []
        self.answer: list[Any] = []
        self.clock = lambda: 0.0

    def expire_old(self, conn_id: int, spi: bytes) -> list[Any]:
        self.asked.append((self.clock(), conn_id, spi))
        return self.answer


class Rig:
    """SaEffects with a real table and connections; the engine's callbacks record."""

    def __init__(self) -> None:
        self.router = Router(ConnectionTable(), lambda addr: True)
        self.conns: dict[int, Conn] = {}
        self.timers = TimerQueue()
        self.now = 0.0
        self.sync = FakeSync()
        self.sync.clock = lambda: self.now
        self.max_spis = 4
        self.retired: list[tuple[float, int, str, bool]] = []
        self.opened: list[tuple[float, Open]] = []
        self.fx = SaEffects(
            self.sync,  # type: ignore[arg-type]
            self.router.table,
            self.conns,
            self.timers,
            lambda: self.max_spis,
            lambda now, cid, reason, graceful: self.retired.append((now, cid, reason, graceful)),
            lambda now, eff: self.opened.append((now, eff)),
        )

    def conn(self, port: int = 50000) -> Conn:
        view = self.router.add_gateway_conn(addr_bytes(LOCAL), addr_bytes(PEER), port)
        codec = rfc9329.StreamCodec(rfc9329.Role.RESPONDER)
        conn = Conn.new(0.0, view, Role.GATEWAY, codec, LOCAL, PEER)
        self.conns[conn.conn_id] = conn
        return conn

    def advance_to(self, end: float) -> None:
        while (due := self.timers.next_due()) is not None and due <= end:
            self.now = due
            self.timers.run_due(due)
        self.now = end


def ike_event(*spis: bytes, rekeyed_to: bytes | None = None) -> dict[str, Any]:
    """An ike-updown (or, with ``rekeyed_to``, ike-rekey) event naming these SAs."""
    event: dict[str, Any] = {"up": "yes"}
    for n, spi in enumerate(spis):
        sa = {"initiator-spi": spi.hex(), "remote-host": PEER, "state": "ESTABLISHED"}
        if rekeyed_to is not None:
            sa = {"old": sa, "new": {**sa, "initiator-spi": rekeyed_to.hex()}}
        event[f"sa{n}"] = sa
    return event


def test_retire_and_open_reach_the_engines_callbacks() -> None:
    rig = Rig()
    conn = rig.conn()
    opening = Open(7, addr_bytes(LOCAL), addr_bytes(PEER), b"frame")
    rig.fx.apply(3.0, [Retire(conn.conn_id, "IKE SA deleted", graceful=False), opening])
    assert rig.retired == [(3.0, conn.conn_id, "IKE SA deleted", False)]
    assert rig.opened == [(3.0, opening)]
    rig.fx.apply(4.0, [Retire(conn.conn_id, "gone")])
    assert rig.retired[-1] == (4.0, conn.conn_id, "gone", True)  # graceful unless said


def test_an_spi_over_the_limit_is_counted_on_its_connection_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    conn = rig.conn()
    rig.max_spis = 9  # read when the effect comes (a reload may change it)
    with caplog.at_level(logging.WARNING, logger="tcpencap"):
        rig.fx.apply(1.0, [SpiLimit(conn.conn_id, 0xC0FFEE01), SpiLimit(conn.conn_id, 2)])
        rig.fx.apply(1.0, [SpiLimit(999, 3)])  # a connection already gone: logged only
    assert conn.drops == {"spi-limit": 2}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "c0ffee01" in lines[0] and "max_spis (9)" in lines[0]
    assert rig.retired == [] and rig.opened == []


def test_an_old_spi_expires_after_its_delay_and_what_follows_is_applied() -> None:
    rig = Rig()
    conn = rig.conn()
    rig.sync.answer = [Retire(conn.conn_id, "IKE SA deleted")]
    rig.fx.apply(10.0, [ExpireOld(conn.conn_id, SPI_A, delay=5.0)])
    rig.advance_to(14.9)
    assert rig.sync.asked == [] and rig.retired == []
    rig.advance_to(15.0)
    assert rig.sync.asked == [(15.0, conn.conn_id, SPI_A)]
    assert rig.retired == [(15.0, conn.conn_id, "IKE SA deleted", True)]


def test_charons_word_marks_the_connections_carrying_the_sa() -> None:
    rig = Rig()
    first, second, bare = rig.conn(50000), rig.conn(50001), rig.conn(50002)
    rig.router.table.bind_ike(first.conn_id, SPI_A)
    rig.router.table.bind_ike(second.conn_id, SPI_B)
    rig.fx.mark_sa_seen(ike_event(SPI_A))
    assert (first.sa_seen, second.sa_seen, bare.sa_seen) == (True, False, False)
    rig.fx.mark_sa_seen(ike_event(bytes(range(8))))  # an SA no connection carries
    assert (second.sa_seen, bare.sa_seen) == (False, False)
    rig.fx.mark_sa_seen(ike_event(bytes(range(8)), rekeyed_to=SPI_B))  # a rekey's new SA
    assert second.sa_seen and not bare.sa_seen


def test_a_connection_gone_from_the_engine_is_not_marked() -> None:
    rig = Rig()
    conn = rig.conn()
    rig.router.table.bind_ike(conn.conn_id, SPI_A)
    del rig.conns[conn.conn_id]  # closed, its table entry not yet removed
    rig.fx.mark_sa_seen(ike_event(SPI_A))
    assert not conn.sa_seen


@settings(deadline=None)  # a shared 2-vCPU host: timing is not the rule under test
@given(st.lists(st.sampled_from(["retire", "open", "limit", "expire"]), max_size=25))
def test_every_effect_is_carried_out_once_and_in_order(kinds: list[str]) -> None:
    """Whatever mix charon's events give, each Retire and Open reaches its callback once,
    in the order given; each SpiLimit counts once; each ExpireOld asks once, after its
    delay."""
    rig = Rig()
    conn = rig.conn()
    effects: list[Any] = []
    for n, kind in enumerate(kinds):
        if kind == "retire":
            effects.append(Retire(conn.conn_id, f"r{n}"))
        elif kind == "open":
            effects.append(Open(n, addr_bytes(LOCAL), addr_bytes(PEER), b"f"))
        elif kind == "limit":
            effects.append(SpiLimit(conn.conn_id, n))
        else:
            effects.append(ExpireOld(conn.conn_id, n.to_bytes(8, "big"), delay=1.0 + n))
    rig.fx.apply(0.0, effects)
    assert [r[2] for r in rig.retired] == [e.reason for e in effects if isinstance(e, Retire)]
    assert [o for _, o in rig.opened] == [e for e in effects if isinstance(e, Open)]
    assert conn.drops.get("spi-limit", 0) == kinds.count("limit")
    rig.advance_to(100.0)
    expected = [(e.delay, conn.conn_id, e.spi) for e in effects if isinstance(e, ExpireOld)]
    assert rig.sync.asked == expected
