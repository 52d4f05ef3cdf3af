"""The RFC 9329 codec (tcpencap/wire/rfc9329.py) with the largest IKE messages, one octet
at a time, and frames over max_frame."""

from __future__ import annotations

import os
import struct

import pytest

from tcpencap.wire import rfc9329


def test_60k_ike_message_one_octet_at_a_time() -> None:
    message = bytes(28) + os.urandom(60 * 1024 - 28)
    wire = rfc9329.PREFIX + rfc9329.frame_ike(message) + rfc9329.frame_esp(b"\x01" * 40)
    codec = rfc9329.StreamCodec(rfc9329.Role.RESPONDER)
    events = []
    for i in range(len(wire)):
        codec.receive_data(wire[i : i + 1])
        while not isinstance(ev := codec.next_event(), rfc9329.NeedData):
            events.append(ev)
    assert isinstance(events[0], rfc9329.PrefixReceived)
    assert isinstance(events[1], rfc9329.IKEMessage) and events[1].data == message
    assert isinstance(events[2], rfc9329.ESPPacket)
    assert len(events) == 3


def test_largest_ike_message_passes_whole() -> None:
    message = os.urandom(rfc9329.MAX_IKE_MESSAGE)
    codec = rfc9329.StreamCodec(rfc9329.Role.ORIGINATOR)
    codec.receive_data(rfc9329.frame_ike(message))
    ev = codec.next_event()
    assert isinstance(ev, rfc9329.IKEMessage) and ev.data == message
    with pytest.raises(ValueError):
        rfc9329.frame_ike(message + b"x")


@pytest.mark.parametrize("max_frame", [64, 1500, 4000])
def test_frame_over_max_frame_is_fatal(max_frame: int) -> None:
    """Closed as soon as the length octets are in, without waiting for the body; every
    later call repeats the error (protocols.md, rfc9329.py frame rules)."""
    codec = rfc9329.StreamCodec(rfc9329.Role.ORIGINATOR, max_frame=max_frame)
    ok = rfc9329.frame_ike(bytes(max_frame - 6))
    assert len(ok) == max_frame
    codec.receive_data(ok)
    assert isinstance(codec.next_event(), rfc9329.IKEMessage)
    codec.receive_data(struct.pack("!H", max_frame + 1))
    ev = codec.next_event()
    assert isinstance(ev, rfc9329.ProtocolError) and "max_frame" in ev.reason
    codec.receive_data(bytes(max_frame))
    assert codec.next_event() == ev
