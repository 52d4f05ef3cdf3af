"""The nfnetlink message that gives one verdict to every queued packet up to an id.

libnetfilter_queue's per-packet verdict costs one sendmsg per packet, and it goes out before
the packet's frame is written to TCP. NFQNL_MSG_VERDICT_BATCH (Linux >= 3.1) settles a whole
read of the queue with one message, sent after the TCP write, so neither the syscall nor its
latency sits in front of the data (include/uapi/linux/netfilter/nfnetlink_queue.h).
"""

from __future__ import annotations

import struct

from .netlink import NFGENMSG, NLATTR, NLM_F_REQUEST, NLMSGHDR, attr, nfnl_message

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_VERDICT_HDR = 2
NF_DROP = 0
NF_ACCEPT = 1

_VERDICT_HDR = struct.Struct("!II")  # verdict, packet id
BATCH_LEN = NLMSGHDR.size + NFGENMSG.size + NLATTR.size + _VERDICT_HDR.size


def verdict_batch(queue_num: int, last_id: int, verdict: int = NF_DROP, seq: int = 0) -> bytes:
    """The message that gives ``verdict`` to all packets of ``queue_num`` with id <= last_id."""
    payload = attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, last_id & 0xFFFFFFFF))
    return nfnl_message(
        NFNL_SUBSYS_QUEUE,
        NFQNL_MSG_VERDICT_BATCH,
        payload,
        seq=seq,
        flags=NLM_F_REQUEST,
        res_id=queue_num,  # family AF_UNSPEC
    )
