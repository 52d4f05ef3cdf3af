"""nfq.verdict's batch verdict message, byte by byte and against the real kernel.

The kernel test runs a bare NetfilterQueue in a child `ip netns exec NS python3 -c ...`
(tests/nfq/queue_netns.py); the assertions are made here.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from nfq.verdict import BATCH_LEN, NF_ACCEPT, NF_DROP, verdict_batch
from tests.nfq.queue_netns import PORT, QUEUE, ns, run_in_ns

__all__ = ["ns"]  # the fixture, used by name


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
