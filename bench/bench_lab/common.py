"""What every job of the lab benchmark shares: the lab's names and ports, the phases,
and the progress line (elapsed time since the run started)."""

from __future__ import annotations

import ipaddress
import time

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


def progress(msg: str) -> None:
    """One progress line with the elapsed time, so a slow step is visible as it happens."""
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)
