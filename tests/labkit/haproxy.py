"""HAProxy (Debian's 2.6) and a TLS web server in a lab namespace.

Deployments put a TCP proxy in front of the gateway: an SNI router that shares port 443
between the VPN (RFC 8229 ``IKETCP`` streams and TLS with the VPN's server name) and a web
site, or a load balancer in front of several gateways. Both pass the client's address on
with a PROXY protocol v2 header, so the lab runs the real thing to test tcpencap behind it.

API::

    sni_router_config(bind, *, plain, tls, sni, web, proxy_v2=True) -> str   # haproxy.cfg
    balancer_config(bind, servers, *, check_interval_ms=500, proxy_v2=True) -> str
    start_haproxy(host, config_text, name="haproxy") -> Process  # checked, listening
    start_tls_web(host, addr, port, cert, key, body="web ok") -> Process
    https_get(host, url_host, port, sni=None, ca=None) -> (status, body)   # curl in host

Addresses are ``ADDR:PORT`` with IPv6 in brackets (``[fd00:100::2]:443``); ``bind`` may be
a list or a comma-separated string to listen on both families.
"""

from __future__ import annotations

import ipaddress
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .process import LabError, Process

if TYPE_CHECKING:
    from .topology import Host

HAPROXY = "/usr/sbin/haproxy"

# Long timeouts on both sides: an idle IKE/ESP-in-TCP stream must not be cut by the proxy.
_GLOBAL_DEFAULTS = """\
global
    maxconn 4096
    log stdout format raw local0

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 1h
    timeout server 1h
"""

_SNI = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


