"""Gateway scale-out benchmark: how a tcpencap gateway's throughput grows with the number of
clients and with the number of NFQUEUE queues (one C reader thread each, ``queues = N``).

Not a test: it prints figures next to a baseline measured in the same run and never asserts
on timings. Run as root from the checkout's root::

    python3 -m bench.bench_scaleout [--clients 1,2,4] [--queues 1,2] [--duration 8]
        [--streams 1] [--json /tmp/bench-scaleout.json] [--keep]

For every K in ``--clients``, a lab with K clients (c1..cK - fw - gw, see tests/labkit/) is built
for the UDP baseline: the same IKEv2 PSK tunnels (kernel-libipsec, ESP-in-UDP) from every
client to gw, nothing blocked, no tcpencap. Then, for every Q in ``--queues``, a fresh lab with
K clients where fw drops all UDP of every client; tcpencap runs on each client and on gw
(listening on TCP 4500, ``queues = Q`` at the top level, the default native data path), so gw
steers its outbound packets with ``--queue-balance`` into Q queues, each read by its own
thread. In each lab, every client runs an iperf3 server on its inner address and gw runs one
iperf3 client per client, all at once, for ``--duration`` seconds: once gw -> clients (the
outbound path the queues spread) and once with ``-R``, clients -> gw.

Per run: aggregate and per-client Gbit/s (iperf3 ``sum_received``), gw tcpencap's CPU
seconds per GB (utime+stime of /proc/PID/stat, which counts every thread of the process) and
gw charon's, and the packets each of gw's queues took (``tcpencap status``, ``queue.per_queue``,
the difference over the run). Each RFC 9329 figure is printed beside the same run's UDP
baseline for the same K, as a ratio.

The machines this project runs on have 2 vCPUs: what more queues or clients can add is capped
by those two cores (shared with both charons, every tcpencap, iperf3 and the kernel's
softirqs), so growth cannot go beyond 2x here, and usually stays well below it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.labkit import (
    CharonError,
    Host,
    Lab,
    LabError,
    Process,
    default_name,
    psk_conf,
    tcpencap_conf,
)

PSK = "bench-shared-secret-0123456789"
TCP_PORT = 4500  # gw's RFC 9329 listener
IPERF_PORT = 5201
IPERF_LOG = "iperf3-server.log"
CLK_TCK = os.sysconf("SC_CLK_TCK")
DIRECTIONS = ("gw->clients", "clients->gw")
# The lab logs charon's net at level 2: a flushed log line per ESP packet, which costs more
# CPU than the tunnel. Lowered on every host, in the baseline and in the TCP runs alike.
QUIET_NET_LOG = """  filelog {
    lab {
      net = 1
    }
  }
