"""Attacks on a cTCP gateway from other namespaces, with an honest client beside them.

Each test mounts one finding of the security review (issue 23, findings 1-4) against a lab
gateway (charon + the tcpencap daemon, ``ctcp_listen = 0.0.0.0:10000``) with raw packets
(scapy) and real handshakes, while c1, an honest cTCP client, keeps a tunnel up and pings
through it. The honest client's figures (pings lost, median RTT, set-up time) are printed.

- the attacker on c2 completes a handshake and sends inner UDP to the gateway's own UDP
  services (53, 9999): none may arrive (finding 1);
- the attacker in fw, on path but blind to the connection's numbers, spoofs c1's address
  and port with RST, FIN and data segments of random seq/ack: c1's connection stays, no
  segment is injected (finding 2);
- the attacker in fw floods spoofed SYNs from 8 addresses while c1 sets up its tunnel;
  the attacker on c2 opens as many real connections as it can and keeps them busy with its
  own "ESP"; stray segments from thousands of IPv6 sources (finding 3);
- a cTCP gateway that routes (fw) must not answer for the hosts behind it (finding 4);
- a plain-UDP client keeps its tunnel beside a cTCP connection from its own address
  (finding 5).

Needs root, iproute2, iptables, tcpdump, ping and strongSwan; fails (never skips) without.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from tests.labkit import Host, Lab, psk_conf, unanswered
from tests.labkit.topology import _run_ping

pytestmark = pytest.mark.lab
PORT = 10000
NAME = "c1-gw"

_ATTACK = r"""
import json, random, sys, time
from scapy.all import IP, IPv6, TCP, UDP, Raw, conf, send, sr, sr1
conf.verb = 0
TRAILER_UDP = bytes(8) + b"!Eli\x10\x11\x01\x00"
args = json.loads(sys.argv[1])
mode, gw, port = args["mode"], args["gw"], args["port"]
out = {}

def ike(marker):
    # an IKEv2 header (SPIs, next payload 0, version 2.0, IKE_SA_INIT, length 28)
    return marker[:8] + bytes(8) + b"\x00\x20\x22\x08" + bytes(4) + (28).to_bytes(4, "big")

def inner_udp(sport, dport, payload):
    u = UDP(sport=sport, dport=dport, len=8 + len(payload), chksum=0)
    return bytes(u) + payload

if mode == "inner-ports":
    # a real handshake, then inner UDP to the gateway's other UDP services
    sport = 45000
    sa = sr1(IP(dst=gw)/TCP(sport=sport, dport=port, flags="S", seq=7000), timeout=2)
    out["synack"] = sa is not None
    if sa is not None:
        seq, ack = 7001, sa.seq + 1
        send(IP(dst=gw)/TCP(sport=sport, dport=port, flags="A", seq=seq, ack=ack))
        for dport in args["ports"]:
            for _ in range(3):
                body = inner_udp(500, dport, b"tcpencap-attack") + TRAILER_UDP
                send(IP(dst=gw)/TCP(sport=sport, dport=port, flags="A", seq=seq, ack=ack)/Raw(body))
                seq += len(body)
        # and one IKE message to charon: that one is allowed
        body = inner_udp(500, 500, ike(b"LEGITIKE")) + TRAILER_UDP
        send(IP(dst=gw)/TCP(sport=sport, dport=port, flags="A", seq=seq, ack=ack)/Raw(body))
elif mode == "spoof":
    # off-path: right addresses and ports, guessed sequence numbers
    rng = random.Random(args["seed"])
    src, sport, n = args["src"], args["sport"], args["count"]
    pkts = []
    for i in range(n):
        s, a = rng.getrandbits(32), rng.getrandbits(32)
        base = IP(src=src, dst=gw)/TCP(sport=sport, dport=port, seq=s, ack=a)
        pkts.append(base.copy()); pkts[-1][TCP].flags = "R"
        pkts.append(base.copy()); pkts[-1][TCP].flags = "RA"
        pkts.append(base.copy()); pkts[-1][TCP].flags = "FA"
        body = inner_udp(500, 500, ike(b"SPOOFIKE")) + TRAILER_UDP
        pkts.append(base.copy()/Raw(body)); pkts[-1][TCP].flags = "A"
    t0 = time.time()
    send(pkts, inter=args.get("inter", 0))
    out["sent"], out["seconds"] = len(pkts), time.time() - t0
