"""End-to-end lab benchmark: the same libipsec tunnel over plain UDP, over RFC 9329 TCP and
over Cisco cTCP, beside OpenVPN over TCP and a socat relay, all in one lab and one run.

Not a test: it prints figures next to a baseline measured in the same run and never asserts
on timings. Run as root from the checkout's root::

    python3 -m bench.bench_lab [--duration 10] [--scale 100,500,1000] [--json PATH] [--keep]
        [--datapath native,python] [--phases udp,tcp,tls,ctcp,openvpn,socat,floor]

One lab (c1 - fw - gw, see tests/labkit/) is built. Phase "udp": charon to charon over UDP,
nothing blocked, no tcpencap: the baseline. From then on fw drops all UDP of c1. Phases
"tcp" (RFC 9329), "tls" (RFC 9329 over TLS 1.3 on 443, Appendix A) and "ctcp" (Cisco
cTCP): tcpencap runs on both ends, once per
``--datapath`` (written as ``datapath = X`` into both tcpencap.conf; "" writes no key).
Each of these measures inner TCP throughput (iperf3, 1 and 4 streams), inner ping RTT, an
inner UDP flood (packets/s and loss), CPU seconds per GB of charon and tcpencap, IKE_SA +
CHILD_SA set-up time; udp and tcp also N concurrent childless IKE SAs from c1 (set-up rate,
tcpencap memory per connection). Phase "openvpn" (bench/openvpn_lab.py): OpenVPN 2.6 over
TCP between the same hosts, with defaults and with --tcp-nodelay: throughput, ping, CPU per
GB of both openvpn processes. Phase "socat": the same iperf3 traffic through a pair of socat
TCP relays (c1 and gw), the C floor for a user-space relay's CPU per GB. Phase "floor":
bench/hop_floor.py's round-trip floor of user-space relays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.hop_floor import measure_floor
from bench.openvpn_lab import OpenVpnPair
from tests.labkit import (
    CharonError,
    Host,
    Lab,
    LabError,
    Process,
    ike_id,
    psk_conf,
    tcpencap_conf,
    vici_to_str,
)
from tests.tls_helpers import make_server_cert

PSK = "bench-shared-secret-0123456789"
SCALE_ID = "scale.lab.test"  # identity of every scale connection (own peer config on gw)
# Every address the benchmark puts on the wire must stay inside the lab's range.
LAB_NET = ipaddress.ip_network("198.18.0.0/15")
CONN = "c1-gw"
IPERF_PORT = 5201  # iperf3's default; the server listens on gw.inner4
RFC9329_PORT = 4500
TLS_PORT = 443
TLS_SNI = "vpn.lab.test"
CTCP_PORT = 10000
RELAY_PORT = 5301  # the socat relays' listening port, on c1.inner4 and gw.outer4
DATAPATHS = ("auto", "native", "python")  # tcpencap.datapath
PHASES = ("udp", "tcp", "tls", "ctcp", "openvpn", "socat", "floor")
BUSY = 0.1  # CPU s per second used by other processes: the phase ran on a busy machine
T0 = time.monotonic()
CLK_TCK = os.sysconf("SC_CLK_TCK")


def progress(msg: str) -> None:
    """One progress line with the elapsed time, so a slow step is visible as it happens."""
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


# --- machine and process facts ----------------------------------------------------------


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


# --- configuration ------------------------------------------------------------------------


def scale_names(n: int) -> list[str]:
    return [f"scale{i:04d}" for i in range(1, n + 1)]


def check_lab_addrs(*hosts: Host) -> None:
    """The scale SAs run between the hosts' outer IPv4 addresses; refuse to send anything
    if the lab ever hands out an address outside 198.18.0.0/15."""
    for h in hosts:
        for addr in (h.outer4, h.inner4):
            if addr is not None and ipaddress.ip_address(addr) not in LAB_NET:
                raise RuntimeError(f"{h.role} address {addr} is outside {LAB_NET}")


def client_scale_conf(c1: Host, gw: Host, n: int) -> str:
    """N connections on c1: same peers, each its own peer config (so its own IKE SA), no
    children; identity SCALE_ID so gw picks its ``scale`` config.

    Childless (RFC 6023, strongSwan >= 5.9.6 with ``childless = allow`` by default on both
    ends): initiated with ``{"ike": name}`` they create no CHILD_SA, so no SPD entries and no
    kernel-libipsec routes - N CHILD_SAs to the same remote TS fail to install routes in
    this lab ("unable to install IPsec policies (SPD) in kernel"), which is charon's limit,
    not tcpencap's. An IKE SA still costs tcpencap one TCP connection."""
    parts = ["connections {"]
    for name in scale_names(n):
        parts.append(
            f"""  {name} {{
    version = 2
    local_addrs = {c1.outer4}
    remote_addrs = {gw.outer4}
    encap = yes
    mobike = no
    unique = never
    local {{
      auth = psk
      id = {SCALE_ID}
    }}
    remote {{
      auth = psk
      id = {ike_id(gw)}
    }}
  }}"""
        )
    parts.append("}")
    parts.append(scale_secret(gw))
    return "\n".join(parts) + "\n"


def gw_scale_conf(c1: Host, gw: Host) -> str:
    """One responder config for all scale connections: ``unique = never`` keeps every IKE SA
    with the same identities; no children, the initiators ask for none."""
    return f"""connections {{
  scale {{
    version = 2
    local_addrs = {gw.outer4}
    remote_addrs = {c1.outer4}
    encap = yes
    mobike = no
    unique = never
    local {{
      auth = psk
      id = {ike_id(gw)}
    }}
    remote {{
      auth = psk
      id = {SCALE_ID}
    }}
  }}
}}
{scale_secret(gw)}"""


def scale_secret(gw: Host) -> str:
    return f"""secrets {{
  ike-scale {{
    id-a = {SCALE_ID}
    id-b = {ike_id(gw)}
    secret = "{PSK}"
  }}
}}
"""


