"""What two extra user-space hops per direction cost on this machine (not a test).

A UDP echo across a veth pair between two network namespaces, timed directly and then
through a pair of relays that carry it over TCP (UDP -> TCP on one side, TCP -> UDP on the
other), the same shape as charon -> tcpencap -> TCP -> tcpencap -> charon. The relays are
socat (C, the cheapest user-space relay there is) and a minimal asyncio relay (the floor
for any Python shim). The difference to the direct echo is the least a user-space TCP
transport can add to a round trip here; tcpencap's own figure comes from bench_lab.

``python3 -m bench.hop_floor [--count 300] [--interval 0.01]`` (root; needs socat).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import uuid

A_ADDR, B_ADDR = "198.18.250.1", "198.18.250.2"
ECHO_PORT, RELAY_UDP_PORT, RELAY_TCP_PORT = 7000, 5000, 6000

ECHO = textwrap.dedent(f"""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", {ECHO_PORT}))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)
""")

PROBE = textwrap.dedent("""
    import socket, sys, time
    host, port = sys.argv[1], int(sys.argv[2])
    count, interval = int(sys.argv[3]), float(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    for i in range(count):
        time.sleep(interval)
        t = time.perf_counter()
        s.sendto(b"x" * 100, (host, port))
        try:
            s.recv(2048)
        except TimeoutError:
            continue
        print((time.perf_counter() - t) * 1e3)
""")

# A minimal asyncio relay: one UDP peer <-> one TCP connection, 2-byte length framing.
PY_RELAY = textwrap.dedent("""
    import asyncio, socket, struct, sys
    mode = sys.argv[1]

    class Tcp(asyncio.Protocol):
        def __init__(self, udp_send):
            self.udp_send, self.buf = udp_send, b""
        def connection_made(self, tr):
            self.tr = tr
            tr.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            RELAY["tcp"] = self
        def data_received(self, data):
            self.buf += data
            while len(self.buf) >= 2:
                n = struct.unpack_from("!H", self.buf)[0]
                if len(self.buf) < 2 + n:
                    break
                self.udp_send(self.buf[2:2 + n])
                self.buf = self.buf[2 + n:]

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, tr):
            self.tr, self.peer = tr, None
        def datagram_received(self, data, addr):
            self.peer = self.peer or addr
            RELAY["tcp"].tr.write(struct.pack("!H", len(data)) + data)

    RELAY = {}

    async def main():
        loop = asyncio.get_running_loop()
        local = ("127.0.0.1", int(sys.argv[2]))
        if mode == "a":  # UDP from the probe -> TCP to relay b
            udp_tr, udp = await loop.create_datagram_endpoint(Udp, local_addr=local)
            back = lambda d: udp_tr.sendto(d, udp.peer)
            await loop.create_connection(lambda: Tcp(back), sys.argv[3], int(sys.argv[4]))
        else:  # TCP from relay a -> UDP to the echo server
            echo = ("127.0.0.1", int(sys.argv[3]))
            udp_tr, udp = await loop.create_datagram_endpoint(Udp, remote_addr=echo)
            await loop.create_server(lambda: Tcp(udp_tr.sendto), "0.0.0.0", int(sys.argv[2]))
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def ns_exec(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def probe(ns: str, port: int, count: int, interval: float, host: str) -> list[float]:
    out = subprocess.run(
        ns_exec(ns, sys.executable, "-c", PROBE, host, str(port), str(count), str(interval)),
        check=True,
        capture_output=True,
        text=True,
        timeout=count * (interval + 1) + 30,
    ).stdout
    return [float(x) for x in out.split()]


def stats(rtts: list[float]) -> dict[str, float]:
    rtts = sorted(rtts)
    return {
        "n": len(rtts),
        "median_ms": statistics.median(rtts),
        "p99_ms": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))],
    }


def measure_floor(count: int = 300, interval: float = 0.01) -> dict[str, dict[str, float]]:
    """RTT figures of the direct echo and of both relay pairs, each with ``added_ms`` (its
    median minus the direct one). Needs root and socat; cleans up what it made."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"hopa{tag}", f"hopb{tag}"
    procs: list[subprocess.Popen[bytes]] = []
    res: dict[str, dict[str, float]] = {}

    def start(ns: str, *argv: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            ns_exec(ns, *argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(p)
        return p

    def stop(p: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass

    def wait_ready(p: subprocess.Popen[bytes]) -> None:
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"

    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"ha{tag}", "netns", a, "type", "veth", "peer", "name",
           f"hb{tag}", "netns", b)  # fmt: skip
        for ns, dev, addr in ((a, f"ha{tag}", A_ADDR), (b, f"hb{tag}", B_ADDR)):
            sh(*ns_exec(ns, "ip", "link", "set", "lo", "up"))
            sh(*ns_exec(ns, "ip", "addr", "add", f"{addr}/30", "dev", dev))
            sh(*ns_exec(ns, "ip", "link", "set", dev, "up"))
        start(b, sys.executable, "-c", ECHO)
        time.sleep(0.5)
        res["direct"] = stats(probe(a, ECHO_PORT, count, interval, B_ADDR))

        relays = [
            start(
                b,
                "socat",
                f"TCP-LISTEN:{RELAY_TCP_PORT},reuseaddr,nodelay",
                f"UDP:127.0.0.1:{ECHO_PORT}",
            ),  # fmt: skip
        ]
        time.sleep(0.3)
        relays.append(
            start(
                a,
                "socat",
                f"UDP-LISTEN:{RELAY_UDP_PORT},bind=127.0.0.1",
                f"TCP:{B_ADDR}:{RELAY_TCP_PORT},nodelay",
            )  # fmt: skip
        )
        time.sleep(0.3)
        res["socat"] = stats(probe(a, RELAY_UDP_PORT, count, interval, "127.0.0.1"))
        for p in relays:
            stop(p)

        pb = start(b, sys.executable, "-c", PY_RELAY, "b", str(RELAY_TCP_PORT), str(ECHO_PORT))
        wait_ready(pb)
        pa = start(a, sys.executable, "-c", PY_RELAY, "a", str(RELAY_UDP_PORT), B_ADDR,
                   str(RELAY_TCP_PORT))  # fmt: skip
        wait_ready(pa)
        res["asyncio"] = stats(probe(a, RELAY_UDP_PORT, count, interval, "127.0.0.1"))
    finally:
        for p in procs:
            stop(p)
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for key in ("socat", "asyncio"):
        if key in res:
            res[key]["added_ms"] = res[key]["median_ms"] - res["direct"]["median_ms"]
    return res


LABELS = {
    "direct": "direct UDP echo",
    "socat": "via socat relays (C)",
    "asyncio": "via minimal asyncio relays",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between probes")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("hop_floor: needs root (network namespaces)", file=sys.stderr)
        return 2
    if shutil.which("socat") is None:
        print("hop_floor: socat is not installed (apt-get install socat)", file=sys.stderr)
        return 2
    n, iv = args.count, args.interval
    print(f"{os.cpu_count()} CPUs, kernel {os.uname().release}; {n} probes every {iv}s")
    for key, r in measure_floor(n, iv).items():
        extra = f"  (+{r['added_ms']:.3f} ms over direct)" if "added_ms" in r else ""
        print(
            f"{LABELS[key]:30s} median {r['median_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms"
            f"  n={r['n']:.0f}{extra}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
