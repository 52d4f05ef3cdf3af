"""Tests for tcpencap.core.sa_sync.SaSync: charon's VICI events and list-sas applied to the table.

Event shapes follow what charon 5.9.8 emits (values decoded to str): ike-updown,
child-updown, child-rekey, ike-rekey, ike-update (new endpoints at the top level, old ones
in the SA) and list-sas (a list of {name: SA} dicts, CHILD SAs keyed "name-uniqueid").
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.core.role import Role
from tcpencap.core.router import Open, Router
from tcpencap.core.sa_sync import UNLISTED_GRACE, ExpireOld, Retire, SaSync
from tcpencap.core.table import ConnectionTable
from tcpencap.wire.packet import addr_bytes

C1 = "198.18.1.2"  # the client host (TCP originator)
C1_NEW = "198.18.2.2"  # the client after a MOBIKE move
GW = "198.19.0.2"  # the gateway (TCP responder)
GW2 = "198.19.0.3"  # a second gateway
GW6 = "fd00:19::2"
C16 = "fd00::1:2"
UDP_ONLY = "198.19.0.9"  # a peer reached over plain UDP
TCP_PEERS = {addr_bytes(a) for a in (GW, GW2, GW6)}

ISPI = "03f18aa0d6bd078d"
RSPI = "0e023a97abc96ae4"
ISPI_NEW = "e1ac44ab85cd6a55"
RSPI_NEW = "5c1f0b1a2d3e4f60"
ISPI_B = "b1b2b3b4b5b6b7b8"
ESP_OUT, ESP_IN = "fb4a163b", "ea2e07bc"
ESP_OUT_NEW, ESP_IN_NEW = "8720bbca", "c3d0e4a1"
ESP_OUT_B = "c0ffee01"


def b(spi_hex: str) -> bytes:
    return bytes.fromhex(spi_hex)


def e(spi_hex: str) -> int:
    return int(spi_hex, 16)


def child(
    spi_out: str = ESP_OUT,
    spi_in: str = ESP_IN,
    state: str = "INSTALLED",
    name: str = "c1-gw",
    uniqueid: str = "1",
) -> dict[str, Any]:
    return {
        "name": name,
        "uniqueid": uniqueid,
        "reqid": "1",
        "state": state,
        "mode": "TUNNEL",
        "protocol": "ESP",
        "encap": "yes",
        "spi-in": spi_in,
        "spi-out": spi_out,
        "encr-alg": "AES_GCM_16",
        "encr-keysize": "256",
        "bytes-in": "0",
        "packets-in": "0",
        "bytes-out": "0",
        "packets-out": "0",
        "rekey-time": "3300",
        "life-time": "3600",
        "install-time": "0",
        "local-ts": ["10.1.0.0/24"],
        "remote-ts": ["10.2.0.0/24"],
    }


def ike_sa(
    ispi: str = ISPI,
    rspi: str = RSPI,
    local: str = C1,
    remote: str = GW,
    lport: str = "4500",
    rport: str = "4500",
    state: str = "ESTABLISHED",
    initiator: bool = True,
    children: dict[str, Any] | None = None,
    uniqueid: str = "1",
) -> dict[str, Any]:
    sa: dict[str, Any] = {
        "uniqueid": uniqueid,
        "version": "2",
        "state": state,
        "local-host": local,
        "local-port": lport,
        "local-id": "c1.example.org",
        "remote-host": remote,
        "remote-port": rport,
        "remote-id": "gw.example.org",
        "initiator-spi": ispi,
        "responder-spi": rspi,
        "encr-alg": "AES_GCM_16",
        "encr-keysize": "256",
        "prf-alg": "PRF_HMAC_SHA2_256",
        "dh-group": "CURVE_25519",
        "established": "1",
        "rekey-time": "13000",
        "local-vips": [],
        "remote-vips": [],
        "tasks-queued": [],
        "tasks-active": [],
        "tasks-passive": [],
    }
    if initiator:
        sa["initiator"] = "yes"
    if children is not None:
        sa["child-sas"] = children
    return sa


def gw_sa(ispi: str = ISPI, rport: str = "40001", **kw: Any) -> dict[str, Any]:
    """The gateway's view: the client is the UDP endpoint (client IP, TCP source port)."""
    return ike_sa(ispi, local=GW, remote=C1, rport=rport, initiator=False, **kw)


def up(name: str, sa: dict[str, Any]) -> dict[str, Any]:
    return {"up": "yes", name: sa}


