"""End to end: strongSwan over RFC 9329 TCP through tcpencap, in the namespace lab.

Every test builds its own lab (torn down even on failure). The client's UDP is dropped in fw,
so a tunnel that works at all works over TCP; the captures on the client's veth prove that
nothing leaked as UDP 500/4500 before fw could drop it.
Needs root, iproute2, iptables, tcpdump and strongSwan; fails (never skips) without them.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.labkit import REPO_ROOT, Host, Lab, Process, ping, psk_conf
from tests.labkit.e2e import (
    CHAIN,
    assert_established,
    assert_pings,
    assert_status_matches_sa,
    assert_steering,
    chain_rules,
    mangle_rules,
    run_hostile,
    start_tcp_clients,
    start_tcp_pair,
    tcpencap_sets,
)

pytestmark = pytest.mark.lab

NAME = "c1-gw"


def _esp_in_udp(packets: list, port: int = 4500) -> int:
    """UDP packets on ``port`` whose payload starts with a non-zero SPI (ESP, not IKE)."""
    from scapy.layers.inet import UDP

    n = 0
    for p in packets:
        if UDP in p and port in (p[UDP].sport, p[UDP].dport):
            payload = bytes(p[UDP].payload)
            if len(payload) >= 8 and payload[:4] != b"\0\0\0\0":
                n += 1
    return n


# --- 1 and 2: PSK and certificates, TCP 4500 and 443, IPv4 and IPv6 outer ---------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("port", [4500, 443])
@pytest.mark.parametrize("auth", ["psk", "cert"])
def test_tunnel_over_tcp(auth: str, port: int, family: int) -> None:
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        start_tcp_pair(lab, c1, family=family, port=port, auth=auth)
        cap = lab.capture(c1)
        c1.charon.initiate(NAME, timeout=10)
        assert_pings(c1, gw)
        cap.stop()

        assert cap.count_udp_ike() == 0, "UDP 500/4500 left the client"
        assert cap.count_tcp(port) > 0
        other = 443 if port == 4500 else 4500
        assert cap.count_tcp(other) == 0, f"TCP {other} used instead of {port}"

        gw_sa = assert_established(gw, NAME)
        c1_sa = assert_established(c1, NAME)
        assert gw_sa["remote-host"] == c1.outer(family)
        assert c1_sa["initiator-spi"] == gw_sa["initiator-spi"]
        for host, peer in ((c1, gw), (gw, c1)):
            conn = assert_status_matches_sa(host, NAME)
            assert conn["side"] == ("client" if host is c1 else "gateway")
            ends = {conn["local"].rsplit(":", 1)[1], conn["peer"].rsplit(":", 1)[1]}
            assert str(port) in ends, conn
            assert host.tcpencap_status()["steered_peers"] == [peer.outer(family)]


# --- the data paths: the C one (the default) and the Python reference -----------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("datapath", ["native", "python"])
def test_each_datapath_carries_bulk_traffic(datapath: str, family: int) -> None:
    """A 4 MiB transfer and pings through each data path; on the native one the flow
    cache carries the bulk and its injections all succeed."""
    setting = f"  datapath = {datapath}"
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        start_tcp_pair(lab, c1, family=family, extra=setting, client_extra=setting)
        cap = lab.capture(c1)
        c1.charon.initiate(NAME, timeout=10)
        assert_pings(c1, gw)
        server = gw.spawn(["iperf3", "-s", "-1", "-B", gw.inner(family)], "iperf3-server.log")
        time.sleep(0.3)
        for reverse in ([], ["-R"]):  # both directions through both engines
            proc = c1.run(
                "iperf3", "-c", gw.inner(family), "-B", c1.inner(family), "-n", "4M",
                "-J", *reverse, check=False, timeout=60,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
            if not reverse:
                assert server.popen.wait(10) == 0, server.log_tail()
                server = gw.spawn(
                    ["iperf3", "-s", "-1", "-B", gw.inner(family)], "iperf3-server2.log"
                )
                time.sleep(0.3)
        assert server.popen.wait(10) == 0, server.log_tail()
        cap.stop()
        assert cap.count_udp_ike() == 0, "UDP 500/4500 left the client"
        for host in (c1, gw):
            st = host.tcpencap_status()
            assert st["datapath"] == datapath, st
            assert "inject-failed" not in st["drops"], st["drops"]
            assert st["queue"]["errors"] == 0, host.tcpencap.log_tail()
            assert st["queue"]["packets"] > 2000, st["queue"]
            if datapath == "native":
                # the flow cache framed most of what charon sent (misses: IKE, each
                # flow's first packets)
                assert st["flows"]["hits"] > 0.9 * st["queue"]["packets"], st
                # ... and the inbound worker injected what came over TCP, in C
                assert st["inbound"]["injected"] > 2000 and st["inbound"]["lent"] == 1, st
            else:
                assert st["flows"] is None and st["inbound"] is None
        assert_established(c1, NAME)


def test_several_queues_each_with_its_thread() -> None:
    """queues = 2 on a gateway with four clients: --queue-balance spreads the peers over
    queues 4500 and 4501 (one peer's packets stay in one), a reader thread per queue."""
    with Lab(clients=4) as lab:
        gw, clients = lab.gw, lab.clients
        start_tcp_clients(lab, clients, extra="  queues = 2")
        for tool in ("iptables", "ip6tables"):
            rules = chain_rules(gw, tool)
            assert [r.endswith("-j NFQUEUE --queue-balance 4500:4501") for r in rules] == [
                True,
                True,
            ]
        for c in clients:
            got = ping(gw, c.inner4, gw.inner4, count=20, interval=0.01)
            assert got[1] == got[0] == 20, (c.role, got)
        q = gw.tcpencap_status()["queue"]
        assert (q["queues"], q["threads"], q["errors"]) == (2, 2, 0), q
        per = q["per_queue"]
        assert sum(per.values()) == q["packets"] >= 80, q  # every reply went through a queue
        print("packets per queue:", per)


# --- 3: one TCP client and one plain UDP client on the same gateway -------------------


def test_tcp_and_udp_clients_together() -> None:
    with Lab(clients=2) as lab:
        c1, c2, gw = lab.clients[0], lab.clients[1], lab.gw
        c2.start_charon()
        gw.start_charon()
        c2.charon.load(psk_conf(c2, gw))
        gw.charon.load(psk_conf(gw, c2))
        start_tcp_pair(lab, c1)
        cap1, cap2 = lab.capture(c1), lab.capture(c2)
        c1.charon.initiate(NAME, timeout=10)
        c2.charon.initiate("c2-gw", timeout=10)
        assert_pings(c1, gw)
        assert_pings(c2, gw)
        # Both at once, interleaved: the TCP path must not disturb the UDP one.
        with ThreadPoolExecutor(2) as pool:
            f1 = pool.submit(ping, c1, gw.inner4, c1.inner4, 20, 0.02)
            f2 = pool.submit(ping, c2, gw.inner4, c2.inner4, 20, 0.02)
            assert f1.result() == (20, 20) and f2.result() == (20, 20)
        cap1.stop()
        cap2.stop()

        assert cap1.count_udp_ike() == 0
        assert cap1.count_tcp(4500) > 0
        assert _esp_in_udp(cap2.packets) >= 2 * (3 * 4 + 20)  # every ping and reply as ESP
        assert cap2.count_tcp(4500) == 0

        assert_established(gw, NAME)
        assert_established(gw, "c2-gw")
        assert_established(c2, "c2-gw")
        conn = assert_status_matches_sa(gw, NAME)
        assert conn["peer"].startswith(c1.outer4 + ":")
        assert gw.tcpencap_status()["steered_peers"] == [c1.outer4]


# --- 4: hostile TCP clients against the gateway -----------------------------------------

DEADLINE = 2.0
IMMEDIATE = {
    "wrong-prefix": b"IKETCX\x00\x10",
    "garbage": bytes(range(0x16, 0x16 + 40)),
    "length-zero": b"IKETCP\x00\x00",
    "length-over-max": b"IKETCP\xff\xff",
}
SLOW = {
    "prefix-then-silence": b"IKETCP",
    "never-sends": b"",
    "partial-prefix": b"IKE",
    "partial-frame": b"IKETCP\x01\x00" + b"\x00" * 20,
}


def test_hostile_clients_closed_while_tunnel_runs() -> None:
    with Lab(clients=2) as lab:
        c1, c2, gw = lab.clients[0], lab.clients[1], lab.gw
        start_tcp_pair(
            lab,
            c1,
            extra="  max_frame = 1024",
            gateway_extra=f"    first_message_timeout = {DEADLINE:g}s",
        )
        c1.charon.initiate(NAME, timeout=10)
        assert_pings(c1, gw)
        before = assert_status_matches_sa(gw, NAME)

        cases = {**IMMEDIATE, **SLOW}
        with ThreadPoolExecutor(1) as pool:
            hostile = pool.submit(run_hostile, c2, gw.outer4, 4500, cases, DEADLINE + 4)
            time.sleep(0.1)
            during = ping(c1, gw.inner4, c1.inner4, count=50, interval=0.05, timeout=5)
            results = hostile.result()
        assert during == (50, 50), f"tunnel disturbed by hostile clients: {during}"
        assert_pings(c1, gw)

        log = (gw.dir / "tcpencap.log").read_text()
        for name in cases:
            r = results[name]
            assert r["how"] in ("eof", "reset"), (name, r)
            assert r["received"] == "", (name, r)  # a responder never sends a prefix
            if name in IMMEDIATE:
                assert r["elapsed"] < 1.0, (name, r)
                want = "protocol error"
            else:
                assert DEADLINE - 0.3 < r["elapsed"] < DEADLINE + 1.5, (name, r)
                want = "deadline"
            lines = [
                line
                for line in log.splitlines()
                if f"<-> {c2.outer4}:{r['port']}: closed (" in line
            ]
            assert len(lines) == 1 and want in lines[0], (name, r, lines)

        st = gw.tcpencap_status()
        assert [c["id"] for c in st["connections"]] == [before["id"]], st["connections"]
        assert st["steered_peers"] == [c1.outer4]
        assert_status_matches_sa(gw, NAME)


# --- 5: rules after SIGTERM and SIGKILL ------------------------------------------------


def _rotate_log(host: Host) -> None:
    """Keep the previous run's log aside, so waiting for "tcpencap running" waits for the
    new process and not for a line the old one wrote."""
    log = host.dir / "tcpencap.log"
    if log.exists():
        n = len(list(host.dir.glob("tcpencap.log.*")))
        log.rename(host.dir / f"tcpencap.log.{n}")


def _restart(host: Host) -> Process:
    _rotate_log(host)
    return host.start_tcpencap((host.dir / "tcpencap.conf").read_text())


def _assert_clean(host: Host) -> None:
    rules = mangle_rules(host)
    assert "TCPENCAP" not in rules, f"{host.role}: rules left behind:\n{rules}"
    assert tcpencap_sets(host) == [], host.role


def _assert_installed(host: Host, peer: str) -> None:
    """Exactly one jump rule per family, the queue rules, and ``peer`` alone in the sets."""
    assert_steering(host, [peer])


def _force_terminate(host: Host, name: str) -> None:
    """Drop an IKE_SA locally without waiting for the peer (its DELETE cannot get out)."""
    sess = host.charon.session(timeout=10)
    try:
        for _ in sess.terminate({"ike": name, "force": "yes", "loglevel": -1}):
            pass
    finally:
        sess.transport.socket.close()


def test_rules_after_sigterm_and_sigkill() -> None:
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        start_tcp_pair(lab, c1)
        _assert_installed(c1, gw.outer4)

        # SIGTERM: exit code 0, and the rules stay (fail-closed, see README "Stops and
        # restarts fail closed").
        assert c1.tcpencap.stop() == 0, c1.tcpencap.log_tail()
        _assert_installed(c1, gw.outer4)
        _restart(c1)
        _assert_installed(c1, gw.outer4)
        c1.charon.initiate(NAME, timeout=10)
        assert_pings(c1, gw)

        # SIGKILL: the rules stay (fail-closed), and nothing leaks as UDP meanwhile.
        proc = c1.tcpencap
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().split(b"\0")
        assert b"tcpencap" in cmdline and b"run" in cmdline, cmdline  # python, not ip netns
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.popen.wait(5) == -signal.SIGKILL
        _assert_installed(c1, gw.outer4)
        cap = lab.capture(c1)
        assert ping(c1, gw.inner4, c1.inner4, count=3, timeout=1)[1] == 0
        cap.stop()
        assert cap.count_udp_ike() == 0, "ESP leaked as UDP while tcpencap was dead"

        # Restart: a stray rule in the stale chain goes, the chain itself stays.
        c1.run("iptables", "-t", "mangle", "-A", CHAIN, "-d", "198.18.99.99", "-j", "RETURN")
        _force_terminate(c1, NAME)
        _restart(c1)
        _assert_installed(c1, gw.outer4)
        assert "198.18.99.99" not in mangle_rules(c1)
        cap = lab.capture(c1)
        c1.charon.initiate(NAME, timeout=10)
        assert_pings(c1, gw)
        cap.stop()
        assert cap.count_udp_ike() == 0
        assert_status_matches_sa(c1, NAME)

        # Final SIGTERM on both sides, then `tcpencap remove-rules`: nothing remains.
        for host in (c1, gw):
            assert host.tcpencap.stop() == 0, host.tcpencap.log_tail()
            conf = str(host.dir / "tcpencap.conf")
            host.run("env", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-m", "tcpencap",
                     "remove-rules", "--config", conf)  # fmt: skip
            _assert_clean(host)


# --- 5b: an existing SA survives a crash and restart of either daemon --------------------


def _ping_until(src: Host, dst: Host, timeout: float) -> float | None:
    """Seconds until one inner ping gets through, or None within ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ping(src, dst.inner4, src.inner4, count=1, timeout=1)[1] == 1:
            return time.monotonic() - t0
    return None


@pytest.mark.parametrize("side", ["client", "gateway"])
def test_sa_resumes_after_daemon_restart(side: str) -> None:
    """RFC 9329 §6: SAs outlive the TCP connection and the Originator reconnects; DESIGN.md:
    the daemon resyncs from list-sas at start-up. So after a crash of either tcpencap and a
    new start, the same IKE_SA carries traffic again without re-initiating, and nothing
    leaves either host as UDP 500/4500."""
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        start_tcp_pair(lab, c1)
        c1.charon.initiate(NAME, timeout=10)
        assert_pings(c1, gw)
        spi = assert_established(c1, NAME)["initiator-spi"]

        host = c1 if side == "client" else gw
        os.kill(host.tcpencap.pid, signal.SIGKILL)
        host.tcpencap.popen.wait(5)
        _restart(host)
        caps = [lab.capture(c1), lab.capture(gw)]
        waited = _ping_until(c1, gw, timeout=8.0)
        for cap in caps:
            cap.stop()
        leaks = [cap.count_udp_ike() for cap in caps]
        logs = "\n".join(f"--- {h.role} tcpencap.log:\n{h.tcpencap.log_tail(12)}" for h in (c1, gw))
        assert waited is not None, (
            f"after a {side} tcpencap restart the existing IKE_SA {spi} carries no traffic "
            f"within 8 s (UDP 500/4500 leaked on c1/gw veths: {leaks})\n{logs}"
        )
        assert leaks == [0, 0], f"UDP 500/4500 on the wire (c1, gw): {leaks}\n{logs}"
        assert_pings(c1, gw)
        assert assert_established(c1, NAME)["initiator-spi"] == spi
