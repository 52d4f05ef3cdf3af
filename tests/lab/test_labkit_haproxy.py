"""The HAProxy lab module: the SNI router's routing, the balancer's config, the web server.

Needs root, iproute2, HAProxy 2.6, curl and ss; fails (never skips) without them.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.labkit import Host, Lab, LabError, make_ca, make_cert
from tests.labkit.haproxy import (
    HAPROXY,
    balancer_config,
    https_get,
    sni_router_config,
    start_haproxy,
    start_tls_web,
)

pytestmark = pytest.mark.lab

VPN_SNI = "vpn.lab.test"
WEB_SNI = "www.lab.test"
PP2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"

# A TCP listener that keeps what each connection sent: DIR/N.bin (the bytes) and DIR/N.end
# (JSON: end "eof", "reset" or "idle"; first_at, the wall clock when the first bytes came),
# written once the connection is over, N counting from 1.
_RECORDER = r"""
import json, os, socket, sys, threading, time

addr, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.makedirs(out, exist_ok=True)
lock, count = threading.Lock(), [0]


def serve(conn, n):
    data, end, first_at = b"", "eof", None
    conn.settimeout(3)
    try:
        while chunk := conn.recv(65536):
            first_at = first_at or time.time()
            data += chunk
    except ConnectionResetError:
        end = "reset"
    except TimeoutError:
        end = "idle"
    conn.close()
    with open(f"{out}/{n}.bin", "wb") as f:
        f.write(data)
    with open(f"{out}/{n}.end.tmp", "w") as f:
        json.dump({"end": end, "first_at": first_at}, f)
    os.rename(f"{out}/{n}.end.tmp", f"{out}/{n}.end")
    print("conn", n, len(data), end, flush=True)


family = socket.AF_INET6 if ":" in addr else socket.AF_INET
lsock = socket.socket(family, socket.SOCK_STREAM)
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind((addr, port))
lsock.listen(64)
print("listening", flush=True)
while True:
    conn, _ = lsock.accept()
    with lock:
        count[0] += 1
        n = count[0]
    threading.Thread(target=serve, args=(conn, n), daemon=True).start()
"""

# Connects, sends (hex bytes, or a TLS ClientHello with an SNI), holds the stream open for
# a while, half-closes, reads the reply until the peer ends; prints JSON: reply (hex), end
# ("eof"/"reset"/"timeout"), secs (from connect to the end), sent_at (wall clock).
_SENDER = r"""
import json, socket, ssl, sys, time

addr, port, mode, arg, hold = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5], float(sys.argv[5])
if mode == "hello":
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=arg)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    data = out.read()
else:
    data = bytes.fromhex(arg)
start = time.monotonic()
sock = socket.create_connection((addr, port), timeout=8)
sock.sendall(data)
sent_at = time.time()
time.sleep(hold)
sock.shutdown(socket.SHUT_WR)
reply, end = b"", "eof"
try:
    while chunk := sock.recv(65536):
        reply += chunk
except ConnectionResetError:
    end = "reset"
except TimeoutError:
    end = "timeout"
secs = time.monotonic() - start
print(json.dumps({"reply": reply.hex(), "end": end, "secs": secs, "sent_at": sent_at}))
"""


@dataclass
class Conn:
    """One connection a Recorder saw."""

    data: bytes
    end: str
    first_at: float | None


class Recorder:
    """A ``_RECORDER`` running in a host's namespace."""

    def __init__(self, host: Host, addr: str, port: int) -> None:
        self.dir = host.dir / f"rec-{port}"
        argv = [sys.executable, "-u", "-c", _RECORDER, addr, str(port), str(self.dir)]
        self.process = host.spawn(argv, f"rec-{port}.log")
        self.process.wait_for_log("listening")

    def conns(self) -> list[Conn]:
        """Every finished connection, in accept order."""
        ends = sorted(self.dir.glob("*.end"), key=lambda p: int(p.stem))
        done = []
        for p in ends:
            meta = json.loads(p.read_text())
            done.append(Conn(p.with_suffix(".bin").read_bytes(), meta["end"], meta["first_at"]))
        return done

    def wait_conns(self, count: int, timeout: float = 5.0) -> list[Conn]:
        deadline = time.monotonic() + timeout
        while len(conns := self.conns()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.dir}: {len(conns)} of {count} connections")
            time.sleep(0.02)
        return conns

    def payloads(self) -> list[bytes]:
        """What followed the PROXY v2 header of each proxied (not health check) connection."""
        return [rest for c in self.conns() for cmd, _, rest in [parse_pp2(c.data)] if cmd == 0x21]


