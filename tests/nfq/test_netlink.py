"""nfq.netlink: the framing of the nfnetlink requests tcpencap builds itself, checked field
by field against the layouts of linux/netlink.h and linux/netfilter/nfnetlink.h."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from nfq.netlink import NLM_F_ACK, NLM_F_REQUEST, attr, nfnl_message


def test_attribute_length_counts_the_header_not_the_padding() -> None:
    a = attr(7, b"abcde")
    assert struct.unpack_from("=HH", a) == (4 + 5, 7)
    assert a[4:9] == b"abcde" and a[9:] == b"\0\0\0" and len(a) == 12


@given(st.integers(0, 0xFFFF), st.binary(max_size=64))
def test_any_attribute_is_padded_to_four_octets(atype: int, payload: bytes) -> None:
    a = attr(atype, payload)
    length, got_type = struct.unpack_from("=HH", a)
    assert (length, got_type) == (4 + len(payload), atype)
    assert len(a) % 4 == 0 and len(a) - length < 4
    assert a[4:length] == payload and set(a[length:]) <= {0}


def test_message_layout() -> None:
    body = attr(1, b"\x06")
    msg = nfnl_message(6, 0x0E, body, seq=9, flags=NLM_F_REQUEST | NLM_F_ACK, family=2, res_id=7)
    assert struct.unpack_from("=IHHII", msg) == (len(msg), 0x060E, 0x5, 9, 0)
    assert msg[16:20] == bytes([2, 0]) + (7).to_bytes(2, "big")  # family, version 0, res_id
    assert msg[20:] == body


@given(
    st.integers(0, 0xFF),
    st.integers(0, 0xFF),
    st.binary(max_size=40).map(lambda b: attr(1, b)),
    st.integers(0, 2**40),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFF),
    st.integers(0, 0xFFFF),
)
def test_message_fields_round_trip(
    subsys: int, cmd: int, attrs: bytes, seq: int, flags: int, family: int, res_id: int
) -> None:
    msg = nfnl_message(subsys, cmd, attrs, seq=seq, flags=flags, family=family, res_id=res_id)
    length, mtype, got_flags, got_seq, pid = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) == 20 + len(attrs)
    assert (mtype >> 8, mtype & 0xFF) == (subsys, cmd)
    assert (got_flags, got_seq, pid) == (flags, seq & 0xFFFFFFFF, 0)
    assert struct.unpack_from("!BBH", msg, 16) == (family, 0, res_id)
    assert msg[20:] == attrs
