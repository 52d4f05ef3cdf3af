"""The RFC 9329 engine's admission of a load balancer's (PROXY v2) connections, and its
front_refused/front_failed reports from the TLS and PROXY front."""

from __future__ import annotations

import logging
import struct

import pytest

from tcpencap.config import parse_config
from tcpencap.core import reload as plans
from tcpencap.core.outputs import Close, Connect
from tcpencap.core.rfc9329_engine import Rfc9329Engine, State
from tcpencap.wire.ike import NON_ESP_MARKER
from tcpencap.wire.packet import addr_bytes, build_udp_packet
from tests.config_text import (
    PATH,
    C,
    G,
    gateway,
    text_of,
)


def gw_engine(now: float = 0.0, **gw: str) -> Rfc9329Engine:
    lines = [f"listen = {G}:4500", *(f"{k} = {v}" for k, v in gw.items())]
    return Rfc9329Engine(gateway(*lines), now)


def ike_sa_init() -> bytes:
    """An IKEv2 IKE_SA_INIT request header (initiator SPI set, responder SPI zero)."""
    body = struct.pack("!BBH", 0, 0, 40) + b"x" * 36  # one payload (SA), the last
    head = bytes.fromhex("1122334455667788") + bytes(8)
    return head + struct.pack("!BBBBII", 33, 0x20, 34, 0x08, 0, 28 + len(body)) + body


def first_ike(e: Rfc9329Engine, conn_id: int, now: float = 0.0) -> None:
    """The prefix and a well-formed IKE_SA_INIT: the connection is no longer pending."""
    frame = NON_ESP_MARKER + ike_sa_init()
    e.receive_data(now, conn_id, 0, b"IKETCP" + (len(frame) + 2).to_bytes(2, "big") + frame)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_admit_proxied_takes_pending_slots(caplog: pytest.LogCaptureFixture) -> None:
    g = gw_engine(max_pending="2", max_connections="10")
    assert g.admit_proxied(0.0, "127.0.0.1:40001") is True
    assert g.admit_proxied(0.0, "127.0.0.1:40002") is True
    assert g.admission.n_proxied == 2
    with caplog.at_level(logging.WARNING, logger="tcpencap"):
        assert g.admit_proxied(0.0, "127.0.0.1:40003") is False
    assert g.admission.n_proxied == 2  # a refusal takes no slot
    assert g.events == {"limit-pending": 1}
    (line,) = warnings(caplog)
    assert "127.0.0.1:40003" in line and "2 connections without a first message" in line
    g.proxied_done()
    assert g.admission.n_proxied == 1
    assert g.admit_proxied(0.0, "127.0.0.1:40004") is True
    assert g.admission.n_proxied == 2 and g.pull() == []


def test_admit_proxied_counts_pending_gateway_connections_too() -> None:
    g = gw_engine(max_pending="2", max_connections="10")
    assert g.accept(0.0, G, 4500, C, 50000) is not None  # pending: no first message yet
    assert g.admit_proxied(0.0, "p1") is True
    assert g.admit_proxied(0.0, "p2") is False
    assert g.events == {"limit-pending": 1}


def test_admit_proxied_is_bounded_by_max_connections() -> None:
    g = gw_engine(max_pending="10", max_connections="2")
    gid = g.accept(0.0, G, 4500, C, 50000)
    assert gid is not None
    first_ike(g, gid)
    assert (g.admission.n_gateway, g.admission.n_pending) == (1, 0)
    assert g.admit_proxied(0.0, "p1") is True  # 1 + 0 < 2
    assert g.admit_proxied(0.0, "p2") is False  # 1 + 1 >= 2
    assert g.events == {"limit-connections": 1}
    assert g.admission.n_proxied == 1


def test_admit_proxied_reports_the_connection_limit_first() -> None:
    g = gw_engine(max_pending="1", max_connections="1")
    assert g.admit_proxied(0.0, "p1") is True
    assert g.admit_proxied(0.0, "p2") is False
    assert g.events == {"limit-connections": 1}


def test_admit_proxied_refusals_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    g = gw_engine(max_pending="1")
    assert g.admit_proxied(10.0, "p0")
    with caplog.at_level(logging.WARNING, logger="tcpencap"):
        for i in range(5):
            assert g.admit_proxied(10.0 + i * 0.1, f"p{i + 1}") is False
        assert len(warnings(caplog)) == 1
        assert g.admit_proxied(11.5, "late") is False
    assert g.events == {"limit-pending": 6}
    assert [("p1" in w, "late" in w) for w in warnings(caplog)] == [(True, False), (False, True)]


def test_accept_counts_proxied_connections_as_pending() -> None:
    g = gw_engine(max_pending="2", max_connections="10", max_per_source="10")
    assert g.admit_proxied(0.0, "p1") and g.admit_proxied(0.0, "p2")
    assert g.accept(0.0, G, 4500, C, 50000) is None
    assert g.events == {"limit-pending": 1}
    assert (g.admission.n_gateway, g.admission.n_pending, g.conns) == (0, 0, {})
    # the header arrived: the proxied slot becomes the client's own connection
    g.proxied_done()
    gid = g.accept(0.0, G, 4500, C, 50001)
    assert gid is not None and g.conns[gid].state is not State.CLOSING
    assert (g.admission.n_gateway, g.admission.n_pending, g.admission.n_proxied) == (1, 1, 1)
    assert g.accept(0.0, G, 4500, C, 50002) is None
    assert g.events == {"limit-pending": 2}


