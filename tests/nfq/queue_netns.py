"""A child Python in a private network namespace whose OUTPUT queues UDP to one loopback
port: shared by the NFQUEUE kernel tests (tests/nfq/test_verdict.py, test_queue.py). The
child prints JSON (what the handler saw, what the receiver got,
/proc/net/netfilter/nfnetlink_queue); the assertions are made in the test."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.labkit.e2e import private_netns, python_in_netns

REPO = Path(__file__).resolve().parents[2]
PORT, QUEUE = 47001, 4777

CHILD = textwrap.dedent(
    f"""
    import asyncio, json, socket, subprocess, sys
    sys.path.insert(0, {str(REPO)!r})
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["iptables", "-w", "5", "-A", "OUTPUT", "-p", "udp", "--dport", "{PORT}",
                    "-j", "NFQUEUE", "--queue-num", "{QUEUE}"], check=True)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", {PORT}))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)

    def received():
        got = []
        while True:
            try:
                got.append(rx.recv(2048))
            except BlockingIOError:
                return got

    def queue_stats():
        for line in open("/proc/net/netfilter/nfnetlink_queue"):
            f = line.split()
            if int(f[0]) == {QUEUE}:
                return {{"waiting": int(f[2]), "dropped": int(f[5]), "user_dropped": int(f[6])}}
        return None

    out = {{}}
    """
)


def run_in_ns(ns: str, body: str) -> dict:
    code = CHILD + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    return python_in_netns(ns, code, timeout=60)


@pytest.fixture
def ns() -> Iterator[str]:
    with private_netns("te-nfq", ("ip", "iptables")) as name:
        yield name
