"""Fail closed through every stop (issue 23, finding 10): tunnels up over TCP (RFC 9329 and
cTCP), then tcpencap on the gateway or on the client is stopped (SIGTERM) or killed (SIGKILL)
and started again while pings keep charon's libipsec sending ESP to the TCP peer.

Not one UDP 500/4500 packet between the two may cross either link, while tcpencap is down
and after it is back, before the peer has reconnected: TCP between c1 and gw is blocked in fw
for that whole time, so the restarted daemon has no connection and must steer the peer
from what it kept (its sets) and what charon still holds (list-sas). Then TCP is let through
again and the tunnel must carry pings both ways (the time it takes is printed).

"Charon has tried": a counter rule in the stopped side's raw OUTPUT counts charon's UDP to
the peer before any tcpencap rule sees it; each wait is for that count, never a fixed time.

On 96634d6 SIGTERM removed the rules (UDP left at once) and every start flushed the sets
(UDP left until the peer reconnected).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.labkit import Host, Lab, LabError, default_name, psk_conf, unanswered
from tests.labkit.e2e import start_tcp_pair

pytestmark = pytest.mark.lab

CTCP_PORT = 10000
TRIES = 30  # charon's packets to the peer to see while it must not get them as UDP
COUNTER = ["-p", "udp", "-m", "multiport", "--sports", "500,4500"]


def ctcp_pair(lab: Lab, c1: Host) -> None:
    gw = lab.gw
    lab.block_udp(c1)
    for h in (c1, gw):
        h.start_charon()
    c1.charon.load(psk_conf(c1, gw))  # type: ignore[union-attr]
    gw.charon.load(psk_conf(gw, c1))  # type: ignore[union-attr]
    gw.start_tcpencap(
        ctcp_conf(gw, f"  gateway {{\n    ctcp_listen = {gw.outer4}:{CTCP_PORT}\n  }}")
    )
    name = default_name(c1, gw)
    c1.start_tcpencap(
        ctcp_conf(c1, f"  connections {{\n    {name} {{\n      encapsulation = ctcp\n    }}\n  }}")
    )


def ctcp_conf(host: Host, body: str) -> str:
    return (
        f"tcpencap {{\n  vici_socket = {host.charon.uri}\n"  # type: ignore[union-attr]
        f"  status_socket = {host.dir}/tcpencap.ctl\n{body}\n}}\n"
    )


def tunnel_up(lab: Lab, encap: str) -> tuple[Host, Host, str]:
    """c1 <-> gw over TCP (c1's UDP dropped in fw), initiated and pinging."""
    c1, gw = lab.clients[0], lab.gw
    if encap == "rfc9329":
        start_tcp_pair(lab, c1)
    else:
        ctcp_pair(lab, c1)
    name = default_name(c1, gw)
    c1.charon.initiate(name, timeout=10)  # type: ignore[union-attr]
    assert not unanswered(c1, gw.inner4, c1.inner4)
    return c1, gw, name


def counted(host: Host, peer: str) -> int:
    """charon's UDP 500/4500 packets to ``peer`` so far (the raw OUTPUT counter)."""
    out = host.run("iptables", "-w", "5", "-t", "raw", "-L", "OUTPUT", "-v", "-x", "-n").stdout
    for line in out.splitlines()[2:]:
        cols = line.split()
        if peer in cols and "multiport" in cols and "sports" in cols:
            return int(cols[0])
    raise LabError(f"no counter rule in {host.role}:\n{out}")


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last {got!r})")
        time.sleep(interval)


def block_tcp(lab: Lab, c1: Host, on: bool) -> None:
    """Drop (or stop dropping) every TCP segment to and from c1 in fw."""
    for direction in ("-i", "-o"):
        spec = ["FORWARD", direction, c1.fw_veth, "-p", "tcp", "-j", "DROP"]
        lab.fw.run("iptables", "-I" if on else "-D", *spec)  # type: ignore[arg-type]


def udp_between(cap: Any, a: str, b: str) -> int:
    from scapy.layers.inet import IP, UDP

    return sum(
        1
        for p in cap.stop()
        if IP in p
        and UDP in p
        and {p[UDP].sport, p[UDP].dport} & {500, 4500}
        and {p[IP].src, p[IP].dst} == {a, b}
    )


