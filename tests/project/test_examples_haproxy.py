"""The HAProxy configurations shipped in configs/examples are valid for Debian's HAProxy
(``haproxy -c``), and say what tcpencap relies on: PROXY v2 to every VPN backend, and on
a balancer, stickiness by source address and sessions shut down with a failed gateway."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "examples"
CONFIGS = sorted(EXAMPLES.glob("*/haproxy*.cfg"))


def test_there_are_haproxy_examples() -> None:
    assert [p.name for p in CONFIGS] == ["haproxy-balancer.cfg", "haproxy.cfg"], CONFIGS


def _haproxy() -> str:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(haproxy).exists(), "haproxy is needed (scripts/setup.sh installs it)"
    return haproxy


def _haproxy_version() -> tuple[int, int]:
    out = subprocess.run([_haproxy(), "-v"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"HA-?Proxy version (\d+)\.(\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_haproxy(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_haproxy_accepts_the_example(path: Path) -> None:
    """Accepted without a warning. HAProxy 2.6 (Debian 12) says "Configuration file is valid";
    since 2.9 (Debian 13: 3.0) ``haproxy -c`` is silent on success (only ``-V`` prints it):
    HAProxy's change, harmless, so each version is held to what it prints."""
    res = _check(path)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 0, out
    if _haproxy_version() < (2, 9):
        assert out == "Configuration file is valid", out
    else:
        assert out == "", out


def test_haproxy_check_rejects_a_broken_example(tmp_path: Path) -> None:
    """The check above can fail: one unknown keyword makes ``haproxy -c`` exit non-zero."""
    broken = tmp_path / "broken.cfg"
    broken.write_text(CONFIGS[0].read_text() + "\nbackend broken\n    no-such-keyword 1\n")
    res = _check(broken)
    assert res.returncode != 0 and "no-such-keyword" in res.stdout + res.stderr, res


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_vpn_server_sends_proxy_v2(path: Path) -> None:
    text = path.read_text()
    servers = [ln.split() for ln in text.splitlines() if ln.strip().startswith("server ")]
    vpn = [s for s in servers if s[1] != "web"]
    assert vpn
    default = next((ln for ln in text.splitlines() if "default-server" in ln), "")
    for s in vpn:
        assert "send-proxy-v2" in s or "send-proxy-v2" in default, s
    if "balancer" in path.name:
        assert "stick on src" in text and "stick-table type ipv6" in text
        assert "on-marked-down shutdown-sessions" in default
