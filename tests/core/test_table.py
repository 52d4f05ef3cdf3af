"""Tests for the connection table: lookups, SPI binding rules and index hygiene.

The stateful test drives the table with random operation sequences and compares every
lookup with a deliberately naive model (plain dicts and lists), so a stale index entry or an
SPI silently moved between connections shows up as a disagreement.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from tcpencap.core.table import DEFAULT_MAX_SPIS, Bind, ConnectionTable
from tcpencap.wire.packet import addr_bytes

L4 = addr_bytes("198.18.0.1")
P4 = addr_bytes("198.19.0.2")
P4B = addr_bytes("198.19.0.3")
L6 = addr_bytes("fd00::1")
P6 = addr_bytes("fd00:1::2")

SPI_A = bytes.fromhex("0102030405060708")
SPI_B = bytes.fromhex("1112131415161718")
SPI_C = bytes.fromhex("2122232425262728")

EMPTY = {"connections": 0, "ike": 0, "esp": 0, "endpoint": 0, "pair": 0, "ike_spi": 0}


def remove_all(table: ConnectionTable) -> None:
    for entry in list(table):
        assert table.remove(entry.conn_id) is entry


# --- connections ------------------------------------------------------------------------


def test_add_get_remove_leaves_nothing():
    table = ConnectionTable()
    a = table.add(L4, P4, 4500)
    b = table.add(L6, P6)
    assert len(table) == 2
    assert table.get(a.conn_id) is a and table.get(b.conn_id) is b
    assert a.conn_id != b.conn_id
    assert a.pair == (L4, P4) and b.pair == (L6, P6)
    assert not a.carries_sa
    assert table.index_sizes() == {
        "connections": 2,
        "ike": 0,
        "esp": 0,
        "endpoint": 1,
        "pair": 2,
        "ike_spi": 0,
    }
    assert table.remove(a.conn_id) is a
    assert table.get(a.conn_id) is None
    assert table.remove(a.conn_id) is None  # second removal is harmless
    assert table.remove(b.conn_id) is b
    assert len(table) == 0
    assert table.index_sizes() == EMPTY


def test_ids_are_never_reused():
    table = ConnectionTable()
    first = table.add(L4, P4).conn_id
    table.remove(first)
    assert table.add(L4, P4).conn_id != first


def test_remove_drops_all_spis_of_both_sets():
    table = ConnectionTable()
    e = table.add(L4, P4, 4500)
    assert table.bind_ike(e.conn_id, SPI_A) is Bind.NEW
    assert table.rekey_ike(e.conn_id, SPI_A, SPI_B) is Bind.NEW
    for spi in (1, 2, 3):
        assert table.bind_esp(e.conn_id, spi) is Bind.NEW
    assert e.carries_sa
    assert table.index_sizes()["ike"] == 2 and table.index_sizes()["esp"] == 3
    table.remove(e.conn_id)
    assert table.index_sizes() == EMPTY
    assert table.lookup_ike(L4, P4, SPI_A) is None
    assert table.lookup_ike(L4, P4, SPI_B) is None
    assert table.lookup_esp(L4, P4, 1) is None


def test_iteration_is_a_snapshot():
    table = ConnectionTable()
    entries = [table.add(L4, P4) for _ in range(3)]
    for entry in table:  # removing while iterating must be safe
        table.remove(entry.conn_id)
    assert len(table) == 0
    assert {e.conn_id for e in entries} == {1, 2, 3}
    assert table.index_sizes() == EMPTY


# --- endpoint and pair ----------------------------------------------------------------


def test_by_endpoint():
    table = ConnectionTable()
    e = table.add(L4, P4, 4500)
    f = table.add(L4, P4B, 4500)
    g = table.add(L4, P4)  # no port: not in the endpoint index
    assert table.by_endpoint(P4, 4500) is e
    assert table.by_endpoint(P4B, 4500) is f
    assert table.by_endpoint(P4, 500) is None
    assert table.by_endpoint(P4, 0) is None
    table.remove(e.conn_id)
    assert table.by_endpoint(P4, 4500) is None
    table.remove(g.conn_id)
    table.remove(f.conn_id)
    assert table.index_sizes() == EMPTY


def test_endpoint_taken_over_by_newer_connection():
    table = ConnectionTable()
    old = table.add(L4, P4, 4500)
    new = table.add(L4, P4, 4500)
    assert table.by_endpoint(P4, 4500) is new
    # Removing the older one must not drop the newer one's endpoint.
    table.remove(old.conn_id)
    assert table.by_endpoint(P4, 4500) is new
    table.remove(new.conn_id)
    assert table.index_sizes() == EMPTY


def test_newest_for_pair_after_removals():
    table = ConnectionTable()
    a = table.add(L4, P4)
    b = table.add(L4, P4)
    c = table.add(L4, P4)
    other = table.add(L4, P4B)
    assert table.newest_for_pair(L4, P4) is c
    assert table.for_pair(L4, P4) == [a, b, c]
    assert table.newest_for_pair(L4, P4B) is other
    assert table.newest_for_pair(P4, L4) is None  # direction matters
    table.remove(c.conn_id)
    assert table.newest_for_pair(L4, P4) is b
    table.remove(a.conn_id)
    assert table.newest_for_pair(L4, P4) is b
    assert table.for_pair(L4, P4) == [b]
    table.remove(b.conn_id)
    assert table.newest_for_pair(L4, P4) is None
    assert table.for_pair(L4, P4) == []
    assert table.index_sizes()["pair"] == 1
    table.remove(other.conn_id)
    assert table.index_sizes() == EMPTY


def test_ipv4_and_ipv6_pairs_are_distinct():
    table = ConnectionTable()
    v4 = table.add(L4, P4, 4500)
    v6 = table.add(L6, P6, 4500)
    assert len(L6) == 16 and len(L4) == 4
    assert table.by_endpoint(P6, 4500) is v6
    assert table.newest_for_pair(L6, P6) is v6
    assert table.bind_ike(v4.conn_id, SPI_A) is Bind.NEW
    assert table.bind_ike(v6.conn_id, SPI_A) is Bind.NEW  # other pair: no conflict
    assert table.bind_esp(v4.conn_id, 7) is Bind.NEW
    assert table.bind_esp(v6.conn_id, 7) is Bind.NEW
    assert table.lookup_ike(L4, P4, SPI_A) is v4
    assert table.lookup_ike(L6, P6, SPI_A) is v6
    assert table.lookup_esp(L6, P6, 7) is v6
    assert table.lookup_esp(L4, P4, 7) is v4
    assert table.lookup_ike(L6, P4, SPI_A) is None
    remove_all(table)
    assert table.index_sizes() == EMPTY


# --- IKE ------------------------------------------------------------------------------


def test_ike_lookup_key_is_local_peer_spi():
    table = ConnectionTable()
    e = table.add(L4, P4)
    assert table.lookup_ike(L4, P4, SPI_A) is None
    assert table.bind_ike(e.conn_id, SPI_A) is Bind.NEW
    assert table.bind_ike(e.conn_id, SPI_A) is Bind.ALREADY
    assert table.lookup_ike(L4, P4, SPI_A) is e
    assert table.lookup_ike(P4, L4, SPI_A) is None
    assert table.lookup_ike(L4, P4B, SPI_A) is None
    assert table.lookup_ike(L4, P4, SPI_B) is None
    assert e.ike_spis == {SPI_A}


def test_ike_unknown_connection():
    table = ConnectionTable()
    assert table.bind_ike(99, SPI_A) is Bind.UNKNOWN
    assert table.rekey_ike(99, SPI_A, SPI_B) is Bind.UNKNOWN
    assert table.move_ike(99, SPI_A) is Bind.UNKNOWN
    assert table.unbind_ike(99, SPI_A) is False
    assert table.index_sizes() == EMPTY


def test_rekey_keeps_old_spi_until_unbound():
    table = ConnectionTable()
    e = table.add(L6, P6, 4500)
    table.bind_ike(e.conn_id, SPI_A)
    assert table.rekey_ike(e.conn_id, SPI_A, SPI_B) is Bind.NEW
    assert e.ike_spis == {SPI_B}
    assert e.ike_spis_old == {SPI_A}
    # The DELETE for the old IKE SA still reaches the same connection.
    assert table.lookup_ike(L6, P6, SPI_A) is e
    assert table.lookup_ike(L6, P6, SPI_B) is e
    assert table.unbind_ike(e.conn_id, SPI_A) is True
    assert table.unbind_ike(e.conn_id, SPI_A) is False
    assert table.lookup_ike(L6, P6, SPI_A) is None
    assert table.lookup_ike(L6, P6, SPI_B) is e
    assert e.ike_spis_old == set()
    # A second rekey.
    assert table.rekey_ike(e.conn_id, SPI_B, SPI_C) is Bind.NEW
    assert e.ike_spis == {SPI_C} and e.ike_spis_old == {SPI_B}
    table.remove(e.conn_id)
    assert table.index_sizes() == EMPTY


def test_rekey_of_unbound_old_spi_just_binds_new():
    table = ConnectionTable()
    e = table.add(L4, P4)
    assert table.rekey_ike(e.conn_id, SPI_A, SPI_B) is Bind.NEW
    assert e.ike_spis == {SPI_B} and e.ike_spis_old == set()
    assert table.lookup_ike(L4, P4, SPI_A) is None


def test_rekey_does_not_touch_another_connections_spi():
    table = ConnectionTable()
    a = table.add(L4, P4)
    b = table.add(L4, P4)
    table.bind_ike(a.conn_id, SPI_A)
    table.bind_ike(a.conn_id, SPI_C)
    assert table.rekey_ike(b.conn_id, SPI_A, SPI_B) is Bind.NEW
    assert a.ike_spis == {SPI_A, SPI_C} and a.ike_spis_old == set()
    assert table.lookup_ike(L4, P4, SPI_A) is a
    # New SPI held by another connection: refused, stays there.
    assert table.rekey_ike(b.conn_id, SPI_B, SPI_C) is Bind.CONFLICT
    assert table.lookup_ike(L4, P4, SPI_C) is a
    assert SPI_C not in b.ike_spis | b.ike_spis_old
    remove_all(table)
    assert table.index_sizes() == EMPTY


def test_ike_conflict_never_moves():
    table = ConnectionTable()
    a = table.add(L4, P4, 4500)
    b = table.add(L4, P4, 4501)
    assert table.bind_ike(a.conn_id, SPI_A) is Bind.NEW
    assert table.bind_ike(b.conn_id, SPI_A) is Bind.CONFLICT
    assert table.lookup_ike(L4, P4, SPI_A) is a
    assert b.ike_spis == set()
    # Unbinding through the wrong connection does nothing either.
    assert table.unbind_ike(b.conn_id, SPI_A) is False
    assert table.lookup_ike(L4, P4, SPI_A) is a
    assert a.ike_spis == {SPI_A}
    # An old-set SPI is protected the same way.
    table.rekey_ike(a.conn_id, SPI_A, SPI_B)
    assert table.bind_ike(b.conn_id, SPI_A) is Bind.CONFLICT
    assert table.lookup_ike(L4, P4, SPI_A) is a
    remove_all(table)
    assert table.index_sizes() == EMPTY


def test_move_ike_moves():
    table = ConnectionTable()
    a = table.add(L4, P4)
    b = table.add(L4, P4)
    table.bind_ike(a.conn_id, SPI_A)
    table.rekey_ike(a.conn_id, SPI_A, SPI_B)  # SPI_A now in a's old set
    assert table.move_ike(b.conn_id, SPI_A) is Bind.NEW
    assert table.lookup_ike(L4, P4, SPI_A) is b
    assert SPI_A not in a.ike_spis | a.ike_spis_old
    assert b.ike_spis == {SPI_A}
    assert table.move_ike(b.conn_id, SPI_A) is Bind.ALREADY
    assert table.move_ike(b.conn_id, SPI_B) is Bind.NEW
    assert a.ike_spis == set() and not a.carries_sa
    assert table.move_ike(b.conn_id, SPI_C) is Bind.NEW  # unbound: plain bind
    assert table.index_sizes()["ike"] == 3
    table.remove(a.conn_id)
    assert table.lookup_ike(L4, P4, SPI_A) is b  # removing the loser keeps b's SPIs
    table.remove(b.conn_id)
    assert table.index_sizes() == EMPTY


# --- ESP ------------------------------------------------------------------------------


def test_esp_bind_lookup_unbind():
    table = ConnectionTable()
    e = table.add(L4, P4)
    assert table.lookup_esp(L4, P4, 0xC0FFEE) is None
    assert table.bind_esp(e.conn_id, 0xC0FFEE) is Bind.NEW
    assert table.bind_esp(e.conn_id, 0xC0FFEE) is Bind.ALREADY
    assert table.lookup_esp(L4, P4, 0xC0FFEE) is e
    assert table.lookup_esp(P4, L4, 0xC0FFEE) is None
    assert e.esp_spis == {0xC0FFEE}
    assert table.unbind_esp(e.conn_id, 0xC0FFEE) is True
    assert table.unbind_esp(e.conn_id, 0xC0FFEE) is False
    assert table.lookup_esp(L4, P4, 0xC0FFEE) is None
    assert table.bind_esp(99, 1) is Bind.UNKNOWN
    assert table.unbind_esp(99, 1) is False
    assert table.move_esp(99, 1) is Bind.UNKNOWN
    table.remove(e.conn_id)
    assert table.index_sizes() == EMPTY


def test_esp_default_limit_is_16():
    table = ConnectionTable()
    assert table.max_spis == DEFAULT_MAX_SPIS == 16
    e = table.add(L4, P4)
    for spi in range(1, 17):
        assert table.bind_esp(e.conn_id, spi) is Bind.NEW
    assert table.bind_esp(e.conn_id, 17) is Bind.LIMIT
    assert table.lookup_esp(L4, P4, 17) is None
    assert len(e.esp_spis) == 16
    assert table.bind_esp(e.conn_id, 16) is Bind.ALREADY  # still recognised when full
    # Freeing one makes room again.
    assert table.unbind_esp(e.conn_id, 1)
    assert table.bind_esp(e.conn_id, 17) is Bind.NEW
    table.remove(e.conn_id)
    assert table.index_sizes() == EMPTY


def test_esp_limit_configurable_and_per_connection():
    table = ConnectionTable(max_spis=2)
    a = table.add(L4, P4)
    b = table.add(L4, P4)
    assert table.bind_esp(a.conn_id, 1) is Bind.NEW
    assert table.bind_esp(a.conn_id, 2) is Bind.NEW
    assert table.bind_esp(a.conn_id, 3) is Bind.LIMIT
    assert table.bind_esp(b.conn_id, 3) is Bind.NEW  # b has its own budget
    assert table.bind_esp(b.conn_id, 4) is Bind.NEW
    assert table.bind_esp(b.conn_id, 5) is Bind.LIMIT
    remove_all(table)
    assert table.index_sizes() == EMPTY


def test_esp_conflict_never_moves():
    table = ConnectionTable()
    a = table.add(L6, P6)
    b = table.add(L6, P6)
    assert table.bind_esp(a.conn_id, 42) is Bind.NEW
    assert table.bind_esp(b.conn_id, 42) is Bind.CONFLICT
    assert table.unbind_esp(b.conn_id, 42) is False
    assert table.lookup_esp(L6, P6, 42) is a
    assert b.esp_spis == set() and a.esp_spis == {42}


def test_move_esp_moves():
    table = ConnectionTable()
    a = table.add(L4, P4)
    b = table.add(L4, P4)
    table.bind_esp(a.conn_id, 42)
    table.bind_esp(a.conn_id, 43)
    assert table.move_esp(b.conn_id, 42) is Bind.NEW
    assert table.lookup_esp(L4, P4, 42) is b
    assert a.esp_spis == {43} and b.esp_spis == {42}
    assert table.move_esp(b.conn_id, 42) is Bind.ALREADY
    assert table.move_esp(b.conn_id, 44) is Bind.NEW  # unbound: plain bind
    assert table.index_sizes()["esp"] == 3
    remove_all(table)
    assert table.index_sizes() == EMPTY


def test_move_esp_into_full_connection_keeps_old_owner():
    table = ConnectionTable(max_spis=1)
    a = table.add(L4, P4)
    b = table.add(L4, P4)
    table.bind_esp(a.conn_id, 42)
    table.bind_esp(b.conn_id, 7)
    assert table.move_esp(b.conn_id, 42) is Bind.LIMIT
    # Refused moves must not lose the SPI: it stays routed to its old owner.
    assert table.lookup_esp(L4, P4, 42) is a
    assert a.esp_spis == {42} and b.esp_spis == {7}
    remove_all(table)
    assert table.index_sizes() == EMPTY


# --- random sequences against a model ---------------------------------------------------

PAIRS = [(L4, P4), (L4, P4B), (L6, P6)]
PORTS = [0, 4500, 4501]
IKE_SPIS = [SPI_A, SPI_B, SPI_C, bytes(8)]
ESP_SPIS = [1, 2, 3, 0xFFFFFFFF]
MODEL_MAX_SPIS = 2


class Model:
    """The table's contract written the slow, obvious way."""

    def __init__(self) -> None:
        self.conns: dict[int, tuple[bytes, bytes, int]] = {}
        self.order: list[int] = []  # creation order of live ids
        self.cur: dict[int, set[bytes]] = {}
        self.old: dict[int, set[bytes]] = {}
        self.esp: dict[int, set[int]] = {}
        self.endpoint: dict[tuple[bytes, int], int] = {}

    def pair_of(self, cid: int) -> tuple[bytes, bytes]:
        local, peer, _ = self.conns[cid]
        return (local, peer)

    def ike_owner(self, pair: tuple[bytes, bytes], spi: bytes) -> int | None:
        for cid in self.order:
            if self.pair_of(cid) == pair and spi in self.cur[cid] | self.old[cid]:
                return cid
        return None

    def esp_owner(self, pair: tuple[bytes, bytes], spi: int) -> int | None:
        for cid in self.order:
            if self.pair_of(cid) == pair and spi in self.esp[cid]:
                return cid
        return None

    def ids_for_pair(self, pair: tuple[bytes, bytes]) -> list[int]:
        return [cid for cid in self.order if self.pair_of(cid) == pair]


