"""The command line: options, root check, the run, the report and the JSON file."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import bench.bench_lab
from bench.bench_lab.common import DATAPATHS, PHASES, T0
from bench.bench_lab.phases import run
from bench.bench_lab.procs import machine_info
from bench.bench_lab.report import report

DESCRIPTION = (bench.bench_lab.__doc__ or "").splitlines()[0]  # the package's first line


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"bench_lab: unknown {what} {', '.join(bad)} (use {', '.join(allowed)})")
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.bench_lab", description=DESCRIPTION)
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
