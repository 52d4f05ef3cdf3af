"""Operations, end to end: ``tcpencap status --json`` and the Prometheus endpoint against
charon's own view (VICI list-sas), reload by control command and by SIGHUP, the shipped
example configurations in configs/examples, and the systemd unit.

Each lab test builds its own Lab. The example tests load the shipped files with their
documentation addresses replaced by lab addresses (plain string replacement) and the
certificates they name generated with lab.make_ca/make_cert.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.labkit import (
    REPO_ROOT,
    Host,
    Lab,
    default_name,
    make_ca,
    make_cert,
    tcpencap_conf,
    unanswered,
)
from tests.labkit.e2e import (
    assert_established,
    assert_pings,
    assert_status_matches_sa,
    ike_sa,
    listen_addr,
    load_tunnel,
    start_tcp_pair,
)

EXAMPLES = REPO_ROOT / "configs" / "examples"
UNIT = REPO_ROOT / "configs" / "tcpencap.service"
METRICS = "127.0.0.1:9555"


def tcpencap_cli(host: Host, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m tcpencap ARGS`` from this checkout inside ``host``'s namespace."""
    return host.run(
        "env", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-m", "tcpencap", *args, check=check
    )


def scrape(host: Host, endpoint: str = METRICS) -> dict[tuple[str, tuple[Any, ...]], float]:
    """GET /metrics inside the namespace; samples keyed by (name, sorted labels)."""
    code = (
        "import urllib.request;"
        f"r=urllib.request.urlopen('http://{endpoint}/metrics',timeout=5);"
        "print(r.headers['Content-Type']);print(r.read().decode(),end='')"
    )
    out = host.run(sys.executable, "-c", code).stdout
    ctype, _, body = out.partition("\n")
    assert ctype.startswith("text/plain; version=0.0.4"), ctype
    samples: dict[tuple[str, tuple[Any, ...]], float] = {}
    for line in body.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, f"bad sample line {line!r}"
        labels = tuple(sorted(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def metric_sum(samples: dict[tuple[str, tuple[Any, ...]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def peer_host(peer: str) -> str:
    """``198.18.1.2:40000`` or ``[fd00:1::2]:40000`` -> the address."""
    return peer.rsplit(":", 1)[0].strip("[]")


def child_spis(sa: dict[str, Any]) -> set[str]:
    return {s for c in sa.get("child-sas", {}).values() for s in (c["spi-in"], c["spi-out"])}


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# --- status, metrics and VICI agree ----------------------------------------------------------


@pytest.mark.lab
def test_status_and_metrics_agree_with_vici() -> None:
    with Lab(clients=2) as lab:
        gw = lab.gw
        c1, c2 = lab.clients
        extra = f"  metrics_listen = {METRICS}"
        gw.start_charon()
        for c in (c1, c2):
            lab.block_udp(c)
            c.start_charon()
            load_tunnel(lab, c, "psk", 4)
        gw.start_tcpencap(tcpencap_conf(gw, listen=[listen_addr(gw, 4, 4500)], extra=extra))
        for c in (c1, c2):
            c.start_tcpencap(tcpencap_conf(c, connections={default_name(c, gw): 4500}, extra=extra))
        cap = lab.capture(c1)
        for c in (c1, c2):
            c.charon.initiate(default_name(c, gw))  # type: ignore[union-attr]
        # Clients: one connection each, carrying exactly their SA's SPIs.
        for c in (c1, c2):
            assert_established(c, default_name(c, gw))
            assert_status_matches_sa(c, default_name(c, gw))
        # Gateway: as many connections as IKE SAs, matched by peer address.
        gw_sas = {n: sa for e in gw.charon.list_sas() for n, sa in e.items()}  # type: ignore[union-attr]
        st = gw.tcpencap_status()
        assert st["vici"] == "connected", st
        conns = st["connections"]
        assert len(conns) == len(gw_sas) == 2, (conns, gw_sas)
        for c in (c1, c2):
            sa = gw_sas[default_name(c, gw)]
            (row,) = [r for r in conns if peer_host(r["peer"]) == c.outer4]
            assert row["side"] == "gateway" and row["state"] == "open", row
            assert row["ike_spis"] == [sa["initiator-spi"]], (row, sa)
            assert row["esp_spis"] and set(row["esp_spis"]) <= child_spis(sa), (row, sa)
            # charon sees the TCP source port as the NAT-T port of its peer
            assert sa["remote-port"] == row["peer"].rsplit(":", 1)[1], (row, sa)
        # The client's connection id matches, seen from both ends, by port.
        c1_row = c1.tcpencap_status()["connections"][0]
        (gw_row,) = [r for r in conns if peer_host(r["peer"]) == c1.outer4]
        assert c1_row["local"] == gw_row["peer"] and c1_row["peer"] == gw_row["local"]

        for host in (gw, c1, c2):
            m0 = scrape(host)
            n = len(host.tcpencap_status()["connections"])
            assert metric_sum(m0, "tcpencap_connections") == n, (host.role, m0)
            assert m0[("tcpencap_vici_connected", ())] == 1, host.role
            assert m0[("tcpencap_frames_in_total", ())] > 0, host.role
        gw_before = scrape(gw)
        c1_before = scrape(c1)
        assert_pings(c1, gw, count=5)
        assert_pings(c2, gw, count=5)
        gw_after = scrape(gw)
        c1_after = scrape(c1)
        # 5 pings x 2 inner families x 2 directions, each direction one frame in per echo
        # or reply, for each of 2 clients on the gateway
        grew = (
            gw_after[("tcpencap_frames_in_total", ())] - gw_before[("tcpencap_frames_in_total", ())]
        )
        assert grew >= 2 * 2 * 2 * 5, (gw_before, gw_after)
        grew = (
            c1_after[("tcpencap_frames_in_total", ())] - c1_before[("tcpencap_frames_in_total", ())]
        )
        assert grew >= 2 * 2 * 5, (c1_before, c1_after)
        assert (
            gw_after[("tcpencap_bytes_out_total", ())] > gw_before[("tcpencap_bytes_out_total", ())]
        )
        # no connection closed: the counter is the sum of the rows (read later, so >=)
        st2 = gw.tcpencap_status()
        live = sum(r["frames_in"] for r in st2["connections"])
        assert live >= gw_after[("tcpencap_frames_in_total", ())], (st2, gw_after)
        assert cap.count_udp_ike() == 0, "IKE or ESP-in-UDP crossed c1's link"


# --- reload --------------------------------------------------------------------------------


def gw_row_for(gw: Host, client: Host) -> dict[str, Any]:
    rows = [r for r in gw.tcpencap_status()["connections"] if peer_host(r["peer"]) == client.outer4]
    assert len(rows) == 1, rows
    return rows[0]


def connect_result(host: Host, addr: str, port: int) -> str:
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({addr!r},{port}),timeout=3).close();print('connected')\n"
        "except ConnectionRefusedError:\n    print('refused')\n"
        "except OSError as e:\n    print('error', e)\n"
    )
    return host.run(sys.executable, "-c", code).stdout.strip()


@pytest.mark.lab
def test_reload_adds_and_removes_listeners_and_keeps_connections() -> None:
    with Lab(clients=2) as lab:
        gw = lab.gw
        c1, c2 = lab.clients
        start_tcp_pair(lab, c1, port=4500)
        conf = gw.dir / "tcpencap.conf"
        c1.charon.initiate(default_name(c1, gw))  # type: ignore[union-attr]
        assert_established(c1, default_name(c1, gw))
        first = gw_row_for(gw, c1)
        assert first["local"] == f"{gw.outer4}:4500", first
        assert gw.tcpencap_status()["listening"] == [f"{gw.outer4}:4500"]
        assert connect_result(c2, gw.outer4, 443) == "refused"

        # 1. add 443 with `tcpencap reload`
        both = tcpencap_conf(gw, listen=[listen_addr(gw, 4, 4500), listen_addr(gw, 4, 443)])
        conf.write_text(both)
        res = tcpencap_cli(gw, "reload", "--config", str(conf))
        assert res.returncode == 0, res.stderr
        assert f"listening on {gw.outer4}:443" in res.stdout, res.stdout
        lab.block_udp(c2)
        c2.start_charon()
        load_tunnel(lab, c2, "psk", 4)
        c2.start_tcpencap(tcpencap_conf(c2, connections={default_name(c2, gw): 443}))
        c2.charon.initiate(default_name(c2, gw))  # type: ignore[union-attr]
        assert_established(c2, default_name(c2, gw))
        c2_row = gw_row_for(gw, c2)
        assert c2_row["local"] == f"{gw.outer4}:443", c2_row
        now = gw_row_for(gw, c1)
        assert (now["id"], now["peer"], now["local"]) == (
            first["id"],
            first["peer"],
            first["local"],
        ), (first, now)
        assert_pings(c1, gw, count=5)
        assert_pings(c2, gw, count=5)

        # 2. bad edits are refused with file:line and exit 2; the daemon runs on unchanged.
        # (Failures here are collected and reported at the end, so that the rest of the
        # reload behaviour is still exercised.)
        problems: list[str] = []
        for what, bad in (
            ("bad value", both.replace("listen = ", "listen = nowhere:99999, ", 1)),
            ("syntax error", both.replace("gateway {", "gateway {{", 1)),
        ):
            conf.write_text(bad)
            res = tcpencap_cli(gw, "reload", "--config", str(conf))
            m = re.search(rf"{re.escape(str(conf))}:(\d+):", res.stderr)
            if res.returncode != 2 or not m or int(m.group(1)) == 0 or "Traceback" in res.stderr:
                problems.append(f"{what}: exit {res.returncode}, stderr {res.stderr[-400:]!r}")
        assert gw.tcpencap.alive()  # type: ignore[union-attr]
        # the same bad file by SIGHUP reaches the daemon itself: refused, still running
        gw.tcpencap.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        gw.tcpencap.wait_for_log("reload refused", timeout=5)  # type: ignore[union-attr]
        assert gw.tcpencap.alive()  # type: ignore[union-attr]
        # (status without --config: the file named there is broken now)
        st = json.loads(
            tcpencap_cli(gw, "status", "--json", "--socket", str(gw.dir / "tcpencap.ctl")).stdout
        )
        assert st["listening"] == [f"{gw.outer4}:4500", f"{gw.outer4}:443"], st["listening"]
        assert len(st["connections"]) == 2, st["connections"]

        # 3. remove 443 by SIGHUP: no new connections there, c2's connection stays
        conf.write_text(tcpencap_conf(gw, listen=[listen_addr(gw, 4, 4500)]))
        gw.tcpencap.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        gw.tcpencap.wait_for_log(  # type: ignore[union-attr]
            f"stopped listening on {gw.outer4}:443", timeout=5
        )
        assert connect_result(c2, gw.outer4, 443) == "refused"
        assert gw.tcpencap_status()["listening"] == [f"{gw.outer4}:4500"]
        assert gw_row_for(gw, c2)["id"] == c2_row["id"]
        assert gw_row_for(gw, c1)["id"] == first["id"]
        assert_pings(c2, gw, count=5)
        assert_pings(c1, gw, count=5)
        assert gw.tcpencap.alive()  # type: ignore[union-attr]
        assert not problems, "tcpencap reload with a bad file:\n" + "\n".join(problems)


# --- the shipped examples ------------------------------------------------------------------


def example(name: str, file: str) -> str:
    return (EXAMPLES / name / file).read_text()


def substitute(text: str, gw: Host) -> str:
    """Documentation addresses -> lab addresses (most specific first)."""
    for doc, lab_addr in (
        ("2001:db8:1::/64", f"{gw.inner6}/128"),
        ("2001:db8:2::/112", "fd00:250::/112"),
        ("2001:db8::1", gw.outer(6)),
        ("198.51.100.0/24", f"{gw.inner4}/32"),
        ("203.0.113.128/25", "198.18.250.0/24"),
        ("203.0.113.0/25", "198.18.250.0/24"),
        ("192.0.2.1", gw.outer(4)),
    ):
        text = text.replace(doc, lab_addr)
    assert not re.search(r"192\.0\.2\.|198\.51\.100\.|203\.0\.113\.|2001:db8", text), text
    return text


def lab_tcpencap(host: Host, text: str) -> str:
    """The shipped tcpencap.conf with this host's VICI and control sockets."""
    assert host.charon is not None
    head = (
        f"tcpencap {{\n  vici_socket = {host.charon.uri}\n"
        f"  status_socket = {host.dir}/tcpencap.ctl\n"
    )
    out, n = re.subn(r"^tcpencap \{\n", head, text, count=1, flags=re.M)
    assert n == 1
    return out


def install_cert(host: Host, ca: Any, identity: str, stem: str, pki: Path) -> None:
    """CA into x509ca/, the certificate and key under the names swanctl.conf uses."""
    assert host.charon is not None
    d = host.charon.swanctl_dir
    shutil.copyfile(ca.cert_path, d / "x509ca" / "strongswanCert.pem")
    cert = make_cert(ca, identity, pki)
    shutil.copyfile(cert.cert_path, d / "x509" / f"{stem}Cert.pem")
    shutil.copyfile(cert.key_path, d / "private" / f"{stem}Key.pem")


def check_config_online(host: Host, names: list[str]) -> None:
    res = tcpencap_cli(host, "check-config", "--config", str(host.dir / "tcpencap.conf"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "NOT loaded" not in res.stdout, res.stdout
    for name in names:
        assert re.search(rf"^connection {name}: ", res.stdout, re.M), res.stdout
    assert "connection(s) loaded" in res.stdout or not names, res.stdout


def sa_named(host: Host, name: str) -> dict[str, Any] | None:
    sas = [sa for e in host.charon.list_sas() for n, sa in e.items() if n == name]  # type: ignore[union-attr]
    return sas[0] if sas else None


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_examples_check_config_offline(name: str) -> None:
    path = EXAMPLES / name / "tcpencap.conf"
    res = subprocess.run(
        [sys.executable, "-m", "tcpencap", "check-config", "--offline", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{path}: syntax and values OK" in res.stdout
    for conf in ("swanctl.conf", "tcpencap.conf"):
        text = (EXAMPLES / name / conf).read_text()
        assert text.lstrip().startswith("#"), f"{name}/{conf} starts without a comment"
    swanctl = (EXAMPLES / name / "swanctl.conf").read_text()
    active = "\n".join(ln for ln in swanctl.splitlines() if not ln.lstrip().startswith("#"))
    for m in re.finditer(r"^    (\S+) \{", active.split("pools {")[0], re.M):
        body = active[m.end() :].split("\n    }\n", 1)[0]
        assert re.search(r"^\s*encap = yes$", body, re.M), f"{name}: {m.group(1)} lacks encap"
    i = swanctl.index("encap = yes")
    assert "#" in swanctl[max(0, i - 800) : i], f"{name}: encap = yes is not explained"


@pytest.mark.lab
def test_example_roadwarrior_and_fallback() -> None:
    """roadwarrior-gateway on gw; roadwarrior-client (TCP 443, UDP blocked) on c1;
    client-fallback on c2: over UDP while UDP passes, over TCP once it is blocked."""
    with Lab(clients=2) as lab:
        gw = lab.gw
        c1, c2 = lab.clients
        pki = lab.dir / "pki"
        ca = make_ca(pki)
        lab.block_udp(c1)
        for h in (gw, c1, c2):
            h.start_charon()
        install_cert(gw, ca, "vpn.example.org", "vpn", pki)
        install_cert(c1, ca, "carol@example.org", "carol", pki)
        install_cert(c2, ca, "dave@example.org", "dave", pki)
        gw.charon.load(substitute(example("roadwarrior-gateway", "swanctl.conf"), gw))  # type: ignore[union-attr]
        c1.charon.load(substitute(example("roadwarrior-client", "swanctl.conf"), gw))  # type: ignore[union-attr]
        c2.charon.load(substitute(example("client-fallback", "swanctl.conf"), gw))  # type: ignore[union-attr]
        gw.start_tcpencap(lab_tcpencap(gw, example("roadwarrior-gateway", "tcpencap.conf")))
        c1.start_tcpencap(lab_tcpencap(c1, example("roadwarrior-client", "tcpencap.conf")))
        c2.start_tcpencap(lab_tcpencap(c2, example("client-fallback", "tcpencap.conf")))
        check_config_online(c1, ["home"])
        check_config_online(c2, ["office"])
        check_config_online(gw, [])
        st = gw.tcpencap_status()
        assert sorted(st["listening"]) == ["0.0.0.0:443", "0.0.0.0:4500", "[::]:4500"], st

        # road warrior over TCP 443, with a virtual IP from the pool
        cap1 = lab.capture(c1)
        c1.charon.initiate("home", timeout=10)  # type: ignore[union-attr]
        sa = assert_established(c1, "home")
        vip4 = [v for v in sa["local-vips"] if "." in v]
        assert vip4 and vip4[0].startswith("198.18.250."), sa
        lost = unanswered(c1, gw.inner4, vip4[0], count=5)  # type: ignore[arg-type]
        assert not lost, lost
        rows = [r for r in gw.tcpencap_status()["connections"] if peer_host(r["peer"]) == c1.outer4]
        assert len(rows) == 1 and rows[0]["local"].endswith(":443"), rows
        assert rows[0]["ike_spis"] == [ike_sa(gw, "rw")["initiator-spi"]], rows
        assert cap1.count_udp_ike() == 0 and cap1.count_tcp(443) > 0

        # fallback client, UDP open: plain UDP, nothing over TCP
        cap2 = lab.capture(c2)
        c2.charon.initiate("office", timeout=10)  # type: ignore[union-attr]
        assert_established(c2, "office")
        lost = unanswered(c2, gw.inner4, sa_named(c2, "office")["local-vips"][0], count=3)  # type: ignore[index]
        assert not lost, lost
        assert c2.tcpencap_status()["connections"] == []
        assert cap2.count_udp_ike() > 0 and cap2.count_tcp(443) == 0
        c2.charon.terminate("office")  # type: ignore[union-attr]
        wait_for(lambda: sa_named(c2, "office") is None, 5, "office to go")
        time.sleep(1.5)  # let the fallback monitor see that no SA is left

        # UDP blocked: after fallback_timeout the retransmission goes over TCP 443
        lab.block_udp(c2)
        cap3 = lab.capture(c2)
        t0 = time.monotonic()
        c2.charon.initiate("office", timeout=20)  # type: ignore[union-attr]
        took = time.monotonic() - t0
        sa2 = assert_established(c2, "office")
        assert took > 3.0, f"up in {took:.1f}s: UDP cannot have been tried first"
        lost = unanswered(c2, gw.inner4, sa2["local-vips"][0], count=3)
        assert not lost, lost
        (row,) = c2.tcpencap_status()["connections"]
        assert row["peer"] == f"{gw.outer4}:443" and row["state"] == "open", row
        assert row["ike_spis"] == [sa2["initiator-spi"]], (row, sa2)
        assert cap3.count_tcp(443) > 0
        assert "falling back to TCP" in c2.tcpencap.log_text()  # type: ignore[union-attr]


CISCO_PLUGINS = ("xauth-generic", "unity")
AGGRESSIVE_PSK = "  i_dont_care_about_security_and_use_aggressive_mode_psk = yes\n"


def commented_client(text: str) -> str:
    """The strongSwan client documented in the comments at the end of the cisco example."""
    tail = text.split("The lines below, uncommented, are", 1)[1].split("\n", 2)[2]
    lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in tail.splitlines()]
    return "\n".join(lines) + "\n"


@pytest.mark.lab
def test_example_cisco_gateway_ikev1_aggressive_xauth_over_ctcp() -> None:
    with Lab(clients=1) as lab:
        gw = lab.gw
        (c1,) = lab.clients
        lab.block_udp(c1)
        gw.start_charon(plugins_extra=CISCO_PLUGINS, settings=AGGRESSIVE_PSK)
        c1.start_charon(plugins_extra=CISCO_PLUGINS)
        text = example("cisco-gateway", "swanctl.conf")
        gw.charon.load(substitute(text, gw))  # type: ignore[union-attr]
        c1.charon.load(substitute(commented_client(text), gw))  # type: ignore[union-attr]
        gw.start_tcpencap(lab_tcpencap(gw, example("cisco-gateway", "tcpencap.conf")))
        client_conf = "tcpencap {\n  connections {\n    cisco {\n      encapsulation = ctcp\n"
        c1.start_tcpencap(lab_tcpencap(c1, client_conf + "    }\n  }\n}\n"))
        check_config_online(c1, ["cisco"])
        check_config_online(gw, [])
        cap = lab.capture(c1)
        c1.charon.initiate("cisco", timeout=15)  # type: ignore[union-attr]
        sa = assert_established(c1, "cisco")
        assert sa["version"] == "1", sa
        (vip,) = sa["local-vips"]
        assert vip.startswith("198.18.250."), sa
        lost = unanswered(c1, gw.inner4, vip, count=3)  # type: ignore[arg-type]
        assert not lost, lost
        gwlog = gw.charon.log.read_text(errors="replace")  # type: ignore[union-attr]
        assert "XAuth authentication of 'alice' successful" in gwlog
        assert "AGGRESSIVE" in c1.charon.log.read_text(errors="replace")  # type: ignore[union-attr]
        rows = [r for r in gw.tcpencap_status()["connections"] if r.get("encapsulation") == "ctcp"]
        assert len(rows) == 1 and rows[0]["local"].endswith(":10000"), rows
        assert cap.count_udp_ike() == 0 and cap.count_tcp(10000) > 0


# --- the systemd unit ----------------------------------------------------------------------


def unit_sections() -> dict[str, dict[str, list[str]]]:
    """The unit file with repeated keys kept (systemd allows them; configparser does not)."""
    sections: dict[str, dict[str, list[str]]] = {}
    cur: dict[str, list[str]] | None = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            cur = sections.setdefault(line.strip("[]"), {})
            continue
        assert cur is not None and "=" in line, raw
        key, _, val = line.partition("=")
        cur.setdefault(key.strip(), []).append(val.strip())
    return sections


def test_unit_file_keys() -> None:
    # configparser must read it too (strict=False: SystemCallFilter= may repeat)
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    assert set(cp.sections()) == {"Unit", "Service", "Install"}
    s = unit_sections()
    unit, svc = s["Unit"], s["Service"]
    assert "strongswan.service" in unit["After"][0].split()
    assert unit.get("BindsTo") == ["strongswan.service"] or unit.get("PartOf") == [
        "strongswan.service"
    ]
    assert svc["ExecStart"][0].split()[1:] == ["run"]
    assert svc["ExecStart"][0].split()[0].endswith("/tcpencap")
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["Restart"] == ["on-failure"]
    for key, want in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("RuntimeDirectory", "tcpencap"),
    ):
        assert svc.get(key) == [want], (key, svc.get(key))
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert set(svc["CapabilityBoundingSet"][0].split()) == caps
    assert set(svc["AmbientCapabilities"][0].split()) == caps
    assert set(svc["RestrictAddressFamilies"][0].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    assert s["Install"]["WantedBy"] == ["multi-user.target"]


def _verify_in_scratch_root(root: Path, unit_text: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify --root`` of ``unit_text`` as tcpencap.service in a scratch root
    laid out as Debian 12 and 13 are (merged /usr: /lib and /bin are links into /usr), with the
    system's units, a stub strongswan.service and a stub /opt/tcpencap/.venv/bin/tcpencap.
    systemd 257 (Debian 13) looks for units only under /usr/lib, no longer /lib: a root with a
    real /lib/systemd/system fails there with "Unit sysinit.target not found"."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is needed (Debian package systemd; scripts/setup.sh installs it)"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for top in ("lib", "bin"):
        (root / top).symlink_to(f"usr/{top}")
    for exe in ("opt/tcpencap/.venv/bin/tcpencap", "usr/bin/kill"):
        p = root / exe
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    (root / "etc/systemd/system/strongswan.service").write_text(
        "[Unit]\nDescription=stub\n[Service]\nExecStart=/bin/kill\n"
    )
    (root / "etc/systemd/system/tcpencap.service").write_text(unit_text)
    return subprocess.run(
        [tool, "verify", f"--root={root}", "tcpencap.service"],
        capture_output=True,
        text=True,
        check=False,
    )


def test_unit_file_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify passes the unit without a warning at all, and (so a scratch
    root it cannot read is not mistaken for a pass) fails the same unit with its program
    missing."""
    unit = UNIT.read_text()
    res = _verify_in_scratch_root(tmp_path / "good", unit)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr
    assert "/opt/tcpencap/.venv/bin/tcpencap" in unit
    broken = unit.replace("/opt/tcpencap/.venv/bin/tcpencap", "/opt/missing/bin/tcpencap")
    res = _verify_in_scratch_root(tmp_path / "broken", broken)
    lines = (res.stdout + res.stderr).strip().splitlines()
    # its one complaint, and only that one (no unit it could not find)
    assert res.returncode != 0 and lines, lines
    assert all("/opt/missing/bin/tcpencap" in line for line in lines), lines
