"""Where tcpencap's CPU goes on the RFC 9329 path (not a test): user against kernel time,
and the kernel time by the system call that spends it.

Usage: ``python3 -m bench.profile_datapath [--datapath native|python] [--seconds 8]``. Root
only. Builds the bench lab (c1 - fw - gw, UDP of c1 dropped in fw), runs one iperf3 stream
c1 -> gw while ``perf record -e cpu-clock -g`` samples each tcpencap process, and prints per
side: CPU s/GB (user, system) from /proc, the share of samples in each binary (kernel,
libpython, the extension, libc) and the kernel's share by entry point: each system call's
samples with everything it called, and the scheduler's context switches. The machine has
no hardware counters (``perf stat -e cycles`` says "not supported"), so these are time
samples, which count what the kernel does on behalf of the process too (veth delivery to
the next namespace runs in the sender's context).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.labkit import Lab, psk_conf, tcpencap_conf

CLK_TCK = os.sysconf("SC_CLK_TCK")
ENTRIES = (
    "__x64_sys_recvmmsg",
    "__x64_sys_sendmmsg",
    "__x64_sys_sendto",
    "__x64_sys_sendmsg",
    "__x64_sys_recvfrom",
    "__x64_sys_write",
    "__x64_sys_epoll_wait",
    "finish_task_switch.isra.0",
    "irqentry_exit_to_user_mode",
)


def user_sys(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def report(data: str, *args: str) -> str:
    return subprocess.run(
        ["perf", "report", "-i", data, "--stdio", "-g", "none", *args],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def shares(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(?:[\d.]+%\s+)?(?:\[[.k]\]\s+)?(\S+)", line)
        if m and not line.lstrip().startswith("#"):
            out.setdefault(m.group(2), float(m.group(1)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datapath", default="native", choices=["native", "python"])
    ap.add_argument("--seconds", type=float, default=8)
    args = ap.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("perf is needed (Debian's linux-perf)")
    setting = f"  datapath = {args.datapath}"
    tmp = Path(tempfile.mkdtemp(prefix="tcpencap-profile-"))
    result: dict[str, object] = {"datapath": args.datapath}
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        for h in (c1, gw):
            h.start_charon()
        gw.charon.load(psk_conf(gw, c1))
        c1.charon.load(psk_conf(c1, gw))
        lab.block_udp(c1)
        gw.start_tcpencap(
            tcpencap_conf(gw, listen=[f"{gw.outer4}:4500"], extra=setting), log_level="info"
        )
        c1.start_tcpencap(
            tcpencap_conf(c1, connections={"c1-gw": 4500}, extra=setting), log_level="info"
        )
        c1.charon.initiate("c1-gw")
        gw.spawn(["iperf3", "-s", "-B", gw.inner4, "-1"], "iperf-s.log")
        time.sleep(0.3)
        hosts = {"c1": c1, "gw": gw}
        assert c1.tcpencap and gw.tcpencap
        pids = {"c1": c1.tcpencap.pid, "gw": gw.tcpencap.pid}
        before = {k: user_sys(p) for k, p in pids.items()}
        perfs = {
            k: subprocess.Popen(
                [
                    "perf",
                    "record",
                    "-e",
                    "cpu-clock",
                    "-F",
                    "2000",
                    "-g",
                    "-o",
                    str(tmp / f"{k}.data"),
                    "-p",
                    str(p),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for k, p in pids.items()
        }
        res = c1.run(
            "iperf3", "-c", gw.inner4, "-B", c1.inner4, "-t", str(args.seconds), "-J",
            timeout=args.seconds + 60,
        )  # fmt: skip
        for p in perfs.values():
            p.send_signal(signal.SIGINT)
            p.wait(60)
        end = json.loads(res.stdout)["end"]["sum_received"]
        gb = end["bytes"] / 1e9
        result["gbit_s"] = round(end["bits_per_second"] / 1e9, 3)
        for k, pid in pids.items():
            u0, s0 = before[k]
            u1, s1 = user_sys(pid)
            st = hosts[k].tcpencap_status()
            result[k] = {
                "user_s_per_gb": round((u1 - u0) / gb, 2),
                "sys_s_per_gb": round((s1 - s0) / gb, 2),
                "queue": st["queue"],
                "flows": st.get("flows"),
            }
        pass
    for k in ("c1", "gw"):
        data = str(tmp / f"{k}.data")
        dsos = shares(report(data, "--no-children", "--sort", "dso"))
        children = shares(report(data, "--children", "--sort", "sym"))
        side = result[k]
        assert isinstance(side, dict)
        side["samples_by_binary_pct"] = {d: v for d, v in dsos.items() if v >= 0.5}
        side["kernel_entry_pct_with_callees"] = {e: children.get(e, 0.0) for e in ENTRIES}
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