class Env:
    def __init__(self) -> None:
        self.table = ConnectionTable()
        self.router = Router(self.table, lambda a: a in TCP_PEERS)
        self.sync = SaSync(self.router)

    def client(self, local: str = C1, peer: str = GW, ike: tuple[str, ...] = (), esp=()) -> int:
        view = self.router.add_client_conn(addr_bytes(local), addr_bytes(peer))
        view.charon_sport = view.charon_dport = 4500
        return self._bind(view.conn_id, ike, esp)

    def gateway(self, port: int, peer: str = C1, ike: tuple[str, ...] = (), esp=()) -> int:
        view = self.router.add_gateway_conn(addr_bytes(GW), addr_bytes(peer), port)
        return self._bind(view.conn_id, ike, esp)

    def _bind(self, cid: int, ike: tuple[str, ...], esp: tuple[str, ...]) -> int:
        for s in ike:
            assert self.table.bind_ike(cid, b(s)).value == "new"
        for s in esp:
            assert self.table.bind_esp(cid, e(s)).value == "new"
        return cid

    def ike(self, cid: int) -> set[bytes]:
        entry = self.table.get(cid)
        assert entry is not None
        return set(entry.ike_spis)

    def old(self, cid: int) -> set[bytes]:
        entry = self.table.get(cid)
        assert entry is not None
        return set(entry.ike_spis_old)

    def esp(self, cid: int) -> set[int]:
        entry = self.table.get(cid)
        assert entry is not None
        return set(entry.esp_spis)

    def snapshot(self) -> tuple:
        conns = {
            x.conn_id: (
                x.local,
                x.peer,
                x.peer_port,
                frozenset(x.ike_spis),
                frozenset(x.ike_spis_old),
                frozenset(x.esp_spis),
            )
            for x in self.table
        }
        return conns, self.table.index_sizes(), sorted(self.router.views), list(self.router.emptied)


@pytest.fixture
def env() -> Env:
    return Env()


# --- ike-updown ---------------------------------------------------------------------------


def test_up_binds_esp_to_the_client_connection_holding_the_ike_spi(env: Env):
    other = env.client(peer=GW2, ike=(ISPI_B,))
    cid = env.client(ike=(ISPI,))
    fx = env.sync.handle("ike-updown", up("c1-gw", ike_sa(children={"c1-gw-1": child()})))
    assert fx == []
    assert env.ike(cid) == {b(ISPI)}
    assert env.esp(cid) == {e(ESP_OUT)}
    assert env.table.lookup_esp(addr_bytes(C1), addr_bytes(GW), e(ESP_OUT)).conn_id == cid
    assert env.esp(other) == set() and env.ike(other) == {b(ISPI_B)}


def test_up_on_gateway_picks_the_endpoint_of_the_sa_not_its_neighbour(env: Env):
    # Two clients behind one NAT address: same pair, different TCP source ports.
    a = env.gateway(40001, ike=(ISPI_B,))
    c = env.gateway(40002, ike=(ISPI,))
    sa = gw_sa(ISPI, rport="40002", children={"gw-c1-7": child(ESP_IN, ESP_OUT)})
    assert env.sync.handle("ike-updown", up("gw-c1", sa)) == []
    assert env.esp(c) == {e(ESP_IN)}  # the gateway's outbound SPI is the client's inbound
    assert env.esp(a) == set()
    assert env.ike(a) == {b(ISPI_B)} and env.ike(c) == {b(ISPI)}


def test_up_takes_the_spi_over_from_a_stale_holder_of_the_same_pair(env: Env):
    # VICI is authoritative: the SPI goes to the connection charon names... which, for the
    # same pair, is the one holding it; a second connection of the pair is left alone.
    first = env.client(ike=(ISPI,), esp=(ESP_OUT,))
    second = env.client()
    env.sync.handle("ike-updown", up("c1-gw", ike_sa(children={"c1-gw-1": child()})))
    assert env.ike(first) == {b(ISPI)} and env.esp(first) == {e(ESP_OUT)}
    assert env.ike(second) == set() and env.esp(second) == set()


def test_down_unbinds_everything_and_retires_the_connection(env: Env):
    cid = env.client(ike=(ISPI, ISPI_NEW), esp=(ESP_OUT, ESP_OUT_NEW))
    env.table.rekey_ike(cid, b(ISPI), b(ISPI_NEW))  # ISPI now in the previous set
    assert env.old(cid) == {b(ISPI)}
    sa = ike_sa(ISPI_NEW, RSPI_NEW, state="DELETING", children={"c1-gw-2": child(ESP_OUT_NEW)})
    fx = env.sync.handle("ike-updown", {"c1-gw": sa})
    assert fx == [Retire(cid, "IKE SA deleted")]
    assert fx[0].graceful is True
    assert env.ike(cid) == set() and env.old(cid) == set() and env.esp(cid) == set()
    sizes = env.table.index_sizes()
    assert sizes["ike"] == sizes["esp"] == sizes["ike_spi"] == 0
    assert sizes["connections"] == 1  # the daemon closes it, not the sync


