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

import pytest

from tcpencap.lab import Host, Lab, Process, ping, psk_conf
from tcpencap.packet import TCP_ACK, TCP_RST, TCP_SYN

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
    from tcpencap.lab import REPO_ROOT

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


def _setup(lab: Lab, family: int, version: int) -> tuple[Host, Host]:
    c1, gw = lab.clients[0], lab.gw
    lab.block_udp(c1)
    for h in (c1, gw):
        h.start_charon()
    for local, remote in ((c1, gw), (gw, c1)):
        conf = psk_conf(local, remote, family=family)
        if version == 1:
            assert "version = 2" in conf
            conf = conf.replace("version = 2", "version = 1\n    aggressive = no")
        local.charon.load(conf)  # type: ignore[union-attr]
    _start_ctcp(gw, _gateway_conf(gw, family))
    _start_ctcp(c1, _client_conf(c1))
    return c1, gw


def _tshark_trailers(pcap: str) -> list[tuple[str, str]]:
    tshark = shutil.which("tshark")
    assert tshark, "tshark is required (apt-get install tshark)"
    argv = [tshark, "-r", pcap, "-d", f"tcp.port=={PORT},tcpencap"]
    argv += ["-Y", "tcpencap", "-T", "fields", "-e", "tcpencap.magic", "-e", "tcpencap.proto"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    return [tuple(line.split("\t")) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


def _check_tunnel(lab: Lab, c1: Host, gw: Host, inner: tuple[int, ...] = (4, 6)) -> None:
    cap = lab.capture(c1)
    c1.charon.initiate(NAME, timeout=10)  # type: ignore[union-attr]
    sas = c1.charon.list_sas()  # type: ignore[union-attr]
    assert any(NAME in sa for sa in sas), sas
    for fam in inner:
        for src, dst in ((c1, gw), (gw, c1)):
            got = ping(src, dst.inner(fam), src.inner(fam), count=3)
            assert got == (3, 3), f"ping {src.role} -> {dst.role} IPv{fam}: {got}"
    packets = cap.stop()
    from scapy.layers.inet import UDP

    assert sum(1 for p in packets if UDP in p) == 0, "UDP crossed c1's link"
    n_tcp = cap.count_tcp(PORT)
    n_pings = 6 * len(inner)  # requests and replies, each one ESP-in-UDP segment
    assert n_tcp >= 3 + n_pings, n_tcp  # handshake, IKE and the pings at least
    trailers = _tshark_trailers(str(cap.pcap))
    assert len(trailers) >= n_pings, trailers
    for magic, proto in trailers:
        assert magic.replace(":", "") == MAGIC_TEXT.replace(":", "")  # tshark 4.0: no colons
        assert int(proto, 0) == 17  # ESP-in-UDP and IKE both travel as inner UDP


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
    # the connection is gone: a data-less ACK now draws a stray RST+ACK
    out["after"] = ex(sr1(IP(dst=dst)/TCP(sport=40002, dport=port, flags="A", seq=5002,
                                          ack=synack.seq + 1), timeout=2))
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
        # TTL 240 - 1 hop (fw): the cTCP service answered, never the gateway kernel (64)
