"""The nfnetlink message that gives one verdict to every queued packet up to an id.

libnetfilter_queue's per-packet verdict costs one sendmsg per packet, and it goes out before
the packet's frame is written to TCP. NFQNL_MSG_VERDICT_BATCH (Linux >= 3.1) settles a whole
read of the queue with one message, sent after the TCP write, so neither the syscall nor its
latency sits in front of the data (include/uapi/linux/netfilter/nfnetlink_queue.h).
"""

from __future__ import annotations

import struct

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_VERDICT_HDR = 2
NLM_F_REQUEST = 0x1
NF_DROP = 0
NF_ACCEPT = 1

_NLMSGHDR = struct.Struct("=IHHII")  # host order
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (queue number, big-endian)
_NLATTR = struct.Struct("=HH")
_VERDICT_HDR = struct.Struct("!II")  # verdict, packet id
BATCH_LEN = _NLMSGHDR.size + _NFGENMSG.size + _NLATTR.size + _VERDICT_HDR.size


def verdict_batch(queue_num: int, last_id: int, verdict: int = NF_DROP, seq: int = 0) -> bytes:
    """The message that gives ``verdict`` to all packets of ``queue_num`` with id <= last_id."""
    msg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH
    return b"".join(
        (
            _NLMSGHDR.pack(BATCH_LEN, msg_type, NLM_F_REQUEST, seq & 0xFFFFFFFF, 0),
            _NFGENMSG.pack(0, 0, queue_num),  # AF_UNSPEC, NFNETLINK_V0
            _NLATTR.pack(_NLATTR.size + _VERDICT_HDR.size, NFQA_VERDICT_HDR),
            _VERDICT_HDR.pack(verdict, last_id & 0xFFFFFFFF),
        )
    )