# Charon's DoS protection counts half-open IKE_SAs per peer IP (block_threshold 5,
# cookie_threshold_ip 3 by default); all scale SAs come from one IP, so lift the limits to
# measure tcpencap rather than charon's cookie/blocking logic.
GW_CHARON_SETTINGS = """  cookie_threshold = 1000000
  cookie_threshold_ip = 1000000
  block_threshold = 1000000
"""
# charon's checkout_by_config reuses an established IKE_SA of an equal peer config (the scale
# configs differ only in name): make every initiate create its own IKE_SA.
C1_CHARON_SETTINGS = "  reuse_ikesa = no\n"
# The lab logs net at level 2: one flushed log line per ESP packet charon sends or receives,
# which costs more CPU than the tunnel itself. Lowered in both phases (sections merge).
QUIET_NET_LOG = """  filelog {
    lab {
      net = 1
    }
  }
"""


# --- measurements -------------------------------------------------------------------------


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


@contextlib.contextmanager
def up_counter(host: Host, event: str, prefix: str) -> Iterator[Callable[[], tuple[int, float]]]:
    """Count ``event`` (ike-updown/child-updown) 'up' events of IKE SAs named ``prefix``*;
    yields a function that returns (count, monotonic time of the latest)."""
    assert host.charon
    state = {"n": 0, "last": time.monotonic()}
    stop = threading.Event()
    ready = threading.Event()
    sess = host.charon.session()

    def run() -> None:
        try:
            gen = sess.listen([event], timeout=0.2)
            ready.set()
            for name, msg in gen:
                if stop.is_set():
                    break
                if name is None:
                    continue
                msg = vici_to_str(msg)  # keys and values as str, whatever vici returned
                if msg.get("up") != "yes":
                    continue
                if any(k.startswith(prefix) for k in msg if k != "up"):
                    state["n"] += 1
                    state["last"] = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - reported through the counter's silence
            progress(f"event listener stopped: {exc}")
        finally:
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.2)  # the listen registration is sent before the first yield
    try:
        yield lambda: (state["n"], state["last"])
    finally:
        stop.set()
        thread.join(2)
        with contextlib.suppress(OSError):
            sess.transport.socket.close()


def count_scale_sas(host: Host) -> int:
    """IKE SAs named scale* in state ESTABLISHED (they have no CHILD_SA by design)."""
    assert host.charon
    return sum(
        1
        for entry in host.charon.list_sas()
        for name, sa in entry.items()
        if name.startswith("scale") and sa.get("state") == "ESTABLISHED"
    )


async def _read_status(path: str, timeout: float) -> bytes:
    """The control socket's reply read to EOF (the daemon closes after one reply): unlike a
    StreamReader.readline() with the default 64 KiB limit, any size fits."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    try:
        writer.write(b"status\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def gw_status(gw: Host) -> dict[str, Any]:
    """Connection count from ``tcpencap status --json``; if the CLI fails, its exact error
    and the count read from the control socket directly (a filesystem socket, reachable
    from outside the namespace), with the reply's size. The CLI fails once the one-line JSON
    reply passes 64 KiB (asyncio's default StreamReader limit in query_status's readline):
    about 270 bytes per connection, so from roughly 240 connections on."""
    res: dict[str, Any] = {}
    try:
        res["gw_tcp_connections"] = len(gw.tcpencap_status()["connections"])
        return res
    except Exception as exc:  # noqa: BLE001 - a figure missing, not a failed run
        # lab's LabError carries the command's stderr at its end: keep the end
        res["gw_status_error"] = f"{type(exc).__name__}: {str(exc)[-300:]}"
    try:
        raw = asyncio.run(_read_status(str(gw.dir / "tcpencap.ctl"), 10))
        res["gw_status_reply_bytes"] = len(raw)
        res["gw_tcp_connections"] = len(json.loads(raw)["connections"])
    except Exception as exc:  # noqa: BLE001
        res["gw_status_direct_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return res


def vici_fire(host: Host, cmd: str, names: list[str], key: str) -> list[str]:
    """Send ``cmd`` (initiate/terminate) for each name without waiting (timeout -1)."""
    assert host.charon
    errors = []
    sess = host.charon.session(timeout=30)
    try:
        for name in names:
            try:
                for _ in getattr(sess, cmd)({key: name, "timeout": -1, "loglevel": -1}):
                    pass
            except Exception as exc:  # noqa: BLE001 - collected and reported
                errors.append(f"{name}: {exc}")
    finally:
        sess.transport.socket.close()
    return errors


def scale(lab: Lab, n: int, tcp: bool, budget: float) -> dict[str, Any]:
    """Initiate n childless scale IKE SAs at once from c1; rate and gateway tcpencap memory
    (RSS after - RSS before) / n."""
    c1, gw = lab.clients[0], lab.gw
    names = scale_names(n)
    res: dict[str, Any] = {"n": n}
    gpid = gw.tcpencap.pid if tcp and gw.tcpencap else None
    cpid = c1.tcpencap.pid if tcp and c1.tcpencap else None
    if gpid:
        res["gw_rss_before_kib"] = rss_kib(gpid)
    if cpid:
        res["c1_rss_before_kib"] = rss_kib(cpid)
    with up_counter(c1, "ike-updown", "scale") as counter:
        t = time.monotonic()
        errors = vici_fire(c1, "initiate", names, "ike")
        fired = time.monotonic() - t
        deadline = t + budget
        last_n, last_change = 0, time.monotonic()
        while time.monotonic() < deadline:
            got, _ = counter()
            if got >= n:
                break
            if got != last_n:
                last_n, last_change = got, time.monotonic()
                progress(f"  scale {n}: {got} up")
            elif time.monotonic() - last_change > 30:
                break  # no progress for 30 s: charon's retransmits have given up or stalled
            time.sleep(0.25)
        got, last = counter()
    elapsed = last - t if got else None
    res |= {
        "initiate_calls_s": round(fired, 3),
        "up_events": got,
        "seconds_to_last_up": elapsed,
        "sas_per_second": (got / elapsed) if elapsed else None,
        "initiate_errors": errors[:3],
    }
    time.sleep(1.0)  # let the daemons settle before sampling
    res["established_c1"] = count_scale_sas(c1)
    res["established_gw"] = count_scale_sas(gw)
    if gpid:
        res["gw_rss_after_kib"] = rss_kib(gpid)
        delta = res["gw_rss_after_kib"] - res["gw_rss_before_kib"]
        res["gw_kib_per_conn"] = delta / n
        res["gw_kib_per_established"] = delta / max(1, res["established_gw"])
        res |= gw_status(gw)
    if cpid:
        res["c1_rss_after_kib"] = rss_kib(cpid)
        res["c1_kib_per_conn"] = (res["c1_rss_after_kib"] - res["c1_rss_before_kib"]) / n
    return res


def scale_teardown(lab: Lab, n: int, budget: float = 60) -> int:
    """Terminate all scale IKE SAs; returns how many are left on c1 after ``budget``."""
    c1 = lab.clients[0]
    vici_fire(c1, "terminate", scale_names(n), "ike")
    deadline = time.monotonic() + budget
    left = count_scale_sas(c1)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = count_scale_sas(c1)
    return left


# --- phases -------------------------------------------------------------------------------


def step(results: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; a failure is recorded and the run goes on."""
    try:
        results[key] = fn()
    except Exception as exc:  # noqa: BLE001 - the benchmark reports, it does not stop
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        progress(f"  {key} FAILED: {str(exc)[:2000]}")
    return results[key]