@pytest.mark.parametrize("encap", ["rfc9329", "ctcp"])
@pytest.mark.parametrize(
    ("victim", "sig"),
    [("gw", signal.SIGTERM), ("gw", signal.SIGKILL), ("c1", signal.SIGTERM)],
    ids=["gw-sigterm", "gw-sigkill", "c1-sigterm"],
)
def test_no_udp_leaves_while_tcpencap_is_down_or_restarting(
    encap: str, victim: str, sig: signal.Signals
) -> None:
    with Lab(clients=1) as lab:
        c1, gw, name = tunnel_up(lab, encap)
        assert not unanswered(gw, c1.inner4, gw.inner4)
        host = gw if victim == "gw" else c1
        peer = c1 if victim == "gw" else gw
        ike_before = [sa[name]["initiator-spi"] for sa in c1.charon.list_sas()]  # type: ignore[union-attr]
        host.run("iptables", "-w", "5", "-t", "raw", "-A", "OUTPUT", *COUNTER, "-d", peer.outer4)
        caps = [lab.capture(c1), lab.capture(gw)]
        for src, dst in ((gw, c1), (c1, gw)):  # ESP from both charons, all the time
            src.spawn(
                ["ping", "-n", "-q", "-i", "0.05", "-I", src.inner4, dst.inner4],
                f"ping-{src.role}.log",
            )
        conf = (host.dir / "tcpencap.conf").read_text()
        block_tcp(lab, c1, True)
        try:
            proc = host.tcpencap
            assert proc is not None
            t_stop = time.monotonic()
            proc.signal(sig)
            proc.popen.wait(10)
            before = counted(host, peer.outer4)
            wait_for("charon sends while tcpencap is down", lambda: (
                counted(host, peer.outer4) >= before + TRIES), 20)  # fmt: skip
            host.start_tcpencap(conf)
            t_up = time.monotonic()
            again = counted(host, peer.outer4)
            wait_for("charon sends to the unconnected peer", lambda: (
                counted(host, peer.outer4) >= again + TRIES), 20)  # fmt: skip
        finally:
            block_tcp(lab, c1, False)
        t_open = time.monotonic()
        wait_for(
            "pings both ways again",
            lambda: (
                not unanswered(c1, gw.inner4, c1.inner4, count=1, timeout=1)
                and not unanswered(gw, c1.inner4, gw.inner4, count=1, timeout=1)
            ),
            90,
            0.0,
        )
        t_back = time.monotonic()
        tried = counted(host, peer.outer4) - before
        leaked = [udp_between(cap, c1.outer4, gw.outer4) for cap in caps]
        ike_after = [sa[name]["initiator-spi"] for sa in c1.charon.list_sas()]  # type: ignore[union-attr]
        print(
            f"\n{encap} {victim} {sig.name}: down {t_up - t_stop:.1f} s, charon sent "
            f"{tried} packets to the peer meanwhile; UDP 500/4500 on c1's/gw's link: "
            f"{leaked[0]}/{leaked[1]}; TCP let through again -> pings both ways in "
            f"{t_back - t_open:.1f} s; IKE SA {'resumed' if ike_after == ike_before else 'new'}"
        )
        assert leaked == [0, 0], f"UDP 500/4500 between c1 and gw (c1's, gw's link): {leaked}"


# An IPPROTO_RAW socket, whose packets pass OUTPUT as charon's do (scapy's default layer-3
# socket on Linux is a packet socket, which netfilter never sees).
SEND = """
import socket, sys
from scapy.all import IP, UDP, Raw
src, dst, sport, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
pkt = bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=sport) / Raw(payload))
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
    s.sendto(pkt, (dst, 0))
"""


def ike_probe(spi_i: bytes) -> bytes:
    """An IKEv2 INFORMATIONAL request, as a MOBIKE probe (UPDATE_SA_ADDRESSES) starts."""
    body = b"\x00" * 8
    header = spi_i + bytes.fromhex("a1b2c3d4e5f60718") + bytes([46, 0x20, 37, 0x08])
    return header + (7).to_bytes(4, "big") + (28 + len(body)).to_bytes(4, "big") + body


