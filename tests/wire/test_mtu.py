"""Packet-size helpers (tcpencap/wire/mtu.py) checked against scapy's own decoders and
reassembly."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6, IPv6ExtHdrFragment

from tcpencap.wire import mtu
from tcpencap.wire.ctcp import encapsulate
from tcpencap.wire.packet import PacketError, build_ipv4, build_ipv6, build_udp_packet
from tests.udp_packets import DST4, DST6, SRC4, SRC6, reassemble4, udp4


@given(size=st.integers(29, 9000), path=st.integers(68, 9000))
@settings(max_examples=150, deadline=None)
def test_fragment_ipv4_reassembles(size: int, path: int) -> None:
    pkt = udp4(size, df=False)
    frags = mtu.fragment_ipv4(pkt, path)
    assert all(len(f) <= path for f in frags)
    if size <= path:
        assert frags == [pkt]
        return
    assert len(frags) >= 2
    for i, f in enumerate(frags):
        p = IP(f)
        q = IP(f)
        del q.chksum
        assert IP(bytes(q)).chksum == p.chksum, "bad header checksum"
        assert bool(p.flags.MF) == (i < len(frags) - 1)
        assert not p.flags.DF
        assert p.len == len(f)
        if i < len(frags) - 1:
            assert len(bytes(p.payload)) % 8 == 0
    assert reassemble4(frags) == pkt[20:]
    from scapy.all import defragment

    whole = defragment([IP(f) for f in frags])[0]
    assert bytes(whole[UDP].payload) == pkt[28:]


def test_fragment_ipv4_refuses_df_and_tiny_mtu() -> None:
    with pytest.raises(PacketError, match="DF"):
        mtu.fragment_ipv4(udp4(1600, df=True), 1500)
    with pytest.raises(PacketError, match="too small"):
        mtu.fragment_ipv4(udp4(1600, df=False), 27)


def test_fragment_ipv4_copies_only_copied_options() -> None:
    # 0x94 router alert (copied), 0x07 record route (not copied), padded
    opts = bytes([0x94, 4, 0, 0, 0x07, 7, 4, 0, 0, 0, 0, 0])
    pkt = build_ipv4(SRC4, DST4, 17, os.urandom(3000), ident=7, options=opts)
    frags = mtu.fragment_ipv4(pkt, 1000)
    assert IP(frags[0]).ihl == 8
    assert all(IP(f).ihl == 6 for f in frags[1:])
    assert frags[1][20:24] == bytes([0x94, 4, 0, 0])
    assert reassemble4(frags) == pkt[32:]


@given(size=st.integers(100, 9000), path=st.integers(1280, 9000))
@settings(max_examples=100, deadline=None)
def test_fragment_ipv6_reassembles(size: int, path: int) -> None:
    pkt = build_ipv6(SRC6, DST6, 17, os.urandom(size))
    frags = mtu.fragment_ipv6(pkt, path, ident=0xABCDEF01)
    assert all(len(f) <= path for f in frags)
    if len(pkt) <= path:
        assert frags == [pkt]
        return
    data = bytearray()
    for i, f in enumerate(frags):
        p = IPv6(f)
        fh = p[IPv6ExtHdrFragment]
        assert fh.id == 0xABCDEF01 and fh.nh == 17
        assert fh.offset * 8 == len(data)
        assert fh.m == (i < len(frags) - 1)
        assert p.plen == len(f) - 40
        data += bytes(fh.payload)
    assert bytes(data) == pkt[40:]


def test_icmp_frag_needed_quotes_the_packet() -> None:
    pkt = udp4(1480, df=True)
    icmp = mtu.icmp_frag_needed(pkt, 1464)
    p = IP(icmp)
    assert p.src == "198.19.0.2" and p.dst == "198.18.1.2"
    assert p[ICMP].type == 3 and p[ICMP].code == 4
    assert p[ICMP].nexthopmtu == 1464
    chk = p[ICMP].chksum
    del p[ICMP].chksum
    assert IP(bytes(p))[ICMP].chksum == chk
    assert p[IPerror].dst == "198.19.0.2" and p[UDPerror].sport == 4500
    assert len(icmp) <= 576


def test_icmpv6_packet_too_big() -> None:
    pkt = build_ipv6(SRC6, DST6, 17, build_udp_packet(SRC6, DST6, 4500, 4500, b"x" * 1500)[40:])
    icmp = mtu.icmpv6_packet_too_big(pkt, 1464)
    p = IPv6(icmp)
    assert p[ICMPv6PacketTooBig].mtu == 1464
    chk = p[ICMPv6PacketTooBig].cksum
    del p[ICMPv6PacketTooBig].cksum
    assert IPv6(bytes(p))[ICMPv6PacketTooBig].cksum == chk
    assert len(icmp) == 1280
    assert mtu.icmpv6_packet_too_big(pkt, 1000)[44:48] == struct.pack("!I", 1280)


@pytest.mark.parametrize("size", [1400, 1464, 1465, 1500])
@pytest.mark.parametrize("df", [True, False])
def test_check_inner_and_plan_match_the_real_overhead(size: int, df: bool) -> None:
    """The encapsulated segment is exactly 36 octets longer; a DF packet that would not fit
    is answered by ICMP, anything else leaves whole or as fragments within the MTU."""
    pkt = udp4(size, df=df)
    seg = encapsulate(pkt, sport=10000, dport=10000, seq=1, ack=1)
    assert len(seg) == size + mtu.CTCP_OVERHEAD
    early = mtu.check_inner(pkt, 1500)
    if size + 36 <= 1500:
        assert early is None
        assert mtu.plan(seg, 1500).send == (seg,)
        return
    if df:
        assert early is not None and early.reason == "too-big-df" and early.send == ()
        assert IP(early.signal)[ICMP].nexthopmtu == 1464
        assert mtu.plan(seg, 1500).send == ()  # never sent whole with DF
        return
    assert early is None
    out = mtu.plan(seg, 1500)
    assert out.reason == "fragmented" and len(out.send) == 2
    assert all(len(f) <= 1500 for f in out.send)
    assert reassemble4(list(out.send)) == seg[20:]


def test_plan_ipv6_fragments_and_signals() -> None:
    pkt = build_ipv6(SRC6, DST6, 17, build_udp_packet(SRC6, DST6, 4500, 4500, b"y" * 1460)[40:])
    seg = encapsulate(pkt, sport=10000, dport=10000, seq=1, ack=1)
    out = mtu.plan(seg, 1500, ident=5, original=pkt)
    assert out.reason == "fragmented6" and len(out.send) == 2
    assert IPv6(out.signal)[ICMPv6PacketTooBig].mtu == 1464
    low = mtu.plan(seg, 1280, ident=6, original=pkt)  # 1244 < 1280: no signal, fragments
    assert low.signal is None and len(low.send) == 2 and low.reason == "fragmented6"
    assert all(len(f) <= 1500 for f in out.send)


def test_udp_helper_sets_df() -> None:
    assert mtu.ipv4_df(udp4(100, df=True)) and not mtu.ipv4_df(udp4(100, df=False))
    assert IP(udp4(100, df=True)).flags.DF


def test_ctcp_original_restores_charons_packet() -> None:
    v4 = udp4(700, df=True)
    seg = encapsulate(v4, sport=10000, dport=10000, seq=9, ack=9)
    assert mtu.ctcp_original(seg) == v4[:26] + b"\x00\x00" + v4[28:]  # cTCP zeroes it
    v6 = build_ipv6(SRC6, DST6, 17, build_udp_packet(SRC6, DST6, 500, 500, b"z" * 300)[40:])
    assert mtu.ctcp_original(encapsulate(v6, sport=1, dport=2, seq=0, ack=0)) == v6
    assert mtu.ctcp_original(v4) is None  # not TCP
    assert mtu.ctcp_original(b"\x45") is None
