"""Tests for the command line, run as `python3 -m tcpencap ...` in a subprocess: exit codes,
messages, and `status` against a fake control server that answers like the daemon.

The fake server's answer is produced by a real Daemon (never started) holding real
TcpConnection objects, so a change of Daemon.status()'s shape that the CLI does not follow
shows up here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tcpencap import __version__
from tcpencap.aio.daemon import Daemon
from tcpencap.config import parse_config
from tcpencap.core.rfc9329_engine import State
from tcpencap.core.role import Role
from tcpencap.wire.packet import addr_bytes

REPO = Path(__file__).resolve().parent.parent

GOOD_CONF = """\
tcpencap {
    queue_num = 4501
    gateway {
        listen = 198.18.0.1:4500, [fd00::1]:4500
    }
    connections {
        home {
            remote_port = 443
            remote_addrs = 198.19.0.2, fd00:19::2
        }
        branch {
            encapsulation = ctcp
            transport = fallback
            remote_port = 8443
        }
    }
}
"""

# Line 4 holds the typo.
BAD_CONF = """\
tcpencap {
    connections {
        home {
            remote_prot = 443
        }
    }
}
"""


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "tcpencap", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def test_version():
    proc = run_cli("version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tcpencap {__version__}"


def test_no_command_is_a_usage_error():
    proc = run_cli()
    assert proc.returncode == 2
    assert "usage" in proc.stderr.lower()


def test_check_config_good_file(tmp_path):
    path = tmp_path / "tcpencap.conf"
    path.write_text(GOOD_CONF)
    proc = run_cli("check-config", "--offline", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == f"{path}: syntax and values OK"
    assert "gateway: RFC 9329 on 198.18.0.1:4500, [fd00::1]:4500" in out
    assert "connection home: always over TCP, rfc9329 to 198.19.0.2, fd00:19::2 port 443" in out
    assert (
        "connection branch: UDP first, TCP after 5s without an answer, ctcp to "
        "(charon's remote_addrs) port 8443" in out
    )


def test_check_config_without_charon_fails_clearly(tmp_path):
    path = tmp_path / "tcpencap.conf"
    sock = tmp_path / "absent.vici"
    path.write_text(
        GOOD_CONF.replace("tcpencap {", f"tcpencap {{\n vici_socket = unix://{sock}", 1)
    )
    proc = run_cli("check-config", "--config", str(path))
    assert proc.returncode == 1
    assert f"cannot ask charon at unix://{sock}" in proc.stderr


def test_check_config_shipped_example_is_valid():
    proc = run_cli("check-config", "--offline", "--config", str(REPO / "configs" / "tcpencap.conf"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{REPO / 'configs' / 'tcpencap.conf'}: syntax and values OK")


def test_check_config_bad_file_names_file_line_and_key(tmp_path):
    path = tmp_path / "bad.conf"
    path.write_text(BAD_CONF)
    proc = run_cli("check-config", "--config", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    msg = proc.stderr.strip()
    assert f"{path}:4:" in msg
    assert "tcpencap.connections.home.remote_prot" in msg
    assert "Traceback" not in proc.stderr


def test_check_config_bad_value(tmp_path):
    path = tmp_path / "bad.conf"
    path.write_text("tcpencap {\n    queue_num = lots\n}\n")
    proc = run_cli("check-config", "--config", str(path))
    assert proc.returncode == 2
    assert f"{path}:2:" in proc.stderr
    assert "tcpencap.queue_num" in proc.stderr
    assert "'lots'" in proc.stderr


def test_check_config_missing_file(tmp_path):
    path = tmp_path / "absent.conf"
    proc = run_cli("check-config", "--config", str(path))
    assert proc.returncode == 2
    assert str(path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_without_a_daemon(tmp_path):
    sock = tmp_path / "nothing-here.ctl"
    conf = tmp_path / "tcpencap.conf"
    conf.write_text(f"tcpencap {{\n    status_socket = {sock}\n}}\n")
    for args in (["--config", str(conf)], ["--config", str(conf), "--socket", str(sock)]):
        proc = run_cli("status", *args)
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert f"cannot reach {sock}" in proc.stderr
        assert "Traceback" not in proc.stderr


# --- a fake control server ---------------------------------------------------------------


def daemon_status() -> dict:
    """What a daemon with one connection of each side answers, built by the real code."""
    cfg = parse_config(GOOD_CONF, "/etc/strongswan.d/tcpencap.conf")
    d = Daemon(cfg)
    e = d.engine
    d.rules.add_peer("198.19.0.2")
    d.rules.add_peer("fd00:19::2")
    e.router.drops["nat-keepalive"] = 3

    now = time.monotonic()
    gid = e.accept(now, "198.18.0.1", 4500, "198.19.5.5", 40000)
    assert gid is not None
    gw = e.conns[gid]
    gw.state = State.OPEN
    gw.frames_in, gw.frames_out, gw.bytes_in, gw.bytes_out = 5, 4, 1500, 1200
    e.table.bind_ike(gid, bytes.fromhex("0102030405060708"))
    e.table.rekey_ike(gid, bytes.fromhex("0102030405060708"), bytes.fromhex("1112131415161718"))
    e.table.bind_esp(gid, 0xC0FFEE01)
    gw.drops["esp-congested"] = 2
    gw.view.drop("ike-spi-held-elsewhere")

    view = e.router.add_client_conn(addr_bytes("fd00::1"), addr_bytes("fd00:19::2"))
    cl = e._new_conn(now, view, Role.CLIENT, "fd00::1", "fd00:19::2")
    cl.local_port, cl.peer_port = 50123, 443
    return d.status()


class FakeControlServer:
    """Answers one line per connection on a unix socket, like Daemon._control_client."""

    def __init__(self, path: Path, reply: dict) -> None:
        self.path = path
        self.reply = reply
        self.received: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(30)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                line = b""
                while not line.endswith(b"\n"):
                    chunk = conn.recv(1)
                    if not chunk:
                        break
                    line += chunk
                self.received.append(line)
                if line == b"status\n":
                    conn.sendall(json.dumps(self.reply).encode() + b"\n")
                else:
                    conn.sendall(json.dumps({"error": f"unknown {line!r}"}).encode() + b"\n")

    def close(self) -> None:
        # shutdown() wakes the accept() blocked in the thread; close() alone would not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def control(tmp_path):
    st = daemon_status()
    server = FakeControlServer(tmp_path / "ctl.sock", st)
    conf = tmp_path / "tcpencap.conf"
    conf.write_text(f"tcpencap {{\n    status_socket = {server.path}\n}}\n")
    try:
        yield server, conf, st
    finally:
        server.close()


def test_status_human_output(control):
    server, conf, st = control
    proc = run_cli("status", "--config", str(conf))
    assert proc.returncode == 0, proc.stderr
    assert server.received == [b"status\n"]
    out = proc.stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"tcpencap pid {st['pid']}, up ")
    assert "config /etc/strongswan.d/tcpencap.conf" in lines[0]
    assert "VICI not connected" in lines[0]
    assert "listening: 198.18.0.1:4500, [fd00::1]:4500" in lines
    assert "steered peers: 198.19.0.2, fd00:19::2" in lines
    assert any(ln.startswith("queue: 0 packets") and "nat-keepalive" in ln for ln in lines)
    assert "connections: 2" in lines
    gw_line = next(ln for ln in lines if ln.lstrip().startswith("#1 "))
    assert "gateway" in gw_line and "open" in gw_line
    assert "198.18.0.1:4500 <-> 198.19.5.5:40000" in gw_line
    assert "frames in/out 5/4  bytes in/out 1500/1200" in out
    assert "IKE SPIs 1112131415161718 (previous 0102030405060708)" in out
    assert "ESP SPIs c0ffee01" in out
    assert "drops esp-congested=2, ike-spi-held-elsewhere=1" in out
    cl_line = next(ln for ln in lines if ln.lstrip().startswith("#2 "))
    assert "client" in cl_line and "connecting" in cl_line
    assert "[fd00::1]:50123 <-> [fd00:19::2]:443" in cl_line
    assert "IKE SPIs -" in out and "ESP SPIs -" in out


def test_status_json_output(control):
    server, conf, st = control
    proc = run_cli("status", "--config", str(conf), "--json")
    assert proc.returncode == 0, proc.stderr
    assert server.received == [b"status\n"]
    assert json.loads(proc.stdout) == st


def test_status_socket_option_overrides_the_config(control, tmp_path):
    server, _, st = control
    conf = tmp_path / "other.conf"
    conf.write_text("tcpencap {\n    status_socket = /nonexistent/ctl\n}\n")
    proc = run_cli("status", "--config", str(conf), "--socket", str(server.path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pid"] == st["pid"]


def test_status_against_a_server_that_says_nothing(tmp_path):
    """A socket that accepts and closes without a reply: exit 1, no traceback."""
    path = tmp_path / "mute.sock"
    conf = tmp_path / "tcpencap.conf"
    conf.write_text("tcpencap {\n}\n")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(64)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        proc = run_cli("status", "--config", str(conf), "--socket", str(path))
    finally:
        t.join(10)
        srv.close()
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert f"bad reply from {path}" in proc.stderr
    assert "Traceback" not in proc.stderr
