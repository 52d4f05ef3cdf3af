"""End-to-end lab benchmark: the same libipsec tunnel over plain UDP and over RFC 9329 TCP.

Not a test: it prints figures next to a baseline measured in the same run and never asserts
on timings. Run as root from anywhere::

    python3 bench/bench_lab.py [--duration 10] [--scale 100,500,1000] [--json PATH] [--keep]

One lab (c1 - fw - gw, see tests/lab/) is built. Phase "udp": charon to charon over UDP,
nothing blocked, no tcpencap. Phase "tcp": fw drops all UDP of c1 and tcpencap runs on both
ends. Each phase measures inner TCP throughput (iperf3, 1 and 4 streams), inner ping RTT, an
inner UDP flood (packets/s and loss), CPU seconds per GB of charon and tcpencap, IKE_SA +
CHILD_SA set-up time, and N concurrent childless IKE SAs from c1 (set-up rate, tcpencap
memory per connection).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hop_floor import measure_floor  # noqa: E402  (this directory is sys.path[0])

from tests.lab import (  # noqa: E402
    CharonError,
    Host,
    Lab,
    ike_id,
    psk_conf,
    tcpencap_conf,
    vici_to_str,
)

PSK = "bench-shared-secret-0123456789"
SCALE_ID = "scale.lab.test"  # identity of every scale connection (own peer config on gw)
# Every address the benchmark puts on the wire must stay inside the lab's range.
LAB_NET = ipaddress.ip_network("198.18.0.0/15")
CONN = "c1-gw"
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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB."""
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else -1


