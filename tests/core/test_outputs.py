"""tcpencap.core.outputs: the records both engines hand the shell, and the shared naming
helpers (a connection in logs, a status row)."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from tcpencap.core.outputs import (
    Close,
    Connect,
    Inject,
    Query,
    SendRaw,
    Steer,
    SteerSegments,
    Transmit,
    bracket,
    count,
    describe,
    status_row,
)

ADDR = st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16)


def test_transmit_defaults_to_one_esp_frame_that_may_be_dropped() -> None:
    t = Transmit(7, b"abc")
    assert (t.conn_id, t.data, t.is_ike, t.frames) == (7, b"abc", False, 1)
    assert repr(t) == "Transmit(7, 3 octets, ike=False)"
    assert repr(Transmit(1, b"", is_ike=True)) == "Transmit(1, 0 octets, ike=True)"


def test_send_raw_sends_the_packet_itself_unless_given_its_fragments() -> None:
    whole = SendRaw(b"packet", b"\x01\x02\x03\x04")
    assert whole.pieces == (b"packet",) and whole.first_try
    split = SendRaw(b"packet", b"\x01\x02\x03\x04", (b"pac", b"ket"), first_try=False)
    assert split.pieces == (b"pac", b"ket") and not split.first_try
    assert repr(split) == "SendRaw(6 octets)"


def test_records_keep_no_per_instance_dict() -> None:
    """The data path creates one per packet: slotted, no __dict__."""
    for rec in (Transmit(1, b""), SendRaw(b"", b""), Inject(b"", b""), Close(1, "")):
        assert not hasattr(rec, "__dict__")


@given(ADDR, st.booleans(), st.integers(0, 65535), ADDR, st.booleans(), st.integers(0, 65535))
def test_steer_equality_is_by_peer_switch_and_port(
    p1: bytes, on1: bool, port1: int, p2: bytes, on2: bool, port2: int
) -> None:
    assert (Steer(p1, on1, port1) == Steer(p2, on2, port2)) == (
        (p1, on1, port1) == (p2, on2, port2)
    )
    assert (SteerSegments(p1, port1, on1) == SteerSegments(p2, port2, on2)) == (
        (p1, on1, port1) == (p2, on2, port2)
    )


def test_records_of_other_kinds_are_never_equal() -> None:
    peer = b"\xc6\x12\x00\x01"
    assert Steer(peer, True, 500) != SteerSegments(peer, 500, True)
    assert SteerSegments(peer, 500, True) != Steer(peer, True, 500)
    assert Query("fallback") != "fallback" and Query("fallback") == Query("fallback")
    assert Query("a") != Query("b")


def test_reprs_name_what_an_operator_reads_in_a_log() -> None:
    peer = bytes([198, 18, 0, 1])
    assert repr(Steer(peer, True)) == "Steer(c6120001, True)"
    assert repr(Steer(peer, False, 4500)) == "Steer(c6120001:4500, False)"
    assert repr(SteerSegments(peer, 10000, True)) == "SteerSegments(c6120001:10000, True)"
    assert repr(Connect(3, 2, peer, 40000, peer, 443)) == "Connect(3/2, port 443)"
    assert repr(Close(3, "idle")) == "Close(3, 'idle')"
    assert repr(Query("sync")) == "Query('sync')"
    assert repr(Inject(b"12345", peer)) == "Inject(5 octets)"


def test_count_starts_at_one_and_adds() -> None:
    counters: dict[str, int] = {}
    count(counters, "drop")
    count(counters, "drop")
    count(counters, "other")
    assert counters == {"drop": 2, "other": 1}


def test_describe_brackets_ipv6_only() -> None:
    assert bracket("198.18.0.1") == "198.18.0.1" and bracket("fd00::1") == "[fd00::1]"
    assert (
        describe(4, "client", "198.18.0.1", 40000, "fd00::2", 4500)
        == "conn 4 client 198.18.0.1:40000 <-> [fd00::2]:4500"
    )


def test_status_row_lists_spis_sorted_and_keeps_the_figures() -> None:
    entry = SimpleNamespace(
        ike_spis={b"\x02" * 8, b"\x01" * 8}, ike_spis_old={b"\x03" * 8}, esp_spis={0x20, 0x1}
    )
    row = status_row(5, "rfc9329", "gateway", "OPEN", "a", "b", entry, {"rx": 9, "tx": 1})
    assert row == {
        "id": 5,
        "encapsulation": "rfc9329",
        "side": "gateway",
        "state": "OPEN",
        "local": "a",
        "peer": "b",
        "ike_spis": ["01" * 8, "02" * 8],
        "ike_spis_old": ["03" * 8],
        "esp_spis": ["00000001", "00000020"],
        "rx": 9,
        "tx": 1,
    }


def test_status_row_without_a_table_entry_has_no_spis() -> None:
    row = status_row(1, "ctcp", "client", "SYN_SENT", "a", "b", None, {})
    assert row["ike_spis"] == row["ike_spis_old"] == row["esp_spis"] == []
