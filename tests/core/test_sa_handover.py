"""The SAs of a lost gateway connection, on their own (tcpencap.core.sa_handover), with a
real table, real orphans and real connections, the clock as plain numbers: which newer
connection of the pair takes them at once, which waits for its first message, when they
are parked and when a parked set is stale, and that a handover never takes an SPI
another connection holds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.core.orphans import ORPHAN_GRACE, Orphans
from tcpencap.core.rfc9329_conn import Conn, Event
from tcpencap.core.role import Role
from tcpencap.core.router import Router
from tcpencap.core.sa_handover import SaHandover
from tcpencap.core.table import ConnectionTable
from tcpencap.wire import rfc9329
from tcpencap.wire.packet import addr_bytes

LOCAL, PEER = "198.19.0.2", "198.18.1.2"
PAIR = (addr_bytes(LOCAL), addr_bytes(PEER))
SPI_A = bytes.fromhex("1122334455667788")
SPI_B = bytes.fromhex("99aabbccddeeff00")
ESP_A = 0xC0FFEE01


class Rig:
    def __init__(self) -> None:
        self.router = Router(ConnectionTable(), lambda addr: True)
        self.table = self.router.table
        self.orphans = Orphans()
        self.conns: dict[int, Conn] = {}
        self.handover = SaHandover(self.table, self.orphans, self.conns)

    def conn(self, port: int, *, opened_by: bytes | None | str = "", peer: str = PEER) -> Conn:
        """A gateway connection; with ``opened_by`` it is open, its first message IKE of
        that SPI (or ESP for None)."""
        view = self.router.add_gateway_conn(addr_bytes(LOCAL), addr_bytes(peer), port)
        codec = rfc9329.StreamCodec(rfc9329.Role.RESPONDER)
        conn = Conn.new(0.0, view, Role.GATEWAY, codec, LOCAL, peer)
        conn.handle(Event.PREFIX)
        if opened_by != "":
            conn.handle(Event.FIRST_MESSAGE)
            conn.first_spi = opened_by  # type: ignore[assignment]
        self.conns[conn.conn_id] = conn
        return conn

    def carrying(self, port: int, ike: list[bytes], esp: list[int], sa_seen: bool) -> Conn:
        conn = self.conn(port, opened_by=ike[0] if ike else None)
        self.table.bind_all(conn.conn_id, ike, esp)
        conn.sa_seen = sa_seen
        return conn

    def lose(self, now: float, conn: Conn) -> None:
        """What the engine does with a lost connection that carried SAs."""
        self.handover.lost(now, conn)
        del self.conns[conn.conn_id]
        self.router.remove(conn.conn_id)

    def spis(self, conn: Conn) -> tuple[set[bytes], set[int]]:
        return conn.entry.ike_spis, conn.entry.esp_spis


def test_without_a_newer_connection_the_sas_are_parked_for_the_pair() -> None:
    rig = Rig()
    old = rig.carrying(50000, [SPI_A], [ESP_A], sa_seen=True)
    rig.lose(10.0, old)
    orphan = rig.orphans[PAIR]
    assert (orphan.ike, orphan.esp, orphan.sa_seen) == ([SPI_A], [ESP_A], True)
    assert orphan.deadline == 10.0 + ORPHAN_GRACE
    assert rig.table.find_ike_spi(SPI_A) is None  # released from the lost connection


def test_an_open_connection_that_resumed_one_of_the_sas_takes_them_at_once() -> None:
    for first in (SPI_A, None):  # its first message: IKE of the SA, or ESP
        rig = Rig()
        old = rig.carrying(50000, [SPI_A], [ESP_A], sa_seen=True)
        new = rig.conn(50001, opened_by=first)
        rig.lose(10.0, old)
        assert rig.spis(new) == ({SPI_A}, {ESP_A}) and new.sa_seen
        assert rig.orphans == {}


def test_a_connection_that_started_something_else_or_is_not_open_waits() -> None:
    rig = Rig()
    old = rig.carrying(50000, [SPI_A], [ESP_A], sa_seen=False)
    new = rig.conn(50001, opened_by=SPI_B)  # its first message: a new IKE SA
    rig.lose(10.0, old)
    assert rig.spis(new) == (set(), set()) and PAIR in rig.orphans
    rig = Rig()
    old = rig.carrying(50000, [SPI_A], [ESP_A], sa_seen=False)
    quiet = rig.conn(50001)  # no first message yet
    rig.lose(10.0, old)
    assert rig.spis(quiet) == (set(), set()) and PAIR in rig.orphans


def test_the_newest_connection_without_sas_of_its_own_is_the_candidate() -> None:
    rig = Rig()
    old = rig.carrying(50000, [SPI_A], [ESP_A], sa_seen=True)
    older = rig.conn(50001, opened_by=SPI_A)
    newest = rig.conn(50002, opened_by=SPI_A)
    busy = rig.carrying(50003, [SPI_B], [], sa_seen=True)  # newer, but carries its own SA
    other = rig.conn(50004, opened_by=SPI_A, peer="198.18.9.9")  # another pair
    rig.lose(10.0, old)
    assert rig.spis(newest) == ({SPI_A}, {ESP_A})
    assert rig.spis(older) == (set(), set()) and rig.spis(other) == (set(), set())
    assert rig.spis(busy) == ({SPI_B}, set())


def test_a_parked_set_goes_to_the_pairs_first_message_that_resumes_it() -> None:
    rig = Rig()
    old = rig.carrying(50000, [SPI_A], [ESP_A], sa_seen=True)
    rig.lose(10.0, old)
    new = rig.conn(50001, opened_by=None)  # ESP first
    rig.handover.first_message(11.0, new)
    assert rig.spis(new) == ({SPI_A}, {ESP_A}) and new.sa_seen and rig.orphans == {}


def test_a_parked_set_is_stale_after_its_grace_or_for_a_new_sa() -> None:
    rig = Rig()
    rig.lose(10.0, rig.carrying(50000, [SPI_A], [ESP_A], sa_seen=True))
    late = rig.conn(50001, opened_by=SPI_A)
    rig.handover.first_message(10.0 + ORPHAN_GRACE + 0.1, late)
    assert rig.spis(late) == (set(), set()) and not late.sa_seen and rig.orphans == {}
    rig.lose(20.0, rig.carrying(50002, [SPI_A], [ESP_A], sa_seen=True))
    fresh = rig.conn(50003, opened_by=SPI_B)  # IKE_SA_INIT of a new SA: the set is stale
    rig.handover.first_message(21.0, fresh)
    assert rig.spis(fresh) == (set(), set()) and rig.orphans == {}


def test_a_connection_that_already_carries_sas_takes_no_parked_set() -> None:
    rig = Rig()
    rig.lose(10.0, rig.carrying(50000, [SPI_A], [ESP_A], sa_seen=True))
    new = rig.carrying(50001, [], [0xBEEF0001], sa_seen=False)  # ESP first, SA bound
    rig.handover.first_message(11.0, new)
    assert rig.spis(new) == (set(), {0xBEEF0001}) and not new.sa_seen


def test_an_spi_charon_placed_elsewhere_meanwhile_stays_there() -> None:
    rig = Rig()
    rig.lose(10.0, rig.carrying(50000, [SPI_A, SPI_B], [ESP_A], sa_seen=False))
    holder = rig.carrying(50001, [SPI_B], [], sa_seen=True)  # charon's word moved SPI_B
    new = rig.conn(50002, opened_by=SPI_A)
    rig.handover.first_message(11.0, new)
    assert rig.spis(new) == ({SPI_A}, {ESP_A})
    assert rig.table.find_ike_spi(SPI_B).conn_id == holder.conn_id  # type: ignore[union-attr]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["new", "new-esp", "new-other", "first", "lose"]), max_size=25),
)
def test_no_spi_is_lost_or_carried_twice(steps: list[str]) -> None:
    """Whatever connections come and go (all within the grace), the SAs the first
    connection carried are all on one connection or all parked, never split or doubled;
    they are dropped only when a first message starts a new SA."""
    rig = Rig()
    ike, esp = [SPI_A, SPI_B], [ESP_A, ESP_A + 1]
    rig.carrying(50000, ike, esp, sa_seen=True)
    port, now = 50001, 0.0
    for step in steps:
        now += 0.1
        live = sorted(rig.conns)
        if step.startswith("new"):
            first = {"new": SPI_A, "new-esp": None, "new-other": bytes(range(1, 9))}[step]
            rig.conn(port, opened_by=first)
            port += 1
        elif step == "first" and live:
            rig.handover.first_message(now, rig.conns[live[-1]])
        elif step == "lose" and live:
            conn = rig.conns[live[0]]
            if conn.entry.carries_sa:
                rig.lose(now, conn)
            else:
                del rig.conns[conn.conn_id]
                rig.router.remove(conn.conn_id)
        parked = rig.orphans.get(PAIR)
        bound_ike = [s for c in rig.conns.values() for s in c.entry.ike_spis]
        bound_esp = [s for c in rig.conns.values() for s in c.entry.esp_spis]
        assert sum(c.entry.carries_sa for c in rig.conns.values()) <= 1
        if parked is not None:
            assert bound_ike == [] and bound_esp == []
            assert sorted(parked.ike) == sorted(ike) and sorted(parked.esp) == sorted(esp)
        elif bound_ike or bound_esp:
            assert sorted(bound_ike) == sorted(ike) and sorted(bound_esp) == sorted(esp)


def test_a_handover_never_takes_back_charons_word_on_the_new_connection() -> None:
    rig = Rig()
    rig.lose(10.0, rig.carrying(50000, [SPI_A], [ESP_A], sa_seen=False))
    new = rig.conn(50001, opened_by=SPI_A)
    new.sa_seen = True  # charon confirmed the SA before the first message was handled
    rig.handover.first_message(11.0, new)
    assert rig.spis(new) == ({SPI_A}, {ESP_A}) and new.sa_seen
