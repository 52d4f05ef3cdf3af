"""The phases: each brings up one transport (UDP, RFC 9329, TLS, cTCP, OpenVPN, socat),
runs the measurements in it and records them; ``run`` builds the lab and runs them in order."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.bench_lab.common import (
    BUSY,
    CONN,
    CTCP_PORT,
    IPERF_PORT,
    PHASES,
    PSK,
    RELAY_PORT,
    RFC9329_PORT,
    TLS_PORT,
    progress,
)
from bench.bench_lab.confs import (
    C1_CHARON_SETTINGS,
    GW_CHARON_SETTINGS,
    QUIET_NET_LOG,
    check_lab_addrs,
    client_scale_conf,
    gw_scale_conf,
    tcpencap_confs,
)
from bench.bench_lab.procs import cpu_account, machine_info, others_per_second, watched_pids
from bench.bench_lab.scale import scale, scale_teardown
from bench.bench_lab.traffic import ping_rtt, setup_time, start_iperf_server, throughput, udp_flood
from bench.hop_floor import measure_floor
from bench.openvpn_lab import OpenVpnPair
from tests.labkit import CharonError, Host, Lab, LabError, Process, psk_conf


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
