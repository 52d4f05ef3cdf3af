"""Socket options for the TCP connections that carry IKE and ESP.

The per-socket IPsec bypass (protocols.md C.3): like charon's own UDP sockets, every TCP
socket tcpencap uses for a peer gets an ALLOW policy for both directions, so a
host-to-host IPsec policy can never swallow the connection that carries that very SA.
"""

from __future__ import annotations

import socket
import struct

IP_XFRM_POLICY = 17
IPV6_XFRM_POLICY = 35
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_ALLOW = 0

# struct xfrm_userpolicy_info: selector (56) + lifetime_cfg (64) + lifetime_cur (32)
# + priority, index (8) + dir, action, flags, share (4) = 164, padded to 168 on 64-bit.
_POLICY_SIZE = 168
_FAMILY_OFFSET = 40  # xfrm_selector.family
_DIR_OFFSET = 160


def _policy(family: int, direction: int) -> bytes:
    buf = bytearray(_POLICY_SIZE)
    struct.pack_into("=H", buf, _FAMILY_OFFSET, family)
    buf[_DIR_OFFSET] = direction
    buf[_DIR_OFFSET + 1] = XFRM_POLICY_ALLOW
    return bytes(buf)


def set_ipsec_bypass(sock: socket.socket) -> None:
    """Exempt ``sock`` from IPsec policies in both directions (needs CAP_NET_ADMIN)."""
    family = sock.family
    if family == socket.AF_INET:
        level, opt = socket.IPPROTO_IP, IP_XFRM_POLICY
    else:
        level, opt = socket.IPPROTO_IPV6, IPV6_XFRM_POLICY
    for direction in (XFRM_POLICY_IN, XFRM_POLICY_OUT):
        sock.setsockopt(level, opt, _policy(int(family), direction))


def set_nodelay(sock: socket.socket) -> None:
    """IKE and ESP are latency-bound datagrams: never let Nagle hold one back."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def is_local_address(addr: str) -> bool:
    """Is ``addr`` one of this host's addresses (in this namespace)? Binding tells."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((addr, 0))
        except OSError:
            return False
    return True
