"""nfq.verdict's batch verdict message, byte by byte and against the real kernel.

The kernel tests run QueueReader (and a bare NetfilterQueue) in a child
`ip netns exec NS python3 -c ...` inside a private namespace whose OUTPUT queues UDP to one
port on loopback; the child prints JSON (what the handler saw, what the receiver got,
/proc/net/netfilter/nfnetlink_queue) and the assertions are made here.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nfq.verdict import BATCH_LEN, NF_ACCEPT, NF_DROP, verdict_batch
from tests.labkit.e2e import private_netns

REPO = Path(__file__).resolve().parents[2]


# --- the message --------------------------------------------------------------------------


def test_layout_of_a_drop_batch():
    msg = verdict_batch(4500, 0x01020304, NF_DROP, seq=7)
    assert len(msg) == BATCH_LEN == 32
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", msg, 0)
    assert (length, mtype, flags, seq, pid) == (32, 0x0303, 1, 7, 0)
    assert msg[16:20] == bytes([0, 0]) + (4500).to_bytes(2, "big")  # AF_UNSPEC, v0, res_id
    assert struct.unpack_from("=HH", msg, 20) == (12, 2)  # nlattr: NFQA_VERDICT_HDR
    assert msg[24:32] == b"\x00\x00\x00\x00" + b"\x01\x02\x03\x04"


@given(
    st.integers(0, 65535),
    st.integers(0, 2**32 - 1),
    st.sampled_from([NF_DROP, NF_ACCEPT]),
    st.integers(0, 2**40),
)
def test_fields_round_trip(queue, last_id, verdict, seq):
    msg = verdict_batch(queue, last_id, verdict, seq=seq)
    assert len(msg) == BATCH_LEN
    assert struct.unpack_from("!H", msg, 18)[0] == queue
    assert struct.unpack_from("!II", msg, 24) == (verdict, last_id)
    assert struct.unpack_from("=I", msg, 8)[0] == seq & 0xFFFFFFFF


# --- against the kernel -------------------------------------------------------------------

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
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stderr}"
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture
def ns():
    with private_netns("te-verdict", ("ip", "iptables")) as name:
        yield name


def test_queue_reader_drops_every_packet_with_batch_verdicts(ns):
    res = run_in_ns(
        ns,
        f"""
        from nfq.queue import QueueReader
        seen, batches = [], []

        async def main():
            loop = asyncio.get_running_loop()
            reader = QueueReader({QUEUE}, seen.append, batches.append)
            reader.start(loop)
            for burst in range(10):
                for i in range(20):
                    tx.sendto(b"%d-%d" % (burst, i), ("127.0.0.1", {PORT}))
                await asyncio.sleep(0.05)
            out["stats"] = queue_stats()
            out["verdict_errors"] = reader.verdict_errors
            reader.stop()

        asyncio.run(main())
        out["seen"] = len(seen)
        out["payload_tails"] = sorted(p[28:].decode() for p in seen)[:3]
        out["received"] = len(received())
        out["reads"] = batches.count(False)
        """,
    )
    assert res["seen"] == 200
    assert res["payload_tails"] == ["0-0", "0-1", "0-10"]
    assert res["received"] == 0, "a queued packet got through: the drop verdict did not apply"
    assert res["stats"] == {"waiting": 0, "dropped": 0, "user_dropped": 0}
    assert res["verdict_errors"] == 0
    assert 1 <= res["reads"] <= 200


def test_accept_batch_releases_exactly_the_packets_up_to_the_id(ns):
    """Hold ten packets, accept the first five by id, then the rest: the receiver gets them
    in those two steps, so the kernel read our queue number, id and verdict."""
    res = run_in_ns(
        ns,
        f"""
        import os, time
        from netfilterqueue import NetfilterQueue
        from nfq.verdict import NF_ACCEPT, verdict_batch
        held = []
        nfq = NetfilterQueue()
        nfq.bind({QUEUE}, held.append)
        sock = socket.socket(fileno=os.dup(nfq.get_fd()))
        for i in range(10):
            tx.sendto(b"p%d" % i, ("127.0.0.1", {PORT}))
        deadline = time.monotonic() + 5
        while len(held) < 10 and time.monotonic() < deadline:
            nfq.run(block=False)
            time.sleep(0.01)
        out["held"] = len(held)
        out["before"] = len(received())
        sock.send(verdict_batch({QUEUE}, held[4].id, NF_ACCEPT))
        time.sleep(0.1)
        out["first"] = [p.decode() for p in received()]
        out["stats_mid"] = queue_stats()
        sock.send(verdict_batch({QUEUE}, held[9].id, NF_ACCEPT))
        time.sleep(0.1)
        out["second"] = [p.decode() for p in received()]
        out["stats_end"] = queue_stats()
        sock.close()
        nfq.unbind()
        """,
    )
    assert res["held"] == 10
    assert res["before"] == 0
    assert res["first"] == [f"p{i}" for i in range(5)]
    assert res["stats_mid"]["waiting"] == 5
    assert res["second"] == [f"p{i}" for i in range(5, 10)]
    assert res["stats_end"]["waiting"] == 0
