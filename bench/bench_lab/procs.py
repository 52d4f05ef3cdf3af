"""Machine and process facts: what the machine is, and the CPU seconds and memory of the
processes a phase watches (charon, tcpencap, relays, everything else)."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.labkit import Host, Lab

CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_info(host: Host | None) -> dict[str, Any]:
    """What the figures were measured on; they mean little without it."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    swan = "?"
    if host is not None and host.charon is not None:
        with contextlib.suppress(Exception):
            sess = host.charon.session(timeout=5)
            ver = sess.version()
            swan = f"strongSwan {ver['version'].decode()}"
            sess.transport.socket.close()
    iperf = subprocess.run(["iperf3", "--version"], capture_output=True, text=True, check=False)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "strongswan": swan,
        "python": sys.version.split()[0],
        "iperf3": iperf.stdout.splitlines()[0] if iperf.stdout else "?",
        "hostname": platform.node(),
        "loadavg_at_start": os.getloadavg(),
    }


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on, as strings; the command may hold spaces."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (field 4 of stat(5))."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(_stat_fields(int(entry.name))[1]) == int(pid):
                    out.append(int(entry.name))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) and of its children, live or reaped,
    in seconds: utime+stime+cutime+cstime (fields 14 to 17 of stat(5)) plus the same for
    every live descendant. A relay that forks per connection (socat) is charged for its
    children, and so would be a daemon that hands its data path to a helper process."""
    fields = _stat_fields(pid)
    total = sum(int(f) for f in fields[11:15]) / CLK_TCK
    for child in _children(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(child)
    return total


def wait_children_gone(pid: int, timeout: float = 5.0) -> None:
    """Until ``pid`` has no live child (socat's per-connection children exit, and are
    reaped, once iperf3 closes its connections), so their time is in its cutime."""
    deadline = time.monotonic() + timeout
    while _children(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB."""
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else -1


def watched_pids(lab: Lab, tcp: bool) -> dict[str, int]:
    """The processes whose CPU time is charged to the IPsec tunnel. ``ip netns exec`` execs
    its command and charon's ``sh -c 'mount ... && exec charon'`` does too, so the spawned
    process ids are the daemons' own."""
    c1, gw = lab.clients[0], lab.gw
    assert c1.charon and gw.charon
    pids = {"charon_c1": c1.charon.process.pid, "charon_gw": gw.charon.process.pid}
    if tcp:
        assert c1.tcpencap and gw.tcpencap
        pids |= {"tcpencap_c1": c1.tcpencap.pid, "tcpencap_gw": gw.tcpencap.pid}
    return pids


def cpu_account() -> dict[str, float]:
    """Machine-wide CPU seconds so far, split so that what other jobs used can be told
    apart: ``busy`` (user + nice + system of /proc/stat; irq and softirq time, mostly the
    lab's own packets, left out), ``ours`` (this process and every descendant, live or
    reaped: the whole lab), ``kthreads`` (kernel threads, e.g. ksoftirqd carrying the
    lab's packets) and ``steal`` (time the hypervisor gave to other VMs)."""
    cols = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    kthreads = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if not (entry / "cmdline").read_bytes():  # kernel thread (or a zombie)
                    kthreads += sum(int(f) for f in _stat_fields(int(entry.name))[11:13])
    return {
        "busy": sum(cols[0:3]) / CLK_TCK,
        "steal": (cols[7] if len(cols) > 7 else 0) / CLK_TCK,
        "kthreads": kthreads / CLK_TCK,
        "ours": cpu_seconds(os.getpid()),
    }


def others_per_second(before: dict[str, float], after: dict[str, float], wall: float) -> float:
    """CPU seconds per second that processes outside this benchmark used in between."""
    d = {k: after[k] - before[k] for k in before}
    return max(0.0, d["busy"] - d["ours"] - d["kthreads"]) / wall if wall > 0 else 0.0
