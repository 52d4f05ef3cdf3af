"""The facts the RFC 9329 engine reads from charon's VICI messages, and the first-message
check: whatever charon (or an attacker, for the frames) sends, they return data and never
raise."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tcpencap.core.vici_facts import ike_spis, inbound_changes, inbound_spis
from tcpencap.wire.ike import IKEV1_EXCHANGES, IKEV2_EXCHANGES, check_first_ike

LABELS = ["ike-updown", "child-updown", "ike-rekey", "child-rekey", "ike-update", "other"]
leaves = st.one_of(st.text(max_size=20), st.sampled_from(["c0ffee01", "zz", "198.18.0.1"]))
vici = st.recursive(
    leaves,
    lambda inner: st.dictionaries(
        st.sampled_from(
            ["spi-in", "initiator-spi", "remote-host", "child-sas", "old", "new", "up", "x"]
        ),
        inner,
        max_size=5,
    ),  # fmt: skip
    max_leaves=20,
)


@given(label=st.sampled_from(LABELS), up=st.booleans(), event=st.dictionaries(st.text(), vici))
def test_garbage_events_give_data(label: str, up: bool, event: dict) -> None:
    for spi, peer in inbound_changes(label, up, event):
        assert 0 <= spi < 1 << 32 and (peer is None or len(peer) in (4, 16))
    assert all(len(s) == 8 for s in ike_spis(event))
    assert isinstance(inbound_spis([event]), dict)


def sa(spi_in: str) -> dict:
    return {"remote-host": "198.18.0.9", "initiator-spi": "0102030405060708",
            "child-sas": {"c-1": {"spi-in": spi_in, "spi-out": "beef0001"}}}  # fmt: skip


def test_child_events_add_and_remove_inbound_spis() -> None:
    peer = bytes([198, 18, 0, 9])
    assert inbound_changes("child-updown", True, {"up": "yes", "c": sa("c0ffee01")}) == [
        (0xC0FFEE01, peer)
    ]
    assert inbound_changes("child-updown", False, {"c": sa("c0ffee01")}) == [(0xC0FFEE01, None)]
    rekey = {"c": {"remote-host": "198.18.0.9", "child-sas": {"c-2": {
        "old": {"spi-in": "00000101"}, "new": {"spi-in": "00000202"}}}}}  # fmt: skip
    assert inbound_changes("child-rekey", False, rekey) == [(0x101, None), (0x202, peer)]
    assert inbound_spis([{"c": sa("c0ffee01")}]) == {0xC0FFEE01: peer}
    assert ike_spis({"c": sa("x")}) == [bytes.fromhex("0102030405060708")]


def ike(exchange: int, major: int = 2, body: bytes = b"b" * 8) -> bytes:
    body = struct.pack("!BBH", 0, 0, 4 + len(body)) + body  # one payload, the last
    n = 28 + len(body)
    return b"\x11" * 8 + bytes(8) + struct.pack("!BBBBII", 33, major << 4, exchange, 8, 0, n) + body


@given(
    major=st.sampled_from([1, 2]),
    data=st.data(),
    body=st.binary(max_size=64),
)
def test_a_well_formed_message_passes_and_every_truncation_fails(
    major: int, data: st.DataObject, body: bytes
) -> None:
    known = IKEV2_EXCHANGES if major == 2 else IKEV1_EXCHANGES
    msg = ike(data.draw(st.sampled_from(sorted(known))), major, body)
    assert check_first_ike(msg) == ""
    cut = data.draw(st.integers(0, len(msg) - 1))
    assert check_first_ike(msg[:cut]) != ""
    assert check_first_ike(msg + b"\x00") != ""  # the frame is longer than the message


@given(st.binary(max_size=80))
def test_any_bytes_give_a_verdict(raw: bytes) -> None:
    assert isinstance(check_first_ike(raw), str)


def test_unknown_exchange_types_fail() -> None:
    assert "exchange type 99" in check_first_ike(ike(99))
    assert check_first_ike(ike(34, major=1)) != ""  # 34 is IKEv2's, not an IKEv1 exchange
    assert check_first_ike(ike(2, major=1)) == ""