def test_proxied_done_gives_the_slot_back() -> None:
    g = gw_engine(max_pending="1")
    for _ in range(3):
        assert g.admit_proxied(0.0, "p") is True
        assert g.admit_proxied(0.0, "q") is False
        g.proxied_done()
        assert g.admission.n_proxied == 0
    assert g.accept(0.0, G, 4500, C, 50000) is not None


def test_front_refused_counts_and_logs_under_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = gw_engine()
    with caplog.at_level(logging.WARNING, logger="tcpencap"):
        g.front_refused(5.0, "proxy-untrusted", "198.18.7.7:40000", "a PROXY header from outside")
        g.front_refused(5.2, "proxy-untrusted", "198.18.7.8:40000", "again")
        g.front_refused(5.3, "proxy-missing", "127.0.0.1:40001", "no PROXY header")
    assert g.events == {"proxy-untrusted": 2, "proxy-missing": 1}
    lines = warnings(caplog)
    assert len(lines) == 2  # the second proxy-untrusted was within the second
    assert "198.18.7.7:40000" in lines[0] and "a PROXY header from outside" in lines[0]
    assert "127.0.0.1:40001" in lines[1] and "no PROXY header" in lines[1]
    assert g.pull() == [] and g.conns == {}
    assert (g.admission.n_gateway, g.admission.n_pending, g.admission.n_proxied) == (0, 0, 0)


def test_front_failed_counts_logs_and_closes_a_gateway_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = gw_engine()
    gid = g.accept(1.0, G, 4500, C, 50000)
    assert gid is not None
    g.pull()
    with caplog.at_level(logging.WARNING, logger="tcpencap"):
        g.front_failed(2.0, gid, 0, "tls-handshake", "alert unknown ca")
    conn = g.conns[gid]
    assert conn.drops == {"tls-handshake": 1}
    assert g.events == {"tls-handshake": 1}
    (line,) = warnings(caplog)
    assert "alert unknown ca" in line and f"conn {gid} " in line
    (close,) = g.pull()
    assert isinstance(close, Close) and (close.conn_id, close.reason) == (gid, "tls-handshake")
    assert conn.state is State.CLOSING
    # a second failure is counted, but the connection is closed once
    g.front_failed(2.1, gid, 0, "tls-handshake", "again")
    assert conn.drops == {"tls-handshake": 2} and g.pull() == []
    # the shell reports the loss: the slots come back
    g.connection_lost(2.2, gid, 0, None)
    assert (g.admission.n_gateway, g.admission.n_pending, g.admission.per_source) == (0, 0, {})


@pytest.mark.parametrize("which", ["stale-generation", "unknown-id"])
def test_front_failed_on_a_stale_connection_does_nothing(
    which: str, caplog: pytest.LogCaptureFixture
) -> None:
    g = gw_engine()
    gid = g.accept(1.0, G, 4500, C, 50000)
    assert gid is not None
    g.pull()
    conn_id, generation = (gid, 1) if which == "stale-generation" else (gid + 100, 0)
    with caplog.at_level(logging.WARNING, logger="tcpencap"):
        g.front_failed(2.0, conn_id, generation, "tls-handshake", "late")
    assert warnings(caplog) == []
    assert g.events == {} and g.conns[gid].drops == {}
    assert g.pull() == [] and g.conns[gid].state is not State.CLOSING


def test_front_failed_closes_a_client_connection() -> None:
    cfg = parse_config(
        text_of("connections.c1-gw", f"remote_addrs = {G}", "transport = tcp", "tls = yes"),
        PATH,
    )
    c = Rfc9329Engine(cfg, 100.0)
    c.apply(
        100.0,
        plans.plan(plans.Intent(restart_only=plans.restart_only(cfg)), plans.intent_of(cfg)),
    )
    c.pull()
    packet = build_udp_packet(
        addr_bytes(C), addr_bytes(G), 4500, 4500, NON_ESP_MARKER + ike_sa_init()
    )
    c.outbound(100.0, packet)
    (connect,) = [o for o in c.pull() if isinstance(o, Connect)]
    assert c.connected(100.1, connect.conn_id, connect.generation)
    c.pull()
    c.front_failed(100.2, connect.conn_id, connect.generation + 1, "tls-verify", "stale")
    assert c.pull() == [] and c.events == {}
    c.front_failed(100.2, connect.conn_id, connect.generation, "tls-verify", "bad certificate")
    outs = c.pull()
    assert [(type(o), o.conn_id, o.reason) for o in outs if isinstance(o, Close)] == [
        (Close, connect.conn_id, "tls-verify")
    ]
    assert c.conns[connect.conn_id].drops == {"tls-verify": 1}
    assert c.events == {"tls-verify": 1}
