"""The cTCP shell (tcpencap/aio/ctcp_service.py) on its packet-size path with fake I/O: the
engine decides (ICMP, fragments, an MTU refresh), the shell sends, retries once on EMSGSIZE
and counts what fails; and its route-MTU lookup against the kernel."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6

from tcpencap.aio.ctcp_service import CtcpService, route_mtu
from tcpencap.config import Config
from tcpencap.core.ctcp_engine import CtcpEngine
from tcpencap.wire.ctcp import encapsulate
from tcpencap.wire.packet import build_ipv6, build_udp_packet
from tests.udp_packets import DST4, DST6, SRC4, SRC6, reassemble4, udp4


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
    for packet in (udp4(1465, df=True), udp4(1464, df=True), udp4(1465, df=False)):
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
    seg = encapsulate(udp4(1465, df=False), sport=10000, dport=10000, seq=1, ack=1)
    sender = _Sender(kernel_mtu=1280)  # the kernel knows a smaller PMTU than the cache
    routes = _Routes(1500, 1280)
    svc, _ = _service(routes, sender)
    _send(svc, seg, DST4)
    assert svc.engine is not None and routes.looks == 2  # looked up again after EMSGSIZE
    assert svc.engine.counters["mtu-refresh"] == 1 and svc.engine.counters["fragmented"] == 2
    assert all(len(p) <= 1280 for p in sender.sent) and len(sender.sent) == 2
    assert reassemble4(sender.sent) == seg[20:]
    assert svc.counters == {}


def test_service_gives_up_after_one_refresh() -> None:
    seg = encapsulate(udp4(1000, df=False), sport=1, dport=2, seq=1, ack=1)
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
