"""Packet-size helpers (tcpencap/wire/mtu.py) checked against scapy's own decoders and
reassembly, plus the RFC 9329 codec with large IKE messages and oversized frames."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6, IPv6ExtHdrFragment

from tcpencap.aio.ctcp_service import CtcpService, route_mtu
from tcpencap.config import Config
from tcpencap.core.ctcp_engine import CtcpEngine
from tcpencap.wire import mtu, rfc9329
from tcpencap.wire.ctcp import encapsulate
from tcpencap.wire.packet import PacketError, build_ipv4, build_ipv6, build_udp_packet

SRC4, DST4 = bytes([198, 18, 1, 2]), bytes([198, 19, 0, 2])
SRC6 = bytes.fromhex("fd000001000000000000000000000002")
DST6 = bytes.fromhex("fd000100000000000000000000000002")


def _udp4(size: int, df: bool, ident: int = 0x1234) -> bytes:
    """A UDP 4500 -> 4500 IPv4 packet of exactly ``size`` octets."""
    body = bytes(range(256)) * (size // 256 + 1)
    pkt = build_udp_packet(SRC4, DST4, 4500, 4500, body[: size - 28])
    return build_ipv4(SRC4, DST4, 17, pkt[20:], ident=ident, df=df)


def _reassemble4(frags: list[bytes]) -> bytes:
    """Reassemble with our own reading of the RFC 791 fields (checked by scapy below)."""
    ident = {IP(f).id for f in frags}
    assert len(ident) == 1
    data = bytearray()
    for f in sorted(frags, key=lambda f: IP(f).frag):
        p = IP(f)
        assert p.frag * 8 == len(data)
        data += bytes(p.payload)
    return bytes(data)


@given(size=st.integers(29, 9000), path=st.integers(68, 9000))
@settings(max_examples=150, deadline=None)
def test_fragment_ipv4_reassembles(size: int, path: int) -> None:
    pkt = _udp4(size, df=False)
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
    assert _reassemble4(frags) == pkt[20:]
    from scapy.all import defragment

    whole = defragment([IP(f) for f in frags])[0]
    assert bytes(whole[UDP].payload) == pkt[28:]


def test_fragment_ipv4_refuses_df_and_tiny_mtu() -> None:
    with pytest.raises(PacketError, match="DF"):
        mtu.fragment_ipv4(_udp4(1600, df=True), 1500)
    with pytest.raises(PacketError, match="too small"):
        mtu.fragment_ipv4(_udp4(1600, df=False), 27)


def test_fragment_ipv4_copies_only_copied_options() -> None:
    # 0x94 router alert (copied), 0x07 record route (not copied), padded
    opts = bytes([0x94, 4, 0, 0, 0x07, 7, 4, 0, 0, 0, 0, 0])
    pkt = build_ipv4(SRC4, DST4, 17, os.urandom(3000), ident=7, options=opts)
    frags = mtu.fragment_ipv4(pkt, 1000)
    assert IP(frags[0]).ihl == 8
    assert all(IP(f).ihl == 6 for f in frags[1:])
    assert frags[1][20:24] == bytes([0x94, 4, 0, 0])
    assert _reassemble4(frags) == pkt[32:]


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
    pkt = _udp4(1480, df=True)
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
    pkt = _udp4(size, df=df)
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
    assert _reassemble4(list(out.send)) == seg[20:]


def test_plan_ipv6_fragments_and_signals() -> None:
    pkt = build_ipv6(SRC6, DST6, 17, build_udp_packet(SRC6, DST6, 4500, 4500, b"y" * 1460)[40:])
    seg = encapsulate(pkt, sport=10000, dport=10000, seq=1, ack=1)
    out = mtu.plan(seg, 1500, ident=5, original=pkt)
    assert out.reason == "fragmented6" and len(out.send) == 2
    assert IPv6(out.signal)[ICMPv6PacketTooBig].mtu == 1464
    low = mtu.plan(seg, 1280, ident=6, original=pkt)  # 1244 < 1280: no signal, fragments
    assert low.signal is None and len(low.send) == 2 and low.reason == "fragmented6"
    assert all(len(f) <= 1500 for f in out.send)


# --- RFC 9329: large messages and oversized frames ---------------------------------------


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


def test_udp_helper_sets_df() -> None:
    assert mtu.ipv4_df(_udp4(100, df=True)) and not mtu.ipv4_df(_udp4(100, df=False))
    assert IP(_udp4(100, df=True)).flags.DF


def test_ctcp_original_restores_charons_packet() -> None:
    v4 = _udp4(700, df=True)
    seg = encapsulate(v4, sport=10000, dport=10000, seq=9, ack=9)
    assert mtu.ctcp_original(seg) == v4[:26] + b"\x00\x00" + v4[28:]  # cTCP zeroes it
    v6 = build_ipv6(SRC6, DST6, 17, build_udp_packet(SRC6, DST6, 500, 500, b"z" * 300)[40:])
    assert mtu.ctcp_original(encapsulate(v6, sport=1, dport=2, seq=0, ack=0)) == v6
    assert mtu.ctcp_original(v4) is None  # not TCP
    assert mtu.ctcp_original(b"\x45") is None


# --- the service's packet-size path: the engine decides, the shell sends (fake I/O) ------------


class _Sender:
    def __init__(self, kernel_mtu: int = 65535) -> None:
        self.kernel_mtu = kernel_mtu
        self.sent: list[bytes] = []

    def send(self, data: bytes, dst: bytes) -> None:
        if len(data) > self.kernel_mtu:  # what a header-included raw socket does
            raise OSError(errno.EMSGSIZE, "Message too long")
        self.sent.append(data)


class _Injector:
    def __init__(self) -> None:
        self.injected: list[tuple[bytes, bytes]] = []

    def inject(self, packet: bytes, dst: bytes) -> None:
        self.injected.append((packet, dst))


class _Routes:
    """The kernel's route MTU: ``first`` for the first look, ``later`` from then on."""

    def __init__(self, first: int, later: int) -> None:
        self.value, self.later, self.looks = first, later, 0

    def __call__(self, dst: bytes) -> int:
        self.looks += 1
        value, self.value = self.value, self.later
        return value


