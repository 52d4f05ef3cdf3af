"""Measurements of one tunnel: iperf3 throughput and CPU per GB, a UDP flood, ping RTT,
and IKE_SA + CHILD_SA set-up time."""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import subprocess
import time
from typing import Any

from bench.bench_lab.common import CONN, IPERF_PORT, progress
from bench.bench_lab.procs import cpu_seconds, wait_children_gone
from tests.labkit import CharonError, Host, Lab, Process

IPERF_LOG = "iperf3-server.log"
_iperf_servers: dict[str, Process] = {}  # gw namespace -> the iperf3 server we started


def start_iperf_server(gw: Host) -> Process:
    """iperf3 -s on gw's inner address (also where the socat relay and OpenVPN lead)."""
    argv = ["iperf3", "-s", "--forceflush", "-B", gw.inner4 or "", "-p", str(IPERF_PORT)]
    proc = gw.spawn(argv, IPERF_LOG)
    _iperf_servers[gw.name] = proc
    proc.wait_for_log("Server listening", timeout=5)
    return proc


def iperf_server_ready(gw: Host, timeout: float = 10) -> bool:
    """Wait until the server has finished its last test (iperf3 serves one at a time and
    answers a client that comes too early with a reset); a server still stuck after
    ``timeout`` (a test whose control connection was starved by a flood) is restarted.
    Returns False if it had to be restarted."""
    log = gw.dir / IPERF_LOG
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if text.rfind("Server listening") > text.rfind("Accepted connection"):
            return True
        time.sleep(0.05)
    progress(f"  iperf3 server busy for {timeout}s: restarting it")
    _iperf_servers[gw.name].stop()
    start_iperf_server(gw)
    return False


def iperf(
    c1: Host,
    dst: str,
    extra: list[str],
    seconds: float,
    port: int = IPERF_PORT,
    grace: float = 30,
) -> dict[str, Any]:
    """Run an iperf3 client in c1 from c1's inner address against ``dst`` (gw's inner
    address, or a relay); the parsed JSON or an error. ``grace``: seconds allowed past
    ``seconds`` for the end-of-test exchange."""
    argv = ["iperf3", "-c", dst, "-p", str(port), "-B", c1.inner4 or "", "-J", *extra]
    argv += ["-t", str(seconds)]
    try:
        proc = c1.run(*argv, check=False, timeout=seconds + grace)
    except subprocess.TimeoutExpired:
        return {"error": f"iperf3 timed out after {seconds + grace}s"}
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": f"iperf3 rc {proc.returncode}: {proc.stdout[-300:]}{proc.stderr[-300:]}"}
    if "error" in out:
        return {"error": f"iperf3: {out['error']}"}
    return out


def throughput(
    lab: Lab,
    pids: dict[str, int],
    streams: int,
    seconds: float,
    dst: str | None = None,
    port: int = IPERF_PORT,
    forking: bool = False,
) -> dict[str, Any]:
    """iperf3 TCP with ``streams`` streams; CPU seconds of ``pids`` over the run, per GB
    received. ``forking``: the watched processes fork per connection; wait for those
    children to be gone (and reaped into the parent's time) before the last sample."""
    c1, gw = lab.clients[0], lab.gw
    server_ok = iperf_server_ready(gw)
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    out = iperf(c1, dst or gw.inner4 or "", ["-P", str(streams)], seconds, port)
    if forking:
        for p in pids.values():
            wait_children_gone(p)
    after = {k: cpu_seconds(p) for k, p in pids.items()}
    if "error" in out:
        return {"streams": streams, "error": out["error"], "server_was_ready": server_ok}
    recv = out["end"]["sum_received"]
    gbytes = recv["bytes"] / 1e9
    cpu = {k: round(after[k] - before[k], 3) for k in pids}
    return {
        "streams": streams,
        "bits_per_second": recv["bits_per_second"],
        "bytes": recv["bytes"],
        "retransmits": out["end"].get("sum_sent", {}).get("retransmits"),
        "cpu_seconds": cpu,
        "cpu_seconds_per_gb": {k: (v / gbytes if gbytes else None) for k, v in cpu.items()},
    }


def udp_flood(lab: Lab, seconds: float, rate: str, size: int) -> dict[str, Any]:
    c1, gw = lab.clients[0], lab.gw
    iperf_server_ready(gw)
    # The end-of-test exchange runs over the iperf3 control connection, through the same
    # tunnel, behind whatever the flood left queued: over cTCP that took 20-30 s to drain
    # after a 5 s flood (the receiver span below), so give it a minute.
    out = iperf(c1, gw.inner4 or "", ["-u", "-b", rate, "-l", str(size)], seconds, grace=60)
    if "error" in out:
        return {"error": out["error"]}
    end = out["end"]
    snt, rcv = end.get("sum_sent") or end["sum"], end.get("sum_received") or end["sum"]
    sent, lost = snt["packets"], rcv["lost_packets"]
    received = rcv["packets"] - lost
    # Rate over the sending time: the receiver's own span can stretch far past it when the
    # iperf3 control connection (through the same tunnel) is stuck behind the flood.
    send_secs = snt["seconds"] or seconds
    return {
        "rate": rate,
        "datagram": size,
        "send_seconds": send_secs,
        "receiver_seconds": rcv["seconds"],
        "sent": sent,
        "received": received,
        "sent_pps": sent / send_secs,
        "received_pps": received / send_secs,
        "received_pps_receiver_span": received / rcv["seconds"] if rcv["seconds"] else None,
        "loss_percent": rcv["lost_percent"],
    }


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ping_rtt(lab: Lab, count: int, interval: float) -> dict[str, Any]:
    c1, gw = lab.clients[0], lab.gw
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", "-I", c1.inner4]
    budget = count * interval + 10
    proc = c1.run(*argv, gw.inner4 or "", check=False, timeout=budget + 5)
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", proc.stdout)]
    if not rtts:
        return {"error": f"no replies: {proc.stdout[-300:]}{proc.stderr[-300:]}"}
    return {
        "sent": count,
        "received": len(rtts),
        "median_ms": statistics.median(rtts),
        "p99_ms": percentile(rtts, 99),
        "min_ms": min(rtts),
        "max_ms": max(rtts),
    }


def setup_time(lab: Lab, cycles: int) -> dict[str, Any]:
    """Terminate and initiate the main tunnel ``cycles`` times; initiate returns once the
    IKE_SA and its CHILD_SA are established."""
    c1 = lab.clients[0]
    assert c1.charon
    times, errors = [], []
    for _ in range(cycles):
        with contextlib.suppress(CharonError):
            c1.charon.terminate(CONN, timeout=10)
        time.sleep(0.05)  # let both sides forget the old SA
        t = time.monotonic()
        try:
            c1.charon.initiate(CONN, timeout=15)
        except CharonError as exc:
            errors.append(str(exc).splitlines()[0])
            continue
        times.append(time.monotonic() - t)
    if not any(CONN in sa for sa in c1.charon.list_sas()):
        c1.charon.initiate(CONN, timeout=15)  # leave the tunnel up for what follows
    res: dict[str, Any] = {"cycles": cycles, "ok": len(times), "errors": errors[:3]}
    if times:
        res |= {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
        }
    return res