def test_down_of_one_of_two_ike_sas_keeps_the_connection(env: Env):
    cid = env.client(ike=(ISPI, ISPI_B), esp=(ESP_OUT, ESP_OUT_B))
    sa = ike_sa(ISPI, state="DELETING", children={"c1-gw-1": child(ESP_OUT)})
    assert env.sync.handle("ike-updown", {"c1-gw": sa}) == []
    assert env.ike(cid) == {b(ISPI_B)}
    assert env.esp(cid) == {e(ESP_OUT_B)}


def test_down_on_gateway_side(env: Env):
    cid = env.gateway(40001, ike=(ISPI,), esp=(ESP_IN,))
    fx = env.sync.handle("ike-updown", {"gw-c1": gw_sa(state="DELETING")})
    assert fx == [Retire(cid, "IKE SA deleted")]
    assert env.ike(cid) == set() and env.esp(cid) == set()


# --- child-updown / child-rekey -------------------------------------------------------------


def test_child_updown_up_and_down(env: Env):
    cid = env.client(ike=(ISPI,))
    sa = ike_sa(children={"c1-gw-1": child()})
    assert env.sync.handle("child-updown", up("c1-gw", sa)) == []
    assert env.esp(cid) == {e(ESP_OUT)}
    gone = ike_sa(children={"c1-gw-1": child(state="DELETING")})
    assert env.sync.handle("child-updown", {"c1-gw": gone}) == []
    assert env.esp(cid) == set()
    assert env.ike(cid) == {b(ISPI)}  # a CHILD SA going down leaves the IKE SA alone


def test_child_updown_moves_the_spi_from_another_connection_of_the_pair(env: Env):
    stale = env.client(esp=(ESP_OUT,))  # learnt from a packet on the wrong connection
    cid = env.client(ike=(ISPI,))
    env.sync.handle("child-updown", up("c1-gw", ike_sa(children={"c1-gw-1": child()})))
    assert env.esp(cid) == {e(ESP_OUT)} and env.esp(stale) == set()


def test_child_rekey_moves_esp_spis(env: Env):
    cid = env.client(ike=(ISPI,), esp=(ESP_OUT,))
    pair = {
        "old": child(ESP_OUT, ESP_IN, state="REKEYED"),
        "new": child(ESP_OUT_NEW, ESP_IN_NEW, uniqueid="2"),
    }
    assert env.sync.handle("child-rekey", {"c1-gw": ike_sa(children={"c1-gw": pair})}) == []
    assert env.esp(cid) == {e(ESP_OUT_NEW)}
    assert env.table.lookup_esp(addr_bytes(C1), addr_bytes(GW), e(ESP_OUT)) is None


# --- ike-rekey and expire_old ---------------------------------------------------------------


def ike_rekey_event() -> dict[str, Any]:
    return {
        "c1-gw": {
            "old": ike_sa(ISPI, RSPI, state="REKEYED"),
            "new": ike_sa(ISPI_NEW, RSPI_NEW, uniqueid="2"),
        }
    }


def test_ike_rekey_keeps_the_old_spi_routable_then_expires_it(env: Env):
    cid = env.client(ike=(ISPI,), esp=(ESP_OUT,))
    fx = env.sync.handle("ike-rekey", ike_rekey_event())
    assert fx == [ExpireOld(cid, b(ISPI))]
    assert fx[0].delay > 0
    assert env.ike(cid) == {b(ISPI_NEW)} and env.old(cid) == {b(ISPI)}
    assert env.table.lookup_ike(addr_bytes(C1), addr_bytes(GW), b(ISPI)).conn_id == cid
    assert env.sync.expire_old(cid, b(ISPI)) == []  # the new SA still lives
    assert env.old(cid) == set() and env.ike(cid) == {b(ISPI_NEW)}
    assert env.table.lookup_ike(addr_bytes(C1), addr_bytes(GW), b(ISPI)) is None
    assert env.esp(cid) == {e(ESP_OUT)}
    assert env.sync.expire_old(cid, b(ISPI)) == []  # twice is harmless


def test_expire_old_retires_only_when_nothing_is_left(env: Env):
    cid = env.client(ike=(ISPI,))
    env.sync.handle("ike-rekey", ike_rekey_event())
    env.table.unbind_ike(cid, b(ISPI_NEW))  # the new SA went away meanwhile
    assert env.sync.expire_old(cid, b(ISPI)) == [Retire(cid, "IKE SA deleted")]
    assert env.old(cid) == set()


def test_expire_old_ignores_unknown_connections_and_current_spis(env: Env):
    cid = env.client(ike=(ISPI,))
    before = env.snapshot()
    assert env.sync.expire_old(cid + 100, b(ISPI)) == []
    assert env.sync.expire_old(cid, b(ISPI)) == []  # current, not previous: kept
    assert env.snapshot() == before