class TableMachine(RuleBasedStateMachine):
    conn_ids = Bundle("conn_ids")

    def __init__(self) -> None:
        super().__init__()
        self.table = ConnectionTable(max_spis=MODEL_MAX_SPIS)
        self.model = Model()

    # --- connections

    @rule(target=conn_ids, pair=st.sampled_from(PAIRS), port=st.sampled_from(PORTS))
    def add(self, pair, port):
        entry = self.table.add(pair[0], pair[1], port)
        cid = entry.conn_id
        assert cid not in self.model.conns
        m = self.model
        m.conns[cid] = (pair[0], pair[1], port)
        m.order.append(cid)
        m.cur[cid], m.old[cid], m.esp[cid] = set(), set(), set()
        if port:
            m.endpoint[(pair[1], port)] = cid
        return cid

    @rule(cid=consumes(conn_ids))
    def remove(self, cid):
        m = self.model
        entry = self.table.remove(cid)
        assert (entry is None) == (cid not in m.conns)
        if entry is None:
            return
        assert entry.conn_id == cid
        del m.conns[cid], m.cur[cid], m.old[cid], m.esp[cid]
        m.order.remove(cid)
        for key in [k for k, v in m.endpoint.items() if v == cid]:
            del m.endpoint[key]

    # --- IKE

    def _expect_bind_ike(self, cid: int, spi: bytes) -> Bind:
        m = self.model
        if cid not in m.conns:
            return Bind.UNKNOWN
        owner = m.ike_owner(m.pair_of(cid), spi)
        if owner == cid:
            return Bind.ALREADY
        if owner is not None:
            return Bind.CONFLICT
        m.cur[cid].add(spi)
        return Bind.NEW

    @rule(cid=conn_ids, spi=st.sampled_from(IKE_SPIS))
    def bind_ike(self, cid, spi):
        expected = self._expect_bind_ike(cid, spi)
        assert self.table.bind_ike(cid, spi) is expected

    @rule(cid=conn_ids, spi=st.sampled_from(IKE_SPIS))
    def unbind_ike(self, cid, spi):
        m = self.model
        expected = cid in m.conns and m.ike_owner(m.pair_of(cid), spi) == cid
        if expected:
            m.cur[cid].discard(spi)
            m.old[cid].discard(spi)
        assert self.table.unbind_ike(cid, spi) is expected

    @rule(cid=conn_ids, old=st.sampled_from(IKE_SPIS), new=st.sampled_from(IKE_SPIS))
    def rekey_ike(self, cid, old, new):
        m = self.model
        if cid in m.conns and old in m.cur[cid]:
            m.cur[cid].discard(old)
            m.old[cid].add(old)
        expected = self._expect_bind_ike(cid, new)
        assert self.table.rekey_ike(cid, old, new) is expected

    @rule(cid=conn_ids, spi=st.sampled_from(IKE_SPIS))
    def move_ike(self, cid, spi):
        m = self.model
        if cid in m.conns:
            owner = m.ike_owner(m.pair_of(cid), spi)
            if owner is not None and owner != cid:
                m.cur[owner].discard(spi)
                m.old[owner].discard(spi)
        expected = self._expect_bind_ike(cid, spi)
        assert self.table.move_ike(cid, spi) is expected
        if cid in m.conns:
            assert self.table.lookup_ike(*m.pair_of(cid), spi).conn_id == cid

    # --- ESP

    def _expect_bind_esp(self, cid: int, spi: int, move: bool) -> Bind:
        m = self.model
        if cid not in m.conns:
            return Bind.UNKNOWN
        owner = m.esp_owner(m.pair_of(cid), spi)
        if owner == cid:
            return Bind.ALREADY
        if owner is not None and not move:
            return Bind.CONFLICT
        if len(m.esp[cid]) >= MODEL_MAX_SPIS:
            return Bind.LIMIT
        if owner is not None:
            m.esp[owner].discard(spi)
        m.esp[cid].add(spi)
        return Bind.NEW

    @rule(cid=conn_ids, spi=st.sampled_from(ESP_SPIS))
    def bind_esp(self, cid, spi):
        expected = self._expect_bind_esp(cid, spi, move=False)
        assert self.table.bind_esp(cid, spi) is expected

    @rule(cid=conn_ids, spi=st.sampled_from(ESP_SPIS))
    def move_esp(self, cid, spi):
        expected = self._expect_bind_esp(cid, spi, move=True)
        assert self.table.move_esp(cid, spi) is expected

    @rule(cid=conn_ids, spi=st.sampled_from(ESP_SPIS))
    def unbind_esp(self, cid, spi):
        m = self.model
        expected = cid in m.conns and spi in m.esp[cid]
        if expected:
            m.esp[cid].discard(spi)
        assert self.table.unbind_esp(cid, spi) is expected

    # --- checks

    @invariant()
    def lookups_agree(self):
        m, t = self.model, self.table
        assert len(t) == len(m.conns)
        assert [e.conn_id for e in t] == m.order
        for pair in PAIRS:
            ids = m.ids_for_pair(pair)
            assert [e.conn_id for e in t.for_pair(*pair)] == ids
            newest = t.newest_for_pair(*pair)
            assert (newest.conn_id if newest else None) == (ids[-1] if ids else None)
            for spi in IKE_SPIS:
                found = t.lookup_ike(*pair, spi)
                assert (found.conn_id if found else None) == m.ike_owner(pair, spi)
            for espi in ESP_SPIS:
                found = t.lookup_esp(*pair, espi)
                assert (found.conn_id if found else None) == m.esp_owner(pair, espi)
            for port in PORTS:
                found = t.by_endpoint(pair[1], port)
                assert (found.conn_id if found else None) == m.endpoint.get((pair[1], port))
        for cid in m.order:
            entry = t.get(cid)
            assert entry is not None
            assert entry.ike_spis == m.cur[cid]
            assert entry.ike_spis_old == m.old[cid]
            assert not entry.ike_spis & entry.ike_spis_old
            assert entry.esp_spis == m.esp[cid]
            assert len(entry.esp_spis) <= MODEL_MAX_SPIS

    @invariant()
    def index_sizes_match(self):
        m = self.model
        assert self.table.index_sizes() == {
            "connections": len(m.conns),
            "ike": sum(len(m.cur[c]) + len(m.old[c]) for c in m.order),
            "esp": sum(len(m.esp[c]) for c in m.order),
            "endpoint": len(m.endpoint),
            "pair": len({m.pair_of(c) for c in m.order}),
            "ike_spi": len({s for c in m.order for s in m.cur[c] | m.old[c]}),
        }

    def teardown(self):
        # Whatever the sequence did, removing every connection must empty every index.
        for cid in list(self.model.order):
            assert self.table.remove(cid) is not None
        assert len(self.table) == 0
        assert self.table.index_sizes() == EMPTY


TableMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestTableMachine = TableMachine.TestCase


def test_find_ike_spi_follows_an_sa_across_address_pairs():
    table = ConnectionTable()
    old = table.add(L4, P4)
    new = table.add(L6, P6)
    assert table.bind_ike(old.conn_id, b"\x01" * 8) is Bind.NEW
    assert table.find_ike_spi(b"\x01" * 8) is old
    assert table.move_ike(new.conn_id, b"\x01" * 8) is Bind.NEW
    assert table.find_ike_spi(b"\x01" * 8) is new
    assert table.lookup_ike(L4, P4, b"\x01" * 8) is old  # other pair: separate key
    table.remove(new.conn_id)
    assert table.find_ike_spi(b"\x01" * 8) is old
    table.remove(old.conn_id)
    assert table.find_ike_spi(b"\x01" * 8) is None
    assert table.index_sizes() == EMPTY


def test_release_and_bind_all_move_whole_sas():
    table = ConnectionTable()
    old = table.add(L4, P4, 40000)
    new = table.add(L4, P4, 40001)
    other = table.add(L4, P4, 40002)
    table.bind_ike(old.conn_id, b"\x01" * 8)
    table.rekey_ike(old.conn_id, b"\x01" * 8, b"\x02" * 8)
    table.bind_esp(old.conn_id, 7)
    ike, esp = table.release(old.conn_id)
    assert sorted(ike) == [b"\x01" * 8, b"\x02" * 8] and esp == [7]
    assert not old.carries_sa and table.lookup_ike(L4, P4, b"\x02" * 8) is None
    # first come: an SPI another connection took meanwhile stays there
    table.bind_esp(other.conn_id, 7)
    table.bind_all(new.conn_id, ike, esp)
    assert new.ike_spis == {b"\x01" * 8, b"\x02" * 8} and new.esp_spis == set()
    assert table.lookup_esp(L4, P4, 7) is other
    # move: authenticated information takes it from the other connection
    table.bind_all(new.conn_id, [], [7], move=True)
    assert table.lookup_esp(L4, P4, 7) is new and other.esp_spis == set()
    assert table.release(12345) == ([], [])
    for e in (old, new, other):
        table.remove(e.conn_id)
    assert table.index_sizes() == EMPTY