def _split_addr(addr: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[ADDR6]:PORT`` -> (address, port); ValueError if malformed."""
    addr = addr.strip()
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
        if not sep:
            raise ValueError(f"address {addr!r}: want [ADDR]:PORT")
    else:
        host, sep, port = addr.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"address {addr!r}: want ADDR:PORT (IPv6 in brackets)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {addr!r}: bad port")
    if host not in ("", "*"):
        ipaddress.ip_address(host)  # raises ValueError: the config takes literals only
    return host, int(port)


def _addr_list(bind: str | list[str]) -> list[str]:
    items = bind.split(",") if isinstance(bind, str) else list(bind)
    addrs = [a.strip() for a in items if a.strip()]
    if not addrs:
        raise ValueError("bind: no address")
    for a in addrs:
        _split_addr(a)
    return addrs


def _server_line(name: str, addr: str, extra: str, proxy_v2: bool) -> str:
    _split_addr(addr)
    opts = f"{extra} send-proxy-v2" if proxy_v2 else extra
    return f"    server {name} {addr}{opts}\n"


def sni_router_config(
    bind: str | list[str],
    *,
    plain: str,
    tls: str,
    sni: str,
    web: str,
    proxy_v2: bool = True,
) -> str:
    """haproxy.cfg for one TCP port shared by the VPN and a web site.

    The first 6 bytes ``IKETCP`` (RFC 8229 stream prefix) go to backend ``vpn_plain``
    (``plain``); a TLS ClientHello whose SNI is ``sni`` goes to ``vpn_tls`` (``tls``); any
    other TLS goes to ``web`` (never a PROXY header: it is an ordinary HTTPS server);
    anything else is rejected. Each decision accepts the content at once, so the 5 s
    inspect delay only bounds how long an undecided connection may stay silent.
    """
    if not _SNI.match(sni):
        raise ValueError(f"sni {sni!r}: not a host name")
    binds = "".join(f"    bind {a}\n" for a in _addr_list(bind))
    return (
        _GLOBAL_DEFAULTS
        + "\nfrontend vpn_front\n"
        + binds
        + "    tcp-request inspect-delay 5s\n"
        + "    acl iketcp req.payload(0,6) -m bin 494b45544350\n"
        + "    acl tls_hello req.ssl_hello_type 1\n"
        + f"    acl vpn_sni req.ssl_sni -i {sni}\n"
        + "    tcp-request content accept if iketcp\n"
        + "    tcp-request content accept if tls_hello\n"
        + "    tcp-request content reject\n"
        + "    use_backend vpn_plain if iketcp\n"
        + "    use_backend vpn_tls if tls_hello vpn_sni\n"
        + "    use_backend web if tls_hello\n"
        + "\nbackend vpn_plain\n"
        + _server_line("plain", plain, "", proxy_v2)
        + "\nbackend vpn_tls\n"
        + _server_line("tls", tls, "", proxy_v2)
        + "\nbackend web\n"
        + _server_line("web", web, "", False)
    )


def balancer_config(
    bind: str | list[str],
    servers: list[str],
    *,
    check_interval_ms: int = 500,
    proxy_v2: bool = True,
) -> str:
    """haproxy.cfg for a TCP load balancer in front of several gateways (``gw1``, ...).

    Round robin for new clients, then stuck to a gateway by source address for an hour (the
    IKE SA and its TCP stream must keep reaching the gateway that holds them; the table is
    ``type ipv6``, which also keys IPv4 clients, where ``type ip`` would not stick IPv6
    clients at all); a gateway that fails two checks is taken out and its clients are
    redispatched. Checks are plain TCP connects to the server's address, but HAProxy sends
    them a PROXY v2 LOCAL header too when the server has ``send-proxy-v2``, then resets the
    connection (see the tests)."""
    if not servers:
        raise ValueError("balancer_config: no servers")
    if check_interval_ms <= 0:
        raise ValueError("check_interval_ms must be positive")
    binds = "".join(f"    bind {a}\n" for a in _addr_list(bind))
    # A gateway marked down takes its sessions with it: its clients' TCP connections are
    # closed, so their tcpencap reconnects (to another gateway) instead of waiting on a
    # connection that leads nowhere.
    check = f" check inter {check_interval_ms} fall 2 rise 2 on-marked-down shutdown-sessions"
    lines = "".join(
        _server_line(f"gw{i}", addr, check, proxy_v2) for i, addr in enumerate(servers, 1)
    )
    return (
        _GLOBAL_DEFAULTS
        + "\nfrontend vpn_lb\n"
        + binds
        + "    default_backend vpn_gateways\n"
        + "\nbackend vpn_gateways\n"
        + "    balance roundrobin\n"
        + "    stick-table type ipv6 size 100k expire 1h\n"
        + "    stick on src\n"
        + "    option redispatch\n"
        + "    retries 3\n"
        + lines
    )


def _config_binds(config_text: str) -> list[tuple[str, int]]:
    """The TCP addresses of every ``bind`` line, to wait for; other kinds are skipped."""
    found = []
    for line in config_text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "bind":
            continue
        for item in words[1].split(","):
            for prefix in ("ipv4@", "ipv6@", "tcp@", "tcp4@", "tcp6@"):
                item = item.removeprefix(prefix)
            if "@" in item or item.startswith("/"):
                continue  # unix sockets, fd@, abns@: not a TCP address
            found.append(_split_addr(item))
    return found


def _listening(host: Host) -> set[tuple[str, int]]:
    """(address, port) of the TCP listeners in ``host``'s namespace, per ``ss``."""
    out = host.run("ss", "-Hltn").stdout
    sockets = set()
    for line in out.splitlines():
        words = line.split()
        if len(words) < 4:
            continue
        addr, _, port = words[3].rpartition(":")
        addr = addr.strip("[]").split("%")[0]
        if not port.isdigit():
            continue
        if addr == "*":  # a dual-stack wildcard socket
            sockets |= {("0.0.0.0", int(port)), ("::", int(port))}
        else:
            sockets.add((str(ipaddress.ip_address(addr)), int(port)))
    return sockets


def _wait_listening(
    host: Host, proc: Process, addrs: Iterable[tuple[str, int]], timeout: float = 5.0
) -> None:
    """Until every address has a listener; LabError with the log tail if the process exits
    or ``timeout`` passes. Looks at the sockets rather than connecting, so no backend and no
    test sees a probe connection."""
    want = set()
    for addr, port in addrs:
        if addr in ("", "*"):
            addr = "0.0.0.0"
        want.add((str(ipaddress.ip_address(addr)), port))
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise LabError(f"{proc.argv} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        missing = want - _listening(host)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise LabError(f"{proc.argv}: {sorted(missing)} not listening:\n{proc.log_tail()}")
        time.sleep(0.02)


def start_haproxy(host: Host, config_text: str, name: str = "haproxy") -> Process:
    """Write ``name``.cfg in the host dir, check it with ``haproxy -c`` and run HAProxy in
    the foreground (``-db``, log ``name``.log); returns once every bind address listens."""
    cfg = host.dir / f"{name}.cfg"
    cfg.write_text(config_text)
    binds = _config_binds(config_text)
    checked = host.run(HAPROXY, "-c", "-f", str(cfg), check=False)
    if checked.returncode != 0:
        raise LabError(
            f"haproxy -c -f {cfg} -> {checked.returncode}:\n{checked.stdout}{checked.stderr}"
        )
    proc = host.spawn([HAPROXY, "-db", "-f", str(cfg)], f"{name}.log")
    _wait_listening(host, proc, binds)
    return proc


# Runs inside the namespace with the lab's Python: every GET gets 200 and the body. The
# handshake runs in the connection's own thread, so a silent client stalls nobody.
_WEB_SERVER = r"""
import http.server, socket, ssl, sys

addr, port, cert, key, body = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
payload = body.encode()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_2
ctx.load_cert_chain(cert, key)


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10

    def setup(self):
        super().setup()
        self.connection.do_handshake()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, fmt, *args):
        print(self.client_address[0], fmt % args, flush=True)


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    daemon_threads = True

    def get_request(self):
        sock, peer = super().get_request()
        return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), peer

    def handle_error(self, request, client_address):
        print("error from", client_address[0], repr(sys.exc_info()[1]), flush=True)


server = Server((addr, port), Handler)
print("listening on", addr, port, flush=True)
server.serve_forever()
"""


def start_tls_web(
    host: Host, addr: str, port: int, cert: Path, key: Path, body: str = "web ok"
) -> Process:
    """An HTTPS server (TLS 1.2 and 1.3) on ``addr``:``port`` in ``host`` answering every
    GET with 200 and ``body``: the web site behind the SNI router. Returns once it listens."""
    log = f"web-{port}.log"
    argv = [sys.executable, "-u", "-c", _WEB_SERVER, addr, str(port), str(cert), str(key), body]
    proc = host.spawn(argv, log)
    _wait_listening(host, proc, [(addr, port)])
    return proc


def https_get(
    host: Host, url_host: str, port: int, sni: str | None = None, ca: Path | None = None
) -> tuple[int, str]:
    """GET / over HTTPS with curl from inside ``host``; returns (status, body).

    With ``sni`` the URL names it and ``--resolve`` points it at ``url_host``, so the
    ClientHello carries that SNI; without, the URL is the address and no SNI is sent. Without
    ``ca`` the certificate is not verified (``-k``). LabError with curl's stderr on failure.
    """
    target = f"[{url_host}]" if ":" in url_host else url_host
    argv = ["curl", "-q", "-sS", "-g", "--max-time", "5", "--noproxy", "*"]
    argv += ["-o", "-", "-w", "\n%{http_code}"]
    argv += ["--cacert", str(ca)] if ca is not None else ["-k"]
    if sni is not None:
        argv += ["--resolve", f"{sni}:{port}:{target}"]
        url = f"https://{sni}:{port}/"
    else:
        url = f"https://{target}:{port}/"
    proc = host.run(*argv, url, check=False, timeout=15)
    if proc.returncode != 0:
        raise LabError(f"curl {url} from {host.role} -> {proc.returncode}: {proc.stderr.strip()}")
    body, _, status = proc.stdout.rpartition("\n")
    return int(status), body