def test_ike_rekey_on_gateway_side(env: Env):
    cid = env.gateway(40001, ike=(ISPI,))
    ev = {"gw-c1": {"old": gw_sa(ISPI, state="REKEYED"), "new": gw_sa(ISPI_NEW, uniqueid="2")}}
    assert env.sync.handle("ike-rekey", ev) == [ExpireOld(cid, b(ISPI))]
    assert env.ike(cid) == {b(ISPI_NEW)} and env.old(cid) == {b(ISPI)}


# --- ike-update -----------------------------------------------------------------------------


def ike_update(new_local: str, new_remote: str, sa_name: str, sa: dict, lport="4500", rport="4500"):
    return {
        "local-host": new_local,
        "local-port": lport,
        "remote-host": new_remote,
        "remote-port": rport,
        sa_name: sa,
    }


@pytest.mark.parametrize(("new_local", "new_remote"), [(C1_NEW, GW), (C16, GW6)])
def test_ike_update_on_client_opens_a_connection_for_the_new_pair(env: Env, new_local, new_remote):
    old = env.client(ike=(ISPI,), esp=(ESP_OUT,))
    fx = env.sync.handle("ike-update", ike_update(new_local, new_remote, "c1-gw", ike_sa()))
    assert len(fx) == 1 and isinstance(fx[0], Open)
    new = fx[0].conn_id
    assert new != old
    assert (fx[0].local, fx[0].peer) == (addr_bytes(new_local), addr_bytes(new_remote))
    assert env.router.views[new].side is Role.CLIENT
    assert env.ike(new) == {b(ISPI)} and env.esp(new) == {e(ESP_OUT)}
    assert env.ike(old) == set() and env.esp(old) == set()
    assert old in env.router.emptied
    found = env.table.lookup_ike(addr_bytes(new_local), addr_bytes(new_remote), b(ISPI))
    assert found is not None and found.conn_id == new


def test_ike_update_on_client_without_a_change_or_already_moved_does_nothing(env: Env):
    env.client(ike=(ISPI,), esp=(ESP_OUT,))
    same = env.snapshot()
    assert env.sync.handle("ike-update", ike_update(C1, GW, "c1-gw", ike_sa())) == []
    assert env.snapshot() == same
    moved = env.client(local=C1_NEW, ike=(ISPI,))  # the packet path got there first
    before = env.snapshot()
    assert env.sync.handle("ike-update", ike_update(C1_NEW, GW, "c1-gw", ike_sa())) == []
    assert env.snapshot() == before
    assert env.ike(moved) == {b(ISPI)}


def test_ike_update_on_gateway_moves_the_sas_to_the_new_endpoint(env: Env):
    old = env.gateway(40001, ike=(ISPI,), esp=(ESP_IN,))
    env.sync.handle("ike-rekey", {"gw-c1": {"old": gw_sa(ISPI), "new": gw_sa(ISPI_NEW)}})
    new = env.gateway(40002)  # the client reconnected from a new source port
    ev = ike_update(GW, C1, "gw-c1", gw_sa(ISPI_NEW, rport="40001"), rport="40002")
    fx = env.sync.handle("ike-update", ev)
    assert fx == [Retire(old, "SA moved to another connection", graceful=False)]
    assert env.ike(new) | env.old(new) == {b(ISPI), b(ISPI_NEW)}
    assert env.esp(new) == {e(ESP_IN)}
    assert env.ike(old) == set() and env.old(old) == set() and env.esp(old) == set()


def test_ike_update_on_gateway_follows_a_new_client_address(env: Env):
    old = env.gateway(40001, ike=(ISPI,), esp=(ESP_IN,))
    new = env.gateway(50000, peer=C1_NEW)
    ev = ike_update(GW, C1_NEW, "gw-c1", gw_sa(ISPI, rport="40001"), rport="50000")
    assert env.sync.handle("ike-update", ev) == [
        Retire(old, "SA moved to another connection", graceful=False)
    ]
    assert env.ike(new) == {b(ISPI)} and env.esp(new) == {e(ESP_IN)}
    assert env.table.lookup_esp(addr_bytes(GW), addr_bytes(C1_NEW), e(ESP_IN)).conn_id == new


def test_ike_update_on_gateway_to_the_same_endpoint_does_nothing(env: Env):
    env.gateway(40001, ike=(ISPI,), esp=(ESP_IN,))
    before = env.snapshot()
    ev = ike_update(GW, C1, "gw-c1", gw_sa(ISPI, rport="40001"), rport="40001")
    assert env.sync.handle("ike-update", ev) == []
    assert env.snapshot() == before


