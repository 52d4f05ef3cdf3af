"""tcpencap.core.ctcp_mtu: the cTCP engine's path MTU cache and packet-size decisions."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP

from tcpencap.core.ctcp_mtu import CACHE_ENTRIES, PathMtus, bounded_put
from tcpencap.wire.ctcp import encapsulate
from tcpencap.wire.packet import build_ipv4, build_udp_packet

SRC4, DST4 = bytes([198, 18, 1, 2]), bytes([198, 19, 0, 2])


def _udp4(size: int, df: bool) -> bytes:
    pkt = build_udp_packet(SRC4, DST4, 500, 500, bytes(size - 28))
    return build_ipv4(SRC4, DST4, 17, pkt[20:], df=df)


class _Kernel:
    """The route MTU the kernel reports now; counts the looks."""

    def __init__(self, mtu: int) -> None:
        self.mtu, self.looks = mtu, 0

    def __call__(self, dst: bytes) -> int:
        self.looks += 1
        return self.mtu


def test_the_route_mtu_is_cached_for_its_ttl_and_looked_up_again_after() -> None:
    kernel = _Kernel(1400)
    mtus = PathMtus(kernel, {}, ttl=5.0)
    assert mtus.route_mtu(DST4, 0.0) == 1400
    kernel.mtu = 1300
    assert mtus.route_mtu(DST4, 4.9) == 1400 and kernel.looks == 1  # cached
    assert mtus.route_mtu(DST4, 5.1) == 1300 and kernel.looks == 2  # expired
    mtus.forget(DST4)
    kernel.mtu = 1200
    assert mtus.route_mtu(DST4, 5.2) == 1200 and kernel.looks == 3  # forgotten: asked again


def test_the_caches_are_bounded_whatever_addresses_strangers_choose() -> None:
    mtus = PathMtus(_Kernel(1500), {}, entries=8)
    for n in range(100):
        mtus.route_mtu(bytes([198, 18, 0, n]), 0.0)
    assert len(mtus) == 8
    assert mtus.route_mtu(bytes([198, 18, 0, 99]), 0.0) == 1500  # the newest stay
    cache: dict[int, int] = {}
    for n in range(10):
        bounded_put(cache, n, n, 3)
    bounded_put(cache, 8, 8, 3)  # a key put again is the newest
    assert list(cache) == [7, 9, 8]
    assert CACHE_ENTRIES == 4096


def test_the_pmtu_we_taught_is_not_believed_but_another_one_is() -> None:
    """After our ICMP the kernel's PMTU to the peer is 1464 for every socket; segments
    must still be planned against the 1500 route, or each DF packet would push it lower."""
    kernel = _Kernel(1500)
    counters: dict[str, int] = {}
    mtus = PathMtus(kernel, counters, ttl=0.0)
    told = mtus.too_big(1.0, _udp4(1480, df=True))
    assert told is not None and told[1] == SRC4 and IP(told[0])[ICMP].nexthopmtu == 1464
    kernel.mtu = 1464  # what IP_MTU now reports
    assert mtus.path_mtu(DST4, 2.0) == 1500
    assert mtus.too_big(2.0, _udp4(1464, df=True)) is None
    kernel.mtu = 1400  # someone else lowered it: believe the kernel
    assert mtus.path_mtu(DST4, 3.0) == 1400
    assert counters == {"too-big-df": 1, "icmp-frag-needed-sent": 1}


def test_only_ipv4_with_df_is_answered_before_carrying() -> None:
    mtus = PathMtus(_Kernel(1500), {})
    assert mtus.too_big(0.0, _udp4(1465, df=False)) is None  # fragmented later instead
    assert mtus.too_big(0.0, _udp4(1464, df=True)) is None  # fits with the 36 octets
    assert mtus.too_big(0.0, b"\x45" + bytes(10)) is None  # not even a header


def test_a_segment_that_fits_goes_whole_and_one_with_df_not_at_all() -> None:
    counters: dict[str, int] = {}
    mtus = PathMtus(_Kernel(1500), counters)
    seg = encapsulate(_udp4(1464, df=False), sport=1, dport=2, seq=0, ack=0)
    assert mtus.size(0.0, seg, DST4) == ((seg,), None) and counters == {}
    big = bytearray(encapsulate(_udp4(1465, df=False), sport=1, dport=2, seq=0, ack=0))
    big[6] |= 0x40  # DF on the segment itself: only the sender can fix it
    pieces, signal = mtus.size(0.0, bytes(big), DST4)
    assert pieces == () and signal is not None and signal[1] == SRC4
    assert counters == {"too-big-df": 1, "icmp-too-big-sent": 1}
