"""nfq.classify.VerdictQueue: each queued packet gets the verdict ``decide`` gives it, and a
``decide`` that raises drops the packet (a bug must not let charon's IKE out unchecked) and
keeps the queue running. Driven with stand-in packets: no kernel queue is bound."""

from __future__ import annotations

import logging

import pytest

from nfq.classify import VerdictQueue


class Packet:
    """What the queue's callback uses of a netfilterqueue packet."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.verdict = ""

    def get_payload(self) -> bytes:
        return self.payload

    def accept(self) -> None:
        self.verdict += "accept"

    def drop(self) -> None:
        self.verdict += "drop"


def test_each_packet_gets_the_verdict_decide_gives_it():
    q = VerdictQueue(4503, decide=lambda payload: payload.startswith(b"ok"))
    packets = [Packet(b"ok 1"), Packet(b"bad"), Packet(b"ok 2")]
    for p in packets:
        q._callback(p)
    assert [p.verdict for p in packets] == ["accept", "drop", "accept"]
    assert (q.accepted, q.dropped, q.errors) == (2, 1, 0)


def test_a_decide_that_raises_drops_the_packet_and_the_queue_goes_on(
    caplog: pytest.LogCaptureFixture,
):
    def decide(payload: bytes) -> bool:
        if payload == b"boom":
            raise ValueError("a bug")
        return True

    q = VerdictQueue(4503, decide)
    bad, good = Packet(b"boom"), Packet(b"fine")
    with caplog.at_level(logging.ERROR, logger="tcpencap.nfq"):
        q._callback(bad)
        q._callback(good)
    assert (bad.verdict, good.verdict) == ("drop", "accept")
    assert (q.accepted, q.dropped, q.errors) == (1, 1, 1)
    assert "queue 4503: error deciding a packet; dropped" in caplog.text