def unnamed_update(ispi: str, remote: str, rport: str, any_text: str) -> dict[str, Any]:
    """The responder's ike-update while it processes IKE_SA_INIT: no peer config yet, the
    old hosts are the any-address."""
    sa = ike_sa(
        ispi,
        RSPI_NEW,
        local=any_text,
        remote=any_text,
        lport="0",
        rport="0",
        state="CREATED",
        initiator=False,
    )
    sa.pop("local-id")
    sa.pop("remote-id")
    return ike_update(GW, remote, "(unnamed)", sa, rport=rport)


@pytest.mark.parametrize("any_text", ["0.0.0.0", "%any", "::"])
def test_unnamed_ike_update_during_sa_init_is_harmless(env: Env, any_text: str):
    env.gateway(40001, ike=(ISPI,))  # the packet path bound the SPI on arrival
    env.gateway(40002, ike=(ISPI_B,), esp=(ESP_IN,))
    env.client(peer=GW2, ike=(ISPI_NEW,), esp=(ESP_OUT,))
    before = env.snapshot()
    assert env.sync.handle("ike-update", unnamed_update(ISPI, C1, "40001", any_text)) == []
    assert env.snapshot() == before


@pytest.mark.parametrize("any_text", ["0.0.0.0", "%any"])
def test_unauthenticated_sa_init_reusing_an_spi_cannot_steal_a_gateway_connection(
    env: Env, any_text: str
):
    """A client (over TCP from the same NAT address, or over plain UDP) sends IKE_SA_INIT
    with the initiator SPI of a victim's established SA (IKE headers are in the clear).
    charon's unnamed ike-update for that half-open SA must not move or retire the victim."""
    victim = env.gateway(40001, ike=(ISPI,), esp=(ESP_IN,))
    attacker = env.gateway(40002)  # same pair: bind_ike(attacker, ISPI) is refused
    assert env.table.bind_ike(attacker, b(ISPI)).value == "conflict"
    before = env.snapshot()
    fx = env.sync.handle("ike-update", unnamed_update(ISPI, C1, "40002", any_text))
    assert fx == []
    assert env.snapshot() == before
    assert env.esp(victim) == {e(ESP_IN)} and env.esp(attacker) == set()
    # the same over UDP from an address without any connection
    fx = env.sync.handle("ike-update", unnamed_update(ISPI, UDP_ONLY, "500", any_text))
    assert fx == []
    assert env.snapshot() == before


# --- unknown SAs and malformed events -----------------------------------------------------


def test_events_for_unknown_sas_never_bind_anything(env: Env):
    a = env.client(ike=(ISPI_B,), esp=(ESP_OUT_B,))
    g = env.gateway(40001, ike=(ISPI_NEW,))
    before = env.snapshot()
    kids = {"c1-gw-1": child()}
    events = [
        ("ike-updown", up("c1-gw", ike_sa(ISPI, children=kids))),
        ("ike-updown", {"c1-gw": ike_sa(ISPI, state="DELETING", children=kids)}),
        ("child-updown", up("c1-gw", ike_sa(ISPI, children=kids))),
        ("child-updown", up("gw-c1", gw_sa(ISPI, children=kids))),
        ("child-rekey", {"c1-gw": ike_sa(ISPI, children={"c1-gw": {"new": child()}})}),
        ("ike-rekey", {"c1-gw": {"old": ike_sa(ISPI), "new": ike_sa("a0a1a2a3a4a5a6a7")}}),
        ("ike-update", ike_update(C1_NEW, GW, "c1-gw", ike_sa(ISPI))),
        ("ike-update", ike_update(GW, C1, "gw-c1", gw_sa(ISPI), rport="40001")),
    ]
    for label, ev in events:
        assert env.sync.handle(label, ev) == [], label
        assert env.snapshot() == before, label
    assert env.esp(a) == {e(ESP_OUT_B)} and env.esp(g) == set()


