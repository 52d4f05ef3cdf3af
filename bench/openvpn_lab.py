"""OpenVPN over TCP between the lab's c1 and gw: the peer a user would pick instead of
strongSwan plus tcpencap when UDP is blocked. Used by bench_lab's ``openvpn`` phase.

Debian's openvpn 2.6 in TLS mode, point to point (``--ifconfig``, no ``--server``), data
channel AES-256-GCM, ``--proto tcp-server`` on gw's outer address and ``tcp-client`` on c1,
through fw (which still drops every UDP packet of c1). Certificates come from the lab PKI
(tests/labkit/pki.py, ECDSA P-256). Its end-entity certificates have no keyUsage extension,
which ``--remote-cert-tls`` insists on, so each end checks the other's name with
``--verify-x509-name`` instead (the CA signature is checked either way).

The tunnel carries a host route to the peer's inner address (``--route``), so iperf3 and
ping use the same commands and addresses as in the IPsec phases (c1.inner4 to gw.inner4);
the caller must have taken the IPsec CHILD_SA down first, or its routes win. Data channel
offload (DCO) is disabled: this kernel has none, and the comparison is between user-space
data paths.
"""

from __future__ import annotations

import ipaddress
import re
import time
from typing import Any

from tests.labkit import Host, Lab, LabError, Process, ike_id, make_ca, make_cert, ping

PORT = 1194  # TCP; fw only drops UDP
DEV = "ovpn0"
# Tunnel-internal point-to-point addresses, inside the lab's 198.18.0.0/15 (hop_floor.py's
# 198.18.250.0/30 lives in namespaces of its own).
TUN_ADDR = {"c1": "198.18.240.1", "gw": "198.18.240.2"}
LAB_NET = ipaddress.ip_network("198.18.0.0/15")
UP_LINE = "Initialization Sequence Completed"


def argv(host: Host, peer: Host, ca: Any, cert: Any, *, server: bool, nodelay: bool) -> list[str]:
    """The openvpn command line for ``host`` (gw is the TCP server, c1 the client)."""
    local, remote = TUN_ADDR[host.role], TUN_ADDR[peer.role]
    for addr in (local, remote):
        if ipaddress.ip_address(addr) not in LAB_NET:
            raise LabError(f"OpenVPN tunnel address {addr} is outside {LAB_NET}")
    out = ["openvpn", "--dev", DEV, "--dev-type", "tun", "--disable-dco"]
    out += ["--data-ciphers", "AES-256-GCM", "--data-ciphers-fallback", "AES-256-GCM"]
    out += ["--ca", str(ca.cert_path), "--cert", str(cert.cert_path), "--key", str(cert.key_path)]
    out += ["--verify-x509-name", ike_id(peer), "name"]
    out += ["--ifconfig", local, remote, "--route", peer.inner4 or "", "255.255.255.255"]
    out += ["--verb", "3"]
    if server:
        out += ["--tls-server", "--dh", "none", "--proto", "tcp-server"]
        out += ["--local", host.outer4 or "", "--lport", str(PORT)]
    else:
        out += ["--tls-client", "--proto", "tcp-client", "--nobind"]
        out += ["--remote", peer.outer4 or "", str(PORT), "--connect-retry", "1"]
    if nodelay:
        out.append("--tcp-nodelay")
    return out


class OpenVpnPair:
    """Both openvpn processes of one run; ``start`` returns once a ping crosses."""

    def __init__(self, lab: Lab, nodelay: bool) -> None:
        self.lab = lab
        self.nodelay = nodelay
        self.tag = "nodelay" if nodelay else "default"
        self.procs: dict[str, Process] = {}
        pki_dir = lab.dir / "openvpn-pki"
        self.ca = make_ca(pki_dir, name="tcpencap lab OpenVPN CA")
        hosts = (lab.gw, lab.clients[0])
        self.certs = {h.role: make_cert(self.ca, ike_id(h), pki_dir) for h in hosts}

    def pids(self) -> dict[str, int]:
        return {k: p.pid for k, p in self.procs.items()}

    def start(self, timeout: float = 20) -> dict[str, Any]:
        c1, gw = self.lab.clients[0], self.lab.gw
        log = f"openvpn-{self.tag}.log"
        gw_argv = argv(gw, c1, self.ca, self.certs["gw"], server=True, nodelay=self.nodelay)
        self.procs["openvpn_gw"] = gw.spawn(gw_argv, log)
        self.procs["openvpn_gw"].wait_for_log("Listening for incoming TCP connection", timeout)
        c1_argv = argv(c1, gw, self.ca, self.certs["c1"], server=False, nodelay=self.nodelay)
        self.procs["openvpn_c1"] = c1.spawn(c1_argv, log)
        for proc in self.procs.values():
            proc.wait_for_log(UP_LINE, timeout)
        deadline = time.monotonic() + timeout
        while ping(c1, gw.inner4 or "", src=c1.inner4, count=1, timeout=1)[1] != 1:
            if time.monotonic() > deadline:
                raise LabError(f"no ping through OpenVPN in {timeout}s")
        route = c1.run("ip", "-o", "route", "get", gw.inner4 or "", "from", c1.inner4 or "")
        if f"dev {DEV}" not in route.stdout:
            raise LabError(f"{gw.inner4} is not routed through {DEV}: {route.stdout.strip()}")
        return self.facts(route.stdout.split("\\")[0].strip())

    def facts(self, route: str) -> dict[str, Any]:
        """What each end negotiated, read from its log: the proof of the settings."""
        out: dict[str, Any] = {"route": route, "argv_gw": self.procs["openvpn_gw"].argv}
        for key, proc in self.procs.items():
            text = proc.log_text()
            data = re.findall(r"Data Channel: cipher '([^']+)'", text)
            control = re.findall(r"Control Channel: ([^,]+), cipher ([^,]+)", text)
            out[key] = {
                "data_cipher": data[-1] if data else None,
                "control_channel": ", ".join(control[-1]) if control else None,
                "tcp_nodelay_set": "TCP_NODELAY=1 succeeded" in text,
            }
        return out

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
