"""The one role type both encapsulations use: which end of the TCP connection this host is."""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    """A string enum, so configuration and status text compare and print as before."""

    CLIENT = "client"  # opens the TCP connection (a road warrior behind a UDP-blocking network)
    GATEWAY = "gateway"  # accepts it (the VPN gateway, reachable from the internet)
