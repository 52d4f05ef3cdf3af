"""End to end: RFC 9329 over TLS 1.3 (Appendix A) between two strongSwan peers.

The gateway has a TLS listener on 443 with a certificate from a test CA; the client has
``tls = yes`` with that CA (or a pinned fingerprint) and an SNI name. A capture on the
client's link is decoded by tshark: a TLS 1.3 handshake, then only application data, and
never the IKETCP prefix or a UDP 500/4500 packet in the clear. Needs root, strongSwan,
tcpdump, tshark and openssl; fails (never skips) without them.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.labkit import Host, Lab, default_name, tcpencap_conf
from tests.labkit.e2e import assert_established, assert_pings, load_tunnel, run_hostile
from tests.tls_helpers import ServerCert, make_server_cert

pytestmark = pytest.mark.lab

SNI = "vpn.lab.test"


def _ep(host: Host, family: int, port: int) -> str:
    addr = host.outer(family)
    return f"{addr}:{port}" if family == 4 else f"[{addr}]:{port}"


def start_tls_pair(
    lab: Lab, client: Host, cert: ServerCert, settings: dict[str, str], family: int = 4,
    gateway_extra: str = "", extra: str = "",
) -> None:  # fmt: skip
    """UDP blocked for ``client``; the gateway's TLS listener on 443, the client's
    connection over TLS with ``settings`` (tls_ca, tls_pin, tls_sni)."""
    gw = lab.gw
    lab.block_udp(client)
    for h in (client, gw):
        h.start_charon()
    load_tunnel(lab, client, "psk", family)
    gw.start_tcpencap(
        tcpencap_conf(
            gw,
            extra=extra,
            gateway_extra=f"    tls_listen = {_ep(gw, family, 443)}\n"
            f"    tls_cert = {cert.cert}\n    tls_key = {cert.key}\n{gateway_extra}",
        )
    )
    conn = {"remote_port": "443", "tls": "yes", **settings}
    client.start_tcpencap(
        tcpencap_conf(client, connections={default_name(client, gw): conn}, extra=extra)
    )


def tshark_records(pcap: Path) -> list[dict[str, str]]:
    """Every TLS record of the capture as tshark dissects it (port 443 is TLS to tshark)."""
    assert shutil.which("tshark"), "tshark is needed"
    fields = [
        "frame.number",
        "tls.record.content_type",
        "tls.record.opaque_type",  # TLS 1.3's outer type of encrypted records
        "tls.handshake.type",
        "tls.handshake.extensions.supported_version",
        "tls.handshake.extensions_server_name",
        "tls.record.version",
    ]
    argv = ["tshark", "-r", str(pcap), "-Y", "tls", "-T", "fields", "-E", "separator=|"]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    rows = []
    for line in out.splitlines():
        rows.append(dict(zip(fields, line.split("|"), strict=True)))
    return rows


def assert_tls13_then_application_data(rows: list[dict[str, str]]) -> None:
    """ClientHello (with our SNI) and ServerHello (TLS 1.3) in the clear; after them only
    application data records (TLS 1.3 encrypts the rest of the handshake as such), and
    the ChangeCipherSpec of middlebox compatibility mode."""
    types = [
        t
        for r in rows
        for key in ("tls.record.content_type", "tls.record.opaque_type")
        for t in r[key].split(",")
        if t
    ]
    hs = [t for r in rows for t in r["tls.handshake.type"].split(",") if t]
    assert hs[:2] == ["1", "2"], rows[:4]  # ClientHello, ServerHello
    assert set(hs) == {"1", "2"}, hs  # no other handshake message is visible
    hello = next(r for r in rows if r["tls.handshake.type"].startswith("1"))
    assert hello["tls.handshake.extensions_server_name"] == SNI, hello
    server_hello = next(r for r in rows if r["tls.handshake.type"].startswith("2"))
    assert "0x0304" in server_hello["tls.handshake.extensions.supported_version"], server_hello
    assert types.count("22") == 2, types  # the two hellos
    assert set(types) <= {"20", "22", "23"}, set(types)
    assert types.count("23") >= 20, types  # IKE and the pings' ESP


@pytest.mark.parametrize("family", [4, 6])
def test_tunnel_over_tls_and_its_capture(family: int) -> None:
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        cert = make_server_cert(lab.dir / "tls", dns=SNI, ips=(gw.outer4, gw.outer6))
        start_tls_pair(lab, c1, cert, {"tls_ca": str(cert.ca), "tls_sni": SNI}, family)
        cap = lab.capture(c1)
        c1.charon.initiate(default_name(c1, gw), timeout=10)
        assert_established(c1, default_name(c1, gw))
        assert_pings(c1, gw)
        cap.stop()
        assert cap.count_udp_ike() == 0
        assert cap.count_tcp(443) > 20
        assert b"IKETCP" not in cap.pcap.read_bytes()  # the prefix travels inside TLS
        rows = tshark_records(cap.pcap)
        assert_tls13_then_application_data(rows)
        for h in (c1, gw):
            st = h.tcpencap_status()
            conns = st["connections"]
            assert len(conns) == 1 and conns[0]["state"] == "open", conns
            assert conns[0]["tls"] == "TLSv1.3", conns
        assert "TLS up (TLSv1.3" in gw.tcpencap.log_text()


def test_pinned_certificate_and_refusals() -> None:
    """tls_pin alone is enough; a wrong pin, a wrong CA and a stalled handshake are each
    counted and logged, and nothing is left open."""
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        cert = make_server_cert(lab.dir / "tls", dns=SNI, ips=(gw.outer4,))
        other = make_server_cert(lab.dir / "other", dns=SNI, ips=(gw.outer4,), tag="other")
        name = default_name(c1, gw)
        pin = ":".join(f"{b:02X}" for b in hashlib.sha256(cert.der).digest())
        start_tls_pair(
            lab, c1, cert, {"tls_pin": f"sha256:{pin}"}, gateway_extra="",
            extra="  tls_handshake_timeout = 1s",
        )  # fmt: skip
        c1.charon.initiate(name, timeout=10)
        assert_established(c1, name)
        assert_pings(c1, gw, count=2)

        # A client that trusts another CA refuses the gateway: counted on both sides.
        c1.charon.terminate(name)
        conf = tcpencap_conf(
            c1,
            connections={name: {"remote_port": "443", "tls": "yes", "tls_ca": str(other.ca),
                                "tls_sni": SNI}},
            extra="  tls_handshake_timeout = 1s",
        )  # fmt: skip
        c1.tcpencap.stop()
        c1.start_tcpencap(conf)
        with pytest.raises(Exception):  # noqa: B017 - any initiate failure
            c1.charon.initiate(name, timeout=4)
        events = c1.tcpencap_status()["events"]
        assert events.get("tls-verify", 0) >= 1, events
        assert "TLS certificate refused" in c1.tcpencap.log_text()
        gw_events = gw.tcpencap_status()["events"]
        assert gw_events.get("tls-handshake", 0) >= 1, gw_events

        # A stalled handshake (half a ClientHello) and garbage after a TLS record header.
        cases = {"stalled": b"\x16\x03\x01\x02\x00\x01", "garbage": b"\x16\x03\x01\x00\x04junk"}
        res = run_hostile(c1, gw.outer4, 443, cases, cap=5.0)
        assert res["stalled"]["how"] in ("eof", "reset"), res
        assert 0.8 <= res["stalled"]["elapsed"] <= 3.0, res
        assert res["garbage"]["how"] in ("eof", "reset") and res["garbage"]["elapsed"] < 1.0, res
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            gw_events = gw.tcpencap_status()["events"]
            if gw_events.get("tls-handshake-timeout", 0) >= 1:
                break
            time.sleep(0.1)
        assert gw_events.get("tls-handshake-timeout", 0) >= 1, gw_events
        assert gw_events.get("tls-handshake", 0) >= 2, gw_events
        assert gw.tcpencap_status()["connections"] == []


def test_reload_reads_the_new_certificate() -> None:
    """A reload re-reads tls_cert and tls_key: new handshakes show the new certificate."""
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        cert = make_server_cert(lab.dir / "tls", dns=SNI, ips=(gw.outer4,))
        start_tls_pair(lab, c1, cert, {"tls_ca": str(cert.ca), "tls_sni": SNI})
        before = _served_fingerprint(c1, gw.outer4)
        fresh = make_server_cert(lab.dir / "fresh", dns=SNI, ips=(gw.outer4,), tag="fresh")
        shutil.copyfile(fresh.cert, cert.cert)
        shutil.copyfile(fresh.key, cert.key)
        gw.run("env", f"PYTHONPATH={Path(__file__).resolve().parents[2]}",
               sys.executable, "-m", "tcpencap", "reload", "--config",
               str(gw.dir / "tcpencap.conf"))  # fmt: skip
        after = _served_fingerprint(c1, gw.outer4)
        assert before != after
        assert after == hashlib.sha256(fresh.der).hexdigest()


def _served_fingerprint(host: Host, addr: str) -> str:
    """SHA-256 of the certificate the TLS listener on ``addr``:443 presents."""
    script = (
        "import hashlib, socket, ssl, sys\n"
        "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n"
        "ctx.check_hostname = False\nctx.verify_mode = ssl.CERT_NONE\n"
        "s = ctx.wrap_socket(socket.create_connection((sys.argv[1], 443), 5),"
        " server_hostname='vpn.lab.test')\n"
        "print(hashlib.sha256(s.getpeercert(True)).hexdigest())\n"
    )
    return host.run(sys.executable, "-c", script, addr).stdout.strip()
