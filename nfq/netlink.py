"""Framing of the nfnetlink requests tcpencap builds itself (queue verdicts, ipset):
nlmsghdr in host order, then nfgenmsg, then attributes padded to 4 octets."""

from __future__ import annotations

import struct

NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
NFGENMSG = struct.Struct("!BBH")  # family, version (NFNETLINK_V0), res_id (big-endian)
NLATTR = struct.Struct("=HH")  # length, type


def attr(atype: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 octets."""
    head = NLATTR.pack(NLATTR.size + len(payload), atype)
    return head + payload + b"\0" * (-len(payload) % 4)


def nfnl_message(
    subsys: int, cmd: int, attrs: bytes, *, seq: int, flags: int, family: int = 0, res_id: int = 0
) -> bytes:
    """One nfnetlink request of ``subsys``/``cmd`` carrying ``attrs``."""
    body = NFGENMSG.pack(family, 0, res_id) + attrs
    head = NLMSGHDR.pack(NLMSGHDR.size + len(body), (subsys << 8) | cmd, flags, seq & 0xFFFFFFFF, 0)
    return head + body
