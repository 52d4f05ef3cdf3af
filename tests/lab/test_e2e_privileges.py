"""The daemon keeps only the capabilities it needs, and still does its job with them."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from tests.labkit import REPO_ROOT, Lab, psk_conf, tcpencap_conf, unanswered

pytestmark = pytest.mark.lab

KEPT = (1 << 10) | (1 << 12) | (1 << 13)  # NET_BIND_SERVICE, NET_ADMIN, NET_RAW


def _proc_status(pid: int, tid: str | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    with open(path) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_capabilities_dropped_and_tunnel_still_works() -> None:
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        lab.block_udp(c1)
        for h in (gw, c1):
            h.start_charon()
        gw.charon.load(psk_conf(gw, c1))
        c1.charon.load(psk_conf(c1, gw))
        procs = {
            "gw": gw.start_tcpencap(tcpencap_conf(gw, listen=[f"{gw.outer4}:4500"])),
            "c1": c1.start_tcpencap(tcpencap_conf(c1, connections={"c1-gw": 4500})),
        }
        # Capabilities are per thread: every thread (the VICI listener, executors) counts.
        for host, proc in procs.items():
            threads = sorted(os.listdir(f"/proc/{proc.pid}/task"))
            assert len(threads) >= 2, (host, threads)  # at least the main and VICI threads
            for tid in threads:
                st = _proc_status(proc.pid, tid)
                who = (host, tid, st["Name"])
                assert int(st["CapEff"], 16) == KEPT, (who, st["CapEff"])
                assert int(st["CapPrm"], 16) == KEPT, (who, st["CapPrm"])
                assert int(st["CapBnd"], 16) == KEPT, (who, st["CapBnd"])
                assert int(st["CapInh"], 16) == 0, (who, st["CapInh"])
                assert st["NoNewPrivs"].strip() == "1", who
        # The gateway adds its steering rule (iptables, run after the drop) when c1 arrives.
        c1.charon.initiate("c1-gw")
        assert gw.tcpencap_status()["steered_peers"] == [c1.outer4]
        assert not unanswered(c1, gw.inner4, c1.inner4)
        assert not unanswered(gw, c1.inner4, gw.inner4)
        # The control socket is root-only.
        mode = os.stat(gw.dir / "tcpencap.ctl").st_mode
        assert stat.S_IMODE(mode) & 0o077 == 0, oct(mode)
        # SIGTERM leaves the rules (fail-closed); `tcpencap remove-rules` takes them away.
        for host, proc in procs.items():
            assert proc.stop() == 0, host
        for host in (gw, c1):
            assert "TCPENCAP" in host.run("iptables", "-t", "mangle", "-S").stdout, host.role
            conf = str(host.dir / "tcpencap.conf")
            host.run("env", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-m", "tcpencap",
                     "remove-rules", "--config", conf)  # fmt: skip
            for tool in ("iptables", "ip6tables"):
                rules = host.run(tool, "-t", "mangle", "-S").stdout
                assert "TCPENCAP" not in rules, (host.role, tool, rules)
            sets = host.run("ipset", "list", "-n").stdout
            assert "TCPENCAP" not in sets, (host.role, sets)
