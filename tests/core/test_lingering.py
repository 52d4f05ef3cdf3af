"""Lingering gateway endpoints on their own (tcpencap.core.lingering): steered while open,
kept while charon may talk to them, released by list-sas, brief ones bounded."""

from __future__ import annotations

from tcpencap.core.lingering import BRIEF_LINGER, PEER_RELEASE_DELAY, Lingering
from tcpencap.core.outputs import Query, Steer
from tcpencap.core.peers import SteeringRefs
from tcpencap.core.timers import TimerQueue

PEER = bytes([198, 18, 1, 2])
EP = (PEER, 50000)


def make() -> tuple[Lingering, list[object], TimerQueue]:
    out: list[object] = []
    timers = TimerQueue()
    return Lingering(SteeringRefs(), out.append, timers), out, timers


def sa_with(port: int, state: str = "ESTABLISHED") -> dict:
    return {"ike": {"remote-host": "198.18.1.2", "remote-port": str(port), "state": state}}


def test_an_endpoint_with_an_sa_lingers_until_charon_has_none() -> None:
    ling, out, _ = make()
    assert ling.steer(EP, 1)
    assert out == [Steer(PEER, True, 50000)]
    ling.linger(10.0, EP, 1, carried=True, max_brief=8)
    assert ling.release_at == {EP: 10.0 + PEER_RELEASE_DELAY} and ling.brief == {}
    ling.check(10.0 + PEER_RELEASE_DELAY)
    assert out[-1] == Query("peer-release")
    ling.release(10.0 + PEER_RELEASE_DELAY, [sa_with(50000)])  # charon still has one
    assert EP in ling.endpoints and out[-1] == Query("peer-release")
    ling.release(100.0, [sa_with(50000, "CONNECTING")])  # a half-open SA is no reason
    assert EP not in ling.endpoints and out[-1] == Steer(PEER, False, 50000)


def test_an_endpoint_without_an_sa_lingers_briefly_and_bounded() -> None:
    ling, out, timers = make()
    for port in range(3):
        ling.steer((PEER, port), port)
        ling.linger(1.0, (PEER, port), port, carried=False, max_brief=2)
    assert list(ling.brief) == [(PEER, 1), (PEER, 2)]  # the oldest went first
    assert out[-1] == Steer(PEER, False, 0)
    assert timers.next_due() == 1.0 + BRIEF_LINGER  # one question for all of them


def test_the_steering_limit_counts_real_peers_only() -> None:
    ling, out, _ = make()
    ling.steer((PEER, 1), 1)
    ling.linger(0.0, (PEER, 1), 1, carried=False, max_brief=8)  # brief: not counted
    assert ling.steer((PEER, 2), 2, limit=1)
    assert not ling.steer((PEER, 3), 3, limit=1)
    assert (PEER, 3) not in ling.endpoints and Steer(PEER, True, 3) not in out


def test_a_previous_runs_addresses_linger_until_released() -> None:
    ling, out, _ = make()
    ling.previous_run(0.0, [PEER], [EP])
    assert out == [Steer(PEER, True, 50000), Steer(PEER, True)]
    ling.release(PEER_RELEASE_DELAY, [])
    assert out[-2:] == [Steer(PEER, False), Steer(PEER, False, 50000)]
    assert not ling.steering.has(PEER, "linger")