def measure(
    lab: Lab,
    args: argparse.Namespace,
    label: str,
    r: dict[str, Any],
    pids: dict[str, int],
    what: set[str],
    dst: str | None = None,
    port: int = IPERF_PORT,
    forking: bool = False,
) -> None:
    """The figures of one phase into ``r``: always iperf3 TCP with 1 and 4 streams (CPU of
    ``pids`` over each); ``what`` adds "ping", "flood", "setup" and "scale"."""
    if "ping" in what:
        progress(f"[{label}] ping RTT: {args.pings} pings at {args.ping_interval}s")
        res = step(r, "ping", lambda: ping_rtt(lab, args.pings, args.ping_interval))
        if "median_ms" in res:
            progress(f"  median {res['median_ms']:.3f} ms, p99 {res['p99_ms']:.3f} ms")
    for streams in (1, 4):
        progress(f"[{label}] iperf3 TCP, {streams} stream(s), {args.duration}s")
        res = step(
            r,
            f"tcp_{streams}",
            lambda s=streams: throughput(lab, pids, s, args.duration, dst, port, forking),
        )
        if "bits_per_second" in res:
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in res["cpu_seconds_per_gb"].items() if v)
            progress(f"  {res['bits_per_second'] / 1e9:.3f} Gbit/s; CPU s/GB: {cpu}")
    if "flood" in what:
        progress(f"[{label}] UDP flood {args.flood_rate} x {args.flood_size} B, {args.flood_time}s")
        step(r, "flood", lambda: udp_flood(lab, args.flood_time, args.flood_rate, args.flood_size))
    if "setup" in what:
        progress(f"[{label}] IKE_SA+CHILD_SA set-up, {args.cycles} cycles")
        step(r, "setup", lambda: setup_time(lab, args.cycles))
    if "scale" in what:
        r["scale"] = scale_steps(lab, args, label, tcp=any(k.startswith("tcpencap") for k in pids))


def scale_steps(lab: Lab, args: argparse.Namespace, label: str, tcp: bool) -> list[dict[str, Any]]:
    """The scale test for each N of ``--scale``; stops early if a tcpencap died."""
    out: list[dict[str, Any]] = []
    for n in args.scale:
        progress(f"[{label}] scale: {n} IKE SAs from c1")
        res: dict[str, Any] = {"n": n}
        try:
            res = scale(lab, n, tcp, args.scale_budget)
            progress(
                f"  {res['established_gw']}/{n} IKE SAs established on gw "
                f"({res['established_c1']} on c1), {res['sas_per_second'] or 0:.1f} SAs/s, "
                f"gw tcpencap connections {res.get('gw_tcp_connections', '-')}, "
                f"{res.get('gw_kib_per_conn', 0):.1f} KiB/conn"
            )
            if "gw_status_error" in res:
                progress(f"  tcpencap status: {res['gw_status_error']}")
        except Exception as exc:  # noqa: BLE001
            res["error"] = f"{type(exc).__name__}: {exc}"
            progress(f"  scale {n} FAILED: {exc}")
        if tcp and res.get("established_gw", 0) < n:
            res["tcpencap_gw_log"] = log_tail(lab.gw.dir / "tcpencap.log")
            res["tcpencap_c1_log"] = log_tail(lab.clients[0].dir / "tcpencap.log")
            lab.keep = True
        try:
            res["left_after_teardown"] = scale_teardown(lab, n)
        except Exception as exc:  # noqa: BLE001
            res["teardown_error"] = str(exc)
        out.append(res)
        if tcp and died(lab, res):
            break
    return out


def died(lab: Lab, res: dict[str, Any]) -> bool:
    """Record (and say) a tcpencap that is no longer running; keep the lab's logs then."""
    dead = False
    for host in (lab.gw, lab.clients[0]):
        proc = host.tcpencap
        if proc is not None and not proc.alive():
            progress(f"  tcpencap_{host.role} DIED (rc {proc.popen.returncode})")
            res[f"tcpencap_{host.role}_died"] = proc.popen.returncode
            lab.keep = dead = True
    return dead