def _service(routes: _Routes, sender: _Sender) -> tuple[CtcpService, _Injector]:
    inj = _Injector()
    svc = CtcpService(Config(), inj, lambda *a: None)
    svc.engine = CtcpEngine(Config(), 100.0, route_mtu=routes)
    svc.sender = sender  # type: ignore[assignment]
    svc._loop = SimpleNamespace(time=lambda: 100.0)  # type: ignore[assignment]
    svc._timer = SimpleNamespace(arm=lambda due: None)  # type: ignore[assignment]
    return svc, inj


def _send(svc: CtcpService, seg: bytes, dst: bytes) -> None:
    """One segment as the engine sends it, executed by the shell."""
    assert svc.engine is not None
    svc.engine._send_raw(100.0, seg, dst)
    svc._execute()


def test_service_answers_df_packets_that_will_not_fit() -> None:
    svc, inj = _service(_Routes(1500, 1500), _Sender())
    assert svc.engine is not None
    for packet in (_udp4(1465, df=True), _udp4(1464, df=True), _udp4(1465, df=False)):
        svc.engine.outbound(100.0, packet)
        svc._execute()
    assert svc.engine.counters == {
        "too-big-df": 1,
        "icmp-frag-needed-sent": 1,
        "esp-no-connection": 2,  # the two that may go on (ESP, to no connection here)
    }
    [(icmp, dst)] = inj.injected
    assert dst == SRC4 and IP(icmp)[ICMP].nexthopmtu == 1464


def test_service_fragments_and_refreshes_the_mtu_on_emsgsize() -> None:
    seg = encapsulate(_udp4(1465, df=False), sport=10000, dport=10000, seq=1, ack=1)
    sender = _Sender(kernel_mtu=1280)  # the kernel knows a smaller PMTU than the cache
    routes = _Routes(1500, 1280)
    svc, _ = _service(routes, sender)
    _send(svc, seg, DST4)
    assert svc.engine is not None and routes.looks == 2  # looked up again after EMSGSIZE
    assert svc.engine.counters["mtu-refresh"] == 1 and svc.engine.counters["fragmented"] == 2
    assert all(len(p) <= 1280 for p in sender.sent) and len(sender.sent) == 2
    assert _reassemble4(sender.sent) == seg[20:]
    assert svc.counters == {}


def test_service_gives_up_after_one_refresh() -> None:
    seg = encapsulate(_udp4(1000, df=False), sport=1, dport=2, seq=1, ack=1)
    sender = _Sender(kernel_mtu=576)
    svc, _ = _service(_Routes(1500, 1500), sender)
    _send(svc, seg, DST4)
    assert svc.engine is not None and svc.engine.counters == {"mtu-refresh": 1}
    assert svc.counters == {"transmit-failed": 1} and sender.sent == []


def test_service_rate_limits_ipv6_too_big() -> None:
    pkt = build_ipv6(SRC6, DST6, 17, build_udp_packet(SRC6, DST6, 4500, 4500, b"q" * 1460)[40:])
    seg = encapsulate(pkt, sport=10000, dport=10000, seq=1, ack=1)
    sender = _Sender()
    svc, inj = _service(_Routes(1500, 1500), sender)
    for _ in range(3):
        _send(svc, seg, DST6)
    assert svc.engine is not None
    assert len(sender.sent) == 6 and svc.engine.counters["fragmented6"] == 3
    assert svc.engine.counters["icmp-too-big-sent"] == 1
    assert svc.engine.counters["icmp-suppressed"] == 2
    [(icmp, local)] = inj.injected
    assert local == SRC6
    p = IPv6(icmp)[ICMPv6PacketTooBig]
    assert p.mtu == 1464 and bytes(p.payload)[:40] == pkt[:40]  # quotes charon's UDP packet


def test_route_mtu_reads_the_kernel() -> None:
    lo = int(Path("/sys/class/net/lo/mtu").read_text())
    assert route_mtu(bytes([127, 0, 0, 1])) == min(lo, 65535)
