"""The configuration texts: the scale test's swanctl connections on c1 and gw, charon's
settings for the benchmark, and both tcpencap.conf files of a phase."""

from __future__ import annotations

import ipaddress

from bench.bench_lab.common import (
    CONN,
    CTCP_PORT,
    LAB_NET,
    PSK,
    RFC9329_PORT,
    SCALE_ID,
    TLS_PORT,
    TLS_SNI,
)
from tests.labkit import Host, LabError, ike_id, tcpencap_conf
from tests.tls_helpers import make_server_cert


def scale_names(n: int) -> list[str]:
    return [f"scale{i:04d}" for i in range(1, n + 1)]


def check_lab_addrs(*hosts: Host) -> None:
    """The scale SAs run between the hosts' outer IPv4 addresses; refuse to send anything
    if the lab ever hands out an address outside 198.18.0.0/15."""
    for h in hosts:
        for addr in (h.outer4, h.inner4):
            if addr is not None and ipaddress.ip_address(addr) not in LAB_NET:
                raise RuntimeError(f"{h.role} address {addr} is outside {LAB_NET}")


def client_scale_conf(c1: Host, gw: Host, n: int) -> str:
    """N connections on c1: same peers, each its own peer config (so its own IKE SA), no
    children; identity SCALE_ID so gw picks its ``scale`` config.

    Childless (RFC 6023, strongSwan >= 5.9.6 with ``childless = allow`` by default on both
    ends): initiated with ``{"ike": name}`` they create no CHILD_SA, so no SPD entries and no
    kernel-libipsec routes - N CHILD_SAs to the same remote TS fail to install routes in
    this lab ("unable to install IPsec policies (SPD) in kernel"), which is charon's limit,
    not tcpencap's. An IKE SA still costs tcpencap one TCP connection."""
    parts = ["connections {"]
    for name in scale_names(n):
        parts.append(
            f"""  {name} {{
    version = 2
    local_addrs = {c1.outer4}
    remote_addrs = {gw.outer4}
    encap = yes
    mobike = no
    unique = never
    local {{
      auth = psk
      id = {SCALE_ID}
    }}
    remote {{
      auth = psk
      id = {ike_id(gw)}
    }}
  }}"""
        )
    parts.append("}")
    parts.append(scale_secret(gw))
    return "\n".join(parts) + "\n"


def gw_scale_conf(c1: Host, gw: Host) -> str:
    """One responder config for all scale connections: ``unique = never`` keeps every IKE SA
    with the same identities; no children, the initiators ask for none."""
    return f"""connections {{
  scale {{
    version = 2
    local_addrs = {gw.outer4}
    remote_addrs = {c1.outer4}
    encap = yes
    mobike = no
    unique = never
    local {{
      auth = psk
      id = {ike_id(gw)}
    }}
    remote {{
      auth = psk
      id = {SCALE_ID}
    }}
  }}
}}
{scale_secret(gw)}"""


def scale_secret(gw: Host) -> str:
    return f"""secrets {{
  ike-scale {{
    id-a = {SCALE_ID}
    id-b = {ike_id(gw)}
    secret = "{PSK}"
  }}
}}
"""


# Charon's DoS protection counts half-open IKE_SAs per peer IP (block_threshold 5,
# cookie_threshold_ip 3 by default); all scale SAs come from one IP, so lift the limits to
# measure tcpencap rather than charon's cookie/blocking logic.
GW_CHARON_SETTINGS = """  cookie_threshold = 1000000
  cookie_threshold_ip = 1000000
  block_threshold = 1000000
"""


# charon's checkout_by_config reuses an established IKE_SA of an equal peer config (the scale
# configs differ only in name): make every initiate create its own IKE_SA.
C1_CHARON_SETTINGS = "  reuse_ikesa = no\n"


# The lab logs net at level 2: one flushed log line per ESP packet charon sends or receives,
# which costs more CPU than the tunnel itself. Lowered in both phases (sections merge).
QUIET_NET_LOG = """  filelog {
    lab {
      net = 1
    }
  }
"""


def tcpencap_confs(c1: Host, gw: Host, kind: str, datapath: str, max_n: int) -> tuple[str, str]:
    """tcpencap.conf texts for gw and c1: RFC 9329 ("tcp", with the scale connections) or
    cTCP ("ctcp", as tests/lab/test_e2e_ctcp.py sets it up: ``ctcp_listen`` on gw,
    ``encapsulation = ctcp`` on c1's connection); ``datapath = X`` at the top level of
    both unless ``datapath`` is empty."""
    extra = f"  datapath = {datapath}" if datapath else ""
    if kind in ("tcp", "tls"):
        # One client charon opens all N connections from one address at once: lift the
        # per-source and pending limits (internet defaults: 32 and 256) for this bench.
        limit = max(1000, max_n + 100)
        gw_extra = (
            f"    max_connections = {limit}\n    max_per_source = {limit}\n"
            f"    max_pending = {limit}"
        )
        listen = [f"{gw.outer4}:{RFC9329_PORT}"]
        conn: int | dict[str, str] = RFC9329_PORT
        if kind == "tls":  # the same, over TLS 1.3 on 443 (RFC 9329 Appendix A)
            cert = make_server_cert(gw.lab.dir / "tls", dns=TLS_SNI, ips=(gw.outer4,))
            listen = []
            gw_extra += (
                f"\n    tls_listen = {gw.outer4}:{TLS_PORT}\n"
                f"    tls_cert = {cert.cert}\n    tls_key = {cert.key}"
            )
            conn = {"remote_port": str(TLS_PORT), "tls": "yes", "tls_ca": str(cert.ca),
                    "tls_sni": TLS_SNI}  # fmt: skip
        gw_conf = tcpencap_conf(gw, listen=listen, gateway_extra=gw_extra, extra=extra)
        conns = {CONN: conn} | dict.fromkeys(scale_names(max_n), conn)
        return gw_conf, tcpencap_conf(c1, connections=conns, extra=extra)
    gw_extra = f"    ctcp_listen = {gw.outer4}:{CTCP_PORT}"
    gw_conf = tcpencap_conf(gw, gateway_extra=gw_extra, extra=extra)
    c1_conf = tcpencap_conf(c1, connections={CONN: CTCP_PORT}, extra=extra)
    port_line = f"      remote_port = {CTCP_PORT}\n"
    if port_line not in c1_conf:
        raise LabError(f"unexpected tcpencap_conf layout:\n{c1_conf}")
    return gw_conf, c1_conf.replace(port_line, port_line + "      encapsulation = ctcp\n")
