"""Helpers for the RFC 9329 end-to-end tests: tunnel set-up, SA lookups, rule listings and
the hostile TCP client that is run inside a lab namespace."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from tests.labkit import (
    Host,
    Lab,
    LabError,
    cert_conf,
    default_name,
    ike_id,
    make_ca,
    make_cert,
    netns,
    psk_conf,
    tcpencap_conf,
    unanswered,
)

CHAIN = "TCPENCAP_OUT"


@contextlib.contextmanager
def private_netns(prefix: str, tools: tuple[str, ...]) -> Iterator[str]:
    """A fresh, empty network namespace for one test (fresh netfilter tables and ipsets),
    deleted afterwards, also when the test fails. Needs root and ``tools``: fails loudly."""
    assert os.geteuid() == 0, "needs root for network namespaces"
    for tool in tools:
        assert shutil.which(tool), f"{tool} is needed"
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    netns.create(name)
    try:
        yield name
    finally:
        with contextlib.suppress(LabError):  # the check below says what is left
            netns.remove(name)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert name not in listed, f"namespace {name} left behind"


def python_in_netns(ns: str, code: str, timeout: float = 120) -> Any:
    """Run ``code`` with this interpreter (and this checkout on the path) inside ``ns``;
    what it printed last, read as JSON. A failed child fails the test with its stderr."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": root},
        timeout=timeout,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stderr}"
    return json.loads(proc.stdout.splitlines()[-1])


def listen_addr(host: Host, family: int, port: int) -> str:
    """``ADDR:PORT`` for a gateway listener, IPv6 in brackets."""
    addr = host.outer(family)
    return f"{addr}:{port}" if family == 4 else f"[{addr}]:{port}"


def load_tunnel(lab: Lab, client: Host, auth: str, family: int) -> None:
    """swanctl config for client <-> gw on both charons (charon already running)."""
    gw = lab.gw
    if auth == "psk":
        client.charon.load(psk_conf(client, gw, family=family))
        gw.charon.load(psk_conf(gw, client, family=family))
        return
    assert auth == "cert", auth
    ca = make_ca(lab.dir / "pki")
    for local, remote in ((client, gw), (gw, client)):
        cert = make_cert(ca, ike_id(local), lab.dir / "pki")
        local.charon.load(cert_conf(local, remote, cert, ca, family=family))


def start_tcp_pair(
    lab: Lab,
    client: Host,
    *,
    family: int = 4,
    port: int = 4500,
    auth: str = "psk",
    extra: str = "",
    gateway_extra: str = "",
    client_extra: str = "",
) -> None:
    """UDP blocked for ``client``; charon and tcpencap on it and on gw, tunnel configured
    (not yet initiated). ``extra`` goes into the gateway's tcpencap section,
    ``client_extra`` into the client's."""
    gw = lab.gw
    lab.block_udp(client)
    for h in (client, gw):
        if h.charon is None:
            h.start_charon()
    load_tunnel(lab, client, auth, family)
    gw.start_tcpencap(
        tcpencap_conf(
            gw,
            listen=[listen_addr(gw, family, port)],
            extra=extra,
            gateway_extra=gateway_extra,
        )
    )
    client.start_tcpencap(
        tcpencap_conf(client, connections={default_name(client, gw): port}, extra=client_extra)
    )


def start_tcp_clients(
    lab: Lab, clients: list[Host], extra: str = "", gateway_extra: str = ""
) -> None:
    """Several clients with UDP blocked, each with its IPv4 PSK tunnel over TCP 4500 to gw,
    initiated. ``extra`` goes into the gateway's tcpencap section, ``gateway_extra`` into
    its gateway section."""
    gw = lab.gw
    for c in clients:
        lab.block_udp(c)
    for h in (gw, *clients):
        h.start_charon()
    for c in clients:
        load_tunnel(lab, c, "psk", 4)
    gw.start_tcpencap(
        tcpencap_conf(gw, listen=[f"{gw.outer4}:4500"], extra=extra, gateway_extra=gateway_extra)
    )
    for c in clients:
        c.start_tcpencap(tcpencap_conf(c, connections={default_name(c, gw): 4500}))
        c.charon.initiate(default_name(c, gw), timeout=10)


