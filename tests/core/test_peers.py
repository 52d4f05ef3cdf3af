"""tcpencap.core.peers.SteeringRefs: a peer is steered while it has a reason, and a change of
reason (add the new one, then remove the old) never leaves a moment without one."""

from __future__ import annotations

from tcpencap.core.peers import SteeringRefs

PEER = bytes([198, 18, 1, 2])
ENDPOINT = (PEER, 4500)


def test_the_first_reason_starts_steering_and_the_last_one_stops_it():
    refs: SteeringRefs[bytes] = SteeringRefs()
    assert refs.add(PEER, "tcp:c1-gw") is True  # start steering
    assert refs.add(PEER, "fallback:c1-gw") is False  # already steered
    assert refs.add(PEER, "tcp:c1-gw") is False  # the same reason twice is one reason
    assert refs.reasons(PEER) == {"tcp:c1-gw", "fallback:c1-gw"}
    assert refs.remove(PEER, "tcp:c1-gw") is False  # one reason left
    assert PEER in refs and refs.has(PEER, "fallback:c1-gw")
    assert refs.remove(PEER, "fallback:c1-gw") is True  # stop steering
    assert PEER not in refs and len(refs) == 0 and refs.reasons(PEER) == frozenset()


def test_a_change_of_reason_leaves_no_gap():
    refs: SteeringRefs[tuple[bytes, int]] = SteeringRefs()
    refs.add(ENDPOINT, "conn:7")
    assert refs.add(ENDPOINT, "linger") is False  # the new reason first ...
    assert refs.remove(ENDPOINT, "conn:7") is False  # ... so this never stops steering
    assert refs.reasons(ENDPOINT) == {"linger"}


def test_removing_what_is_not_there_changes_nothing():
    refs: SteeringRefs[bytes] = SteeringRefs()
    assert refs.remove(PEER, "tcp:x") is False
    refs.add(PEER, "tcp:x")
    assert refs.remove(PEER, "brief") is False
    assert refs.has(PEER, "tcp:x") and not refs.has(PEER, "brief")


def test_a_whole_address_and_one_of_its_endpoints_are_different_targets():
    refs: SteeringRefs[bytes | tuple[bytes, int]] = SteeringRefs()
    refs.add(PEER, "tcp:c1-gw")
    refs.add(ENDPOINT, "conn:1")
    assert len(refs) == 2 and set(refs.peers()) == {PEER, ENDPOINT}
    refs.remove(PEER, "tcp:c1-gw")
    assert refs.peers() == [ENDPOINT]