def watched_pids(lab: Lab, tcp: bool) -> dict[str, int]:
    """The processes whose CPU time is charged to the tunnel. ``ip netns exec`` execs its
    command and charon's ``sh -c 'mount ... && exec charon'`` does too, so the spawned
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


def iperf(c1: Host, gw: Host, extra: list[str], seconds: float) -> dict[str, Any]:
    """Run an iperf3 client in c1 against gw's inner address; the parsed JSON or an error."""
    argv = ["iperf3", "-c", gw.inner4 or "", "-B", c1.inner4 or "", "-J", *extra]
    argv += ["-t", str(seconds)]
    try:
        proc = c1.run(*argv, check=False, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        return {"error": f"iperf3 timed out after {seconds + 30}s"}
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": f"iperf3 rc {proc.returncode}: {proc.stdout[-300:]}{proc.stderr[-300:]}"}
    if "error" in out:
        return {"error": f"iperf3: {out['error']}"}
    return out


def throughput(lab: Lab, tcp: bool, streams: int, seconds: float) -> dict[str, Any]:
    c1, gw = lab.clients[0], lab.gw
    pids = watched_pids(lab, tcp)
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    out = iperf(c1, gw, ["-P", str(streams)], seconds)
    after = {k: cpu_seconds(p) for k, p in pids.items()}
    if "error" in out:
        return {"streams": streams, "error": out["error"]}
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
    out = iperf(c1, gw, ["-u", "-b", rate, "-l", str(size)], seconds)
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


def measure(lab: Lab, args: argparse.Namespace, tcp: bool) -> dict[str, Any]:
    label = "tcp" if tcp else "udp"
    r: dict[str, Any] = {}
    progress(f"[{label}] ping RTT: {args.pings} pings at {args.ping_interval}s")
    step(r, "ping", lambda: ping_rtt(lab, args.pings, args.ping_interval))
    for streams in (1, 4):
        progress(f"[{label}] iperf3 TCP, {streams} stream(s), {args.duration}s")
        res = step(r, f"tcp_{streams}", lambda s=streams: throughput(lab, tcp, s, args.duration))
        if "bits_per_second" in res:
            progress(f"  {res['bits_per_second'] / 1e9:.3f} Gbit/s")
    progress(f"[{label}] UDP flood {args.flood_rate} x {args.flood_size} B, {args.flood_time}s")
    step(r, "flood", lambda: udp_flood(lab, args.flood_time, args.flood_rate, args.flood_size))
    progress(f"[{label}] IKE_SA+CHILD_SA set-up, {args.cycles} cycles")
    step(r, "setup", lambda: setup_time(lab, args.cycles))
    if tcp or args.udp_scale:
        r["scale"] = []
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
            r["scale"].append(res)
            for key in ("tcpencap_gw", "tcpencap_c1"):
                proc = (lab.gw if key.endswith("gw") else lab.clients[0]).tcpencap
                if tcp and proc is not None and not proc.alive():
                    progress(f"  {key} DIED (rc {proc.popen.returncode})")
                    res[f"{key}_died"] = proc.popen.returncode
                    lab.keep = True
            if any(k.endswith("_died") for k in res):
                break
    return r


def log_tail(path: Path, lines: int = 40) -> list[str]:
    """The last lines of a log, warnings and errors first (they say why)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    bad = [ln for ln in text if re.search(r"\b(ERROR|WARNING|Traceback|Error)\b", ln)]
    return bad[-20:] + ["--- tail ---"] + text[-lines:]


def run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Both phases in one lab; ``results`` is filled as it goes, so a failure keeps the rest."""
    results["args"] = {k: v for k, v in vars(args).items() if k != "json"}
    max_n = max(args.scale) if args.scale else 0
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
        srv = gw.spawn(["iperf3", "-s", "--forceflush", "-B", gw.inner4 or ""], "iperf3-server.log")
        srv.wait_for_log("Server listening", timeout=5)

        progress("== phase udp: plain ESP-in-UDP, no tcpencap ==")
        c1.charon.initiate(CONN, timeout=15)
        results["udp"] = measure(lab, args, tcp=False)
        with contextlib.suppress(CharonError):
            c1.charon.terminate(CONN, timeout=10)

        progress("== phase tcp: UDP of c1 dropped in fw, RFC 9329 through tcpencap ==")
        lab.block_udp(c1)
        listen = [f"{gw.outer4}:4500"]
        # One client charon opens all N connections from one address at once: lift the
        # per-source and pending limits (internet defaults: 32 and 256) for this bench.
        limit = max(1000, max_n + 100)
        gw_extra = (
            f"    max_connections = {limit}\n    max_per_source = {limit}\n"
            f"    max_pending = {limit}"
        )
        gw.start_tcpencap(
            tcpencap_conf(gw, listen=listen, gateway_extra=gw_extra), log_level=args.log_level
        )
        conns = {CONN: 4500} | dict.fromkeys(scale_names(max_n), 4500)
        c1.start_tcpencap(tcpencap_conf(c1, connections=conns), log_level=args.log_level)
        c1.charon.initiate(CONN, timeout=15)
        results["tcp"] = measure(lab, args, tcp=True)
        results["loadavg_at_end"] = os.getloadavg()
        if lab.keep:
            progress(f"logs kept in {lab.dir}")
    if args.floor:
        progress(f"== hop floor: UDP echo direct and via relay pairs, {args.pings} probes ==")
        step(results, "floor", lambda: measure_floor(args.pings, args.ping_interval))


# --- report -------------------------------------------------------------------------------


def _get(d: dict[str, Any], *path: Any) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(res: dict[str, Any]) -> str:
    u, t = res.get("udp", {}), res.get("tcp", {})
    rows: list[tuple[str, str, str, str]] = []

    def ratio(path: tuple[Any, ...], scale: float, spec: str, label: str, kind: str) -> None:
        a, b = _get(u, *path), _get(t, *path)
        a2 = a * scale if a is not None else None
        b2 = b * scale if b is not None else None
        cmp = "-"
        if a2 is not None and b2 is not None:
            cmp = f"x{b2 / a2:.2f}" if kind == "ratio" and a2 else f"{b2 - a2:+{spec}}"
        rows.append((label, _fmt(a2, spec), _fmt(b2, spec), cmp))

    for s in (1, 4):
        ratio((f"tcp_{s}", "bits_per_second"), 1e-9, ".3f", f"TCP {s} stream(s) Gbit/s", "ratio")
    ratio(("ping", "median_ms"), 1, ".3f", "ping RTT median ms", "diff")
    ratio(("ping", "p99_ms"), 1, ".3f", "ping RTT p99 ms", "diff")
    floor = res.get("floor") or {}
    for key, label in (("socat", "C relays (socat)"), ("asyncio", "asyncio relays")):
        if "added_ms" in floor.get(key, {}):
            added = f"{floor[key]['added_ms']:+.3f}"
            rows.append((f"hop floor: RTT added by {label}", "", "", added))
    ratio(("flood", "received_pps"), 1, ".0f", "UDP flood received pkt/s", "ratio")
    ratio(("flood", "loss_percent"), 1, ".1f", "UDP flood loss %", "diff")
    for s in (1, 4):
        for proc in ("charon_c1", "charon_gw", "tcpencap_c1", "tcpencap_gw"):
            ratio((f"tcp_{s}", "cpu_seconds_per_gb", proc), 1, ".2f", f"CPU s/GB {proc} P{s}", "-")
            rows[-1] = (*rows[-1][:3], "")
    ratio(("setup", "median_s"), 1e3, ".1f", "IKE+CHILD set-up median ms", "diff")
    for i, sc in enumerate(t.get("scale", [])):
        us = (u.get("scale") or [{}] * (i + 1))[i] if i < len(u.get("scale", [])) else {}
        n = sc.get("n")
        rows.append(
            (
                f"scale N={n} established (gw)",
                _fmt(us.get("established_gw"), "d"),
                _fmt(sc.get("established_gw"), "d"),
                "",
            )
        )
        rows.append(
            (
                f"scale N={n} set-up SAs/s",
                _fmt(us.get("sas_per_second"), ".1f"),
                _fmt(sc.get("sas_per_second"), ".1f"),
                "",
            )
        )
        before, after = sc.get("gw_rss_before_kib"), sc.get("gw_rss_after_kib")
        rss = f"{_fmt(before, 'd')} -> {_fmt(after, 'd')}"
        rows.append((f"scale N={n} gw tcpencap RSS KiB", "", rss, ""))
        rows.append(
            (f"scale N={n} gw KiB/connection", "", _fmt(sc.get("gw_kib_per_conn"), ".1f"), "")
        )
        rows.append(
            (
                f"scale N={n} gw tcpencap connections",
                "",
                _fmt(sc.get("gw_tcp_connections"), "d"),
                "",
            )
        )
    w = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{w}}  {'UDP':>14}  {'RFC9329/TCP':>20}  {'TCP vs UDP':>10}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{a:<{w}}  {b:>14}  {c:>20}  {d:>10}" for a, b, c, d in rows]
    errs = [
        f"{phase}.{k}: {v['error']}"
        for phase in ("udp", "tcp")
        for k, v in res.get(phase, {}).items()
        if isinstance(v, dict) and "error" in v
    ]
    errs += [
        f"{phase}.scale N={sc.get('n')}: {sc['error']}"
        for phase in ("udp", "tcp")
        for sc in res.get(phase, {}).get("scale", [])
        if "error" in sc
    ]
    if errs:
        lines += ["", "errors:", *("  " + e for e in errs)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10, help="seconds per iperf3 TCP run")
    ap.add_argument("--scale", default="100", help="comma-separated N for the scale test")
    ap.add_argument("--scale-budget", type=float, default=180, help="max seconds per N")
    ap.add_argument("--no-udp-scale", dest="udp_scale", action="store_false",
                    help="skip the scale test over UDP (baseline)")  # fmt: skip
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the hop floor (bench/hop_floor.py; needs socat)",
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
    print()
    m = results["machine"]
    print(
        f"machine: {m['nproc']} x {m['cpu_model']}, kernel {m['kernel']}, {m['strongswan']}, "
        f"Python {m['python']}, {m.get('iperf3', '?')}"
    )
    print(f"load average at start {m.get('loadavg_at_start')}, end {results.get('loadavg_at_end')}")
    print(report(results))
    Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nresults written to {args.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
