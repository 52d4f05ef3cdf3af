"""tcpencap.core.restart: which peers of a previous run stay steered at start."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from tcpencap.core.restart import member_of, sa_hosts, still_held

A, B, C = "198.19.0.2", "198.19.0.3", "fd00:19::2"


def sa(host: object, port: object = "4500") -> dict[str, object]:
    return {"conn": {"remote-host": host, "remote-port": port, "state": "ESTABLISHED"}}


def packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_only_peers_charon_still_holds_sas_with_stay() -> None:
    sas = [sa(A), sa(C), sa("198.19.0.99")]
    assert still_held([A, B, C], sas) == ([packed(A), packed(C)], [])


def test_charon_unreachable_keeps_every_remembered_peer() -> None:
    assert still_held([A, B, f"{C},4500"], None) == ([packed(A), packed(B)], [(packed(C), 4500)])


def test_endpoint_members_stay_only_at_the_port_charon_talks_to() -> None:
    assert member_of(f"{A},4500") == (packed(A), 4500)
    assert member_of(f"{C},udp:4500") == (packed(C), 4500)
    assert member_of(C) == (packed(C), None)
    assert member_of(f"{A},x") is None and member_of("nonsense") is None
    assert still_held([f"{A},1234", f"{A},4500"], [sa(A)]) == ([], [(packed(A), 4500)])
    assert still_held([f"{A},1234"], [sa(A, "1234")]) == ([], [(packed(A), 1234)])


def test_whatever_charon_sends_is_read_without_raising() -> None:
    junk = [{}, {"x": None}, {"x": "str"}, sa(None), sa(5), sa("nonsense"), sa("0.0.0.0")]
    assert sa_hosts(junk) == set()  # type: ignore[arg-type]
    assert still_held([A], junk) == ([], [])  # type: ignore[arg-type]


@given(st.lists(st.text(max_size=40), max_size=8), st.lists(st.ip_addresses(), max_size=5))
def test_any_member_text_never_raises_and_only_held_addresses_stay(members, hosts) -> None:
    sas = [sa(str(h)) for h in hosts]
    kept, endpoints = still_held(members, sas)
    assert set(kept) <= {h.packed for h in hosts}
    assert len(kept) == len(set(kept)) and endpoints == []


def test_a_lingering_peer_of_a_previous_run_is_dropped_then_released() -> None:
    """The engine side (fake clock): a previous run's peer that charon holds SAs with is
    steered at start, charon's packets to it are dropped (no connection: never UDP), and it
    is released once charon lists no SA with it."""
    from tcpencap.core.lingering import PEER_RELEASE_DELAY
    from tcpencap.core.outputs import Query, Steer, Transmit
    from tcpencap.core.rfc9329_engine import Rfc9329Engine
    from tcpencap.wire.ike import NON_ESP_MARKER
    from tests.core.test_rfc9329_engine import CB, SPI_I, C, G, from_charon, gateway_config, ike

    g = Rfc9329Engine(gateway_config(), 0.0, None)
    g.pull()
    g.linger(0.0, [CB], [])
    assert g.pull() == [Steer(CB, True)]
    g.outbound(1.0, from_charon(G, C, 4500, 50000, NON_ESP_MARKER + ike(spi_i=SPI_I)))
    assert not [o for o in g.pull() if isinstance(o, Transmit)]
    held = [{"gw-c1": {"remote-host": C, "state": "ESTABLISHED"}}]
    now, asked, released = 0.0, 0, []
    while now < 3 * PEER_RELEASE_DELAY and not released:
        now = g.get_timer() or now + 1.0
        g.handle_timer(now)
        for o in g.pull():
            if isinstance(o, Query) and o.purpose == "peer-release":
                asked += 1
                g.sas_listed(now, o.purpose, held if now < 2 * PEER_RELEASE_DELAY else [])
            elif isinstance(o, Steer):
                released.append((now, o))
        released += [(now, o) for o in g.pull() if isinstance(o, Steer)]
    assert asked >= 2
    assert [o for _, o in released] == [Steer(CB, False)]
    assert released[0][0] >= 2 * PEER_RELEASE_DELAY


def test_ctcp_lingering_peers_are_released_but_configured_ones_stay() -> None:
    """cTCP gateway peers whose flow closed (or of a previous run) stay steered while
    charon holds SAs with them; a client's configured cTCP peer is never released."""
    from tcpencap.config import parse_config
    from tcpencap.core.ctcp_engine import RELEASE_POLL, RELEASE_QUERY, CtcpEngine
    from tcpencap.core.outputs import Query, Steer, SteerSegments
    from tcpencap.core.reload import CtcpPeers

    engine = CtcpEngine(parse_config("tcpencap {\n}\n", "/etc/tcpencap.conf"), 0.0)
    gw_peer, client_peer = packed(A), packed(B)
    engine.apply(0.0, [CtcpPeers({client_peer: 10000})])
    assert engine.pull() == [SteerSegments(client_peer, 10000, True), Steer(client_peer, True)]
    engine.linger(0.0, [(gw_peer, 4500)])
    assert engine.pull() == [Steer(gw_peer, True, 4500)]
    engine.handle_timer(RELEASE_POLL)
    assert engine.pull() == [Query(RELEASE_QUERY)]
    engine.sas_listed(RELEASE_POLL, RELEASE_QUERY, [sa(A)])  # charon still holds an SA
    assert engine.pull() == []
    engine.handle_timer(2 * RELEASE_POLL)
    assert engine.pull() == [Query(RELEASE_QUERY)]
    engine.sas_listed(2 * RELEASE_POLL, RELEASE_QUERY, [])
    assert engine.pull() == [Steer(gw_peer, False, 4500)]  # the client's peer is not asked about
    assert engine.get_timer() is None and list(engine.steering.peers()) == []