def assert_pings(a: Host, b: Host, count: int = 3) -> None:
    """Inner addresses answer each other, both directions, both inner families."""
    for family in (4, 6):
        for src, dst in ((a, b), (b, a)):
            lost = unanswered(src, dst.inner(family), src.inner(family), count=count)
            assert not lost, f"ping {src.role} -> {dst.role} IPv{family}: no reply to {lost}"


def ike_sas(host: Host, name: str) -> list[dict[str, Any]]:
    """Every IKE_SA called ``name`` in ``host``'s charon (more than one around a rekey)."""
    return [sa for entry in host.charon.list_sas() for n, sa in entry.items() if n == name]


def ike_sa(host: Host, name: str) -> dict[str, Any]:
    """The one IKE_SA called ``name`` in ``host``'s charon."""
    sas = ike_sas(host, name)
    assert len(sas) == 1, f"{host.role}: IKE_SAs named {name}: {sas}"
    return sas[0]


def assert_established(host: Host, name: str) -> dict[str, Any]:
    """IKE_SA ``name`` is ESTABLISHED with an INSTALLED CHILD_SA; returns it."""
    sa = ike_sa(host, name)
    assert sa["state"] == "ESTABLISHED", sa
    children = list(sa.get("child-sas", {}).values())
    assert [c["state"] for c in children] == ["INSTALLED"], children
    return sa


