"""Tests for the RFC 9329 stream codec: framing rules, libreswan's negative vectors, properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.wire.ike import parse_ike_header
from tcpencap.wire.rfc9329 import (
    PREFIX,
    ConnectionClosed,
    ESPPacket,
    IKEMessage,
    InvalidFrame,
    Keepalive,
    NeedData,
    PrefixReceived,
    ProtocolError,
    Role,
    StreamCodec,
    frame_esp,
    frame_ike,
)

EVENT_TYPES = (
    PrefixReceived,
    IKEMessage,
    ESPPacket,
    Keepalive,
    InvalidFrame,
    NeedData,
    ProtocolError,
    ConnectionClosed,
)
TERMINAL = (ProtocolError, ConnectionClosed)

# IKE_SA_INIT header of libreswan's vector 10: SPIi 01..08, SPIr 0, NP 0, version 0x20,
# exchange 0x22, flags 0x08 (initiator), MID 0, length 0x1c.
IKE_HEADER_28 = (
    bytes(range(1, 9)) + bytes(8) + b"\x00\x20\x22\x08" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x1c"
)


def drain(codec: StreamCodec) -> tuple[list[object], bool]:
    """Events up to NeedData (excluded) or a terminal event (included)."""
    out: list[object] = []
    while True:
        ev = codec.next_event()
        assert isinstance(ev, EVENT_TYPES), ev
        if isinstance(ev, NeedData):
            return out, False
        out.append(ev)
        if isinstance(ev, TERMINAL):
            return out, True
        assert len(out) < 1_000_000


def run(
    chunks: list[bytes],
    role: Role = Role.RESPONDER,
    *,
    eof: bool = True,
    max_frame: int = 65535,
    check_bound: bool = False,
) -> list[object]:
    """Feed chunks (draining after each), then EOF; the non-NeedData events in order."""
    codec = StreamCodec(role, max_frame=max_frame)
    events: list[object] = []
    for chunk in chunks:
        assert chunk, "an empty chunk would mean EOF"
        codec.receive_data(chunk)
        evs, done = drain(codec)
        events += evs
        if done:
            return events
        if check_bound:
            limit = len(PREFIX) if role is Role.RESPONDER and not codec.prefix_received else 0
            assert codec.bytes_buffered < max(limit, max_frame)
    if eof:
        codec.receive_data(b"")
        evs, done = drain(codec)
        assert done
        events += evs
    return events


def feed(data: bytes, role: Role = Role.RESPONDER, **kw: int) -> tuple[StreamCodec, list[object]]:
    codec = StreamCodec(role, **kw)
    codec.receive_data(data)
    return codec, drain(codec)[0]


# ---------------------------------------------------------------------------- wire format


def test_prefix_octets() -> None:
    assert PREFIX == bytes.fromhex("494b45544350")


def test_frame_ike_example_from_protocols_md() -> None:
    frame = frame_ike(IKE_HEADER_28)
    assert frame[:2] == b"\x00\x22"  # 2 + 4 + 28
    assert frame[2:6] == bytes(4)
    assert frame[6:] == IKE_HEADER_28


def test_frame_esp_length_counts_itself() -> None:
    packet = b"\x00\x00\x10\x01" + bytes(96)
    assert frame_esp(packet) == b"\x00\x66" + packet


def test_send_keepalive() -> None:
    assert StreamCodec(Role.ORIGINATOR).send_keepalive() == b"\x00\x03\xff"


def test_send_methods_match_helpers() -> None:
    codec = StreamCodec(Role.ORIGINATOR)
    esp = b"\xc0\x01\x02\x03" + bytes(20)
    assert codec.send_ike(b"abc") == frame_ike(b"abc")
    assert codec.send_esp(esp) == frame_esp(esp)


def test_helpers_take_memoryview_and_bytearray() -> None:
    esp = b"\x00\x00\x00\x07seq0data"
    assert frame_esp(memoryview(esp)) == frame_esp(bytearray(esp)) == b"\x00\x0e" + esp
    assert frame_ike(memoryview(b"xy")) == b"\x00\x08" + bytes(4) + b"xy"


def test_send_prefix_originator_once() -> None:
    codec = StreamCodec(Role.ORIGINATOR)
    assert codec.send_prefix() == b"IKETCP"
    with pytest.raises(ValueError):
        codec.send_prefix()


def test_send_prefix_refused_for_responder() -> None:
    with pytest.raises(ValueError):
        StreamCodec(Role.RESPONDER).send_prefix()


def test_send_esp_rejects_spi_zero() -> None:
    with pytest.raises(ValueError, match="SPI 0"):
        frame_esp(bytes(4) + b"\x00\x00\x00\x01payload")


@pytest.mark.parametrize("n", [0, 1, 4, 7])
def test_send_esp_rejects_short(n: int) -> None:
    with pytest.raises(ValueError):
        frame_esp(b"\x01" * n)


def test_send_esp_size_limit() -> None:
    biggest = b"\x01" * 65533
    assert frame_esp(biggest)[:2] == b"\xff\xff"
    with pytest.raises(ValueError):
        frame_esp(b"\x01" * 65534)


def test_send_ike_size_limits() -> None:
    assert frame_ike(b"\x01" * 65529)[:2] == b"\xff\xff"
    with pytest.raises(ValueError):
        frame_ike(b"\x01" * 65530)
    with pytest.raises(ValueError):
        frame_ike(b"")


@pytest.mark.parametrize("bad", [-1, 0, 1, 65536])
def test_max_frame_range(bad: int) -> None:
    with pytest.raises(ValueError):
        StreamCodec(Role.RESPONDER, max_frame=bad)
    StreamCodec(Role.RESPONDER, max_frame=2)
    StreamCodec(Role.RESPONDER, max_frame=65535)


def test_emitted_events_are_frozen_values() -> None:
    esp = b"\x01\x02\x03\x04" + bytes(8)
    _, events = feed(frame_ike(b"i") + frame_esp(esp), Role.ORIGINATOR)
    assert events == [IKEMessage(b"i"), ESPPacket(esp)]
    assert hash(events[0]) == hash(IKEMessage(b"i"))
    for ev in events:
        with pytest.raises(AttributeError):
            ev.data = b"changed"  # type: ignore[misc]


# ---------------------------------------------------------------------------- prefix


@pytest.mark.parametrize("k", range(1, 6))
def test_partial_prefix_waits(k: int) -> None:
    codec, events = feed(PREFIX[:k])
    assert events == []
    assert codec.next_event() == NeedData()
    assert not codec.prefix_received
    assert codec.bytes_buffered == k


@pytest.mark.parametrize("pos", range(6))
def test_wrong_prefix_octet_is_fatal_immediately(pos: int) -> None:
    wrong = PREFIX[:pos] + bytes([PREFIX[pos] ^ 0x20])
    codec, events = feed(wrong)
    assert len(events) == 1 and isinstance(events[0], ProtocolError)
    assert "prefix" in events[0].reason
    assert not codec.prefix_received


def test_prefix_byte_by_byte_then_frame() -> None:
    stream = PREFIX + frame_ike(b"hello")
    events = run([stream[i : i + 1] for i in range(len(stream))])
    assert events == [PrefixReceived(), IKEMessage(b"hello"), ConnectionClosed()]


def test_prefix_received_flag_and_not_counted_as_frame() -> None:
    codec, events = feed(PREFIX)
    assert events == [PrefixReceived()]
    assert codec.prefix_received
    assert codec.frames_in == 0
    assert codec.bytes_buffered == 0


def test_prefix_not_repeated_on_later_frames() -> None:
    codec, events = feed(PREFIX + PREFIX)
    # The second "IKETCP" is a frame of length 0x494b, not a second prefix.
    assert events == [PrefixReceived()]
    assert codec.next_event() == NeedData()


def test_originator_expects_no_prefix() -> None:
    esp = b"\x01\x02\x03\x04" + bytes(12)
    codec, events = feed(frame_esp(esp) + frame_ike(b"x"), Role.ORIGINATOR)
    assert events == [ESPPacket(esp), IKEMessage(b"x")]
    assert not codec.prefix_received


def test_originator_reads_iketcp_as_a_length() -> None:
    codec, events = feed(PREFIX, Role.ORIGINATOR)
    assert events == []  # 0x494b = 18763-octet frame, incomplete
    codec2, events2 = feed(PREFIX, Role.ORIGINATOR, max_frame=1500)
    assert len(events2) == 1 and isinstance(events2[0], ProtocolError)


# ---------------------------------------------------------------------------- frames


def test_keepalive_is_its_own_event_not_invalid() -> None:
    codec, events = feed(PREFIX + b"\x00\x03\xff")
    assert events == [PrefixReceived(), Keepalive()]
    assert codec.frames_in == 1


@pytest.mark.parametrize("octet", [0x00, 0x01, 0xFE])
def test_one_octet_non_keepalive_dropped(octet: int) -> None:
    _, events = feed(PREFIX + bytes([0, 3, octet]) + frame_ike(b"z"))
    assert isinstance(events[1], InvalidFrame)
    assert events[2] == IKEMessage(b"z")


@pytest.mark.parametrize(
    "payload",
    [b"\x00\x00", b"\x01\x02", b"\x00\x00\x00", b"\xff\xff\xff", b"\x00\x00\x00\x01"],
)
def test_payload_of_2_to_4_octets_dropped(payload: bytes) -> None:
    frame = (len(payload) + 2).to_bytes(2, "big") + payload
    codec, events = feed(PREFIX + frame + b"\x00\x03\xff")
    assert isinstance(events[1], InvalidFrame)
    assert events[2] == Keepalive()
    assert codec.frames_in == 2


@pytest.mark.parametrize("n", [5, 6, 7])
def test_esp_shorter_than_spi_and_sequence_dropped(n: int) -> None:
    frame = (n + 2).to_bytes(2, "big") + b"\x01" * n
    _, events = feed(PREFIX + frame)
    assert isinstance(events[1], InvalidFrame)
    assert "ESP" in events[1].reason


def test_esp_of_8_octets_delivered() -> None:
    esp = b"\x00\x00\x01\x00\x00\x00\x00\x01"
    _, events = feed(PREFIX + frame_esp(esp))
    assert events == [PrefixReceived(), ESPPacket(esp)]


def test_spi_with_only_low_octet_set_is_esp() -> None:
    esp = b"\x00\x00\x00\x01" + b"\x00" * 8
    _, events = feed(PREFIX + b"\x00\x0e" + esp)
    assert events[1] == ESPPacket(esp)


@pytest.mark.parametrize("n", [1, 2, 27])
def test_ike_shorter_than_header_still_delivered(n: int) -> None:
    msg = b"\x07" * n
    _, events = feed(PREFIX + frame_ike(msg))
    assert events == [PrefixReceived(), IKEMessage(msg)]


@pytest.mark.parametrize("length", [0, 1])
@pytest.mark.parametrize("role", list(Role))
def test_length_0_or_1_fatal(length: int, role: Role) -> None:
    lead = PREFIX if role is Role.RESPONDER else b""
    codec, events = feed(lead + frame_ike(b"ok") + length.to_bytes(2, "big") + b"junk", role)
    assert events[-2] == IKEMessage(b"ok")
    assert isinstance(events[-1], ProtocolError)


def test_length_above_max_frame_fatal_before_payload() -> None:
    codec, events = feed(PREFIX + b"\x00\x65", max_frame=100)  # 101 > 100, no payload yet
    assert isinstance(events[-1], ProtocolError)
    assert "max_frame" in events[-1].reason


def test_length_equal_to_max_frame_accepted() -> None:
    msg = b"\x01" * 94
    _, events = feed(PREFIX + frame_ike(msg), max_frame=100)
    assert events == [PrefixReceived(), IKEMessage(msg)]


def test_maximum_frames_round_trip() -> None:
    ike = b"\x02" * 65529
    esp = b"\x03" * 65533
    events = run([PREFIX + frame_ike(ike) + frame_esp(esp)])
    assert events == [PrefixReceived(), IKEMessage(ike), ESPPacket(esp), ConnectionClosed()]


def test_frames_in_and_bytes_buffered() -> None:
    codec = StreamCodec(Role.RESPONDER)
    data = PREFIX + frame_ike(b"a") + b"\x00\x02" + b"\x00\x03\xff" + b"\x00\x10"
    codec.receive_data(data)
    assert codec.bytes_buffered == len(data)
    events, _ = drain(codec)
    assert len(events) == 4
    assert codec.frames_in == 3
    assert codec.bytes_buffered == 2


# ---------------------------------------------------------------------------- terminal states


def test_protocol_error_is_sticky_and_frees_buffer() -> None:
    codec, events = feed(PREFIX + b"\x00\x00" + frame_ike(b"never"))
    err = events[-1]
    assert isinstance(err, ProtocolError)
    codec.receive_data(frame_ike(b"more"))
    codec.receive_data(b"")
    assert codec.next_event() is err
    assert codec.next_event() is err
    assert codec.bytes_buffered == 0


def test_clean_eof_at_frame_boundary() -> None:
    codec = StreamCodec(Role.RESPONDER)
    codec.receive_data(PREFIX + frame_ike(b"m"))
    codec.receive_data(b"")
    assert drain(codec)[0] == [PrefixReceived(), IKEMessage(b"m"), ConnectionClosed()]
    assert codec.next_event() == ConnectionClosed()


@pytest.mark.parametrize("role", list(Role))
def test_eof_before_any_data_is_clean(role: Role) -> None:
    assert run([], role) == [ConnectionClosed()]


@pytest.mark.parametrize(
    "data",
    [PREFIX[:3], PREFIX + b"\x00", PREFIX + frame_ike(b"abcdef")[:-1]],
    ids=["in-prefix", "in-length", "in-frame"],
)
def test_eof_mid_stream_is_fatal(data: bytes) -> None:
    events = run([data])
    assert isinstance(events[-1], ProtocolError)
    assert "EOF" in events[-1].reason


def test_data_after_eof_is_fatal() -> None:
    codec = StreamCodec(Role.ORIGINATOR)
    codec.receive_data(b"")
    codec.receive_data(frame_ike(b"late"))
    ev = codec.next_event()
    assert isinstance(ev, ProtocolError) and "after EOF" in ev.reason


def test_repeated_eof_is_harmless() -> None:
    codec = StreamCodec(Role.ORIGINATOR)
    codec.receive_data(b"")
    codec.receive_data(b"")
    assert codec.next_event() == ConnectionClosed()


# ---------------------------------------------------------------------------- Part D vectors
# libreswan ikev2-tcp-09-fail-timeout: each on a new connection, then idle (no EOF).


def test_vector_01_nothing_waits() -> None:
    codec = StreamCodec(Role.RESPONDER)
    assert codec.next_event() == NeedData()
    assert not codec.prefix_received


def test_vector_02_one_prefix_octet_waits() -> None:
    codec, events = feed(b"I")
    assert events == []
    assert codec.next_event() == NeedData()


def test_vector_03_wrong_prefix_closes() -> None:
    _, events = feed(b"123456")
    assert len(events) == 1 and isinstance(events[0], ProtocolError)


def test_vector_04_prefix_only_waits() -> None:
    codec, events = feed(b"IKETCP")
    assert events == [PrefixReceived()]
    assert codec.next_event() == NeedData()


def test_vector_05_half_length_waits() -> None:
    codec, events = feed(b"IKETCP\x00")
    assert events == [PrefixReceived()]
    assert codec.bytes_buffered == 1


def test_vector_06_length_zero_closes() -> None:
    _, events = feed(b"IKETCP\x00\x00")
    assert events[0] == PrefixReceived()
    assert isinstance(events[1], ProtocolError) and len(events) == 2


def test_vector_07_empty_frame_dropped() -> None:
    codec, events = feed(b"IKETCP\x00\x02")
    assert events[0] == PrefixReceived()
    assert isinstance(events[1], InvalidFrame) and len(events) == 2
    assert codec.next_event() == NeedData()


def test_vector_08_marker_only_dropped() -> None:
    codec, events = feed(b"IKETCP\x00\x06\x00\x00\x00\x00")
    assert events[0] == PrefixReceived()
    assert isinstance(events[1], InvalidFrame) and len(events) == 2
    assert "marker" in events[1].reason
    assert codec.next_event() == NeedData()


def test_vector_09_one_octet_ike_delivered() -> None:
    _, events = feed(b"IKETCP\x00\x07\x00\x00\x00\x00\xff")
    assert events == [PrefixReceived(), IKEMessage(b"\xff")]


def test_vector_10_bare_ike_sa_init_header_delivered() -> None:
    data = b"IKETCP\x00\x22\x00\x00\x00\x00" + IKE_HEADER_28
    _, events = feed(data)
    assert events == [PrefixReceived(), IKEMessage(IKE_HEADER_28)]
    hdr = parse_ike_header(events[1].data)
    assert hdr.exchange == 0x22 and hdr.is_sa_init and hdr.length == 28


def test_vector_11_incomplete_message_waits() -> None:
    codec, events = feed(b"IKETCP\x00\xff")
    assert events == [PrefixReceived()]
    assert codec.next_event() == NeedData()


def test_vector_12_max_length_waits() -> None:
    codec, events = feed(b"IKETCP\xff\xff")
    assert events == [PrefixReceived()]
    assert codec.next_event() == NeedData()


# ---------------------------------------------------------------------------- buffering


def test_many_small_frames_keep_buffer_compact() -> None:
    codec = StreamCodec(Role.ORIGINATOR)
    frame = frame_ike(b"q" * 20)
    seen = 0
    for _ in range(5000):
        codec.receive_data(frame[:7])
        codec.receive_data(frame[7:])
        events, _ = drain(codec)
        seen += len(events)
        # White-box: consumed octets must not pile up in the bytearray.
        assert len(codec._buf) <= len(frame)
    assert seen == 5000 and codec.frames_in == 5000


def test_one_big_chunk_of_many_frames() -> None:
    frame = frame_esp(b"\x00\x00\x01\x00" + bytes(60))
    events = run([frame * 20000], Role.ORIGINATOR)
    assert len(events) == 20001 and events[-1] == ConnectionClosed()


# ---------------------------------------------------------------------------- properties

spis = st.integers(1, 2**32 - 1).map(lambda v: v.to_bytes(4, "big"))
items = st.one_of(
    st.tuples(st.just("ike"), st.binary(min_size=1, max_size=700)),
    st.tuples(st.just("esp"), st.tuples(spis, st.binary(min_size=4, max_size=1500))),
    st.tuples(st.just("ka"), st.none()),
)


def encode(seq: list[tuple[str, object]]) -> tuple[bytes, list[object]]:
    out = [frame_ike(v) if k == "ike" else b"" for k, v in seq]
    expected: list[object] = []
    for i, (kind, value) in enumerate(seq):
        if kind == "ike":
            expected.append(IKEMessage(value))
        elif kind == "esp":
            packet = value[0] + value[1]
            out[i] = frame_esp(packet)
            expected.append(ESPPacket(packet))
        else:
            out[i] = b"\x00\x03\xff"
            expected.append(Keepalive())
    return b"".join(out), expected


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(items, max_size=30), role=st.sampled_from(list(Role)))
def test_round_trip(seq: list[tuple[str, object]], role: Role) -> None:
    body, expected = encode(seq)
    lead: list[object] = []
    if role is Role.RESPONDER:
        body = StreamCodec(Role.ORIGINATOR).send_prefix() + body
        lead = [PrefixReceived()]
    assert run([body] if body else [], role) == [*lead, *expected, ConnectionClosed()]


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(items, max_size=15), data=st.data())
def test_any_split_of_valid_stream_gives_same_events(seq, data) -> None:
    body, _ = encode(seq)
    stream = PREFIX + body
    cuts = data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=40))
    whole = run([stream], check_bound=True)
    assert run(split(stream, cuts), check_bound=True) == whole
    assert run([stream[i : i + 1] for i in range(len(stream))]) == whole


# A frame of any declared length (including 0, 1, short and oversized) over random payload.
raw_frames = st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=64)).map(
    lambda t: t[0].to_bytes(2, "big") + t[1]
)
messy_streams = st.tuples(
    st.sampled_from([PREFIX, b"", PREFIX[:3], b"IKETCQ"]),
    st.lists(
        st.one_of(
            raw_frames,
            st.binary(min_size=1, max_size=7).map(lambda b: (len(b) + 2).to_bytes(2, "big") + b),
            items.map(lambda it: encode([it])[0]),
        ),
        max_size=12,
    ),
).map(lambda t: t[0] + b"".join(t[1]))


@settings(max_examples=300, deadline=None)
@given(
    stream=st.one_of(messy_streams, st.binary(max_size=300)),
    role=st.sampled_from(list(Role)),
    max_frame=st.one_of(st.just(65535), st.integers(2, 65535)),
    eof=st.booleans(),
    data=st.data(),
)
def test_arbitrary_input_only_defined_events_and_split_invariant(
    stream: bytes, role: Role, max_frame: int, eof: bool, data
) -> None:
    cuts = data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=20))
    whole = run([stream] if stream else [], role, eof=eof, max_frame=max_frame, check_bound=True)
    parts = run(split(stream, cuts), role, eof=eof, max_frame=max_frame, check_bound=True)
    assert parts == whole
    for ev in whole[:-1]:
        assert not isinstance(ev, TERMINAL)
    if eof:
        assert isinstance(whole[-1], TERMINAL)
    if PrefixReceived() in whole:
        assert role is Role.RESPONDER and whole.index(PrefixReceived()) == 0


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(items, min_size=1, max_size=10), data=st.data())
def test_truncated_stream_ends_in_error_or_close(seq, data) -> None:
    frames = [encode([item])[0] for item in seq]
    _, expected = encode(seq)
    stream = PREFIX + b"".join(frames)
    boundaries = {0, len(PREFIX)}
    end = len(PREFIX)
    for frame in frames:
        end += len(frame)
        boundaries.add(end)
    cut = data.draw(st.integers(0, len(stream)))
    events = run([stream[:cut]] if cut else [])
    delivered = [e for e in events if not isinstance(e, (*TERMINAL, PrefixReceived))]
    assert delivered == expected[: len(delivered)]
    if cut in boundaries:
        assert events[-1] == ConnectionClosed()
    else:
        assert isinstance(events[-1], ProtocolError) and "EOF" in events[-1].reason
