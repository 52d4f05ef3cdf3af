"""Packet captures in a lab namespace: tcpdump writes a pcap, scapy reads it back."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .process import LabError, Process

if TYPE_CHECKING:
    from .topology import Host


def start_capture(host: Host, iface: str | None = None, timeout: float = 5.0) -> Capture:
    """Start tcpdump on ``host``'s veth (or ``iface``) and wait until it listens."""
    iface = iface or host.veth
    if iface is None:
        raise LabError(f"capture on {host.role}: name an interface")
    stamp = f"{time.monotonic_ns()}"
    pcap = host.dir / f"cap-{iface}-{stamp}.pcap"
    argv = ["tcpdump", "-Z", "root", "-U", "--immediate-mode", "-n", "-i", iface, "-w", str(pcap)]
    proc = host.spawn(argv, f"tcpdump-{iface}-{stamp}.log")
    proc.wait_for_log("listening on", timeout)
    return Capture(proc, pcap)


class Capture:
    """A running tcpdump writing a pcap file."""

    def __init__(self, process: Process, pcap: Path) -> None:
        self.process = process
        self.pcap = pcap
        self.packets: list[Any] | None = None

    def stop(self) -> list[Any]:
        """Stop tcpdump (flushing the file) and return the packets parsed by scapy."""
        if self.packets is None:
            # scapy takes most of a second to import: only the tests that read a capture pay
            import scapy.layers.inet6  # noqa: F401  (binds IPv6 to Ethernet for rdpcap)
            from scapy.utils import rdpcap

            if self.process.alive():
                time.sleep(0.05)  # let packets just sent reach tcpdump
                self.process.popen.send_signal(signal.SIGINT)
                try:
                    self.process.popen.wait(3)
                except subprocess.TimeoutExpired:
                    self.process.stop()
            self.packets = list(rdpcap(str(self.pcap))) if self.pcap.exists() else []
        return self.packets

    def count_udp_ike(self) -> int:
        """Packets with UDP source or destination port 500 or 4500 (IKE and ESP-in-UDP)."""
        from scapy.layers.inet import UDP

        return sum(
            1 for p in self.stop() if UDP in p and ({p[UDP].sport, p[UDP].dport} & {500, 4500})
        )

    def count_tcp(self, port: int) -> int:
        """TCP packets with source or destination ``port``."""
        from scapy.layers.inet import TCP

        return sum(1 for p in self.stop() if TCP in p and port in (p[TCP].sport, p[TCP].dport))