def _malformed() -> list[tuple[str, dict[str, Any]]]:
    good = ike_sa(children={"c1-gw-1": child()})
    cases: list[tuple[str, dict[str, Any]]] = []
    for label in ("ike-updown", "child-updown", "child-rekey", "ike-rekey", "ike-update"):
        cases += [
            (label, {}),
            (label, {"up": "yes"}),
            (label, {"up": "yes", "c1-gw": "not a dict"}),
            (label, {"up": "yes", "c1-gw": ["a", "list"]}),
            (label, {"up": "yes", "c1-gw": {}}),
            (label, {"up": "yes", "c1-gw": {**good, "initiator-spi": "zz" * 8}}),
            (label, {"up": "yes", "c1-gw": {**good, "initiator-spi": "03f1"}}),
            (label, {"up": "yes", "c1-gw": {**good, "initiator-spi": "00" * 8}}),
        ]
    # known SPI, broken parts
    cases += [
        ("ike-updown", up("c1-gw", {**good, "initiator-spi": ISPI_B, "child-sas": "x"})),
        ("child-updown", up("c1-gw", {**good, "initiator-spi": ISPI_B, "child-sas": "x"})),
        (
            "child-updown",
            up(
                "c1-gw",
                {**good, "initiator-spi": ISPI_B, "child-sas": {"c1-gw-1": {"spi-out": "xyz"}}},
            ),
        ),
        ("child-updown", up("c1-gw", {**good, "initiator-spi": [ISPI_B]})),
        ("child-rekey", {"c1-gw": {**good, "initiator-spi": ISPI_B, "child-sas": "x"}}),
        (
            "child-rekey",
            {
                "c1-gw": {
                    **good,
                    "initiator-spi": ISPI_B,
                    "child-sas": {"c1-gw": {"old": "x", "new": ["y"]}},
                }
            },
        ),
        (
            "child-rekey",
            {
                "c1-gw": {
                    **good,
                    "initiator-spi": ISPI_B,
                    "child-sas": {"c1-gw": {"new": {"spi-out": "qq"}}},
                }
            },
        ),
        ("ike-rekey", {"c1-gw": {"old": "x", "new": "y"}}),
        ("ike-rekey", {"c1-gw": {"old": ike_sa(ISPI_B), "new": "y"}}),
        ("ike-rekey", {"c1-gw": {"old": ike_sa(ISPI_B), "new": {"initiator-spi": "zz"}}}),
        ("ike-update", {"remote-host": "bogus", "c1-gw": ike_sa(ISPI_B)}),
        ("ike-update", {"local-host": C1, "remote-host": ["x"], "c1-gw": ike_sa(ISPI_B)}),
        (
            "ike-update",
            {"local-host": GW, "remote-host": C1, "remote-port": "x", "gw-c1": gw_sa(ISPI_NEW)},
        ),
        ("ike-update", {"local-host": GW, "remote-host": C1, "gw-c1": gw_sa(ISPI_NEW)}),
        ("no-such-event", up("c1-gw", ike_sa(ISPI_B, children={"c1-gw-1": child()}))),
    ]
    return cases


@pytest.mark.parametrize(("label", "event"), _malformed())
def test_malformed_events_never_raise_and_change_nothing(env: Env, label: str, event: dict):
    env.client(ike=(ISPI_B,), esp=(ESP_OUT_B,))
    env.gateway(40001, ike=(ISPI_NEW,), esp=(ESP_IN,))
    before = env.snapshot()
    assert env.sync.handle(label, event) == []
    assert env.snapshot() == before


@pytest.mark.parametrize("children", ["x", ["x"], {"c1-gw-1": "x"}, {"c1-gw-1": {"spi-out": []}}])
def test_down_with_broken_child_sas_still_unbinds_and_retires(env: Env, children: Any):
    cid = env.client(ike=(ISPI,), esp=(ESP_OUT,))
    other = env.gateway(40001, ike=(ISPI_B,), esp=(ESP_IN,))
    sa = {**ike_sa(ISPI, state="DELETING"), "child-sas": children}
    assert env.sync.handle("ike-updown", {"c1-gw": sa}) == [Retire(cid, "IKE SA deleted")]
    assert env.ike(cid) == set() and env.esp(cid) == set()
    assert env.ike(other) == {b(ISPI_B)} and env.esp(other) == {e(ESP_IN)}


# --- resync and reconcile_esp ---------------------------------------------------------------


def test_resync_binds_unbinds_and_reopens(env: Env):
    known = env.client(ike=(ISPI,))
    gone = env.client(peer=GW2, ike=(ISPI_B,), esp=(ESP_OUT_B,))
    waiting = env.client(local=C1_NEW)  # no SA yet: left alone
    sas = [
        {"c1-gw": ike_sa(ISPI, children={"c1-gw-1": child()})},
        # outlived its connection (tcpencap restarted): reopen
        {
            "c1-gw6": ike_sa(
                ISPI_NEW,
                local=C16,
                remote=GW6,
                lport="4501",
                rport="4502",
                children={"c1-gw6-3": child(ESP_OUT_NEW, uniqueid="3")},
            )
        },
        # not established, or not a TCP peer: no connection
        {"c1-half": ike_sa("c1c2c3c4c5c6c7c8", remote=GW2, state="CONNECTING")},
        {"c1-udp": ike_sa("d1d2d3d4d5d6d7d8", remote=UDP_ONLY)},
    ]
    fx = env.sync.resync(sas)
    opens = [x for x in fx if isinstance(x, Open)]
    assert len(opens) == 1
    op = opens[0]
    assert (op.local, op.peer) == (addr_bytes(C16), addr_bytes(GW6))
    assert env.ike(op.conn_id) == {b(ISPI_NEW)} and env.esp(op.conn_id) == {e(ESP_OUT_NEW)}
    view = env.router.views[op.conn_id]
    assert view.side is Role.CLIENT
    assert (view.charon_sport, view.charon_dport) == (4501, 4502)
    assert [x for x in fx if isinstance(x, Retire)] == [Retire(gone, "IKE SA unknown to charon")]
    assert env.ike(gone) == set() and env.esp(gone) == set()
    assert env.ike(known) == {b(ISPI)} and env.esp(known) == {e(ESP_OUT)}
    assert env.ike(waiting) == set()
    assert len(env.table) == 4  # known, gone (retired by the daemon), waiting, reopened
    # a second pass is a no-op
    before = env.snapshot()
    assert env.sync.resync(sas) == []
    assert env.snapshot() == before


