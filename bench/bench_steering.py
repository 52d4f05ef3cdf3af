"""What the steering rules cost every packet the host sends (not a test).

In a fresh network namespace, tcpencap's steering (nfq.rules.SteeringRules of the tree
given, default this checkout) is installed with N steered peers; then UDP datagrams are
sent to a local socket, timed per packet: from port 5555 (traffic that is not charon's)
and from port 4500 to an address that is not steered (charon's traffic to a UDP peer).
Comparing N = 0 with N = 1000, and this tree with an older one, shows what a linear
per-peer rule list costs and what the peer set saves.

``python3 -m bench.bench_steering [--peers 0,1000] [--tree /path/to/other/checkout]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import json, socket, statistics, subprocess, sys, time
    from nfq.rules import SteeringRules
    n_peers, count = int(sys.argv[1]), int(sys.argv[2])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    rules = SteeringRules(4500)
    rules.install()
    t = time.perf_counter()
    for i in range(n_peers):
        rules.add_peer(f"198.19.{i // 250}.{i % 250 + 1}")
    setup = time.perf_counter() - t
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 7777))
    rx.setblocking(False)

    def per_packet(sport):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tx.bind(("127.0.0.1", sport))
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            for i in range(count):
                tx.sendto(b"x" * 200, ("127.0.0.1", 7777))
                if i % 64 == 63:
                    try:
                        while True:
                            rx.recv(2048)
                    except BlockingIOError:
                        pass
            runs.append((time.perf_counter() - t) / count * 1e6)
        tx.close()
        return statistics.median(runs)

    out = {"peers": n_peers, "add_peers_s": setup,
           "other_us": per_packet(5555), "ike_port_us": per_packet(4500)}
    rules.remove()
    print(json.dumps(out))
    """
)


def run(tree: str, peers: int, count: int) -> dict:
    ns = f"te-steer-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CHILD, str(peers), str(count)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": tree},
            cwd=tree,  # sys.path[0] is the working directory: it must be the tree too
            timeout=600,
        )
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        return json.loads(proc.stdout.splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="0,1000", help="comma-separated numbers of peers")
    ap.add_argument("--count", type=int, default=20000, help="datagrams per timing run")
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_steering: needs root (network namespaces)", file=sys.stderr)
        return 2
    print(f"tree {args.tree}, {os.cpu_count()} CPUs, kernel {os.uname().release}")
    print(f"{'peers':>6} {'add peers s':>12} {'other UDP us/pkt':>17} {'UDP from 4500 us/pkt':>21}")
    for n in (int(x) for x in args.peers.split(",")):
        r = run(args.tree, n, args.count)
        print(f"{n:>6} {r['add_peers_s']:>12.2f} {r['other_us']:>17.2f} {r['ike_port_us']:>21.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