def send(host: Host, addr: str, port: int, mode: str, arg: str, hold: float = 0.0) -> dict:
    argv = [sys.executable, "-c", _SENDER, addr, str(port), mode, arg, str(hold)]
    return json.loads(host.run(*argv, timeout=15).stdout)


def parse_pp2(data: bytes) -> tuple[int, tuple[str, int, str, int] | None, bytes]:
    """A PROXY v2 header at the start of ``data``: (command byte, (src, sport, dst, dport)
    or None when no TCP addresses, what follows the header)."""
    assert data[:12] == PP2_SIG, data[:16]
    cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    body, rest = data[16 : 16 + length], data[16 + length :]
    if fam == 0x11:  # TCP over IPv4
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
    elif fam == 0x21:  # TCP over IPv6
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
    else:
        return cmd, None, rest
    addrs = (str(ipaddress.ip_address(src)), sport, str(ipaddress.ip_address(dst)), dport)
    return cmd, addrs, rest


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.02)


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    for tool in (HAPROXY, "curl", "ss", "ip"):
        assert shutil.which(tool), f"{tool} is not installed"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(clients=1) as lab:
        yield lab


def test_sni_router_routes(lab: Lab, tmp_path: Path) -> None:
    c1, gw = lab.clients[0], lab.gw
    plain, tls = Recorder(gw, "127.0.0.1", 4500), Recorder(gw, "127.0.0.1", 4443)
    ca = make_ca(tmp_path / "ca")
    web_cert = make_cert(ca, WEB_SNI, tmp_path / "web")
    start_tls_web(gw, "127.0.0.1", 8443, web_cert.cert_path, web_cert.key_path, body="site")
    config = sni_router_config(
        [f"{gw.outer4}:443", f"[{gw.outer6}]:443"],
        plain="127.0.0.1:4500",
        tls="127.0.0.1:4443",
        sni=VPN_SNI,
        web="127.0.0.1:8443",
    )
    proxy = start_haproxy(gw, config)

    # RFC 8229 stream prefix, then an IKE length field: vpn_plain, after a PROXY v2 header,
    # forwarded as soon as the 6 bytes are in (not after the 5 s inspect delay).
    payload = b"IKETCP\x00\x1c" + bytes(26)
    sent = send(c1, gw.outer4, 443, "hex", payload.hex(), hold=1.0)
    assert sent["end"] == "eof"
    [conn] = plain.wait_conns(1)
    assert conn.end == "eof" and conn.first_at - sent["sent_at"] < 0.5
    cmd, addrs, rest = parse_pp2(conn.data)
    assert cmd == 0x21  # version 2, PROXY
    assert addrs is not None and addrs[0] == c1.outer4 and addrs[2:] == (gw.outer4, 443)
    assert rest == payload

    # A ClientHello for the VPN's name (any case): vpn_tls, also after a PROXY v2 header.
    for n, (family, name) in enumerate(((4, VPN_SNI), (6, VPN_SNI.upper())), 1):
        sent = send(c1, gw.outer(family), 443, "hello", name, hold=1.0)
        conn = tls.wait_conns(n)[n - 1]
        assert conn.first_at - sent["sent_at"] < 0.5
        cmd, addrs, rest = parse_pp2(conn.data)
        assert addrs is not None and addrs[0] == c1.outer(family)
        assert addrs[2:] == (gw.outer(family), 443)
        assert rest[:1] == b"\x16" and rest[5:6] == b"\x01"  # handshake, ClientHello
        assert VPN_SNI.encode() in rest.lower()

    # Other TLS, with another SNI or none at all: the web site, without a PROXY header.
    assert https_get(c1, gw.outer4, 443, sni=WEB_SNI, ca=ca.cert_path) == (200, "site")
    assert https_get(c1, gw.outer6, 443, sni=WEB_SNI, ca=ca.cert_path) == (200, "site")
    assert https_get(c1, gw.outer4, 443) == (200, "site")
    # With the VPN's name curl reaches vpn_tls, which answers nothing: curl fails.
    with pytest.raises(LabError, match="curl"):
        https_get(c1, gw.outer4, 443, sni=VPN_SNI, ca=ca.cert_path)
    assert len(tls.wait_conns(3)) == 3

    # Neither IKETCP nor TLS: closed at once, even with the stream left open, and no
    # backend sees it.
    for hold in (0.0, 1.0):
        sent = send(c1, gw.outer4, 443, "hex", b"GET / HTTP/1.0\r\n\r\n".hex(), hold=hold)
        assert sent["reply"] == "" and sent["secs"] < hold + 0.5
    time.sleep(0.3)
    assert (len(plain.conns()), len(tls.conns())) == (1, 3)
    assert proxy.alive()


