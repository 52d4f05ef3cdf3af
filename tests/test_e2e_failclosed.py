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
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e_helpers import start_tcp_pair
from tests.lab import Host, Lab, LabError, default_name, psk_conf, unanswered

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
        c1, gw = lab.clients[0], lab.gw
        if encap == "rfc9329":
            start_tcp_pair(lab, c1)
        else:
            ctcp_pair(lab, c1)
        name = default_name(c1, gw)
        c1.charon.initiate(name, timeout=10)  # type: ignore[union-attr]
        assert not unanswered(c1, gw.inner4, c1.inner4)
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
