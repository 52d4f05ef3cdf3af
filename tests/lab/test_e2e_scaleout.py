"""End to end: two gateways (each with charon and tcpencap) behind one HAProxy.

The balancer (configs/examples/gateway-behind-haproxy/haproxy-balancer.cfg: TCP mode,
PROXY v2, round robin for new clients, stuck by source address)
spreads the clients over both gateways. One gateway is killed; its client's TCP
connection is cut, tcpencap reconnects through the balancer to the other gateway, and
charon's DPD finds the old IKE SA dead and restarts it there. The test measures the time
from the kill to the first ping through the new tunnel. Needs root, strongSwan and
haproxy; fails (never skips) without them.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.labkit import Host, Lab, ping, tcpencap_conf
from tests.labkit.haproxy import start_haproxy
from tests.tls_helpers import make_server_cert

pytestmark = pytest.mark.lab

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "examples" / "gateway-behind-haproxy"
SERVICE = "198.18.250.1"  # the protected address behind both gateways
PSK = "scale-out-secret-0123456789"
# Short retransmits so a dead gateway is noticed in seconds (strongswan.conf, charon { })
FAST_RETRANSMIT = "retransmit_tries = 2\nretransmit_timeout = 1.0\nretransmit_base = 1.4\n"


def client_conf(c: Host, lb: Host) -> str:
    return f"""connections {{
  vpn {{
    version = 2
    local_addrs = {c.outer4}
    remote_addrs = {lb.outer4}
    encap = yes
    mobike = no
    dpd_delay = 1s
    local {{
      auth = psk
      id = {c.role}.lab.test
    }}
    remote {{
      auth = psk
      id = vpn.lab.test
    }}
    children {{
      vpn {{
        local_ts = {c.inner4}/32
        remote_ts = {SERVICE}/32
        dpd_action = restart
      }}
    }}
  }}
}}
secrets {{
  ike-vpn {{
    id-a = {c.role}.lab.test
    id-b = vpn.lab.test
    secret = "{PSK}"
  }}
}}
"""


def gateway_conf(g: Host, clients: list[Host]) -> str:
    """One connection per client; every gateway has the same identity and secrets."""
    out = "connections {\n"
    for c in clients:
        out += f"""  vpn-{c.role} {{
    version = 2
    local_addrs = {g.outer4}
    remote_addrs = {c.outer4}
    encap = yes
    mobike = no
    local {{
      auth = psk
      id = vpn.lab.test
    }}
    remote {{
      auth = psk
      id = {c.role}.lab.test
    }}
    children {{
      vpn-{c.role} {{
        local_ts = {SERVICE}/32
        remote_ts = {c.inner4}/32
      }}
    }}
  }}
"""
    out += "}\nsecrets {\n"
    for c in clients:
        out += f"""  ike-{c.role} {{
    id-a = vpn.lab.test
    id-b = {c.role}.lab.test
    secret = "{PSK}"
  }}
"""
    return out + "}\n"


def serving(gateways: list[Host], c: Host) -> list[Host]:
    """The gateways whose charon has an established IKE SA with ``c``."""
    out = []
    for g in gateways:
        if g.charon is None or not g.charon.process.alive():
            continue
        for entry in g.charon.list_sas():
            for sa in entry.values():
                if sa.get("remote-host") == c.outer4 and sa.get("state") == "ESTABLISHED":
                    out.append(g)
    return out


def wait_ping(c: Host, limit: float) -> float:
    """Seconds until one ping from ``c`` to the service address is answered."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if ping(c, SERVICE, c.inner4, count=1, timeout=1.0)[1] == 1:
            return time.monotonic() - t0
    raise AssertionError(f"{c.role}: no answer from {SERVICE} within {limit}s")