elif mode == "synflood":
    # SYNs from eight spoofed sources (198.18.128.1-8), for a while
    # (a new 4-tuple each time: none is repeated within a run)
    rng = random.Random(1)
    batches = [[IP(src=f"198.18.128.{rng.randrange(1, 9)}", dst=gw)
                /TCP(sport=rng.randrange(1024, 65536), dport=port, flags="S",
                     seq=rng.getrandbits(32)) for _ in range(1000)] for _ in range(16)]
    t0, sent = time.time(), 0
    while time.time() - t0 < args["seconds"] and sent < 16000:
        send(batches[sent // 1000])
        sent += 1000
    out["sent"], out["seconds"] = sent, time.time() - t0
elif mode == "hold":
    # real connections from one address, all at once, each then kept busy with the
    # attacker's own "ESP"
    sports = range(46000, 46000 + args["count"])
    ans, _ = sr([IP(dst=gw)/TCP(sport=p, dport=port, flags="S", seq=9000) for p in sports],
                timeout=2)
    conns = [[r[TCP].dport, 9001, r[TCP].seq + 1] for _, r in ans if int(r[TCP].flags) == 0x12]
    send([IP(dst=gw)/TCP(sport=c[0], dport=port, flags="A", seq=9001, ack=c[2]) for c in conns])
    out["synacks"] = len(conns)
    print("handshakes done", flush=True)
    t0 = time.time()
    while time.time() - t0 < args["seconds"]:
        for c in conns:
            esp = (0x1000 + c[0]).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes(40)
            body = inner_udp(4500, 4500, esp) + TRAILER_UDP
            send(IP(dst=gw)/TCP(sport=c[0], dport=port, flags="A", seq=c[1], ack=c[2])/Raw(body))
            c[1] += len(body)
        time.sleep(0.2)
elif mode == "strays6":
    # stray ACKs from many IPv6 sources: each draws a RST, each RST a route-MTU lookup
    rng = random.Random(2)
    pkts = [IPv6(src=f"fd00:66::{rng.getrandbits(16):x}:{rng.getrandbits(16):x}", dst=gw)
            /TCP(sport=2000, dport=port, flags="A", seq=1, ack=1) for _ in range(args["count"])]
    send(pkts)
    out["sent"] = len(pkts)
elif mode == "forward":
    # a SYN to a host behind a routing cTCP gateway
    r = sr1(IP(dst=gw)/TCP(sport=47000, dport=port, flags="S", seq=1), timeout=2)
    out["reply"] = None if r is None else {"flags": int(r[TCP].flags), "ttl": r[IP].ttl}
print(json.dumps(out))
"""

_UDP_SERVICE = r"""
import select, socket, sys
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    socks.append(s)
print("listening", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(65535)
        print("got", s.getsockname()[1], peer[0], data[:32], flush=True)
"""


def attack(lab: Lab, host: Host, timeout: float = 60, **args: Any) -> dict[str, Any]:
    script = lab.dir / "attack.py"
    script.write_text(textwrap.dedent(_ATTACK))
    res = host.run(sys.executable, str(script), json.dumps(args), timeout=timeout)
    return json.loads(res.stdout.strip().splitlines()[-1])


def spawn_attack(lab: Lab, host: Host, log: str, **args: Any):  # type: ignore[no-untyped-def]
    script = lab.dir / "attack.py"
    script.write_text(textwrap.dedent(_ATTACK))
    return host.spawn([sys.executable, str(script), json.dumps(args)], log)


def no_kernel_resets(host: Host) -> None:
    """The attacker's own kernel would reset SYN+ACKs it has no socket for."""
    host.run("iptables", "-A", "OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP")


class Pinger(threading.Thread):
    """An honest client's pings through its tunnel while an attack runs."""

    def __init__(self, host: Host, dst: str, src: str, count: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.args = (host, dst, src, count, interval, count * interval + 5)
        self.count = count
        self.output = ""

    def run(self) -> None:
        self.output = _run_ping(*self.args, quiet=False)  # type: ignore[arg-type]

    def result(self) -> tuple[list[int], float]:
        """(requests without a reply, median RTT in ms)."""
        self.join(self.count * self.args[4] + 15)
        from tests.labkit.topology import unanswered_in

        lost = unanswered_in(self.output, self.count)
        rtts = [float(x) for x in re.findall(r"icmp_seq=\d+ \S+ time=([\d.]+) ms", self.output)]
        return lost, statistics.median(rtts) if rtts else float("nan")


def ctcp_rows(host: Host) -> list[dict[str, Any]]:
    rows = host.tcpencap_status()["connections"]
    return [c for c in rows if c.get("encapsulation") == "ctcp"]


def ctcp_summary(host: Host) -> dict[str, Any]:
    return host.tcpencap_status()["ctcp"]


def wait_for(what: str, cond, timeout: float):  # type: ignore[no-untyped-def]
    """Poll ``cond`` until it is true (returns its value) or fail saying ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def gateway_conf(gw: Host, extra: str = "") -> str:
    return (
        f"tcpencap {{\n  status_socket = {gw.dir}/tcpencap.ctl\n"
        f"  vici_socket = {gw.charon.uri}\n  gateway {{\n"  # type: ignore[union-attr]
        f"    ctcp_listen = 0.0.0.0:{PORT}, [::]:{PORT}\n{extra}  }}\n}}\n"
    )


def client_conf(c: Host) -> str:
    return (
        f"tcpencap {{\n  status_socket = {c.dir}/tcpencap.ctl\n"
        f"  vici_socket = {c.charon.uri}\n  connections {{\n"  # type: ignore[union-attr]
        f"    {NAME} {{\n      encapsulation = ctcp\n    }}\n  }}\n}}\n"
    )


def honest_lab(lab: Lab, gw_extra: str = "", initiate: bool = True) -> tuple[Host, Host, float]:
    """c1 (UDP blocked) with a cTCP tunnel to gw; returns (c1, gw, set-up seconds)."""
    c1, gw = lab.clients[0], lab.gw
    lab.block_udp(c1)
    for h in (c1, gw):
        h.start_charon()
    c1.charon.load(psk_conf(c1, gw))  # type: ignore[union-attr]
    gw.charon.load(psk_conf(gw, c1))  # type: ignore[union-attr]
    gw.start_tcpencap(gateway_conf(gw, gw_extra))
    c1.start_tcpencap(client_conf(c1))
    took = 0.0
    if initiate:
        t0 = time.monotonic()
        c1.charon.initiate(NAME, timeout=10)  # type: ignore[union-attr]
        took = time.monotonic() - t0
        lost = unanswered(c1, gw.inner4, c1.inner4, count=3)  # type: ignore[arg-type]
        assert not lost, lost
    return c1, gw, took


def report(what: str, lost: list[int], count: int, median: float, extra: str = "") -> None:
    print(f"\n[{what}] honest c1: {len(lost)}/{count} pings lost, median RTT {median:.2f} ms"
          f"{extra}")  # fmt: skip


# --- finding 1: inner UDP to the gateway's own services ---------------------------------------


def test_inner_udp_reaches_only_charon() -> None:
    with Lab(clients=2) as lab:
        c1, gw, _ = honest_lab(lab)
        c2 = lab.clients[1]
        service = gw.spawn([sys.executable, "-c", _UDP_SERVICE, "53", "9999"], "udp-service.log")
        service.wait_for_log("listening", timeout=10)
        # the listeners work: a datagram from the gateway itself arrives
        gw.run(sys.executable, "-c", "import socket; socket.socket(socket.AF_INET, "
               "socket.SOCK_DGRAM).sendto(b'probe', ('127.0.0.1', 9999))")  # fmt: skip
        service.wait_for_log("got 9999 127.0.0.1", timeout=5)
        no_kernel_resets(c2)
        pinger = Pinger(c1, gw.inner4, c1.inner4, count=60)  # type: ignore[arg-type]
        pinger.start()
        out = attack(lab, c2, mode="inner-ports", gw=gw.outer4, port=PORT, ports=[53, 9999])
        lost, median = pinger.result()
        report("inner ports", lost, 60, median)
        assert out["synack"], out
        # the allowed IKE message went through the same connection: the attack really ran
        rows = {r["peer"]: r for r in ctcp_rows(gw)}
        attacker = rows[f"{c2.outer4}:45000"]
        assert attacker["frames_in"] == 1, attacker
        assert attacker["drops"].get("inner-port-refused") == 6, attacker
        got = [ln for ln in service.log_text().splitlines() if ln.startswith("got")]
        assert got == [ln for ln in got if "127.0.0.1" in ln], f"reached the services: {got}"
        assert not lost, lost


# --- finding 5: a plain-UDP client behind a cTCP peer's address -------------------------------


def test_udp_client_keeps_its_udp_beside_a_ctcp_connection_from_its_address() -> None:
    """c1 talks plain UDP (NAT-T on 4500) to gw. From c1's own address (as from another
    host behind the same NAT) an attacker completes a cTCP handshake and sends an IKE
    message from inner port 500. Before: gw steered c1's whole address into the cTCP queue,
    so charon's ESP for c1's UDP tunnel went into the attacker's connection. Now only the
    endpoint the cTCP peer's IKE came from, c1:500, is steered."""
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        for h in (gw, c1):
            h.start_charon()
        c1.charon.load(psk_conf(c1, gw))  # type: ignore[union-attr]
        gw.charon.load(psk_conf(gw, c1))  # type: ignore[union-attr]
        gw.start_tcpencap(gateway_conf(gw))  # no tcpencap on c1, UDP not blocked
        c1.charon.initiate(NAME, timeout=10)  # type: ignore[union-attr]
        lost = unanswered(c1, gw.inner4, c1.inner4, count=2)  # type: ignore[arg-type]
        assert not lost, lost
        no_kernel_resets(c1)
        pinger = Pinger(c1, gw.inner4, c1.inner4, count=100)  # type: ignore[arg-type]
        pinger.start()
        out = attack(lab, c1, mode="inner-ports", gw=gw.outer4, port=PORT, ports=[])
        rows = wait_for("the attacker's connection", lambda: ctcp_rows(gw), 10)
        lost, median = pinger.result()
        report("UDP client beside a cTCP connection", lost, 100, median)
        assert out["synack"] and rows[0]["frames_in"] == 1, (out, rows)
        assert not lost, lost
        steered = ctcp_summary(gw).get("steered_endpoints", [])
        assert f"{c1.outer4}:500" in steered and f"{c1.outer4}:4500" not in steered, steered


# --- finding 2: spoofed RST, FIN and data from off-path --------------------------------------


def test_spoofed_segments_neither_reset_nor_impersonate_a_client() -> None:
    with Lab(clients=1) as lab:
        c1, gw, _ = honest_lab(lab)
        (row,) = ctcp_rows(gw)
        c1_port = int(row["peer"].rsplit(":", 1)[1])
        cap = lab.capture(gw, iface="lo")  # injected packets show on the gateway's lo
        pinger = Pinger(c1, gw.inner4, c1.inner4, count=80)  # type: ignore[arg-type]
        pinger.start()
        # the attacker sits in fw (it sees nothing of the flow but can forge any source);
        # it is given c1's port, the prize of a 65536-guess search
        out = attack(lab, lab.fw, mode="spoof", gw=gw.outer4, port=PORT, src=c1.outer4,
                     sport=c1_port, count=500, seed=3)  # fmt: skip
        lost, median = pinger.result()
        report("spoofed RST/FIN/data", lost, 80, median, f", {out['sent']} forged segments")
        (after,) = ctcp_rows(gw)
        assert after["peer"] == row["peer"] and after["state"] == "established", after
        assert after["drops"].get("out-of-window", 0) + after["drops"].get("rst-bad-seq", 0) >= (
            out["sent"] - 10
        ), after  # every forged segment dropped (a handful may be lost on the way)
        packets = cap.stop()
        forged = sum(1 for p in packets if b"SPOOFIKE" in bytes(p))
        assert forged == 0, f"{forged} forged IKE messages were injected to charon"
        assert not lost, lost
        lost2 = unanswered(c1, gw.inner4, c1.inner4, count=3)  # type: ignore[arg-type]
        assert not lost2, lost2


# --- finding 3: exhaustion ----------------------------------------------------------------


FLOOD_SECONDS = 12


def test_spoofed_syn_flood_does_not_lock_out_an_honest_client() -> None:
    with Lab(clients=1) as lab:
        c1, gw, _ = honest_lab(lab, gw_extra="    max_connections = 50\n", initiate=False)
        flood = spawn_attack(lab, lab.fw, "flood.log", mode="synflood", gw=gw.outer4,
                             port=PORT, seconds=FLOOD_SECONDS)  # fmt: skip

        def queued() -> int:
            s = ctcp_summary(gw)
            return s.get("segments", s["packets"])  # 96634d6 had one queue for both

        wait_for("the flood reaches the gateway", lambda: queued() > 2000, 30)
        t0 = time.monotonic()
        c1.charon.initiate(NAME, timeout=FLOOD_SECONDS)  # type: ignore[union-attr]
        setup = time.monotonic() - t0
        pinger = Pinger(c1, gw.inner4, c1.inner4, count=40)  # type: ignore[arg-type]
        pinger.start()
        peak = max(len(ctcp_rows(gw)) for _ in range(10))
        lost, median = pinger.result()
        still_flooding = flood.alive()
        flood.popen.wait(FLOOD_SECONDS + 30)
        res = json.loads(flood.log_text().strip().splitlines()[-1])
        summary = ctcp_summary(gw)
        report("spoofed SYN flood", lost, 40, median,
               f", set-up {setup:.2f} s, {res['sent'] / res['seconds']:.0f} SYN/s, "
               f"{summary['counters'].get('syn-cookie-sent')} SYN+ACKs, "
               f"{summary['counters'].get('syn-ack-limited')} limited")  # fmt: skip
        assert still_flooding, "the flood ended before the honest client was measured"
        assert peak == 1, peak  # only c1: the flood holds no slot
        assert summary["counters"].get("syn-ack-limited", 0) > 0, summary
        assert not lost, lost


def test_one_source_holds_only_its_share_and_its_own_esp_binds_nothing() -> None:
    extra = "    max_per_source = 8\n    ctcp_no_sa_timeout = 3s\n"
    with Lab(clients=2) as lab:
        c1, gw, _ = honest_lab(lab, gw_extra=extra)
        c2 = lab.clients[1]
        no_kernel_resets(c2)
        hold = spawn_attack(lab, c2, "hold.log", mode="hold", gw=gw.outer4, port=PORT,
                            count=30, seconds=10)  # fmt: skip
        peaks: list[int] = []

        def attackers() -> list[dict[str, Any]]:
            mine = [r for r in ctcp_rows(gw) if r["peer"].startswith(c2.outer4 + ":")]
            peaks.append(len(mine))
            return mine

        hold.wait_for_log("handshakes done", timeout=30)
        attackers()
        pinger = Pinger(c1, gw.inner4, c1.inner4, count=60, interval=0.1)  # type: ignore[arg-type]
        pinger.start()
        # the attacker keeps sending its "ESP", yet its connections end at the no-SA deadline
        t_gone = wait_for("the attacker's connections reset at the no-SA deadline",
                          lambda: (not attackers() and time.monotonic()), 20)  # fmt: skip
        still_sending = hold.alive()
        lost, median = pinger.result()
        hold.popen.wait(30)
        res = json.loads(hold.log_text().strip().splitlines()[-1])
        summary = ctcp_summary(gw)
        report("one source, own ESP", lost, 60, median,
               f", attacker held at most {max(peaks)} of 30 connections")  # fmt: skip
        assert t_gone and still_sending, "the attacker stopped before its connections ended"
        # all 30 SYNs were answered (a SYN takes nothing); 8 of the ACKs made connections,
        # and never more were held at once
        peak = max(peaks)
        assert res["synacks"] == 30 and peaks[0] == 8 and peak == 8, (res, peaks)
        assert summary["counters"].get("refused-per-source", 0) >= 22, summary
        (row,) = ctcp_rows(gw)  # c1's, bound by charon's ESP, untouched
        assert row["peer"].startswith(c1.outer4 + ":") and row["esp_spis"], row
        assert not lost, lost


def test_stray_segments_from_many_sources_grow_nothing() -> None:
    extra = "    ctcp_reply_rate = 10000\n"
    with Lab(clients=1) as lab:
        c1, gw, _ = honest_lab(lab, gw_extra=extra)
        from tcpencap.core.ctcp_mtu import CACHE_ENTRIES as MTU_CACHE_ENTRIES

        n = MTU_CACHE_ENTRIES + 2000
        out = attack(lab, lab.fw, timeout=120, mode="strays6", gw=gw.outer6, port=PORT, count=n)
        summary = wait_for("the strays are answered",
                           lambda: (s := ctcp_summary(gw))["counters"].get("stray-reset", 0)
                           >= out["sent"] * 0.9 and s, 30)  # fmt: skip
        print(f"\n[strays] {out['sent']} sources, {summary['counters']['stray-reset']} RSTs, "
              f"MTU cache {summary['mtu_cache']} entries")  # fmt: skip
        assert summary["mtu_cache"] <= MTU_CACHE_ENTRIES, summary
        assert set(summary["counters"]) <= {
            "stray-reset", "stray-dropped", "stray-reset-limited", "syn-cookie-sent",
            "accepted", "inbound-malformed", "nat-keepalive",
        }, summary  # fmt: skip
        lost = unanswered(c1, gw.inner4, c1.inner4, count=3)  # type: ignore[arg-type]
        assert not lost, lost


# --- finding 4: a wildcard listener on a host that routes --------------------------------------


def test_wildcard_listener_never_answers_for_hosts_it_routes_to() -> None:
    with Lab(clients=1) as lab:
        fw, gw, c1 = lab.fw, lab.gw, lab.clients[0]
        # fw routes between c1 and gw and is itself a cTCP gateway on 0.0.0.0:10000
        conf = (f"tcpencap {{\n  status_socket = {fw.dir}/tcpencap.ctl\n"
                f"  vici_socket = unix://{fw.dir}/no-charon.vici\n"
                f"  gateway {{\n    ctcp_listen = 0.0.0.0:{PORT}\n  }}\n}}\n")  # fmt: skip
        fw.start_tcpencap(conf)
        no_kernel_resets(c1)
        before = ctcp_summary(fw)["segments"]
        passing = attack(lab, c1, mode="forward", gw=gw.outer4, port=PORT)
        # gw has no listener: its own kernel answers RST (TTL 64 - 1), never a SYN+ACK
        # forged by fw for gw (TTL 240)
        assert passing["reply"] is not None, passing
        assert passing["reply"]["flags"] & 0x12 != 0x12, passing
        assert passing["reply"]["ttl"] == 63, passing
        assert ctcp_summary(fw)["segments"] == before  # nothing of it was queued
        # fw's own address is served
        local = attack(lab, c1, mode="forward", gw=c1.outer4.rsplit(".", 1)[0] + ".1", port=PORT)
        assert local["reply"] is not None and local["reply"]["flags"] == 0x12, local
        assert local["reply"]["ttl"] == 240, local
