"""End to end: strongSwan over Cisco cTCP (IPsec over TCP) in the netns lab.

c1 reaches the gateway with UDP blocked in fw; each side runs the tcpencap daemon, which starts
its cTCP service. Proofs: the SA comes up,
pings cross in both directions, c1's veth carries TCP 10000 and no UDP at all, and tshark's
own ``tcpencap`` dissector reads the trailer magic and inner protocol 17 (UDP, A.13) in
every data segment. Hostile cases are sent with scapy from c2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from tcpencap.wire.packet import TCP_ACK, TCP_RST, TCP_SYN
from tests.labkit import (
    Host,
    Lab,
    Process,
    cert_conf,
    ike_id,
    make_ca,
    make_cert,
    ping,
    psk_conf,
    tcpencap_conf,
    unanswered,
)

pytestmark = pytest.mark.lab
PORT = 10000
NAME = "c1-gw"
MAGIC_TEXT = "21:45:6c:69:10"


def _endpoint(host: Host, family: int) -> str:
    addr = host.outer(family)
    return f"{addr}:{PORT}" if family == 4 else f"[{addr}]:{PORT}"


def _start_ctcp(host: Host, conf: str) -> Process:
    """The whole daemon (it starts the cTCP service when cTCP is configured)."""
    conf = conf.replace(
        "tcpencap {\n", f"tcpencap {{\n  status_socket = {host.dir}/tcpencap.ctl\n", 1
    )
    proc = host.start_tcpencap(conf)
    assert host.tcpencap_status()["ctcp"] is not None, "the daemon did not start cTCP"
    return proc


def _repo() -> str:
    from tests.labkit import REPO_ROOT

    return str(REPO_ROOT)


def _gateway_conf(gw: Host, family: int) -> str:
    return (
        f"tcpencap {{\n  vici_socket = {gw.charon.uri}\n  gateway {{\n"  # type: ignore[union-attr]
        f"    ctcp_listen = {_endpoint(gw, family)}\n  }}\n}}\n"
    )


def _client_conf(c: Host) -> str:
    # no remote_addrs and no remote_port: resolved over VICI, port defaults to 10000
    return (
        f"tcpencap {{\n  vici_socket = {c.charon.uri}\n  connections {{\n"  # type: ignore[union-attr]
        f"    {NAME} {{\n      encapsulation = ctcp\n    }}\n  }}\n}}\n"
    )


def _setup(lab: Lab, family: int, version: int, auth: str = "psk") -> tuple[Host, Host]:
    c1, gw = lab.clients[0], lab.gw
    lab.block_udp(c1)
    for h in (c1, gw):
        h.start_charon()
    ca = make_ca(lab.dir / "pki") if auth == "cert" else None
    for local, remote in ((c1, gw), (gw, c1)):
        if ca is not None:
            cert = make_cert(ca, ike_id(local), lab.dir / "pki")
            conf = cert_conf(local, remote, cert, ca, family=family)
        else:
            conf = psk_conf(local, remote, family=family)
        if version == 1:
            assert "version = 2" in conf
            conf = conf.replace("version = 2", "version = 1\n    aggressive = no")
        local.charon.load(conf)  # type: ignore[union-attr]
    _start_ctcp(gw, _gateway_conf(gw, family))
    _start_ctcp(c1, _client_conf(c1))
    return c1, gw


SEG_FIELDS = (
    "tcp.srcport",
    "tcpencap.zero",
    "tcpencap.magic",
    "tcpencap.magic2",
    "tcpencap.proto",
    "isakmp.ispi",
    "esp.spi",
    "udp.srcport",
    "udp.dstport",
)


def tshark_segments(pcap: str) -> list[dict[str, str]]:
    """Every segment tshark decodes as tcpencap on port 10000, as {field: text}
    (the inner ``udp.*`` fields: tshark's tcpencap dissector hands 500->500 to UDP)."""
    tshark = shutil.which("tshark")
    assert tshark, "tshark is required (apt-get install tshark)"
    argv = [tshark, "-n", "-r", pcap, "-d", f"tcp.port=={PORT},tcpencap", "-Y", "tcpencap"]
    argv += ["-T", "fields", "-E", "separator=|", "-E", "occurrence=l"]
    for f in SEG_FIELDS:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    return [dict(zip(SEG_FIELDS, line.split("|"), strict=True)) for line in out.splitlines()]


def check_segments(pcap: str, min_ike500: int) -> list[dict[str, str]]:
    """A.4 trailer in every tcpencap segment (zero, magic, magic2, inner protocol 17);
    IKE on 500 reads as ISAKMP with its initiator SPI. tshark hands any other inner packet
    to its ESP dissector (A.5), so UDP 4500 -> 4500 shows as SPI 0x11941194."""
    segs = tshark_segments(pcap)
    assert segs, "tshark found no tcpencap segment"
    for s in segs:
        assert int(s["tcpencap.zero"], 0) == 0, s
        assert s["tcpencap.magic"].replace(":", "") == MAGIC_TEXT.replace(":", ""), s
        assert s["tcpencap.magic2"].replace(":", "") == "0100", s
        assert int(s["tcpencap.proto"], 0) == 17, s  # IKE and ESP-in-UDP: inner UDP (A.13)
        if s["udp.srcport"] == "500":
            assert len(s["isakmp.ispi"]) == 16 and int(s["isakmp.ispi"], 16) != 0, s
        else:
            assert int(s["esp.spi"], 0) == 0x11941194, s
    assert sum(1 for s in segs if s["isakmp.ispi"]) >= min_ike500, segs
    return segs


def _check_tunnel(lab: Lab, c1: Host, gw: Host, inner: tuple[int, ...] = (4, 6)) -> None:
    cap = lab.capture(c1)
    c1.charon.initiate(NAME, timeout=10)  # type: ignore[union-attr]
    sas = c1.charon.list_sas()  # type: ignore[union-attr]
    assert any(NAME in sa for sa in sas), sas
    for fam in inner:
        for src, dst in ((c1, gw), (gw, c1)):
            lost = unanswered(src, dst.inner(fam), src.inner(fam), count=3)
            assert not lost, f"ping {src.role} -> {dst.role} IPv{fam}: no reply to {lost}"
    packets = cap.stop()
    from scapy.layers.inet import UDP

    assert sum(1 for p in packets if UDP in p) == 0, "UDP crossed c1's link"
    n_tcp = cap.count_tcp(PORT)
    n_pings = 6 * len(inner)  # requests and replies, each one ESP-in-UDP segment
    assert n_tcp >= 3 + n_pings, n_tcp  # handshake, IKE and the pings at least
    segs = check_segments(str(cap.pcap), min_ike500=2)
    assert len(segs) >= n_pings, segs


@pytest.mark.parametrize("family", [4, 6])
def test_ikev2_psk_over_ctcp(family: int) -> None:
    with Lab(clients=1) as lab:
        c1, gw = _setup(lab, family, version=2)
        _check_tunnel(lab, c1, gw)


def test_ikev1_main_mode_psk_over_ctcp() -> None:
    with Lab(clients=1) as lab:
        c1, gw = _setup(lab, 4, version=1)
        # IKEv1 Quick Mode negotiates one selector pair per CHILD_SA: the IPv4 one
        _check_tunnel(lab, c1, gw, inner=(4,))
        log = c1.charon.log.read_text(errors="replace")  # type: ignore[union-attr]
        assert "ID_PROT" in log, "not IKEv1 Main Mode"


def test_ikev1_main_mode_certificates_over_ctcp() -> None:
    with Lab(clients=1) as lab:
        c1, gw = _setup(lab, 4, version=1, auth="cert")
        _check_tunnel(lab, c1, gw, inner=(4,))
        log = c1.charon.log.read_text(errors="replace")  # type: ignore[union-attr]
        assert "ID_PROT" in log, "not IKEv1 Main Mode"
        assert "authentication of 'gw.lab.test' with ECDSA" in log, "no certificate auth"


# --- hostile peers (scapy from c2) ------------------------------------------------------

_HOSTILE = r"""
import json, sys
from scapy.all import IP, TCP, conf, sr1, send
conf.verb = 0
dst, port = sys.argv[1], int(sys.argv[2])
def ex(p):
    return None if p is None else {"flags": int(p[TCP].flags), "seq": p[TCP].seq,
                                   "ack": p[TCP].ack, "sport": p[TCP].sport, "ttl": p[IP].ttl}
out = {}
# a stray ACK with 5 payload octets, no connection: RST+ACK, seq = its ack, ack = seq + 5
out["stray"] = ex(sr1(IP(dst=dst)/TCP(sport=40001, dport=port, flags="A", seq=1000,
                                      ack=777777)/b"hello", timeout=2))
# handshake, then FIN: RST with seq = the FIN's ack
synack = sr1(IP(dst=dst)/TCP(sport=40002, dport=port, flags="S", seq=5000), timeout=2)
out["synack"] = ex(synack)
if synack is not None:
    send(IP(dst=dst)/TCP(sport=40002, dport=port, flags="A", seq=5001, ack=synack.seq + 1))
    out["fin"] = ex(sr1(IP(dst=dst)/TCP(sport=40002, dport=port, flags="FA", seq=5001,
                                        ack=synack.seq + 1), timeout=2))
    # the connection is gone: an ACK without a valid cookie draws a stray RST+ACK
    out["after"] = ex(sr1(IP(dst=dst)/TCP(sport=40002, dport=port, flags="A", seq=5002,
                                          ack=synack.seq + 100), timeout=2))
print(json.dumps(out))
"""


def test_hostile_segments_get_resets() -> None:
    with Lab(clients=2) as lab:
        gw, c2 = lab.gw, lab.clients[1]
        gw.start_charon()
        _start_ctcp(gw, _gateway_conf(gw, 4))
        # c2's own kernel would reset the SYN+ACK it has no socket for
        c2.run("iptables", "-A", "OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP")
        script = lab.dir / "hostile.py"
        script.write_text(textwrap.dedent(_HOSTILE))
        res = c2.run(sys.executable, str(script), gw.outer4, str(PORT), timeout=30)  # type: ignore[arg-type]
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["stray"] == {
            "flags": TCP_RST | TCP_ACK, "seq": 777777, "ack": 1005, "sport": PORT, "ttl": 239
        }  # fmt: skip
        synack = out["synack"]
        assert synack is not None and synack["flags"] == TCP_SYN | TCP_ACK
        assert synack["ack"] == 5001 and synack["ttl"] == 239
        assert out["fin"] == {
            "flags": TCP_RST, "seq": (synack["seq"] + 1) & 0xFFFFFFFF, "ack": 0, "sport": PORT,
            "ttl": 239,
        }  # fmt: skip
        assert out["after"] is not None and out["after"]["flags"] == TCP_RST | TCP_ACK
        assert out["after"]["seq"] == (synack["seq"] + 100) & 0xFFFFFFFF
        # TTL 240 - 1 hop (fw): the cTCP service answered, never the gateway kernel (64)


# --- keepalive, half-open, no-SA timeout, SYN flood ----------------------------------------

_TIMERS = r"""
import json, sys, time
from scapy.all import IP, TCP, conf, send, sr1
conf.verb = 0
dst, port, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {}
def handshake(sport, ack=True):
    sa = sr1(IP(dst=dst)/TCP(sport=sport, dport=port, flags="S", seq=1000), timeout=2)
    if sa is not None and ack:
        send(IP(dst=dst)/TCP(sport=sport, dport=port, flags="A", seq=1001, ack=sa.seq + 1))
    return None if sa is None else sa.seq
if phase == "open":
    out["keepalive_isn"] = handshake(41001)
    out["half_open_isn"] = handshake(41002, ack=False)
    out["no_sa_isn"] = handshake(41003)
    out["t_established"] = time.time()
    # a zero-length segment in ESTABLISHED is a keepalive: no reply of any kind
    if out["keepalive_isn"] is not None:
        r = sr1(IP(dst=dst)/TCP(sport=41001, dport=port, flags="A", seq=1001,
                                ack=out["keepalive_isn"] + 1), timeout=1)
        out["keepalive_reply"] = None if r is None else int(r[TCP].flags)
elif phase == "late":
    isn = int(sys.argv[4])
    r = sr1(IP(dst=dst)/TCP(sport=41002, dport=port, flags="A", seq=1001, ack=isn + 1),
            timeout=2)
    out["late"] = None if r is None else {"flags": int(r[TCP].flags), "seq": r[TCP].seq}
elif phase == "flood":
    pkts = [IP(dst=dst)/TCP(sport=20000 + i, dport=port, flags="S", seq=i)
            for i in range(int(sys.argv[4]))]
    t0 = time.time()
    send(pkts)
    out["flood_seconds"] = time.time() - t0
print(json.dumps(out))
"""


def _run_script(lab: Lab, host: Host, *args: str, timeout: float = 30) -> dict:
    script = lab.dir / "timers.py"
    script.write_text(textwrap.dedent(_TIMERS))
    res = host.run(sys.executable, str(script), *args, timeout=timeout)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _ctcp_rows(host: Host) -> list[dict]:
    rows = host.tcpencap_status()["connections"]
    return [c for c in rows if c.get("encapsulation") == "ctcp"]


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


MAX_CONNS = 500
FLOOD = 3000
COOKIE_SLOT = 1.0  # ctcp_handshake_timeout: a cookie is good for one to two of these
RSS_LIMIT_KIB = 80 * 1024  # measured: about 30 MiB at the peak of the flood


def test_keepalive_half_open_no_sa_and_syn_flood() -> None:
    with Lab(clients=2) as lab:
        gw, c1, c2 = lab.gw, lab.clients[0], lab.clients[1]
        lab.block_udp(c1)
        for h in (gw, c1):
            h.start_charon()
        c1.charon.load(psk_conf(c1, gw))  # type: ignore[union-attr]
        gw.charon.load(psk_conf(gw, c1))  # type: ignore[union-attr]
        conf = _gateway_conf(gw, 4).replace(
            "  gateway {\n",
            f"  gateway {{\n    ctcp_no_sa_timeout = 4s\n    max_connections = {MAX_CONNS}\n"
            f"    ctcp_handshake_timeout = {COOKIE_SLOT}s\n",
        )
        daemon = _start_ctcp(gw, conf)
        c2.run("iptables", "-A", "OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP")
        cap = lab.capture(c2)
        opened = _run_script(lab, c2, gw.outer4, str(PORT), "open")  # type: ignore[arg-type]
        assert None not in (opened["keepalive_isn"], opened["half_open_isn"], opened["no_sa_isn"])
        assert opened["keepalive_reply"] is None, opened  # keepalive: silently dropped
        states = {r["peer"].rsplit(":", 1)[1]: r for r in _ctcp_rows(gw)}
        assert "41002" not in states, states  # a SYN leaves nothing behind (a cookie)
        assert states["41001"]["state"] == "established", states
        assert states["41001"]["drops"] == {"keepalive": 1}, states["41001"]
        # wait for the 4 s no-SA resets, and for the cookie of 41002 to expire (two slots)
        deadline = time.monotonic() + 10
        while _ctcp_rows(gw) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _ctcp_rows(gw) == [], "no-SA connections are still there"
        expired = opened["t_established"] + 2 * COOKIE_SLOT + 0.2
        while time.time() < expired:  # the cookie's lifetime is the event waited for
            time.sleep(0.05)
        late = _run_script(lab, c2, gw.outer4, str(PORT), "late", str(opened["half_open_isn"]))  # type: ignore[arg-type]
        assert late["late"] == {"flags": TCP_RST | TCP_ACK, "seq": opened["half_open_isn"] + 1}
        from scapy.layers.inet import TCP

        packets = cap.stop()
        resets = {
            p[TCP].dport: float(p.time)
            for p in packets
            if TCP in p and p[TCP].sport == PORT and p[TCP].flags == TCP_RST
        }
        # both established connections bound no SA: reset 4 s after their handshake
        for sport in (41001, 41003):
            assert sport in resets, f"no RST on {sport}: {resets}"
            assert 3.0 <= resets[sport] - opened["t_established"] <= 5.0, resets
        assert 41002 not in resets  # the half-open one had nothing to reset

        # SYN flood: 3000 SYNs in one batch; a SYN makes no state, so no slot is taken
        st0 = gw.tcpencap_status()["ctcp"]
        c0, queued0 = st0["counters"], st0["segments"]
        flood = c2.spawn(
            [sys.executable, str(lab.dir / "timers.py"), gw.outer4, str(PORT), "flood",  # type: ignore[list-item]
             str(FLOOD)], "flood.log",
        )  # fmt: skip
        peak, peak_rss = 0, 0
        while flood.alive():
            peak = max(peak, len(_ctcp_rows(gw)))
            peak_rss = max(peak_rss, _rss_kib(daemon.pid))
            time.sleep(0.05)
        assert flood.popen.returncode == 0, flood.log_tail()
        rows = _ctcp_rows(gw)
        peak, peak_rss = max(peak, len(rows)), max(peak_rss, _rss_kib(daemon.pid))
        summary = gw.tcpencap_status()["ctcp"]
        c1_ = summary["counters"]
        answered = c1_.get("syn-cookie-sent", 0) - c0.get("syn-cookie-sent", 0)
        limited = c1_.get("syn-ack-limited", 0) - c0.get("syn-ack-limited", 0)
        queued = summary["segments"] - queued0
        secs = json.loads(flood.log_text().strip().splitlines()[-1])["flood_seconds"]
        print(f"flood: {secs:.1f} s, {queued} queued, peak {peak} flows, {answered} SYN+ACKs, "
              f"{limited} limited, RSS {peak_rss} KiB")  # fmt: skip
        assert peak == 0 and rows == [], (peak, rows)  # nothing half-open, ever
        # every SYN reached the service, or was dropped by the kernel's bounded queue
        assert answered + limited == queued and queued <= FLOOD, summary
        assert answered <= 40 + 20 * secs + 1, summary  # ctcp_reply_rate: 20 a second, burst 40
        assert peak_rss < RSS_LIMIT_KIB, f"tcpencap RSS {peak_rss} KiB"
        _start_ctcp(c1, _client_conf(c1))
        c1.charon.initiate(NAME, timeout=10)  # type: ignore[union-attr]
        for src, dst in ((c1, gw), (gw, c1)):
            lost = unanswered(src, dst.inner4, src.inner4, count=3)  # type: ignore[arg-type]
            assert not lost, f"ping {src.role} -> {dst.role}: no reply to {lost}"
        (row,) = _ctcp_rows(gw)
        assert row["state"] == "established" and row["esp_spis"], row
        time.sleep(4.5)  # the SA is bound: the 4 s no-SA timer must not reset it
        lost = unanswered(c1, gw.inner4, c1.inner4, count=2)  # type: ignore[arg-type]
        assert not lost, lost


# --- RFC 9329 and cTCP on one gateway ------------------------------------------------------


def test_rfc9329_and_ctcp_clients_at_once() -> None:
    with Lab(clients=2) as lab:
        gw, c1, c2 = lab.gw, lab.clients[0], lab.clients[1]
        for c in (c1, c2):
            lab.block_udp(c)
        for h in (gw, c1, c2):
            h.start_charon()
        for c in (c1, c2):
            c.charon.load(psk_conf(c, gw))  # type: ignore[union-attr]
            gw.charon.load(psk_conf(gw, c))  # type: ignore[union-attr]
        gw.start_tcpencap(
            tcpencap_conf(
                gw,
                listen=[f"{gw.outer4}:4500"],
                gateway_extra=f"    ctcp_listen = {gw.outer4}:{PORT}\n",
            )
        )
        c1.start_tcpencap(tcpencap_conf(c1, connections={"c1-gw": 4500}))
        _start_ctcp(c2, _client_conf(c2).replace(NAME, "c2-gw"))
        caps = {c.role: lab.capture(c) for c in (c1, c2)}
        for c in (c1, c2):
            c.charon.initiate(f"{c.role}-gw", timeout=10)  # type: ignore[union-attr]
        import concurrent.futures

        jobs = [(c1, gw.inner4, c1.inner4), (gw, c1.inner4, gw.inner4),
                (c2, gw.inner4, c2.inner4), (gw, c2.inner4, gw.inner4)]  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
            futs = [ex.submit(ping, h, dst, src, 20, 0.05, 5.0) for h, dst, src in jobs]
            results = [f.result() for f in futs]
        assert results == [(20, 20)] * 4, results
        from scapy.layers.inet import TCP, UDP

        p1, p2 = caps["c1"].stop(), caps["c2"].stop()
        for pk in (p1, p2):
            assert not any(UDP in p for p in pk), "UDP crossed a client's link"
        assert sum(1 for p in p1 if TCP in p and 4500 in (p[TCP].sport, p[TCP].dport)) >= 40
        assert not any(TCP in p and PORT in (p[TCP].sport, p[TCP].dport) for p in p1)
        assert caps["c2"].count_tcp(PORT) >= 40
        check_segments(str(caps["c2"].pcap), min_ike500=1)
        rows = gw.tcpencap_status()["connections"]
        peers = sorted((c.get("encapsulation", "rfc9329"), c["peer"].split(":")[0]) for c in rows)
        assert peers == [("ctcp", c2.outer4), ("rfc9329", c1.outer4)], rows
