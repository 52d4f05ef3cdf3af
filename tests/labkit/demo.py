"""The demo: two unmodified strongSwan peers that can only reach each other over TCP.

Builds the lab (client c1 - firewall - gateway, all UDP from c1 dropped in the firewall),
starts charon and tcpencap in both namespaces, brings the IKEv2 SA up over TCP, pings
through the tunnel both ways, prints ``tcpencap status`` of both sides and what a capture
on the client's link saw, and tears everything down.

Usage: ``bash scripts/demo.sh [--ipv6] [--port 4500] [--keep]`` (as root), which runs
``.venv/bin/python -m tests.labkit.demo`` from the checkout. Test-side: not installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from tcpencap.cli import _fmt_status

from . import Lab, LabError, ping, psk_conf, tcpencap_conf


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="demo.sh", description=__doc__.splitlines()[0])
    ap.add_argument("--ipv6", action="store_true", help="IPv6 outer addresses")
    ap.add_argument("--port", type=int, default=4500, help="TCP port of the gateway")
    ap.add_argument("--keep", action="store_true", help="keep the lab directory (logs)")
    args = ap.parse_args(argv)
    fam = 6 if args.ipv6 else 4
    try:
        return _run(fam, args.port, args.keep)
    except (LabError, subprocess.SubprocessError, OSError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


def _run(fam: int, port: int, keep: bool) -> int:
    step("building the lab: namespaces c1 - fw - gw joined by veth")
    with Lab(clients=1, keep=keep) as lab:
        c1, gw = lab.clients[0], lab.gw
        print(f"    client c1 {c1.outer(fam)}, gateway {gw.outer(fam)}, prefix {lab.prefix}")
        step("firewall fw drops every UDP packet of c1: IKE and ESP over UDP cannot work")
        lab.block_udp(c1)
        step("starting charon (kernel-libipsec) in c1 and gw, loading an IKEv2 PSK tunnel")
        for host in (gw, c1):
            host.start_charon()
        gw.charon.load(psk_conf(gw, c1, family=fam))
        c1.charon.load(psk_conf(c1, gw, family=fam))
        gw_listen = gw.outer(fam) if fam == 4 else f"[{gw.outer(fam)}]"
        step(f"starting tcpencap: gateway listens on TCP {gw_listen}:{port}, client uses TCP")
        gw.start_tcpencap(tcpencap_conf(gw, listen=[f"{gw_listen}:{port}"]), log_level="info")
        c1.start_tcpencap(tcpencap_conf(c1, connections={"c1-gw": port}), log_level="info")
        cap = lab.capture(c1)
        step("c1: swanctl --initiate (charon believes it talks UDP 500/4500)")
        t0 = time.monotonic()
        c1.charon.initiate("c1-gw", timeout=15)
        print(f"    IKE_SA and CHILD_SA established in {time.monotonic() - t0:.3f} s")
        step(f"ping {c1.inner(fam)} -> {gw.inner(fam)} through the tunnel")
        sent, got = ping(c1, gw.inner(fam), c1.inner(fam), count=5, interval=0.2)
        print(f"    {got}/{sent} replies")
        step(f"ping {gw.inner(fam)} -> {c1.inner(fam)} through the tunnel")
        sent2, got2 = ping(gw, c1.inner(fam), gw.inner(fam), count=5, interval=0.2)
        print(f"    {got2}/{sent2} replies")
        step("tcpencap status on the client")
        print(_indent(_fmt_status(c1.tcpencap_status())))
        step("tcpencap status on the gateway")
        print(_indent(_fmt_status(gw.tcpencap_status())))
        cap.stop()
        udp, tcp = cap.count_udp_ike(), cap.count_tcp(port)
        step(f"capture on c1's link: {tcp} TCP segments on port {port}, {udp} UDP 500/4500")
        ok = got == sent and got2 == sent2 and udp == 0 and tcp > 0
        step("tearing down" + (f" (logs kept in {lab.dir})" if keep else ""))
    print("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