"""
T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime (fields 14 and 15 of stat(5)) of a process: all its threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_info() -> dict[str, Any]:
    iperf = subprocess.run(["iperf3", "--version"], capture_output=True, text=True, check=False)
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "iperf3": iperf.stdout.splitlines()[0] if iperf.stdout else "?",
        "loadavg_at_start": os.getloadavg(),
    }


# --- lab set-up -----------------------------------------------------------------------------


def start_charons(lab: Lab) -> None:
    for h in (lab.gw, *lab.clients):
        h.start_charon(settings=QUIET_NET_LOG)
    for c in lab.clients:
        c.charon.load(psk_conf(c, lab.gw, psk=PSK))
        lab.gw.charon.load(psk_conf(lab.gw, c, psk=PSK))


def start_tcpencap(lab: Lab, queues: int, log_level: str) -> None:
    gw = lab.gw
    conf = tcpencap_conf(gw, listen=[f"{gw.outer4}:{TCP_PORT}"], extra=f"  queues = {queues}")
    gw.start_tcpencap(conf, log_level=log_level)
    for c in lab.clients:
        c.start_tcpencap(
            tcpencap_conf(c, connections={default_name(c, gw): TCP_PORT}), log_level=log_level
        )


def initiate_all(lab: Lab) -> None:
    for c in lab.clients:
        c.charon.initiate(default_name(c, lab.gw), timeout=15)


def start_iperf_servers(lab: Lab) -> dict[str, Process]:
    servers = {}
    for c in lab.clients:
        argv = ["iperf3", "-s", "--forceflush", "-B", c.inner4 or "", "-p", str(IPERF_PORT)]
        servers[c.role] = proc = c.spawn(argv, IPERF_LOG)
        proc.wait_for_log("Server listening", timeout=5)
    return servers


def servers_idle(lab: Lab, timeout: float = 10) -> bool:
    """Every iperf3 server has finished its last test (one test at a time per server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        texts = [(c.dir / IPERF_LOG).read_text(errors="replace") for c in lab.clients]
        if all(t.rfind("Server listening") > t.rfind("Accepted connection") for t in texts):
            return True
        time.sleep(0.05)
    return False


# --- measurement ----------------------------------------------------------------------------


def iperf_one(gw: Host, client: Host, seconds: float, streams: int, reverse: bool) -> Any:
    argv = ["iperf3", "-c", client.inner4 or "", "-B", gw.inner4 or "", "-p", str(IPERF_PORT)]
    argv += ["-J", "-P", str(streams), "-t", str(seconds)] + (["-R"] if reverse else [])
    try:
        proc = gw.run(*argv, check=False, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        return {"error": f"iperf3 timed out after {seconds + 30}s"}
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": f"iperf3 rc {proc.returncode}: {proc.stdout[-200:]}{proc.stderr[-200:]}"}
    if "error" in out:
        return {"error": f"iperf3: {out['error']}"}
    recv = out["end"]["sum_received"]
    return {
        "bits_per_second": recv["bits_per_second"],
        "bytes": recv["bytes"],
        "retransmits": out["end"].get("sum_sent", {}).get("retransmits"),
    }


def per_queue(gw: Host) -> dict[str, int] | None:
    if gw.tcpencap is None:
        return None
    q = gw.tcpencap_status()["queue"]
    return {str(k): int(v) for k, v in q["per_queue"].items()}


def run_direction(lab: Lab, args: argparse.Namespace, reverse: bool) -> dict[str, Any]:
    """All K iperf3 clients on gw at once; throughput, gw CPU per GB, queue split."""
    gw = lab.gw
    ready = servers_idle(lab)
    pids = {"charon_gw": gw.charon.process.pid}
    if gw.tcpencap is not None:
        pids["tcpencap_gw"] = gw.tcpencap.pid
    q_before = per_queue(gw)
    cpu_before = {k: cpu_seconds(p) for k, p in pids.items()}
    with ThreadPoolExecutor(len(lab.clients)) as pool:
        futures = {
            c.role: pool.submit(iperf_one, gw, c, args.duration, args.streams, reverse)
            for c in lab.clients
        }
        clients = {role: f.result() for role, f in futures.items()}
    cpu = {k: round(cpu_seconds(p) - cpu_before[k], 3) for k, p in pids.items()}
    q_after = per_queue(gw)
    res: dict[str, Any] = {"servers_were_idle": ready, "clients": clients, "cpu_seconds": cpu}
    if q_before is not None and q_after is not None:
        res["per_queue_packets"] = {k: v - q_before.get(k, 0) for k, v in q_after.items()}
    errors = {r: c["error"] for r, c in clients.items() if "error" in c}
    if errors:
        res["error"] = "; ".join(f"{r}: {e}" for r, e in errors.items())
        return res
    total = sum(c["bytes"] for c in clients.values())
    res["aggregate_bits_per_second"] = sum(c["bits_per_second"] for c in clients.values())
    res["bytes"] = total
    res["cpu_seconds_per_gb"] = {k: (v / (total / 1e9) if total else None) for k, v in cpu.items()}
    return res


def lab_run(args: argparse.Namespace, k: int, queues: int | None, res: dict[str, Any]) -> None:
    """One lab with ``k`` clients: the UDP baseline (``queues`` None) or RFC 9329 with
    ``queues`` queues on gw; both directions. A lab that fails to build is tried once more
    (the namespaces are torn down by Lab either way). Figures go into ``res`` as they come,
    so an interrupted lab keeps what it measured."""
    what = "udp baseline" if queues is None else f"rfc9329 queues={queues}"
    res |= {"clients": k, "queues": queues}
    for attempt in (1, 2):
        progress(f"K={k} {what}: building the lab")
        try:
            lab = Lab(clients=k, keep=args.keep)
            lab.start()
            break
        except LabError as exc:
            res["build_error"] = f"attempt {attempt}: {str(exc)[-300:]}"
            progress(f"  lab build failed: {res['build_error']}")
    else:
        res["error"] = "lab build failed: " + res["build_error"]
        return
    res["loadavg_before"] = os.getloadavg()
    progress(f"  lab {lab.prefix} in {lab.dir}")
    t = time.monotonic()
    with lab:
        res["lab_dir"] = str(lab.dir)
        try:
            start_charons(lab)
            if queues is not None:
                for c in lab.clients:
                    lab.block_udp(c)
                start_tcpencap(lab, queues, args.log_level)
            initiate_all(lab)
            if queues is not None:
                st = lab.gw.tcpencap_status()
                q = st["queue"]
                res["gw_status"] = {
                    "datapath": st.get("datapath"),
                    "queues": q["queues"],
                    "threads": q["threads"],
                }
                if (q["queues"], q["threads"]) != (queues, queues):
                    progress(f"  WARNING: gw reports {q['queues']} queues, {q['threads']} threads")
            start_iperf_servers(lab)
            for name, reverse in zip(DIRECTIONS, (False, True), strict=True):
                progress(f"K={k} {what}: iperf3 {name}, {args.duration}s")
                res[name] = r = run_direction(lab, args, reverse)
                if "error" in r:
                    progress(f"  error: {r['error']}")
                else:
                    progress(f"  {r['aggregate_bits_per_second'] / 1e9:.3f} Gbit/s")
            if queues is not None:
                q = lab.gw.tcpencap_status()["queue"]
                res["gw_queue_after"] = {k2: q[k2] for k2 in ("errors", "verdict_errors")}
                dead = [h.role for h in (lab.gw, *lab.clients) if not h.tcpencap.alive()]
                if dead:
                    res["tcpencap_died"] = dead
        except (LabError, CharonError, OSError, KeyError, subprocess.SubprocessError) as exc:
            res["error"] = f"{type(exc).__name__}: {str(exc)[-400:]}"
            res["traceback"] = traceback.format_exc()[-2000:]
            progress(f"  FAILED: {res['error']}")
            for h in (lab.gw, *lab.clients):
                if h.tcpencap is not None:
                    res.setdefault("tcpencap_log_tail", {})[h.role] = h.tcpencap.log_tail(20)
        finally:
            for c in lab.clients:
                if c.charon is not None:
                    with contextlib.suppress(CharonError, LabError):
                        c.charon.terminate(default_name(c, lab.gw), timeout=5)
    res["wall_seconds"] = round(time.monotonic() - t, 1)


# --- report ---------------------------------------------------------------------------------


def _gbit(r: dict[str, Any] | None) -> float | None:
    if not r or "error" in r:
        return None
    return r["aggregate_bits_per_second"] / 1e9


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def split_text(per: dict[str, int] | None) -> str:
    if not per:
        return "-"
    total = sum(per.values())
    parts = [f"{n}:{c}" for n, c in sorted(per.items())]
    if total:
        parts.append(
            "(" + "/".join(f"{100 * c / total:.0f}%" for _, c in sorted(per.items())) + ")"
        )
    return " ".join(parts)


def gw_path(st: dict[str, Any] | None) -> str:
    """What gw's daemon reported: data path and reader threads (should be Q of them)."""
    return "-" if not st else f"{st['datapath']}/{st['threads']}thr"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return out


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "",
        f"gateway scale-out, {results['args']['duration']}s iperf3 per figure, "
        f"{results['args']['streams']} stream(s) per client; nproc={m['nproc']}, "
        f"load at start {m['loadavg_at_start'][0]:.2f}",
        "UDP = ESP-in-UDP baseline, same K, same run; RFC = RFC 9329 through tcpencap; "
        "ratio = RFC / UDP;",
        "s/GB = gw tcpencap CPU (utime+stime, all threads) per GB received; "
        "per client = RFC Gbit/s of c1, c2, ...;",
        "gw path = data path and reader threads gw reports; load = 1-min load average before "
        "the RFC lab (above ~1, other jobs share the CPUs: compare ratios, repeat).",
    ]
    header = ("K", "Q", "direction", "UDP Gbit/s", "RFC Gbit/s", "ratio", "per client")
    header += ("gw tcpencap s/GB", "per-queue packets", "gw path", "load")
    rows = []
    for run in results["runs"]:
        base = results["baseline"].get(str(run["clients"]), {})
        for name in DIRECTIONS:
            r = run.get(name)
            u, t = _gbit(base.get(name)), _gbit(r)
            ratio = f"x{t / u:.2f}" if u and t is not None else "-"
            per_client = s_gb = "-"
            if r and "error" not in r:
                per_client = " ".join(
                    f"{c['bits_per_second'] / 1e9:.2f}" for c in r["clients"].values()
                )
                s_gb = _f(r["cpu_seconds_per_gb"].get("tcpencap_gw"), ".2f")
            elif r is None:
                err = run.get("error")
                per_client = f"FAILED: {err[:60]}" if err else "not measured"
            else:
                per_client = "ERROR: " + r["error"][:60]
            rows.append(
                (
                    str(run["clients"]),
                    str(run["queues"]),
                    name,
                    _f(u, ".3f"),
                    _f(t, ".3f"),
                    ratio,
                    per_client,
                    s_gb,
                    split_text(r.get("per_queue_packets") if r else None),
                    gw_path(run.get("gw_status")),
                    _f(run.get("loadavg_before", [None])[0], ".2f"),
                )
            )
    lines += table(header, rows)
    failed = [
        f"K={b['clients']} baseline: {b['error']}"
        for b in results["baseline"].values()
        if "error" in b
    ]
    if failed:
        lines += ["", *failed]
    if results.get("interrupted"):
        lines += ["", "INTERRUPTED: the run stopped early; later rows were not measured"]
    lines += [
        "",
        f"This machine has {m['nproc']} CPUs: growth with queues or clients cannot exceed "
        "what they allow (2 vCPUs: 2x at most).",
    ]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{what}: comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"--{what}: at least one value, each >= 1")
    return list(dict.fromkeys(values))