def test_resync_keeps_the_previous_spi_while_charon_still_has_it(env: Env):
    cid = env.client(ike=(ISPI,))
    env.sync.handle("ike-rekey", ike_rekey_event())
    sas = [{"c1-gw": ike_sa(ISPI_NEW)}, {"c1-gw": ike_sa(ISPI, state="DELETING")}]
    assert env.sync.resync(sas) == []
    assert env.ike(cid) | env.old(cid) == {b(ISPI), b(ISPI_NEW)}
    # once the old one is gone from list-sas it is unbound, without retiring
    assert env.sync.resync([{"c1-gw": ike_sa(ISPI_NEW)}]) == []
    assert env.ike(cid) | env.old(cid) == {b(ISPI_NEW)}


def test_resync_with_empty_list_retires_all_connections_with_sas(env: Env):
    a = env.client(ike=(ISPI,), esp=(ESP_OUT,))
    g = env.gateway(40001, ike=(ISPI_B,))
    env.gateway(40002)
    fx = env.sync.resync([])
    assert sorted(fx, key=lambda x: x.conn_id) == [
        Retire(a, "IKE SA unknown to charon"),
        Retire(g, "IKE SA unknown to charon"),
    ]
    sizes = env.table.index_sizes()
    assert sizes["ike"] == sizes["esp"] == sizes["ike_spi"] == 0


def test_resync_never_raises_on_bad_ports(env: Env):
    sas = [{"c1-gw": ike_sa(ISPI, lport="x", rport="%any")}]
    fx = env.sync.resync(sas)
    assert all(isinstance(x, Open | Retire) for x in fx)


def test_reconcile_esp_drops_collision_losers_and_binds_missing(env: Env):
    cid = env.client(ike=(ISPI,), esp=(ESP_OUT, ESP_OUT_B))  # ESP_OUT_B lost a collision
    g = env.gateway(40001, ike=(ISPI_NEW,), esp=(ESP_IN,))
    sas = [
        {
            "c1-gw": ike_sa(
                ISPI,
                children={
                    "c1-gw-1": child(ESP_OUT),
                    "c1-gw-2": child(ESP_OUT_NEW, uniqueid="2"),
                    "c1-gw-3": child("0badf00d", uniqueid="3", state="DELETING"),
                },
            )
        },
        {"gw-c1": gw_sa(ISPI_NEW, children={"gw-c1-5": child(ESP_IN, ESP_OUT, uniqueid="5")})},
    ]
    env.table.bind_esp(cid, e("0badf00d"))
    env.sync.reconcile_esp(sas)
    assert env.esp(cid) == {e(ESP_OUT), e(ESP_OUT_NEW)}
    assert env.esp(g) == {e(ESP_IN)}
    assert env.ike(cid) == {b(ISPI)}  # IKE SPIs are resync's business
    env.sync.reconcile_esp([])
    assert env.esp(cid) == set() and env.esp(g) == set()
    assert env.ike(cid) == {b(ISPI)} and env.ike(g) == {b(ISPI_NEW)}


def test_reconcile_esp_does_not_bind_for_unknown_sas(env: Env):
    cid = env.client(ike=(ISPI_B,))
    env.sync.reconcile_esp([{"c1-gw": ike_sa(ISPI, children={"c1-gw-1": child()})}])
    assert env.esp(cid) == set()
    assert env.table.index_sizes()["esp"] == 0


def test_reconcile_ike_unbinds_a_collision_loser_after_the_grace(env: Env):
    """The redundant IKE SA of a rekey collision: its SPI was seen on the wire, charon
    never reports it, list-sas stops showing it. It stays bound through the grace (it may
    be an SA charon has not processed yet), then goes; the winner stays."""
    cid = env.client(ike=(ISPI, ISPI_B))  # ISPI_B: the redundant SA
    sas = [{"c1-gw": ike_sa(ISPI)}]
    assert env.sync.reconcile_ike(100.0, sas) == []
    assert env.ike(cid) == {b(ISPI), b(ISPI_B)} and env.sync.unlisted_ike == 1
    assert env.sync.reconcile_ike(100.0 + UNLISTED_GRACE - 0.1, sas) == []
    assert env.ike(cid) == {b(ISPI), b(ISPI_B)}
    assert env.sync.reconcile_ike(100.0 + UNLISTED_GRACE, sas) == []
    assert env.ike(cid) == {b(ISPI)} and env.sync.unlisted_ike == 0
    assert env.table.find_ike_spi(b(ISPI_B)) is None


