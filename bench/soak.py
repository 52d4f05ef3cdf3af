"""Soak run: one RFC 9329 tunnel (c1 <-> gw) under bounded traffic and frequent rekeys.

    python3 -m bench.soak [--minutes 10] [--keep]

Traffic: ping every 50 ms both ways through the tunnel and a 1 Mbit/s iperf3 UDP stream
c1 -> gw. The client's swanctl connection rekeys its IKE SA every 60 s and its CHILD SA
every 30 s (rand_time 0). At the start, every minute and at the end it prints, for both
sides: tcpencap's RSS and open descriptors, the WARNING/ERROR lines logged since the last
report (with their text), ping loss of the minute, rekeys seen, and whether
``tcpencap status`` matches charon's list-sas. Needs root and the lab tools (see
tests/labkit/). Exit status 1 when a tunnel check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.labkit import Host, Lab, default_name, ping, psk_conf, tcpencap_conf

PING_INTERVAL = 0.05
PING_PER_MINUTE = int(60 / PING_INTERVAL)


def rekeying_conf(text: str) -> str:
    """psk_conf text with IKE rekey every 60 s, CHILD every 30 s, no randomisation."""
    text = text.replace(
        "    proposals = default\n",
        "    proposals = default\n    rekey_time = 60s\n    rand_time = 0s\n",
        1,
    )
    return text.replace(
        "        esp_proposals = default\n",
        "        esp_proposals = default\n        rekey_time = 30s\n        rand_time = 0s\n",
        1,
    )


def rss_and_fds(pid: int) -> tuple[int, int]:
    rss = 0
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


def status_matches(host: Host, name: str) -> tuple[bool, str]:
    """tcpencap status has one open connection carrying exactly charon's current IKE SPI and
    only ESP SPIs of its installed CHILD SAs."""
    sas = [sa for e in host.charon.list_sas() for n, sa in e.items() if n == name]
    conns = host.tcpencap_status()["connections"]
    if len(sas) != 1 or len(conns) != 1:
        return False, f"{len(sas)} IKE SAs, {len(conns)} connections"
    sa, conn = sas[0], conns[0]
    children = {s for c in sa.get("child-sas", {}).values() for s in (c["spi-in"], c["spi-out"])}
    ok = (
        conn["state"] == "open"
        and sa["initiator-spi"] in conn["ike_spis"]
        and bool(conn["esp_spis"])
        and set(conn["esp_spis"]) <= children
    )
    return ok, (
        f"IKE {sa['initiator-spi']} (tcpencap {conn['ike_spis']}), "
        f"ESP {sorted(children)} (tcpencap {conn['esp_spis']})"
    )


def log_problems(host: Host, seen: dict[str, int]) -> list[str]:
    """WARNING/ERROR lines of host's tcpencap log not reported before."""
    lines = (host.dir / "tcpencap.log").read_text(errors="replace").splitlines()
    bad = [x for x in lines if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", x)]
    new = bad[seen.get(host.role, 0) :]
    seen[host.role] = len(bad)
    return new


class Soak:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.c1, self.gw = lab.clients[0], lab.gw
        self.name = default_name(self.c1, self.gw)
        self.seen: dict[str, int] = {}
        self.ike_spis: set[str] = set()
        self.child_spis: set[str] = set()
        self.failures: list[str] = []
        self.totals = {"sent": 0, "received": 0}
        self.problems = 0

    def start(self) -> None:
        c1, gw, lab = self.c1, self.gw, self.lab
        lab.block_udp(c1)
        for h in (c1, gw):
            h.start_charon()
        c1.charon.load(rekeying_conf(psk_conf(c1, gw)))
        gw.charon.load(psk_conf(gw, c1))
        gw.start_tcpencap(tcpencap_conf(gw, listen=[f"{gw.outer4}:4500"]), log_level="info")
        c1.start_tcpencap(tcpencap_conf(c1, connections={self.name: 4500}), log_level="info")
        c1.charon.initiate(self.name, timeout=10)

    def note_sas(self) -> None:
        for e in self.c1.charon.list_sas():
            for n, sa in e.items():
                if n == self.name:
                    self.ike_spis.add(sa["initiator-spi"])
                    for c in sa.get("child-sas", {}).values():
                        self.child_spis.add(c["spi-out"])

    def report(self, label: str, loss: tuple[int, int] | None) -> None:
        self.note_sas()
        print(f"== {label} ({time.strftime('%H:%M:%S')})")
        for h in (self.c1, self.gw):
            assert h.tcpencap is not None
            rss, fds = rss_and_fds(h.tcpencap.pid)
            ok, detail = status_matches(h, self.name)
            if not ok:  # a rekey may be under way: ask again once
                time.sleep(2)
                ok, detail = status_matches(h, self.name)
            if not ok:
                self.failures.append(f"{label} {h.role}: status != list-sas: {detail}")
            problems = log_problems(h, self.seen)
            self.problems += len(problems)
            print(
                f"  {h.role}: tcpencap rss {rss / 1048576:.1f} MiB, fds {fds}, "
                f"warnings/errors {len(problems)}, status matches list-sas: {ok} ({detail})"
            )
            for line in problems[:10]:
                print(f"    {line}")
            if len(problems) > 10:
                print(f"    ... {len(problems) - 10} more")
        if loss is not None:
            print(f"  ping loss this minute: {loss[0] - loss[1]}/{loss[0]} (both directions)")
        print(
            f"  rekeys so far: {len(self.ike_spis) - 1} IKE, "
            f"{len(self.child_spis) - 1} CHILD (distinct SPIs seen, list-sas every 5 s)",
            flush=True,
        )

    def minute(self, pool: ThreadPoolExecutor) -> tuple[int, int]:
        c1, gw = self.c1, self.gw
        futs = [
            pool.submit(ping, c1, gw.inner4, c1.inner4, PING_PER_MINUTE, PING_INTERVAL, 65),
            pool.submit(ping, gw, c1.inner4, gw.inner4, PING_PER_MINUTE, PING_INTERVAL, 65),
        ]
        results = [f.result() for f in futs]
        sent, received = sum(r[0] for r in results), sum(r[1] for r in results)
        self.totals["sent"] += sent
        self.totals["received"] += received
        return sent, received


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="keep the lab directory")
    a = ap.parse_args()
    with Lab(clients=1, keep=a.keep) as lab:
        soak = Soak(lab)
        soak.start()
        c1, gw = soak.c1, soak.gw
        gw.spawn(["iperf3", "-s", "-B", gw.inner4], "iperf3-server.log")
        time.sleep(0.5)
        iperf = c1.spawn(
            ["iperf3", "-c", gw.inner4, "-B", c1.inner4, "-u", "-b", "1M"]
            + ["-t", str(a.minutes * 60 + 5), "-J"],
            "iperf3-client.json",
        )
        soak.report("start", None)
        done = threading.Event()

        def poll() -> None:  # catch every rekey (CHILD every 30 s) between reports
            while not done.wait(5.0):
                with contextlib.suppress(Exception):
                    soak.note_sas()

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        with ThreadPoolExecutor(2) as pool:
            for m in range(1, a.minutes + 1):
                loss = soak.minute(pool)
                soak.report(f"minute {m}", loss)
        done.set()
        poller.join()
        iperf.popen.wait(30)
        try:
            end = json.loads(iperf.log_text())["end"]["sum"]
            udp = f"{end['lost_packets']}/{end['packets']} lost ({end['lost_percent']:.2f}%)"
        except (ValueError, KeyError) as exc:
            udp = f"no result ({exc}): {iperf.log_tail(5)}"
        t = soak.totals
        print("== end")
        print(f"  ping: {t['sent'] - t['received']}/{t['sent']} lost in {a.minutes} min")
        print(f"  iperf3 UDP 1 Mbit/s c1 -> gw: {udp}")
        print(f"  warnings/errors logged: {soak.problems}")
        print(f"  status/list-sas mismatches: {len(soak.failures)}")
        for f in soak.failures:
            print(f"    {f}")
        return 1 if soak.failures or t["received"] < t["sent"] * 0.99 else 0


if __name__ == "__main__":
    sys.exit(main())