@pytest.mark.parametrize(
    ("failure", "tls"), [("killed", False), ("unplugged", False), ("killed", True)]
)
def test_two_gateways_behind_haproxy_and_failover(failure: str, tls: bool) -> None:
    """``killed``: charon and tcpencap die (the kernel resets their connections);
    ``unplugged``: the gateway's link goes down, nothing is reset, and only the balancer's
    health checks notice (shutdown-sessions then closes the client's connection).
    The gateways listen with TLS listeners (one certificate for the service name on both),
    which take plain RFC 9329 too; ``tls``: the clients speak TLS through the balancer."""
    assert shutil.which("haproxy"), "haproxy is needed"
    with Lab(clients=4) as lab:
        lb = lab.gw
        clients, gateways = lab.clients[:2], lab.clients[2:]
        for c in clients:
            lab.block_udp(c)
        cert = make_server_cert(lab.dir / "tls", dns="vpn.lab.test", ips=())
        port = 443  # the gateways' TLS listeners, which take plain RFC 9329 too
        for g in gateways:
            g.run("ip", "address", "add", f"{SERVICE}/32", "dev", "lo")
            g.start_charon()
            g.charon.load(gateway_conf(g, clients))
            listener = (
                f"    tls_listen = {g.outer4}:{port}\n    tls_cert = {cert.cert}\n"
                f"    tls_key = {cert.key}\n"
            )
            g.start_tcpencap(
                tcpencap_conf(
                    g, gateway_extra=f"{listener}    proxy_protocol_from = {lb.outer4}\n"
                ).replace("    listen = \n", "")
            )
        # The shipped example, with the lab's gateway addresses.
        shipped = (EXAMPLE / "haproxy-balancer.cfg").read_text()
        for i, g in enumerate(gateways, start=1):
            assert f"10.0.0.1{i}:443" in shipped
            shipped = shipped.replace(f"10.0.0.1{i}:443", f"{g.outer4}:{port}")
        start_haproxy(lb, shipped)
        for c in clients:
            c.start_charon(settings=FAST_RETRANSMIT)
            c.charon.load(client_conf(c, lb))
            conn: int | dict[str, str] = 443
            if tls:
                conn = {"remote_port": "443", "tls": "yes", "tls_ca": str(cert.ca),
                        "tls_sni": "vpn.lab.test"}  # fmt: skip
            c.start_tcpencap(tcpencap_conf(c, connections={"vpn": conn}))
        for c in clients:
            c.charon.initiate("vpn", timeout=10)
            assert wait_ping(c, 5) < 5
        # Round robin spread the two clients, one per gateway.
        home = {c.role: serving(gateways, c) for c in clients}
        assert sorted(len(v) for v in home.values()) == [1, 1], home
        assert home["c1"] != home["c2"], home
        for g in gateways:
            rows = g.tcpencap_status()["connections"]
            assert [r["tls"] for r in rows] == ["TLSv1.3" if tls else None], rows
        # Health checks (a LOCAL header, then a reset, every second) are not connections.
        time.sleep(2.2)
        for g in gateways:
            st = g.tcpencap_status()
            assert len(st["connections"]) == 1, st["connections"]
            assert not {k for k in st["events"] if k.startswith("proxy-")}, st["events"]

        # Stickiness: c2's next connection goes back to its gateway, though round robin
        # would pick the other one.
        c2 = clients[1]
        c2.charon.terminate("vpn")
        time.sleep(1.0)  # the client closes its TCP connection 0.5 s after the SA
        c2.charon.initiate("vpn", timeout=10)
        assert serving(gateways, c2) == home["c2"]

        # c1's gateway fails.
        c1 = clients[0]
        dead = home["c1"][0]
        other = next(g for g in gateways if g is not dead)
        t_kill = time.monotonic()
        if failure == "killed":  # charon and tcpencap, by PID
            for proc in (dead.tcpencap, dead.charon.process):
                proc.signal(signal.SIGKILL)
        else:
            lab.fw.run("ip", "link", "set", dead.fw_veth, "down")
        recovery = wait_ping(c1, 60)
        print(f"\nfailover ({failure}): first ping through {other.role} {recovery:.2f}s later")
        assert serving([other], c1) == [other]
        assert wait_ping(c2, 2) < 2  # the other gateway's client kept its tunnel
        # c1's new connection on the surviving gateway carries the client's real address
        # (the reconnect that carried the dead SA's last packets goes once charon drops
        # that SA; only the new SA's connection stays)
        deadline = time.monotonic() + 10
        while True:
            rows = other.tcpencap_status()["connections"]
            peers = sorted(r["peer"].rsplit(":", 1)[0] for r in rows)
            if peers == sorted(c.outer4 for c in clients) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert peers == sorted(c.outer4 for c in clients), rows
        assert recovery < 30, recovery
        assert time.monotonic() - t_kill < 60