def assert_status_matches_sa(host: Host, name: str) -> dict[str, Any]:
    """``tcpencap status`` has exactly one connection, carrying the IKE SPI charon reports
    and (only) ESP SPIs of the CHILD_SA; returns that connection."""
    sa = ike_sa(host, name)
    st = host.tcpencap_status()
    conns = st["connections"]
    assert len(conns) == 1, f"{host.role}: {json.dumps(conns, indent=1)}"
    conn = conns[0]
    assert conn["state"] == "open", conn
    assert conn["ike_spis"] == [sa["initiator-spi"]], (conn, sa["initiator-spi"])
    child_spis = {s for c in sa["child-sas"].values() for s in (c["spi-in"], c["spi-out"])}
    assert conn["esp_spis"], conn
    assert set(conn["esp_spis"]) <= child_spis, (conn["esp_spis"], child_spis)
    assert conn["frames_in"] > 0 and conn["frames_out"] > 0, conn
    assert 1 <= conn["reads_in"] <= conn["bytes_in"], conn
    q = st["queue"]
    assert 1 <= q["reads"] <= q["packets"] and q["verdict_errors"] == 0, q
    # Every queued packet got its (batch) verdict: none is left waiting in the kernel.
    proc = host.run("cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    rows = [ln.split() for ln in proc.splitlines()]
    assert [r[2] for r in rows if r[0] == str(q["num"])] == ["0"], proc
    return conn


def mangle_rules(host: Host) -> str:
    """``-S`` of the mangle table, IPv4 then IPv6."""
    return "".join(host.run(t, "-t", "mangle", "-S").stdout for t in ("iptables", "ip6tables"))


def jump_rules(host: Host, tool: str) -> list[str]:
    out = host.run(tool, "-t", "mangle", "-S", "OUTPUT").stdout
    return [line for line in out.splitlines() if f"-j {CHAIN}" in line]


def chain_rules(host: Host, tool: str) -> list[str]:
    """Rules of tcpencap's chain (``-A`` lines only)."""
    out = host.run(tool, "-t", "mangle", "-S", CHAIN).stdout
    return [line for line in out.splitlines() if line.startswith("-A")]


def set_members(host: Host, name: str) -> list[str] | None:
    """Members of an ipset (ipset CLI), None without the set."""
    proc = host.run("ipset", "list", name, check=False)
    if proc.returncode:
        return None
    lines = proc.stdout.splitlines()
    return sorted(x.strip() for x in lines[lines.index("Members:") + 1 :] if x.strip())


def steered_set(host: Host, family: int) -> list[str] | None:
    """The addresses steered for ``family``: tcpencap's peer set and the addresses of its
    endpoint set (``ADDR,udp:PORT``), sorted, or None without the peer set."""
    whole = set_members(host, f"{CHAIN}_{family}")
    if whole is None:
        return None
    endpoints = set_members(host, f"{CHAIN}_EP{family}") or []
    return sorted({*whole, *(m.split(",")[0] for m in endpoints)})


def steered_endpoints(host: Host, family: int) -> list[str]:
    """Members of tcpencap's endpoint set for ``family`` as ``ADDR,udp:PORT``."""
    return set_members(host, f"{CHAIN}_EP{family}") or []


def tcpencap_sets(host: Host) -> list[str]:
    return [n for n in host.run("ipset", "list", "-n").stdout.split() if "TCPENCAP" in n]


def assert_steering(
    host: Host, peers4: list[str], peers6: list[str] | None = None, client: bool | None = None
) -> None:
    """Exactly tcpencap's layout: one jump per family (UDP from 500/4500 only), one queue
    rule matching the family's peer set and one its endpoint set, and exactly these peers
    in the sets (whole, or one endpoint of them). A TCP client (by default: any host but gw)
    also queues charon's IKE to anyone else (4503), for the per-packet check of
    tcpencap.core.ike_guard."""
    client = host.role != "gw" if client is None else client
    for fam, tool in ((4, "iptables"), (6, "ip6tables")):
        jump = f"-A OUTPUT -p udp -m multiport --sports 500,4500 -j {CHAIN}"
        assert jump_rules(host, tool) == [jump], mangle_rules(host)
        queue = f"-A {CHAIN} -m set --match-set {CHAIN}_{fam} dst -j NFQUEUE --queue-num 4500"
        ep = f"-A {CHAIN} -m set --match-set {CHAIN}_EP{fam} dst,dst -j NFQUEUE --queue-num 4500"
        rules = [queue, ep]
        if client:
            marker = '"0x0>>0x16&0x3c@0x8=0x0"' if fam == 4 else '"0x30=0x0"'
            guard = "-m addrtype ! --dst-type LOCAL -j NFQUEUE --queue-num 4503"
            rules.append(f"-A {CHAIN} -p udp -m udp --sport 500 {guard}")
            rules.append(f"-A {CHAIN} -p udp -m udp --sport 4500 -m u32 --u32 {marker} {guard}")
        assert chain_rules(host, tool) == rules, mangle_rules(host)
    assert steered_set(host, 4) == sorted(peers4)
    assert steered_set(host, 6) == sorted(peers6 or [])


# The hostile client: one thread per case, each connects to ADDR:PORT, sends its bytes and
# measures how long the gateway takes to close (EOF or reset). Prints one JSON object.
HOSTILE_SCRIPT = r"""
import json, socket, sys, threading, time
addr, port, cap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cases = {k: bytes.fromhex(v) for k, v in json.loads(sys.argv[4]).items()}
out = {}
def one(name, data):
    s = socket.create_connection((addr, port), timeout=cap)
    t0 = time.monotonic()
    res = {"port": s.getsockname()[1], "received": ""}
    try:
        if data:
            s.sendall(data)
        while True:
            chunk = s.recv(4096)
            if not chunk:
                res["how"] = "eof"
                break
            res["received"] += chunk.hex()
    except ConnectionResetError:
        res["how"] = "reset"
    except (socket.timeout, TimeoutError):
        res["how"] = "still-open"
    res["elapsed"] = time.monotonic() - t0
    s.close()
    out[name] = res
threads = [threading.Thread(target=one, args=kv) for kv in cases.items()]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


def run_hostile(
    host: Host, addr: str, port: int, cases: dict[str, bytes], cap: float
) -> dict[str, dict[str, Any]]:
    """Run every case at once from ``host``; each waits at most ``cap`` seconds for closure."""
    spec = json.dumps({k: v.hex() for k, v in cases.items()})
    proc = host.run(
        sys.executable, "-c", HOSTILE_SCRIPT, addr, str(port), str(cap), spec, timeout=cap + 10
    )
    return json.loads(proc.stdout)