def test_reconcile_ike_forgives_an_spi_charon_lists_again(env: Env):
    """Missing from one answer (charon had not processed its IKE_SA_INIT yet), listed in
    the next: the clock starts over."""
    cid = env.client(ike=(ISPI,))
    env.sync.reconcile_ike(0.0, [])
    env.sync.reconcile_ike(5.0, [{"c1-gw": ike_sa(ISPI, state="CONNECTING")}])
    assert env.sync.unlisted_ike == 0
    env.sync.reconcile_ike(6.0, [])
    assert env.sync.reconcile_ike(6.0 + UNLISTED_GRACE - 1, []) == []
    assert env.ike(cid) == {b(ISPI)}


def test_reconcile_ike_retires_a_connection_left_without_an_sa(env: Env):
    """Its only IKE SA never came up (charon gave up on it, no event): the connection is
    retired, its CHILD SPIs released; another connection with a listed SA is untouched;
    rekeyed SPIs are left to their own expiry."""
    lone = env.client(ike=(ISPI_B,), esp=(ESP_OUT_B,))
    g = env.gateway(40001, ike=(ISPI_NEW,))
    kept = env.client(peer=GW2, ike=(ISPI,))
    env.table.rekey_ike(kept, b(ISPI), b("00000000000000aa"))
    sas = [{"gw-c1": gw_sa(ISPI_NEW)}, {"c1-gw2": ike_sa("00000000000000aa", remote=GW2)}]
    env.sync.reconcile_ike(0.0, sas)
    fx = env.sync.reconcile_ike(UNLISTED_GRACE, sas)
    assert fx == [Retire(lone, "IKE SA unknown to charon")]
    assert env.table.get(lone) is None or not env.table.get(lone).carries_sa
    assert env.ike(g) == {b(ISPI_NEW)}
    assert env.old(kept) == {b(ISPI)}  # ExpireOld's business, not reconcile's


def test_reconcile_ike_forgets_suspects_of_removed_connections(env: Env):
    cid = env.client(ike=(ISPI_B,))
    env.sync.reconcile_ike(0.0, [])
    env.table.remove(cid)
    env.sync.reconcile_ike(1.0, [])
    assert env.sync.unlisted_ike == 0


# --- fuzz -----------------------------------------------------------------------------------

_KEYS = st.sampled_from(
    [
        "up",
        "c1-gw",
        "c1-gw-1",
        "gw-c1",
        "(unnamed)",
        "old",
        "new",
        "child-sas",
        "initiator-spi",
        "responder-spi",
        "local-host",
        "remote-host",
        "local-port",
        "remote-port",
        "spi-out",
        "spi-in",
        "state",
    ]
) | st.text(max_size=6)
_LEAVES = st.sampled_from(
    [
        ISPI,
        ISPI_B,
        ISPI_NEW,
        "00" * 8,
        "zz",
        "",
        "yes",
        "ESTABLISHED",
        "DELETING",
        "INSTALLED",
        C1,
        C1_NEW,
        GW,
        GW6,
        "0.0.0.0",
        "%any",
        "4500",
        "40001",
        "40002",
        "0",
        "-1",
        ESP_OUT,
        ESP_IN,
        "x",
    ]
) | st.text(max_size=20)
_VALUES = st.recursive(
    _LEAVES,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_KEYS, kids, max_size=5),
    max_leaves=25,
)
_EVENTS = st.dictionaries(_KEYS, _VALUES, max_size=6)
_LABELS = ["ike-updown", "child-updown", "child-rekey", "ike-rekey", "ike-update"]


def _populated() -> Env:
    env = Env()
    env.client(ike=(ISPI,), esp=(ESP_OUT,))
    env.client(peer=GW6, local=C16, ike=(ISPI_NEW,))
    env.gateway(40001, ike=(ISPI_B,), esp=(ESP_IN,))
    env.gateway(40002)
    return env


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_LABELS), _EVENTS)
def test_handle_never_raises(label: str, event: dict[str, Any]):
    env = _populated()
    fx = env.sync.handle(label, event)
    assert isinstance(fx, list)
    assert all(isinstance(getattr(x, "conn_id", None), int) for x in fx)


@settings(max_examples=200, deadline=None)
@given(st.lists(_EVENTS, max_size=4))
def test_resync_and_reconcile_never_raise(sas: list[dict[str, Any]]):
    env = _populated()
    fx = env.sync.resync(sas)
    assert all(isinstance(getattr(x, "conn_id", None), int) for x in fx)
    env.sync.reconcile_esp(sas)