def log_tail(path: Path, lines: int = 40) -> list[str]:
    """The last lines of a log, warnings and errors first (they say why)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    bad = [ln for ln in text if re.search(r"\b(ERROR|WARNING|Traceback|Error)\b", ln)]
    return bad[-20:] + ["--- tail ---"] + text[-lines:]


def tcpencap_confs(c1: Host, gw: Host, kind: str, datapath: str, max_n: int) -> tuple[str, str]:
    """tcpencap.conf texts for gw and c1: RFC 9329 ("tcp", with the scale connections) or
    cTCP ("ctcp", as tests/lab/test_e2e_ctcp.py sets it up: ``ctcp_listen`` on gw,
    ``encapsulation = ctcp`` on c1's connection); ``datapath = X`` at the top level of
    both unless ``datapath`` is empty."""
    extra = f"  datapath = {datapath}" if datapath else ""
    if kind in ("tcp", "tls"):
        # One client charon opens all N connections from one address at once: lift the
        # per-source and pending limits (internet defaults: 32 and 256) for this bench.
        limit = max(1000, max_n + 100)
        gw_extra = (
            f"    max_connections = {limit}\n    max_per_source = {limit}\n"
            f"    max_pending = {limit}"
        )
        listen = [f"{gw.outer4}:{RFC9329_PORT}"]
        conn: int | dict[str, str] = RFC9329_PORT
        if kind == "tls":  # the same, over TLS 1.3 on 443 (RFC 9329 Appendix A)
            cert = make_server_cert(gw.lab.dir / "tls", dns=TLS_SNI, ips=(gw.outer4,))
            listen = []
            gw_extra += (
                f"\n    tls_listen = {gw.outer4}:{TLS_PORT}\n"
                f"    tls_cert = {cert.cert}\n    tls_key = {cert.key}"
            )
            conn = {"remote_port": str(TLS_PORT), "tls": "yes", "tls_ca": str(cert.ca),
                    "tls_sni": TLS_SNI}  # fmt: skip
        gw_conf = tcpencap_conf(gw, listen=listen, gateway_extra=gw_extra, extra=extra)
        conns = {CONN: conn} | dict.fromkeys(scale_names(max_n), conn)
        return gw_conf, tcpencap_conf(c1, connections=conns, extra=extra)
    gw_extra = f"    ctcp_listen = {gw.outer4}:{CTCP_PORT}"
    gw_conf = tcpencap_conf(gw, gateway_extra=gw_extra, extra=extra)
    c1_conf = tcpencap_conf(c1, connections={CONN: CTCP_PORT}, extra=extra)
    port_line = f"      remote_port = {CTCP_PORT}\n"
    if port_line not in c1_conf:
        raise LabError(f"unexpected tcpencap_conf layout:\n{c1_conf}")
    return gw_conf, c1_conf.replace(port_line, port_line + "      encapsulation = ctcp\n")


def start_tcpencap_pair(
    lab: Lab, args: argparse.Namespace, kind: str, datapath: str, max_n: int
) -> None:
    c1, gw = lab.clients[0], lab.gw
    gw_conf, c1_conf = tcpencap_confs(c1, gw, kind, datapath, max_n)
    gw.start_tcpencap(gw_conf, log_level=args.log_level)
    c1.start_tcpencap(c1_conf, log_level=args.log_level)
    if kind == "ctcp":
        for h in (gw, c1):
            if h.tcpencap_status().get("ctcp") is None:
                raise LabError(f"tcpencap in {h.role} did not start its cTCP service")


def stop_tcpencap_pair(lab: Lab) -> None:
    """Stop every tcpencap this lab started (by its Process, so by the PID we spawned),
    also one whose start failed half-way; TERM lets it remove its rules and sets."""
    for proc in lab.processes:
        if proc.alive() and proc.argv[1:3] == ["-m", "tcpencap"]:
            proc.stop()
    for host in (lab.gw, lab.clients[0]):
        host.tcpencap = None


def status_digest(host: Host) -> dict[str, Any]:
    """What ``tcpencap status`` says about the data path and what went through it."""
    try:
        s = host.tcpencap_status()
    except Exception as exc:  # noqa: BLE001 - a missing fact, not a failed phase
        return {"error": f"{type(exc).__name__}: {str(exc)[-300:]}"}
    out = {k: v for k, v in s.items() if "datapath" in k}
    out |= {k: s.get(k) for k in ("queue", "drops", "ctcp", "flows") if k in s}
    out["connections"] = len(s.get("connections") or [])
    # what the daemon said about its data path (a native path that cannot load falls back)
    log = host.tcpencap.log_text() if host.tcpencap else ""
    pat = re.compile("datapath|data path|native", re.I)
    out["datapath_log"] = [ln for ln in log.splitlines() if pat.search(ln)][:5]
    return out


PHASE_TITLES = {
    "udp": "UDP baseline: ESP-in-UDP charon to charon, nothing blocked, no tcpencap",
    "tcp": "RFC 9329 over TCP {port} through tcpencap",
    "tls": "RFC 9329 over TLS 1.3 on TCP {port} through tcpencap (TLS in Python's ssl)",
    "ctcp": "Cisco cTCP over TCP {port} through tcpencap",
    "openvpn": "OpenVPN 2.6 over TCP 1194, TLS, AES-256-GCM, p2p; {mode}",
    "socat": "no tunnel: iperf3 TCP through socat relays in c1 and gw (fork per connection)",
}


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


@contextlib.contextmanager
def phase(
    lab: Lab,
    results: dict[str, Any],
    label: str,
    kind: str,
    title: str,
    datapath: str | None = None,
) -> Iterator[dict[str, Any]]:
    """One phase's result dict; a failure inside is recorded and the run goes on. Records
    the phase's wall time and how much CPU other processes used meanwhile."""
    r: dict[str, Any] = {"kind": kind, "title": title}
    if datapath is not None:
        r["datapath"] = datapath or "(not set)"
    r["loadavg_at_start"] = list(os.getloadavg())
    results["phases"][label] = r
    progress(f"== phase {label}: {title} (load {r['loadavg_at_start'][0]:.2f}) ==")
    before, t0 = cpu_account(), time.monotonic()
    try:
        yield r
    except Exception as exc:  # noqa: BLE001 - the next phase still runs
        r["error"] = f"{type(exc).__name__}: {str(exc)[:3000]}"
        progress(f"  phase {label} FAILED: {str(exc)[:2000]}")
    finally:
        wall = time.monotonic() - t0
        after = cpu_account()
        others = others_per_second(before, after, wall)
        r["seconds"] = round(wall, 1)
        r["cpu_account_s"] = {k: round(after[k] - before[k], 2) for k in before}
        r["others_cpu_per_second"] = round(others, 3)
        r["steal_per_second"] = round((after["steal"] - before["steal"]) / wall, 3) if wall else 0
        if others > BUSY:
            progress(f"  machine busy: other processes used {others:.2f} CPU/s meanwhile")


def ipsec_phase(
    lab: Lab,
    args: argparse.Namespace,
    results: dict[str, Any],
    kind: str,
    datapath: str,
    max_n: int,
) -> None:
    """One phase of the strongSwan tunnel: "udp" (no tcpencap), "tcp" or "ctcp"."""
    c1 = lab.clients[0]
    assert c1.charon
    label = {"udp": "udp", "tcp": "rfc9329", "tls": "rfc9329-tls", "ctcp": "ctcp"}[kind]
    port = {"tcp": RFC9329_PORT, "tls": TLS_PORT}.get(kind, CTCP_PORT)
    title = PHASE_TITLES[kind].format(port=port)
    if datapath:
        label, title = f"{label}/{datapath}", f"{title}, datapath = {datapath}"
    elif kind != "udp":
        title += ", no datapath key"
    with phase(lab, results, label, kind, title, None if kind == "udp" else datapath) as r:
        try:
            if kind != "udp":
                start_tcpencap_pair(lab, args, kind, datapath, max_n)
            c1.charon.initiate(CONN, timeout=15)
            what = {"ping", "flood", "setup"}
            if args.scale and (kind in ("tcp", "tls") or (kind == "udp" and args.udp_scale)):
                what.add("scale")
            measure(lab, args, label, r, watched_pids(lab, kind != "udp"), what)
            if kind != "udp":
                r["tcpencap_status"] = {h.role: status_digest(h) for h in (c1, lab.gw)}
                died(lab, r)
        finally:
            with contextlib.suppress(CharonError):
                c1.charon.terminate(CONN, timeout=10)
            stop_tcpencap_pair(lab)


def openvpn_phase(
    lab: Lab, args: argparse.Namespace, results: dict[str, Any], nodelay: bool
) -> None:
    """OpenVPN over TCP between c1 and gw (the IPsec tunnel is down), same iperf3 and ping
    as the IPsec phases: bench/openvpn_lab.py routes gw.inner4 through its tun device."""
    label = "openvpn/nodelay" if nodelay else "openvpn"
    mode = "--tcp-nodelay on both ends" if nodelay else "defaults (Nagle on)"
    title = PHASE_TITLES["openvpn"].format(mode=mode)
    with phase(lab, results, label, "openvpn", title) as r:
        pair = OpenVpnPair(lab, nodelay)
        try:
            r["openvpn"] = pair.start()
            measure(lab, args, label, r, pair.pids(), {"ping"})
            for key, proc in pair.procs.items():
                if not proc.alive():
                    r[f"{key}_died"] = proc.popen.returncode
                    lab.keep = True
        finally:
            pair.stop()


def start_relays(lab: Lab) -> dict[str, Process]:
    """socat in gw (gw.outer4:RELAY_PORT -> iperf3 on gw.inner4) and in c1 (c1.inner4:
    RELAY_PORT -> gw's relay): one user-space hop per side, as tcpencap has, in C and
    doing nothing else; nodelay on the hop between the hosts, as tcpencap sets it."""
    c1, gw = lab.clients[0], lab.gw
    relays = {}
    listen = f"TCP-LISTEN:{RELAY_PORT},reuseaddr,fork"
    relays["socat_gw"] = gw.spawn(
        [
            "socat",
            "-d",
            "-d",
            f"{listen},bind={gw.outer4},nodelay",
            f"TCP:{gw.inner4}:{IPERF_PORT}",
        ],
        "socat-gw.log",
    )
    relays["socat_c1"] = c1.spawn(
        [
            "socat",
            "-d",
            "-d",
            f"{listen},bind={c1.inner4}",
            f"TCP:{gw.outer4}:{RELAY_PORT},nodelay",
        ],
        "socat-c1.log",
    )
    for proc in relays.values():
        proc.wait_for_log("listening on", timeout=5)
    return relays


def socat_phase(lab: Lab, args: argparse.Namespace, results: dict[str, Any]) -> None:
    label = "socat"
    with phase(lab, results, label, "socat", PHASE_TITLES["socat"]) as r:
        relays: dict[str, Process] = {}
        try:
            relays = start_relays(lab)
            pids = {k: p.pid for k, p in relays.items()}
            dst = lab.clients[0].inner4
            measure(lab, args, label, r, pids, set(), dst, RELAY_PORT, forking=True)
        finally:
            for proc in relays.values():
                proc.stop()


def run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """All phases in one lab; ``results`` is filled as it goes, so a failure keeps the rest."""
    results["args"] = {k: v for k, v in vars(args).items() if k != "json"}
    results["phases"] = {}
    lab_phases = [p for p in PHASES if p in args.phases and p != "floor"]
    scaled = "tcp" in lab_phases or "tls" in lab_phases or ("udp" in lab_phases and args.udp_scale)
    max_n = max(args.scale) if args.scale and scaled else 0
    if lab_phases:
        with Lab(clients=1, keep=args.keep) as lab:
            c1, gw = lab.clients[0], lab.gw
            results["lab_dir"] = str(lab.dir)
            progress(f"lab {lab.prefix} up in {lab.dir}; starting charon in gw and c1")
            quiet = "" if args.charon_net_log else QUIET_NET_LOG
            gw.start_charon(settings=GW_CHARON_SETTINGS + quiet)
            c1.start_charon(settings=C1_CHARON_SETTINGS + quiet)
            results["machine"] = machine_info(gw)
            progress("machine: " + ", ".join(f"{k}={v}" for k, v in results["machine"].items()))
            gw.charon.load(psk_conf(gw, c1, psk=PSK))
            c1.charon.load(psk_conf(c1, gw, psk=PSK))
            check_lab_addrs(c1, gw)
            if max_n:
                gw.charon.load(gw_scale_conf(c1, gw))
                t = time.monotonic()
                c1.charon.load(client_scale_conf(c1, gw, max_n))
                progress(f"loaded {max_n} scale connections in c1 in {time.monotonic() - t:.1f}s")
            start_iperf_server(gw)

            if "udp" in lab_phases:
                ipsec_phase(lab, args, results, "udp", "", max_n)
            lab.block_udp(c1)  # from here on, as in a hotel network
            for kind in ("tcp", "tls", "ctcp"):
                if kind in lab_phases:
                    for datapath in args.datapath:
                        ipsec_phase(lab, args, results, kind, datapath, max_n)
            if "openvpn" in lab_phases:
                for nodelay in (False, True):
                    openvpn_phase(lab, args, results, nodelay)
            if "socat" in lab_phases:
                socat_phase(lab, args, results)
            results["loadavg_at_end"] = os.getloadavg()
            if lab.keep:
                progress(f"logs kept in {lab.dir}")
    if "floor" in args.phases:
        progress(f"== hop floor: UDP echo direct and via relay pairs, {args.pings} probes ==")
        step(results, "floor", lambda: measure_floor(args.pings, args.ping_interval))
    results.setdefault("loadavg_at_end", os.getloadavg())


# --- report -------------------------------------------------------------------------------


def _get(d: dict[str, Any], *path: Any) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _cmp(a: float | None, b: float | None, kind: str, spec: str) -> str:
    """``b`` against the baseline ``a``: xRATIO, or +DIFF and xRATIO ("diff")."""
    if a is None or b is None:
        return "-"
    ratio = f"x{b / a:.2f}" if a else ""
    return ratio if kind == "ratio" else f"{b - a:+{spec}} {ratio}".strip()


def _cpu(phase: dict[str, Any], streams: int, proc: str) -> float | None:
    return _get(phase, f"tcp_{streams}", "cpu_seconds_per_gb", proc)


def _cpu_sum(phase: dict[str, Any], streams: int, pred: Callable[[str], bool]) -> float | None:
    """Sum of the CPU s/GB of the phase's processes that ``pred`` selects; None if none."""
    per = _get(phase, f"tcp_{streams}", "cpu_seconds_per_gb") or {}
    vals = [v for k, v in per.items() if pred(k)]
    return sum(vals) if vals and None not in vals else None


def _cpu_procs(phase: dict[str, Any]) -> list[str]:
    keys: dict[str, None] = {}
    for s in (1, 4):
        keys |= dict.fromkeys(_get(phase, f"tcp_{s}", "cpu_seconds_per_gb") or {})
    return list(keys)


Row = tuple[str, str, str, str]


def phase_rows(u: dict[str, Any], t: dict[str, Any]) -> list[Row]:
    """The rows of one phase against the UDP baseline ``u``: (metric, UDP, phase, vs UDP).
    A metric the phase did not measure has no row."""
    rows: list[Row] = []

    def add(path: tuple[Any, ...], scale: float, spec: str, label: str, kind: str) -> None:
        a, b = _get(u, *path), _get(t, *path)
        if b is None:
            return
        a2 = a * scale if a is not None else None
        rows.append((label, _fmt(a2, spec), _fmt(b * scale, spec), _cmp(a2, b * scale, kind, spec)))

    def pair(label: str, get: Callable[[dict[str, Any], int], float | None]) -> None:
        a, b = [get(u, s) for s in (1, 4)], [get(t, s) for s in (1, 4)]
        if b == [None, None]:
            return
        cells = [" / ".join(_fmt(x, ".2f") for x in v) for v in (a, b)]
        cmps = " / ".join(_cmp(x, y, "ratio", ".2f") for x, y in zip(a, b, strict=True))
        rows.append((label, cells[0], cells[1], cmps))

    add(("tcp_1", "bits_per_second"), 1e-9, ".3f", "TCP 1 stream Gbit/s", "ratio")
    add(("tcp_4", "bits_per_second"), 1e-9, ".3f", "TCP 4 streams Gbit/s", "ratio")
    add(("ping", "median_ms"), 1, ".3f", "ping RTT median ms", "diff")
    add(("ping", "p99_ms"), 1, ".3f", "ping RTT p99 ms", "diff")
    add(("flood", "received_pps"), 1, ".0f", "UDP flood received pkt/s", "ratio")
    add(("flood", "loss_percent"), 1, ".1f", "UDP flood loss %", "diff")
    add(("flood", "receiver_seconds"), 1, ".1f", "UDP flood receiver span s", "diff")
    add(("flood", "received_pps_receiver_span"), 1, ".0f", "  pkt/s over receiver span", "ratio")
    for proc in _cpu_procs(t):
        pair(f"CPU s/GB {proc} (P1 / P4)", lambda ph, s, p=proc: _cpu(ph, s, p))
    for side in ("c1", "gw"):
        pair(
            f"CPU s/GB all of {side} (P1 / P4)",
            lambda ph, s, sd=side: _cpu_sum(ph, s, lambda k: k.endswith("_" + sd)),
        )
    pair("CPU s/GB both sides (P1 / P4)", lambda ph, s: _cpu_sum(ph, s, lambda k: True))
    add(("setup", "median_s"), 1e3, ".1f", "IKE+CHILD set-up median ms", "diff")
    uscale = u.get("scale") or []
    for i, sc in enumerate(t.get("scale") or []):
        us = uscale[i] if i < len(uscale) and uscale[i].get("n") == sc.get("n") else {}
        n = sc.get("n")
        for key, spec, what in (
            ("established_gw", "d", "established (gw)"),
            ("sas_per_second", ".1f", "set-up SAs/s"),
        ):
            a, b = us.get(key), sc.get(key)
            cmp = _cmp(a, b, "ratio", spec) if key == "sas_per_second" else ""
            rows.append((f"scale N={n} {what}", _fmt(a, spec), _fmt(b, spec), cmp))
        rss = f"{_fmt(sc.get('gw_rss_before_kib'), 'd')} -> {_fmt(sc.get('gw_rss_after_kib'), 'd')}"
        rows.append((f"scale N={n} gw tcpencap RSS KiB", "", rss, ""))
        rows.append(
            (f"scale N={n} gw KiB/connection", "", _fmt(sc.get("gw_kib_per_conn"), ".1f"), "")
        )
        conns = _fmt(sc.get("gw_tcp_connections"), "d")
        rows.append((f"scale N={n} gw tcpencap connections", "", conns, ""))
    return rows


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned first column, the others right-aligned, widths from the content."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    out = [line(header), "-" * len(line(header))]
    return out + [line(r) for r in rows]


def short(label: str) -> str:
    """A phase's label as the report prints it: UDP, RFC9329/native, cTCP/python, ..."""
    if label in ("udp", "socat"):
        return {"udp": "UDP", "socat": "socat relays"}[label]
    kind, _, rest = label.partition("/")
    name = {"rfc9329": "RFC9329", "rfc9329-tls": "RFC9329+TLS", "ctcp": "cTCP",
            "openvpn": "OpenVPN"}.get(kind, kind)  # fmt: skip
    return f"{name}/{rest}" if rest else name


def _is_relay(proc: str, side: str) -> bool:
    """tcpencap, openvpn or socat on ``side`` ("_c1", "_gw"): not charon."""
    return proc.endswith(side) and not proc.startswith("charon")


def summary_rows(phases: dict[str, Any]) -> list[tuple[str, ...]]:
    """One line per phase: throughput, RTT and CPU per GB next to the UDP baseline."""
    u = phases.get("udp", {})
    rows = []
    for label, t in phases.items():
        cells = [short(label) + (" FAILED" if "error" in t else "")]
        for s in (1, 4):
            a, b = _get(u, f"tcp_{s}", "bits_per_second"), _get(t, f"tcp_{s}", "bits_per_second")
            cmp = "" if label == "udp" or a is None else " " + _cmp(a, b, "ratio", ".3f")
            cells.append("-" if b is None else f"{b / 1e9:.3f}{cmp}")
        a, b = _get(u, "ping", "median_ms"), _get(t, "ping", "median_ms")
        cmp = "" if label == "udp" or a is None else f" ({_cmp(a, b, 'diff', '.2f')})"
        cells.append("-" if b is None else f"{b:.2f}{cmp}")
        for s in (1, 4):
            relay = [_cpu_sum(t, s, lambda k, sd=sd: _is_relay(k, sd)) for sd in ("_c1", "_gw")]
            cells.append(" / ".join(_fmt(x, ".2f") for x in relay) if relay != [None] * 2 else "-")
        for s in (1, 4):
            a, b = _cpu_sum(u, s, lambda k: True), _cpu_sum(t, s, lambda k: True)
            cmp = "" if label == "udp" or a is None else " " + _cmp(a, b, "ratio", ".2f")
            cells.append("-" if b is None else f"{b:.2f}{cmp}")
        rows.append(tuple(cells))
    return rows


def conditions(phase: dict[str, Any]) -> str:
    """Load average at the phase's start and other processes' CPU use during it."""
    load = (phase.get("loadavg_at_start") or [None])[0]
    others = phase.get("others_cpu_per_second")
    flag = " BUSY" if (others or 0) > BUSY else ""
    return f"load {_fmt(load, '.2f')}, others {_fmt(others, '.2f')} CPU/s{flag}"


def relay_rows(phases: dict[str, Any]) -> list[tuple[str, ...]]:
    """Each phase's user-space relay (tcpencap, openvpn) per side and stream count, with
    its ratio to socat's in the same run."""
    floor = phases.get("socat", {})
    rows = []
    for label, t in phases.items():
        procs = [k for k in _cpu_procs(t) if not k.startswith("charon")]
        if not procs:
            continue
        cells = [short(label), procs[0].rsplit("_", 1)[0]]
        for s in (1, 4):
            for side in ("_c1", "_gw"):
                v = _cpu_sum(t, s, lambda k, sd=side: _is_relay(k, sd))
                f = _cpu_sum(floor, s, lambda k, sd=side: _is_relay(k, sd))
                cmp = f" x{v / f:.1f}" if v is not None and f and label != "socat" else ""
                cells.append(f"{_fmt(v, '.2f')}{cmp}")
        rows.append(tuple(cells))
    return rows


def report(res: dict[str, Any]) -> str:
    phases: dict[str, Any] = res.get("phases", {})
    u = phases.get("udp", {})
    lines: list[str] = []
    for label, t in phases.items():
        if label == "udp":
            continue
        lines += ["", f"== {short(label)}: {t.get('title', '')} =="]
        lines.append(conditions(t) + "; UDP baseline: " + (conditions(u) if u else "not run"))
        rows = phase_rows(u, t)
        st = t.get("tcpencap_status") or {}
        used = [f"{h} {st[h]['datapath']}" for h in ("c1", "gw") if "datapath" in st.get(h, {})]
        if used:
            lines.append("data path in effect (tcpencap status): " + ", ".join(used))
        if rows:
            lines += table(("metric", "UDP baseline", short(label), "vs UDP"), rows)
        if "error" in t:
            lines.append(f"phase FAILED: {t['error'][:500]}")
    floor = res.get("floor") or {}
    if "direct" in floor:
        lines += [
            "",
            "== hop floor: UDP echo RTT, direct and through relay pairs (hop_floor.py) ==",
        ]
        rows = [("direct UDP echo median ms", _fmt(floor["direct"].get("median_ms"), ".3f"), "")]
        for key, name in (("socat", "C relays (socat)"), ("asyncio", "asyncio relays")):
            if key in floor:
                added = _fmt(floor[key].get("added_ms"), "+.3f")
                rows.append(
                    (f"via {name} median ms", _fmt(floor[key].get("median_ms"), ".3f"), added)
                )
        lines += table(("metric", "value", "added"), rows)
    if phases:
        lines += ["", "== summary: each figure beside this run's UDP baseline =="]
        header = (
            "phase",
            "P1 Gbit/s",
            "P4 Gbit/s",
            "ping median ms",
            "relay s/GB P1 c1 / gw",
            "P4 c1 / gw",
            "all s/GB P1",
            "all P4",
        )
        lines += table(header, summary_rows(phases))
        lines.append(
            "P1/P4: iperf3 TCP with 1/4 streams; relay = CPU s/GB of tcpencap, openvpn or socat "
            "per side; all = of every watched process of both sides, charon included"
        )
        relay = relay_rows(phases)
        if relay:
            lines += ["", "== user-space relay CPU s/GB per side, against socat's (the C floor) =="]
            header = ("phase", "relay", "c1 P1", "gw P1", "c1 P4", "gw P4")
            lines += table(header, relay)
        busy = [
            f"{short(k)} {v['others_cpu_per_second']:.2f}"
            for k, v in phases.items()
            if (v.get("others_cpu_per_second") or 0) > BUSY
        ]
        if busy:
            lines += [
                "",
                "machine busy (CPU/s used by processes outside this lab): " + ", ".join(busy),
            ]
    errs = []
    for label, t in phases.items():
        if "error" in t:
            errs.append(f"{label}: phase FAILED: {t['error'].splitlines()[-1][:300]}")
        for k, v in t.items():
            if isinstance(v, dict) and "error" in v:
                errs.append(f"{label}.{k}: {v['error'][:300]}")
        errs += [
            f"{label}.scale N={sc.get('n')}: {sc['error']}"
            for sc in t.get("scale") or []
            if "error" in sc
        ]
    if isinstance(res.get("floor"), dict) and "error" in res["floor"]:
        errs.append(f"floor: {res['floor']['error']}")
    if errs:
        lines += ["", "errors:", *("  " + e for e in errs)]
    return "\n".join(lines)


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"bench_lab: unknown {what} {', '.join(bad)} (use {', '.join(allowed)})")
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10, help="seconds per iperf3 TCP run")
    ap.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (always run in that order)",
    )
    ap.add_argument(
        "--datapath",
        default="native,python",
        help="tcpencap datapath values for the tcp and ctcp phases, one phase each; "
        "'' writes no datapath key (one phase each)",
    )
    ap.add_argument("--scale", default="100", help="comma-separated N for the scale test")
    ap.add_argument("--scale-budget", type=float, default=180, help="max seconds per N")
    ap.add_argument("--no-udp-scale", dest="udp_scale", action="store_false",
                    help="skip the scale test over UDP (baseline)")  # fmt: skip
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the hop floor (bench/hop_floor.py; needs socat); same as leaving it out of "
        "--phases",
    )
    ap.add_argument("--ping-interval", type=float, default=0.01)
    ap.add_argument("--flood-time", type=float, default=5)
    ap.add_argument("--flood-rate", default="1G", help="iperf3 -b, above the tunnel capacity")
    ap.add_argument("--flood-size", type=int, default=1200, help="UDP datagram bytes")
    ap.add_argument("--cycles", type=int, default=10, help="set-up time cycles")
    ap.add_argument("--log-level", default="info", help="tcpencap --log-level")
    ap.add_argument("--charon-net-log", action="store_true",
                    help="keep the lab's per-packet charon net log (level 2)")  # fmt: skip
    ap.add_argument("--json", default="bench-results.json", help="where to write results")
    ap.add_argument("--keep", action="store_true", help="keep the lab directory (logs)")
    args = ap.parse_args(argv)
    args.scale = [int(x) for x in args.scale.split(",") if x.strip()]
    args.phases = parse_list(args.phases, PHASES, "phase")
    if not args.floor and "floor" in args.phases:
        args.phases.remove("floor")
    args.datapath = parse_list(args.datapath, DATAPATHS, "datapath") or [""]
    if os.geteuid() != 0:
        print("bench_lab: needs root (network namespaces)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    rc = 0
    try:
        run(args, results)
    except (Exception, KeyboardInterrupt) as exc:  # the lab is torn down; report what we have
        results.setdefault("error", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        rc = 130 if isinstance(exc, KeyboardInterrupt) else 1
    results.setdefault("machine", machine_info(None))
    results["elapsed_s"] = round(time.monotonic() - T0, 1)
    print()
    m = results["machine"]
    print(
        f"machine: {m['nproc']} x {m['cpu_model']}, kernel {m['kernel']}, {m['strongswan']}, "
        f"Python {m['python']}, {m.get('iperf3', '?')}"
    )
    print(
        f"load average at start {m.get('loadavg_at_start')}, end {results.get('loadavg_at_end')};"
        f" {results['elapsed_s']} s"
    )
    print(report(results))
    Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nresults written to {args.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
