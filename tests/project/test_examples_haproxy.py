"""The HAProxy configurations shipped in configs/examples are valid for Debian's HAProxy
(``haproxy -c``), and say what tcpencap relies on: PROXY v2 to every VPN backend, and on
a balancer, stickiness by source address and sessions shut down with a failed gateway."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "examples"
CONFIGS = sorted(EXAMPLES.glob("*/haproxy*.cfg"))


def test_there_are_haproxy_examples() -> None:
    assert [p.name for p in CONFIGS] == ["haproxy-balancer.cfg", "haproxy.cfg"], CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_haproxy_accepts_the_example(path: Path) -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(haproxy).exists(), "haproxy is needed (scripts/setup.sh installs it)"
    res = subprocess.run(
        [haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Configuration file is valid" in res.stdout + res.stderr


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
