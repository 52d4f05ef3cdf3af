"""The client's steering reasons on their own (tcpencap.core.client_steering): each reason
steers exactly its peers, new before old, and a peer stays while any reason holds it."""

from __future__ import annotations

from tcpencap.core.client_steering import ClientSteering
from tcpencap.core.outputs import Steer
from tcpencap.core.reload import SteerTcp, UnsteerTcp, UnwatchFallback, WatchFallback

A, B = bytes([198, 19, 0, 2]), bytes([198, 19, 0, 3])


def make() -> tuple[ClientSteering, list[object]]:
    out: list[object] = []
    return ClientSteering(out.append), out


def test_a_reason_steers_exactly_its_peers_new_ones_first() -> None:
    cs, out = make()
    cs.apply([SteerTcp("vpn", (A,), 443)])
    assert out == [Steer(A, True)] and cs.is_client_peer(A) and cs.client_peers == {A: 443}
    out.clear()
    cs.apply([SteerTcp("vpn", (B,), 0)])
    assert out == [Steer(B, True), Steer(A, False)]  # never a moment with neither
    assert cs.client_peers == {B: 4500} and not cs.is_client_peer(A)


def test_a_peer_stays_while_any_reason_holds_it() -> None:
    cs, out = make()
    cs.apply([SteerTcp("one", (A,), 443), SteerTcp("two", (A,), 443)])
    cs.apply([UnsteerTcp("one")])
    assert out == [Steer(A, True)] and cs.is_client_peer(A)
    cs.apply([UnsteerTcp("two")])
    assert out[-1] == Steer(A, False) and not cs.is_client_peer(A)


def test_a_fallback_is_watched_not_steered_until_it_falls_back() -> None:
    cs, out = make()
    cs.apply([WatchFallback("fb", (A,), 10443, 3.0)])
    assert out == [] and "fb" in cs.fallback.conns and cs.port_of(A) == 10443
    cs.set_reason("fallback:fb", (A,), 0)  # what fallback_update does when it falls back
    assert out == [Steer(A, True)] and cs.client_peers == {A: 10443}
    cs.apply([UnwatchFallback("fb")])
    assert out[-1] == Steer(A, False) and "fb" not in cs.fallback.conns
