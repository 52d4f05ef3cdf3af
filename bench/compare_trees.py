"""Compare two checkouts of tcpencap in the same lab conditions (not a test).

Usage: ``python3 bench/compare_trees.py TREE [tcp|udp]``: brings up the lab from TREE's own
code, measures the inner ping RTT median (200 pings, 10 ms) and one iperf3 stream (8 s), and
tcpencap's CPU seconds per GB on both sides; prints one JSON line. Run it alternately for an
old and a new tree (``git worktree add /tmp/old REV``) to get before/after figures. TREE's
lab is ``tests.labkit`` (today), ``tests.lab`` (before the tests were laid out by layer) or
``tcpencap.lab`` (before the lab moved to the test side). The one bench script run as a
file, not as ``-m bench.compare_trees``: it must import nothing from this checkout, or this
checkout's ``tests`` package would hide an older TREE's.
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def import_lab(tree: str) -> ModuleType:
    """TREE's own lab harness, wherever that tree keeps it (newest place first). It must come
    from TREE, not from another checkout or an installed copy."""
    root = Path(tree).resolve()
    places = ("tests.labkit", "tests.lab", "tcpencap.lab")
    name = next(n for n in places if (root / n.replace(".", "/") / "__init__.py").is_file())
    sys.path.insert(0, str(root))
    lab = importlib.import_module(name)
    if root not in Path(lab.__file__).resolve().parents:
        raise SystemExit(f"{name} came from {lab.__file__}, not from {root}")
    return lab


def main() -> None:
    tree, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "tcp")
    lab_module = import_lab(tree)
    Lab, psk_conf, tcpencap_conf = lab_module.Lab, lab_module.psk_conf, lab_module.tcpencap_conf

    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        for h in (c1, gw):
            h.start_charon()
        gw.charon.load(psk_conf(gw, c1))
        c1.charon.load(psk_conf(c1, gw))
        if mode == "tcp":
            lab.block_udp(c1)
            gw.start_tcpencap(tcpencap_conf(gw, listen=[f"{gw.outer4}:4500"]), log_level="info")
            c1.start_tcpencap(tcpencap_conf(c1, connections={"c1-gw": 4500}), log_level="info")
        c1.charon.initiate("c1-gw")
        out = c1.run("ping", "-n", "-c", "200", "-i", "0.01", "-I", c1.inner4, gw.inner4).stdout
        rtts = [float(x.split("time=")[1].split()[0]) for x in out.splitlines() if "time=" in x]
        gw.spawn(["iperf3", "-s", "-B", gw.inner4, "-1"], "iperf-s.log")
        time.sleep(0.3)
        pids = [h.tcpencap.pid for h in (c1, gw)] if mode == "tcp" else []
        before = [cpu_seconds(p) for p in pids]
        res = c1.run("iperf3", "-c", gw.inner4, "-B", c1.inner4, "-t", "8", "-J", timeout=60)
        end = json.loads(res.stdout)["end"]["sum_received"]
        gb = end["bytes"] / 1e9
        cpu = [round((cpu_seconds(p) - b) / gb, 1) for p, b in zip(pids, before, strict=True)]
        print(
            json.dumps(
                {
                    "tree": tree,
                    "mode": mode,
                    "gbit_s": round(end["bits_per_second"] / 1e9, 3),
                    "rtt_median_ms": statistics.median(rtts),
                    "tcpencap_cpu_s_per_gb_c1_gw": cpu,
                }
            )
        )


if __name__ == "__main__":
    main()
