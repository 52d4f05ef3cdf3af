"""systemd for real: run inside the Debian guest booted with systemd as PID 1 (tests/vm/
test_vm_systemd.py boots it). The gateway is the guest itself, an existing strongSwan gateway
(charon-systemd's strongswan.service, ESP in the kernel) that gets tcpencap as the README's
deployment section says: `apt install ./tcpencap_*.deb` (tests/vm/package.py built it for this
suite and left it in /root), the example configuration, `systemctl reload tcpencap`, and at
the end `apt remove` and `apt purge`. The client is a lab namespace behind a firewall
namespace that drops its UDP. The tests run in file order, each step building on the one
before.

Not collected on the host (the name has no test_ prefix).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kernel_scenarios import WAIT, ike_spis, wait_for, xfrm_states

from tests.labkit import Host, Lab, ping, psk_conf, tcpencap_conf

NAME = "c1-gw"
KEPT = (1 << 10) | (1 << 12) | (1 << 13)  # NET_BIND_SERVICE, NET_ADMIN, NET_RAW
CONF = Path("/etc/strongswan.d/tcpencap.conf")
EXAMPLE = Path("/usr/share/doc/tcpencap/examples/roadwarrior-gateway/tcpencap.conf")
APT = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q", "-y", "--no-install-recommends"]


def sh(*argv: str, check: bool = True, timeout: float = 120) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {res.returncode}\n{res.stdout}{res.stderr}")
    return res.stdout + res.stderr


def prop(unit: str, name: str) -> str:
    return sh("systemctl", "show", "-p", name, "--value", unit).strip()


def root_ping(dst: str, src: str) -> tuple[int, int]:
    out = sh("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", "-I", src, dst, check=False)
    m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def pings_both_ways(c1: Host, gw: Host) -> bool:
    there = ping(c1, gw.inner4, c1.inner4, timeout=5)
    back = root_ping(c1.inner4, gw.inner4)
    return there == (3, 3) and back == (3, 3)


def tcpencap_leftovers() -> list[str]:
    """tcpencap's chains and sets in the guest's root namespace."""
    found = []
    for tool in ("iptables-save", "ip6tables-save"):
        found += [line for line in sh(tool).splitlines() if "TCPENCAP" in line]
    found += [s for s in sh("ipset", "list", "-n").split() if s.startswith("TCPENCAP")]
    return found


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Any]]:
    """The lab; its gw's link moved into the guest's root namespace, where systemd runs."""
    with Lab(clients=1, ipsec="kernel") as lab:
        c1, gw = lab.clients[0], lab.gw
        lab.block_udp(c1)
        sh("ip", "-n", gw.name, "link", "set", gw.veth, "netns", "1")
        for argv in (
            ["link", "set", gw.veth, "up"],
            ["addr", "add", f"{gw.outer4}/24", "dev", gw.veth],
            ["-6", "addr", "add", f"{gw.outer6}/64", "dev", gw.veth, "nodad"],
            ["addr", "add", f"{gw.inner4}/32", "dev", "lo"],
            ["-6", "addr", "add", f"{gw.inner6}/128", "dev", "lo", "nodad"],
            ["route", "add", "198.18.0.0/15", "via", "198.19.0.1"],
            ["-6", "route", "add", "fd00::/8", "via", "fd00:100::1"],
        ):
            sh("ip", *argv)
        # The strongSwan gateway tcpencap is added to (swanctl's conf.d, loaded at start).
        Path("/etc/swanctl/conf.d/lab.conf").write_text(psk_conf(gw, c1))
        # The client: charon and tcpencap in its namespace, as in every lab test.
        c1.start_charon()
        c1.charon.load(psk_conf(c1, gw))
        c1.start_tcpencap(tcpencap_conf(c1, connections={NAME: 4500}), log_level="info")
        try:
            yield {"lab": lab, "c1": c1, "gw": gw}
        finally:
            sh("systemctl", "stop", "tcpencap", "strongswan", check=False)
            sh(*APT, "purge", "tcpencap", check=False, timeout=900)
            # The moved veth goes with fw's namespace; the inner addresses stay on lo.
            sh("ip", "addr", "del", f"{gw.inner4}/32", "dev", "lo", check=False)
            sh("ip", "-6", "addr", "del", f"{gw.inner6}/128", "dev", "lo", check=False)


def timed(what: str, fn: Callable[[], Any]) -> Any:
    t0 = time.monotonic()
    out = fn()
    print(f"{what}: {time.monotonic() - t0:.1f} s")
    return out


def test_1_apt_install_on_a_running_strongswan(lab: dict[str, Any]) -> None:
    """The package on a gateway whose strongswan.service runs already: offline (the image has
    its dependencies in apt's cache), enabled next to strongswan.service, started."""
    timed("systemctl start strongswan", lambda: sh("systemctl", "start", "strongswan"))
    debs = sorted(Path("/root").glob("tcpencap_*.deb"))
    assert len(debs) == 1, debs
    out = timed(f"apt install {debs[0]}", lambda: sh(*APT, "install", str(debs[0]), timeout=900))
    print("\n".join(out.splitlines()[-12:]))
    unit = prop("tcpencap.service", "FragmentPath")
    print(f"unit {unit}: {prop('tcpencap.service', 'UnitFileState')}, "
          f"{prop('tcpencap.service', 'ActiveState')}; strongswan.service drop-ins: "
          f"{prop('strongswan.service', 'DropInPaths')}")  # fmt: skip
    assert unit in ("/lib/systemd/system/tcpencap.service",
                    "/usr/lib/systemd/system/tcpencap.service"), unit  # fmt: skip
    assert "path=/usr/sbin/tcpencap ; argv[]=/usr/sbin/tcpencap run " in prop(
        "tcpencap.service", "ExecStart"
    )
    assert prop("tcpencap.service", "UnitFileState") == "enabled"
    wants = sh("systemctl", "show", "-p", "Wants", "--value", "strongswan.service").split()
    assert "tcpencap.service" in wants, wants
    assert any(d.endswith("/strongswan.service.d/tcpencap.conf")
               for d in prop("strongswan.service", "DropInPaths").split())  # fmt: skip
    assert sh("getent", "passwd", "tcpencap").startswith("tcpencap:")
    wait_for("tcpencap started by the package",
             lambda: prop("tcpencap.service", "ActiveState") == "active")  # fmt: skip
    settings = [ln for ln in CONF.read_text().splitlines() if "=" in ln.split("#", 1)[0]]
    assert settings == [], "the packaged configuration must have every key commented out"


def listening(port: int) -> bool:
    return bool(sh("ss", "-Hltn", f"sport = :{port}").strip())


def test_2_example_config_reload_and_a_client_over_tcp(lab: dict[str, Any]) -> None:
    c1, gw = lab["c1"], lab["gw"]
    pid = prop("tcpencap.service", "MainPID")
    shutil.copyfile(EXAMPLE, CONF)
    print(sh("tcpencap", "check-config").strip())
    timed("systemctl reload tcpencap", lambda: sh("systemctl", "reload", "tcpencap"))
    wait_for("listeners on 4500 and 443", lambda: listening(4500) and listening(443))
    assert prop("tcpencap.service", "MainPID") == pid, "reload restarted the daemon"
    print(sh("ss", "-Hltn", "( sport = :4500 or sport = :443 )").strip())
    cap = lab["lab"].capture(c1)
    timed("initiate over TCP", lambda: c1.charon.initiate(NAME, timeout=WAIT))
    wait_for("pings both ways", lambda: pings_both_ways(c1, gw))
    states = xfrm_states(None)  # the gateway is the guest's root namespace
    assert states and all(s["encap"].startswith("espinudp ") for s in states), states
    print(f"gateway ip xfrm state: {states}")
    cap.stop()
    assert cap.count_udp_ike() == 0, "UDP 500/4500 on c1's link"
    assert cap.count_tcp(4500) > 0
    print(f"capture on c1's link: {cap.count_tcp(4500)} TCP segments on 4500, 0 UDP 500/4500")


def test_3_journal_and_man_pages(lab: dict[str, Any]) -> None:
    log = sh("journalctl", "-u", "tcpencap", "--no-pager", "-o", "cat")
    print(log[-2000:])
    assert "tcpencap running" in log
    # the package carries the extension, built for the suite's Python
    assert "native data path)" in log and "native data path unavailable" not in log
    assert "listening on 0.0.0.0:4500" in log
    # `systemctl help tcpencap` opens what Documentation= names
    docs = [d.strip('"') for d in prop("tcpencap.service", "Documentation").split()]
    assert docs == ["man:tcpencap(8)", "man:tcpencap.conf(5)"], docs
    for page in ("man8/tcpencap.8.gz", "man5/tcpencap.conf.5.gz"):
        assert (Path("/usr/share/man") / page).is_file(), page


def test_3b_reload_applies_a_change(lab: dict[str, Any]) -> None:
    c1, gw = lab["c1"], lab["gw"]
    pid = prop("tcpencap.service", "MainPID")
    text = CONF.read_text()
    assert ", 0.0.0.0:443" in text, text
    CONF.write_text(text.replace(", 0.0.0.0:443", ""))
    timed("systemctl reload tcpencap", lambda: sh("systemctl", "reload", "tcpencap"))
    wait_for("the listener on 443 gone", lambda: not listening(443))
    assert listening(4500)
    assert prop("tcpencap.service", "MainPID") == pid, "reload restarted the daemon"
    wait_for("pings both ways after the reload", lambda: pings_both_ways(c1, gw))


def test_4_sigkill_is_restarted_and_sas_resume(lab: dict[str, Any]) -> None:
    c1, gw = lab["c1"], lab["gw"]
    spi = ike_spis(c1)
    pid = prop("tcpencap.service", "MainPID")
    sh("systemctl", "kill", "-s", "SIGKILL", "tcpencap")
    t0 = time.monotonic()
    wait_for(
        "systemd restarts tcpencap",
        lambda: (
            prop("tcpencap.service", "MainPID") not in ("0", pid)
            and prop("tcpencap.service", "ActiveState") == "active"
        ),
    )
    wait_for("pings both ways after the restart", lambda: pings_both_ways(c1, gw))
    restarts = prop("tcpencap.service", "NRestarts")
    print(f"SIGKILL to pings again: {time.monotonic() - t0:.1f} s; NRestarts={restarts}")
    assert ike_spis(c1) == spi, "the IKE SA was re-established instead of resumed"


def charon_udp_to(peer: str) -> int:
    """charon's (and the kernel's ESP-in-UDP) packets to ``peer`` so far: a counter rule
    in raw OUTPUT, before any rule of tcpencap's."""
    out = sh("iptables", "-w", "5", "-t", "raw", "-L", "OUTPUT", "-v", "-x", "-n")
    for line in out.splitlines()[2:]:
        cols = line.split()
        if peer in cols and "multiport" in cols:
            return int(cols[0])
    raise AssertionError(f"no counter rule:\n{out}")


def fw_block_tcp(lab: Lab, c1: Host, on: bool) -> None:
    for direction in ("-i", "-o"):
        spec = ["FORWARD", direction, c1.fw_veth, "-p", "tcp", "-j", "DROP"]
        lab.fw.run("iptables", "-I" if on else "-D", *spec)  # type: ignore[arg-type]


def test_5_systemctl_restart_leaks_no_udp(lab: dict[str, Any]) -> None:
    """`systemctl restart tcpencap` with the tunnel up and the gateway pinging c1: c1
    cannot reconnect (TCP blocked in fw) until charon has sent 30 more packets to it
    after the restart; not one may cross the gateway's link as UDP."""
    c1, gw = lab["c1"], lab["gw"]
    wait_for("pings both ways before", lambda: pings_both_ways(c1, gw))
    counter = ["-p", "udp", "-m", "multiport", "--sports", "500,4500", "-d", c1.outer4]
    sh("iptables", "-w", "5", "-t", "raw", "-A", "OUTPUT", *counter)
    pcap = Path("/tmp/restart.pcap")
    tcpdump = subprocess.Popen(
        ["tcpdump", "-U", "-n", "-i", gw.veth, "-w", str(pcap), "udp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    pinger = subprocess.Popen(
        ["ping", "-n", "-q", "-i", "0.05", "-I", gw.inner4, c1.inner4],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        restart_with_tcp_blocked(lab, pcap, tcpdump, pinger)
    finally:
        for proc in (pinger, tcpdump):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


def restart_with_tcp_blocked(
    lab: dict[str, Any], pcap: Path, tcpdump: subprocess.Popen, pinger: subprocess.Popen
) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap

    c1, gw = lab["c1"], lab["gw"]
    pid = prop("tcpencap.service", "MainPID")
    fw_block_tcp(lab["lab"], c1, True)
    try:
        wait_for("tcpdump listening", lambda: pcap.exists())
        before = charon_udp_to(c1.outer4)
        timed("systemctl restart tcpencap", lambda: sh("systemctl", "restart", "tcpencap"))
        wait_for(
            "tcpencap running again",
            lambda: (
                prop("tcpencap.service", "MainPID") not in ("0", pid)
                and prop("tcpencap.service", "ActiveState") == "active"
            ),
        )
        after = charon_udp_to(c1.outer4)
        wait_for("charon sends 30 more to the unconnected c1",
                 lambda: charon_udp_to(c1.outer4) >= after + 30)  # fmt: skip
        tried = charon_udp_to(c1.outer4) - before
    finally:
        fw_block_tcp(lab["lab"], c1, False)
    t0 = time.monotonic()
    wait_for("pings both ways after the restart", lambda: pings_both_ways(c1, gw))
    back = time.monotonic() - t0
    for proc in (pinger, tcpdump):
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(10)
    leaked = sum(
        1
        for p in rdpcap(str(pcap))
        if IP in p and UDP in p and {p[UDP].sport, p[UDP].dport} & {500, 4500}
        and {p[IP].src, p[IP].dst} == {c1.outer4, gw.outer4}
    )  # fmt: skip
    print(
        f"restart: charon sent {tried} packets to c1 meanwhile; UDP 500/4500 on the gateway's "
        f"link: {leaked}; TCP let through -> pings both ways in {back:.1f} s; "
        f"NRestarts={prop('tcpencap.service', 'NRestarts')}"
    )
    assert leaked == 0, f"{leaked} UDP 500/4500 packets left the gateway"


def daemon_view(pid: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the daemon could: its mount namespace, user, group and groups."""
    st = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    uid, gid = st["Uid"].split()[0], st["Gid"].split()[0]
    groups = ",".join(st["Groups"].split())
    ids = [f"--reuid={uid}", f"--regid={gid}"]
    ids += [f"--groups={groups}"] if groups else ["--clear-groups"]
    return subprocess.run(
        ["nsenter", "-t", pid, "-m", "--", "setpriv", *ids, *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


CONNECT = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"


def test_6_unit_runs_confined(lab: dict[str, Any]) -> None:
    """The unit's user, capabilities and reach, and systemd-analyze's exposure score."""
    pid = prop("tcpencap.service", "MainPID")
    st = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    caps = {k: int(st[k].strip(), 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")}
    uid = st["Uid"].split()[0]
    user = prop("tcpencap.service", "User") or "root"
    sets = ", ".join(f"{k} {v:#x}" for k, v in caps.items())
    groups = st["Groups"].strip() or "-"
    print(
        f"unit User={user}, uid {uid}, groups {groups}, "
        f"NoNewPrivs {st['NoNewPrivs'].strip()}, {sets}"
    )
    journal = sh("journalctl", "-u", "tcpencap", "--no-pager", "-o", "cat")
    dropped = "could not drop capabilities" not in journal
    print(f"journal: {'no' if dropped else 'a'} 'could not drop capabilities' line")
    score = sh("systemd-analyze", "security", "--no-pager", "tcpencap.service", check=False)
    overall = [ln for ln in score.splitlines() if "Overall exposure level" in ln]
    print(overall[0] if overall else score[-500:])
    reach = {}
    for path in ("/run/systemd/private", "/run/dbus/system_bus_socket", "/run/charon.vici"):
        if Path(path).exists():
            res = daemon_view(pid, ["python3", "-c", CONNECT, path])
            reach[path] = res.returncode == 0
    writes = {}
    for path in ("/run/tcpencap/probe", "/run/probe", "/etc/probe", "/var/lib/probe"):
        writes[path] = daemon_view(pid, ["touch", path]).returncode == 0
        daemon_view(pid, ["rm", "-f", path])
    print(f"the daemon can connect to: {reach}; can write: {writes}")
    assert uid != "0", f"the unit runs as root ({user})"
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == KEPT, caps
    assert st["NoNewPrivs"].strip() == "1"
    assert dropped, "the capability drop failed under the unit"
    assert reach.get("/run/charon.vici") is True, reach
    assert not reach["/run/systemd/private"], reach
    assert not reach.get("/run/dbus/system_bus_socket"), reach
    assert writes == {"/run/tcpencap/probe": True, "/run/probe": False, "/etc/probe": False,
                      "/var/lib/probe": False}, writes  # fmt: skip
    # 96634d6 measured 2.0 (root, /run writable, systemd's socket reachable)
    level = float(re.search(r"exposure level for tcpencap.service: ([0-9.]+)", score)[1])
    assert level < 2.0, overall


def test_7_stopping_strongswan_stops_tcpencap_and_leaves_no_rules(lab: dict[str, Any]) -> None:
    assert tcpencap_leftovers(), "tcpencap's rules should exist while it runs"
    timed("systemctl stop strongswan", lambda: sh("systemctl", "stop", "strongswan"))
    wait_for(
        "tcpencap stopped",
        lambda: prop("tcpencap.service", "ActiveState") in ("inactive", "failed"),
    )
    assert prop("tcpencap.service", "ActiveState") == "inactive", prop("tcpencap.service", "Result")
    assert tcpencap_leftovers() == []


def test_8_apt_remove_stops_it_and_leaves_no_rule_then_purge(lab: dict[str, Any]) -> None:
    """strongswan.service starts tcpencap again (the package enabled it there); `apt remove`
    then stops it and takes its rules and sets, charon keeps running; `apt purge` takes the
    configuration."""
    timed("systemctl start strongswan", lambda: sh("systemctl", "start", "strongswan"))
    wait_for("tcpencap started with strongswan",
             lambda: prop("tcpencap.service", "ActiveState") == "active")  # fmt: skip
    wait_for("tcpencap's rules in place", lambda: tcpencap_leftovers() != [])
    out = timed("apt remove tcpencap", lambda: sh(*APT, "remove", "tcpencap", timeout=900))
    print("\n".join(out.splitlines()[-8:]))
    left = tcpencap_leftovers()
    print(f"after apt remove: tcpencap.service {prop('tcpencap.service', 'LoadState')}, "
          f"strongswan.service {prop('strongswan.service', 'ActiveState')}, "
          f"rules and sets left: {left}")  # fmt: skip
    assert left == []
    assert prop("tcpencap.service", "LoadState") == "not-found"
    assert prop("strongswan.service", "ActiveState") == "active"
    assert not sh("pgrep", "-f", "/usr/sbin/tcpencap", check=False).strip()
    assert CONF.exists(), "remove must keep the configuration"
    timed("apt purge tcpencap", lambda: sh(*APT, "purge", "tcpencap", timeout=900))
    assert not CONF.exists(), "purge must remove /etc/strongswan.d/tcpencap.conf"
    print("after apt purge: /etc/strongswan.d/tcpencap.conf is gone")
