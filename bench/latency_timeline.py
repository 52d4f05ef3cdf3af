"""Where a ping's round trip goes (not a test): captures on both hosts while five inner pings
cross RFC 9329, printing the timestamps of each step (inner packet, TCP segment, injected
UDP) so the share of each hand-off can be read. ``python3 -m bench.latency_timeline``."""

from __future__ import annotations

import time

from tests.labkit import Lab, psk_conf, tcpencap_conf

FILTER = "(tcp port 4500 and greater 100) or icmp or (udp port 4500)"


def main() -> None:
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        lab.block_udp(c1)
        for h in (c1, gw):
            h.start_charon()
        gw.charon.load(psk_conf(gw, c1))
        c1.charon.load(psk_conf(c1, gw))
        gw.start_tcpencap(tcpencap_conf(gw, listen=[f"{gw.outer4}:4500"]), log_level="info")
        c1.start_tcpencap(tcpencap_conf(c1, connections={"c1-gw": 4500}), log_level="info")
        c1.charon.initiate("c1-gw")
        dumps = {}
        for h in (c1, gw):
            argv = ["tcpdump", "-i", "any", "-n", "--immediate-mode", "-tt", "-l", FILTER]
            dumps[h.role] = (h, h.spawn(argv, f"{h.role}-timeline.txt"))
        time.sleep(1.5)
        print(c1.run("ping", "-n", "-c", "5", "-i", "0.3", "-I", c1.inner4, gw.inner4).stdout)
        time.sleep(0.5)
        for role, (h, proc) in dumps.items():
            proc.stop()
            print(f"=== {role}")
            print((h.dir / f"{role}-timeline.txt").read_text())


if __name__ == "__main__":
    main()
