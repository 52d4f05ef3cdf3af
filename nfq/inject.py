"""Hand a rebuilt IP packet to the local stack through raw sockets (IPPROTO_RAW).

lab.md: this works for IPv4 and IPv6, with strict rp_filter, and injected packets do not
come back through the OUTPUT queue rule (their destination is a local address).
"""

from __future__ import annotations

import socket

from tcpencap.wire.packet import addr_text


class RawInjector:
    def __init__(self) -> None:
        self._v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self._v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for sock in (self._v4, self._v6):
            sock.setblocking(False)
        self._dst_cache: dict[bytes, str] = {}

    def inject(self, packet: bytes, dst: bytes) -> None:
        """Send ``packet`` (whole IP header included) towards its own local destination."""
        text = self._dst_cache.get(dst)
        if text is None:
            text = self._dst_cache[dst] = addr_text(dst)
        if len(dst) == 4:
            self._v4.sendto(packet, (text, 0))
        else:
            self._v6.sendto(packet, (text, 0))

    def fds(self) -> tuple[int, int]:
        """The IPv4 and IPv6 sockets, for the native path's batched sends."""
        return self._v4.fileno(), self._v6.fileno()

    def close(self) -> None:
        self._v4.close()
        self._v6.close()
