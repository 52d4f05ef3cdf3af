"""End to end: tcpencap behind Debian's HAProxy on a port 443 shared with a web site.

HAProxy (TCP mode, configs/examples/gateway-behind-haproxy/haproxy.cfg) on the gateway's
443 sends connections that start with ``IKETCP`` to
tcpencap's plain listener, TLS with tcpencap's SNI to its TLS listener, and any other TLS
to a web server; both VPN routes carry a PROXY v2 header, which tcpencap takes only from
``proxy_protocol_from`` (here 127.0.0.1), so charon sees the clients' real addresses.
Needs root, strongSwan, haproxy and curl; fails (never skips) without them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tcpencap.wire import proxy_v2
from tests.labkit import Lab, default_name, tcpencap_conf
from tests.labkit.e2e import assert_established, assert_pings, ike_sa, load_tunnel, run_hostile
from tests.labkit.haproxy import https_get, start_haproxy, start_tls_web
from tests.tls_helpers import make_server_cert

pytestmark = pytest.mark.lab

VPN_SNI = "vpn.lab.test"
EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "examples" / "gateway-behind-haproxy"
WEB_SNI = "www.lab.test"


def _ep(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@pytest.mark.parametrize("family", [4, 6])
def test_web_and_vpn_share_443(family: int) -> None:
    assert shutil.which("haproxy") and shutil.which("curl"), "haproxy and curl are needed"
    with Lab(clients=2) as lab:
        c1, c2, gw = lab.clients[0], lab.clients[1], lab.gw
        vpn_cert = make_server_cert(lab.dir / "tls", dns=VPN_SNI, ips=())
        web_cert = make_server_cert(lab.dir / "web", dns=WEB_SNI, ips=(), tag="web")
        for c in (c1, c2):
            lab.block_udp(c)
        for h in (gw, c1, c2):
            h.start_charon()
        for c in (c1, c2):
            load_tunnel(lab, c, "psk", family)
        gw.start_tcpencap(
            tcpencap_conf(
                gw,
                listen=[_ep(gw.outer(family), 4500), "127.0.0.1:4500"],
                gateway_extra="    tls_listen = 127.0.0.1:4443\n"
                f"    tls_cert = {vpn_cert.cert}\n    tls_key = {vpn_cert.key}\n"
                "    proxy_protocol_from = 127.0.0.1\n",
            )
        )
        start_tls_web(gw, "127.0.0.1", 8443, web_cert.cert, web_cert.key, body="web ok")
        # The shipped example, as an administrator installs it (only the name differs).
        shipped = (EXAMPLE / "haproxy.cfg").read_text()
        assert "req.ssl_sni -i vpn.example.org" in shipped
        start_haproxy(gw, shipped.replace("vpn.example.org", VPN_SNI))
        # c1: plain RFC 9329 to 443; c2: TLS with the VPN's SNI to 443.
        c1.start_tcpencap(tcpencap_conf(c1, connections={default_name(c1, gw): 443}))
        tls = {"remote_port": "443", "tls": "yes", "tls_ca": str(vpn_cert.ca),
               "tls_sni": VPN_SNI}  # fmt: skip
        c2.start_tcpencap(tcpencap_conf(c2, connections={default_name(c2, gw): tls}))
        for c in (c1, c2):
            c.charon.initiate(default_name(c, gw), timeout=10)
            assert_established(c, default_name(c, gw))
            assert_pings(c, gw, count=2)
            # charon on the gateway sees the client's own address, not HAProxy's
            sa = ike_sa(gw, default_name(c, gw))
            assert sa["remote-host"] == c.outer(family), sa
        rows = {
            r["peer"].rsplit(":", 1)[0].strip("[]"): r for r in gw.tcpencap_status()["connections"]
        }
        assert set(rows) == {c1.outer(family), c2.outer(family)}, rows
        assert rows[c1.outer(family)]["tls"] is None
        assert rows[c2.outer(family)]["tls"] == "TLSv1.3"
        # the web site on the same 443, with its own name
        assert https_get(c1, gw.outer(family), 443, sni=WEB_SNI, ca=web_cert.ca) == (200, "web ok")

        # A client that sends a PROXY header itself (to the listener it can reach) is
        # refused, and so is a connection from the proxy's address that sends none.
        spoof = proxy_v2.build(c1.outer4, 40000, gw.outer4, 4500) + b"IKETCP"
        res = run_hostile(c2, gw.outer(family), 4500, {"spoof": spoof}, cap=3.0)
        assert res["spoof"]["how"] in ("eof", "reset") and res["spoof"]["elapsed"] < 1.0, res
        res = run_hostile(gw, "127.0.0.1", 4500, {"bare": b"IKETCP"}, cap=8.0)
        assert res["bare"]["how"] in ("eof", "reset") and res["bare"]["elapsed"] < 1.0, res
        # a proxy that never sends its header is cut at tls_handshake_timeout (5 s)
        res = run_hostile(gw, "127.0.0.1", 4500, {"silent": b""}, cap=8.0)
        assert res["silent"]["how"] in ("eof", "reset"), res
        assert 4.0 <= res["silent"]["elapsed"] <= 7.0, res
        deadline = time.monotonic() + 3
        events: dict[str, int] = {}
        while time.monotonic() < deadline:
            events = gw.tcpencap_status()["events"]
            if events.get("proxy-timeout"):
                break
            time.sleep(0.1)
        assert events.get("proxy-unexpected") == 1, events
        assert events.get("proxy-missing") == 1, events
        assert events.get("proxy-timeout") == 1, events
        log = gw.tcpencap.log_text()
        assert "not in proxy_protocol_from" in log and "no PROXY protocol v2 header" in log
        # the tunnels are untouched by all this
        for c in (c1, c2):
            assert_pings(c, gw, count=2)
        assert len(gw.tcpencap_status()["connections"]) == 2
