"""systemd for real: run inside the Debian guest booted with systemd as PID 1 (tests/vm/
test_vm_systemd.py boots it). The gateway is the guest itself: charon-systemd's
strongswan.service and configs/tcpencap.service installed as the README's deployment section
says, ESP in the kernel. The client is a lab namespace behind a firewall namespace that drops
its UDP. The tests run in file order, each step building on the one before.

Not collected on the host (the name has no test_ prefix).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kernel_scenarios import WAIT, ike_spis, wait_for, xfrm_states

from tests.lab import REPO_ROOT, Host, Lab, ping, psk_conf, tcpencap_conf

NAME = "c1-gw"
UNIT = Path("/etc/systemd/system/tcpencap.service")
CONF = Path("/etc/strongswan.d/tcpencap.conf")
VENV_BIN = Path("/opt/tcpencap/.venv/bin")


def sh(*argv: str, check: bool = True) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {res.returncode}\n{res.stdout}{res.stderr}")
    return res.stdout + res.stderr


def prop(unit: str, name: str) -> str:
    return sh("systemctl", "show", "-p", name, "--value", unit).strip()


def gateway_conf(listen: list[str]) -> str:
    return "tcpencap {\n  gateway {\n    listen = " + ", ".join(listen) + "\n  }\n}\n"


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
        # The gateway, as the README's deployment section says.
        Path("/etc/swanctl/conf.d/lab.conf").write_text(psk_conf(gw, c1))
        CONF.write_text(gateway_conf([f"{gw.outer4}:4500"]))
        unit = (REPO_ROOT / "configs/tcpencap.service").read_text()
        assert f"ExecStart={VENV_BIN}/tcpencap run" in unit  # where the image installed it
        UNIT.write_text(unit)
        sh("systemctl", "daemon-reload")
        # The client: charon and tcpencap in its namespace, as in every lab test.
        c1.start_charon()
        c1.charon.load(psk_conf(c1, gw))
        c1.start_tcpencap(tcpencap_conf(c1, connections={NAME: 4500}), log_level="info")
        try:
            yield {"lab": lab, "c1": c1, "gw": gw}
        finally:
            sh("systemctl", "stop", "tcpencap", "strongswan", check=False)
            # The moved veth goes with fw's namespace; the inner addresses stay on lo.
            sh("ip", "addr", "del", f"{gw.inner4}/32", "dev", "lo", check=False)
            sh("ip", "-6", "addr", "del", f"{gw.inner6}/128", "dev", "lo", check=False)


def timed(what: str, fn: Callable[[], Any]) -> Any:
    t0 = time.monotonic()
    out = fn()
    print(f"{what}: {time.monotonic() - t0:.1f} s")
    return out


def test_1_systemctl_start_and_traffic_over_tcp(lab: dict[str, Any]) -> None:
    c1, gw = lab["c1"], lab["gw"]
    timed(
        "systemctl start strongswan tcpencap",
        lambda: sh("systemctl", "start", "strongswan", "tcpencap"),
    )
    wait_for(
        "tcpencap running",
        lambda: "tcpencap running" in sh("journalctl", "-u", "tcpencap", "--no-pager"),
    )
    assert prop("tcpencap.service", "ActiveState") == "active"
    print(sh("systemctl", "status", "--no-pager", "tcpencap", check=False))
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


def test_2_journal_shows_tcpencap(lab: dict[str, Any]) -> None:
    log = sh("journalctl", "-u", "tcpencap", "--no-pager", "-o", "cat")
    print(log[-2000:])
    assert "tcpencap running" in log
    # pip install in the guest built the extension: the unit runs the native data path
    assert "native data path)" in log and "native data path unavailable" not in log
    assert "listening on 198.19.0.2:4500" in log
    # `systemctl help tcpencap` opens what Documentation= names: pip installed it there
    docs = prop("tcpencap.service", "Documentation").split()
    assert docs and all(Path(d.removeprefix("file://")).is_file() for d in docs), docs


def test_3_reload_applies_a_change(lab: dict[str, Any]) -> None:
    c1, gw = lab["c1"], lab["gw"]
    pid = prop("tcpencap.service", "MainPID")
    CONF.write_text(gateway_conf([f"{gw.outer4}:4500", f"{gw.outer4}:443"]))
    timed("systemctl reload tcpencap", lambda: sh("systemctl", "reload", "tcpencap"))
    wait_for("a listener on 443", lambda: sh("ss", "-Hltn", "sport = :443").strip())
    assert prop("tcpencap.service", "MainPID") == pid, "reload restarted the daemon"
    wait_for("pings both ways after the reload", lambda: pings_both_ways(c1, gw))
    print(sh("ss", "-Hltn", "sport = :443"))


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


def test_5_stopping_strongswan_stops_tcpencap_and_leaves_no_rules(lab: dict[str, Any]) -> None:
    assert tcpencap_leftovers(), "tcpencap's rules should exist while it runs"
    timed("systemctl stop strongswan", lambda: sh("systemctl", "stop", "strongswan"))
    wait_for(
        "tcpencap stopped",
        lambda: prop("tcpencap.service", "ActiveState") in ("inactive", "failed"),
    )
    assert prop("tcpencap.service", "ActiveState") == "inactive", prop("tcpencap.service", "Result")
    assert tcpencap_leftovers() == []