@pytest.mark.parametrize("encap", ["rfc9329", "ctcp"])
def test_ike_of_a_tcp_sa_to_an_unsteered_address_never_leaves_as_udp(encap: str) -> None:
    """A TCP client's charon sends IKE of its TCP SA to an address of the gateway that is
    not steered (a MOBIKE probe to an additional address): dropped. IKE of any other SA to
    that address, and ESP, still go out as UDP, since they are not a TCP peer's. Sent from
    charon's ports with a raw socket, through the same OUTPUT path as charon's packets."""
    with Lab(clients=1) as lab:
        c1, gw, name = tunnel_up(lab, encap)
        (sa,) = [sa[name] for sa in c1.charon.list_sas()]  # type: ignore[union-attr]
        tcp_spi = bytes.fromhex(sa["initiator-spi"])
        other = gw.outer4.rsplit(".", 1)[0] + ".77"  # another address of the gateway's
        cap = lab.capture(c1)
        cases = {
            "probe-4500": (4500, b"\x00" * 4 + ike_probe(tcp_spi)),
            "probe-500": (500, ike_probe(tcp_spi)),
            "other-sa-4500": (4500, b"\x00" * 4 + ike_probe(bytes.fromhex("0102030405060708"))),
            "esp": (4500, bytes.fromhex("c0ffee01") + b"\x00" * 60),
        }
        for sport, payload in cases.values():
            c1.run(sys.executable, "-c", SEND, c1.outer4, other, str(sport), payload.hex())
        assert not unanswered(c1, gw.inner4, c1.inner4)  # the tunnel is unharmed
        from scapy.layers.inet import IP, UDP

        seen = {k: 0 for k in cases}
        for p in cap.stop():
            if IP in p and UDP in p and p[IP].dst == other:
                raw = bytes(p[UDP].payload)
                for k, (_sport, payload) in cases.items():
                    seen[k] += raw == payload
        print(f"\n{encap}: on c1's link, by case: {seen}")
        assert seen == {"probe-4500": 0, "probe-500": 0, "other-sa-4500": 1, "esp": 1}, seen
        drops = c1.tcpencap_status()["drops"]
        assert drops.get("ike-off-tcp") == 2, drops


def test_a_real_mobike_move_sends_no_udp() -> None:
    """c1's IPv4 address changes (198.18.1.2 -> .3) while only the gateway's IPv4 address is
    configured: charon's MOBIKE also tries the gateway's IPv6 address, which it learnt from
    ADDITIONAL_IP6_ADDRESS and tcpencap cannot see (README Limitations). Nothing of it may
    leave as UDP; the SA follows c1 to its new address over TCP."""
    from scapy.layers.inet import UDP

    with Lab(clients=1) as lab:
        c1, gw, name = tunnel_up(lab, "rfc9329")
        spi = c1.charon.list_sas()[0][name]["initiator-spi"]  # type: ignore[union-attr]
        cap = lab.capture(c1)
        c1.run("sysctl", "-q", "-w", f"net.ipv4.conf.{c1.veth}.promote_secondaries=1")
        c1.run("ip", "addr", "add", "198.18.1.3/24", "dev", c1.veth)
        c1.run("ip", "addr", "del", "198.18.1.2/24", "dev", c1.veth)
        c1.run("ip", "route", "replace", "default", "via", "198.18.1.1")

        def moved() -> bool:
            sas = gw.charon.list_sas()  # type: ignore[union-attr]
            return bool(sas) and sas[0][name]["remote-host"] == "198.18.1.3"

        t0 = time.monotonic()
        wait_for("the IKE SA follows c1", moved, 20)
        wait_for("pings again", lambda: not unanswered(c1, gw.inner4, c1.inner4, count=1), 20)
        took = time.monotonic() - t0
        udp = [p for p in cap.stop() if UDP in p and {p[UDP].sport, p[UDP].dport} & {500, 4500}]
        drops = c1.tcpencap_status()["drops"]
        print(f"\nMOBIKE move: pings again after {took:.1f} s; UDP 500/4500 on c1's link: "
              f"{len(udp)}; IKE dropped off TCP: {drops.get('ike-off-tcp', 0)}")  # fmt: skip
        assert gw.charon.list_sas()[0][name]["initiator-spi"] == spi  # type: ignore[union-attr]
        assert udp == [], [p.summary() for p in udp]