def test_sni_router_without_proxy_header(lab: Lab) -> None:
    c1, gw = lab.clients[0], lab.gw
    plain = Recorder(gw, "127.0.0.1", 4500)
    config = sni_router_config(
        f"{gw.outer4}:443",
        plain="127.0.0.1:4500",
        tls="127.0.0.1:4443",
        sni=VPN_SNI,
        web="127.0.0.1:8443",
        proxy_v2=False,
    )
    assert "send-proxy" not in config
    start_haproxy(gw, config, name="router")
    send(c1, gw.outer4, 443, "hex", b"IKETCPabc".hex())
    [conn] = plain.wait_conns(1)
    assert conn.data == b"IKETCPabc"


def test_start_haproxy_reports_bad_config(lab: Lab) -> None:
    with pytest.raises(LabError, match="haproxy -c"):
        start_haproxy(lab.gw, "frontend f\n    bind 127.0.0.1:1\n    no-such-keyword\n")
    # Valid, but the address is not in this namespace: haproxy exits, the log says why.
    bad = balancer_config("192.0.2.1:443", ["127.0.0.1:4500"])
    with pytest.raises(LabError, match="exited"):
        start_haproxy(lab.gw, bad, name="nobind")


def test_balancer_config_is_valid(tmp_path: Path) -> None:
    config = balancer_config("198.19.0.2:443,[fd00:100::2]:443", ["127.0.0.1:4501", "[::1]:4502"])
    assert "bind [fd00:100::2]:443" in config
    assert (
        config.count("check inter 500 fall 2 rise 2 on-marked-down shutdown-sessions send-proxy-v2")
        == 2
    )
    for text in (config, balancer_config("[::]:443", ["10.0.0.1:1"], proxy_v2=False)):
        cfg = tmp_path / "lb.cfg"
        cfg.write_text(text)
        out = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    with pytest.raises(ValueError):
        balancer_config("fd00::2:443", ["127.0.0.1:1"])  # IPv6 needs brackets
    good = {"plain": "127.0.0.1:1", "tls": "127.0.0.1:2", "web": "127.0.0.1:3"}
    assert "req.ssl_sni -i vpn.lab.test" in sni_router_config(":443", sni=VPN_SNI, **good)
    with pytest.raises(ValueError, match="sni"):
        sni_router_config(":443", sni="vpn lab.test", **good)  # would inject config
    with pytest.raises(ValueError):
        sni_router_config(":443", sni=VPN_SNI, **{**good, "web": "www.lab.test:443"})


def test_balancer_checks_stickiness_failover(lab: Lab) -> None:
    c1, gw = lab.clients[0], lab.gw
    recs = [Recorder(gw, "127.0.0.1", 4501), Recorder(gw, "127.0.0.1", 4502)]
    config = balancer_config(
        [f"{gw.outer4}:443", f"[{gw.outer6}]:443"], ["127.0.0.1:4501", "127.0.0.1:4502"]
    )
    start_haproxy(gw, config, name="lb")
    # A health check, as the gateway sees it: a PROXY v2 LOCAL header (the server has
    # send-proxy-v2), no address and no payload, then HAProxy resets the connection.
    for rec in recs:
        for conn in rec.wait_conns(2, timeout=3):
            assert parse_pp2(conn.data) == (0x20, None, b""), conn.data
            assert conn.end == "reset"

    # One source address, per family: every connection lands on the same gateway.
    for family in (4, 6):
        before = [len(r.payloads()) for r in recs]
        for i in range(4):
            send(c1, gw.outer(family), 443, "hex", f"IKETCP{family}{i}".encode().hex())
        wait_until(lambda b=before: sum(len(r.payloads()) for r in recs) == sum(b) + 4)
        added = sorted(len(r.payloads()) - n for r, n in zip(recs, before, strict=True))
        assert added == [0, 4], (family, added)

    # c1's IPv4 gateway goes away: after two failed checks its client is redispatched.
    first = next(i for i, r in enumerate(recs) if b"IKETCP40" in r.payloads())
    recs[first].process.stop()
    time.sleep(1.5)
    assert send(c1, gw.outer4, 443, "hex", b"IKETCPmoved".hex())["end"] == "eof"
    wait_until(lambda: b"IKETCPmoved" in recs[1 - first].payloads())