MAIN_PID = os.getpid()


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM in this process unwinds through Lab.__exit__ (namespaces and processes go).
    pyroute2 forks helpers that inherit this handler and are ended with SIGTERM: they must
    just die, not unwind a copy of this benchmark (which would tear down the lab)."""
    if os.getpid() != MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,2,4", help="client counts K (default 1,2,4)")
    p.add_argument("--queues", default="1,2", help="gw queue counts Q (default 1,2)")
    p.add_argument("--duration", type=float, default=8, help="seconds per iperf3 run")
    p.add_argument("--streams", type=int, default=1, help="iperf3 streams per client")
    p.add_argument("--json", default="/tmp/bench-scaleout.json", help="where to write figures")
    p.add_argument("--log-level", default="info", help="tcpencap --log-level (default info)")
    p.add_argument("--keep", action="store_true", help="keep the lab directories")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    ks, qs = parse_ints(args.clients, "clients"), parse_ints(args.queues, "queues")
    if max(ks) > 50:
        raise SystemExit("--clients: at most 50 (the lab's limit)")
    args.duration = int(args.duration) if args.duration == int(args.duration) else args.duration
    signal.signal(signal.SIGTERM, _terminate)
    results: dict[str, Any] = {
        "args": vars(args) | {"clients": ks, "queues": qs},
        "machine": machine_info(),
        "baseline": {},
        "runs": [],
    }
    try:
        for k in ks:
            results["baseline"][str(k)] = base = {"clients": k}
            lab_run(args, k, None, base)
            for q in qs:
                results["runs"].append(run := {"clients": k, "queues": q})
                lab_run(args, k, q, run)
    except KeyboardInterrupt:
        progress("interrupted: reporting what was measured")
        results["interrupted"] = True
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(report(results))
    print(f"\nJSON: {args.json}")
    return 1 if results.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
