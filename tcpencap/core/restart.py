"""What a starting daemon keeps steered from the run before it (pure).

The steering sets outlive the daemon (nfq/rules.py), so at start they still hold the TCP
peers of the previous run. A peer that charon still holds an IKE SA with must stay steered:
charon keeps sending it DPD, rekeys and ESP, and with no TCP connection yet those packets
are dropped, which is right (never UDP) until the peer reconnects. The others go when the
new set is swapped in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from tcpencap.core.vici_facts import address, as_dict
from tcpencap.core.vici_facts import port as vici_port


def member_of(member: str) -> tuple[bytes, int | None] | None:
    """A set member as ``ipset list`` writes it: (address, None) for ``ADDR``, (address,
    port) for ``ADDR,PORT`` (an endpoint set's); None for anything else."""
    text, port = member, None
    if member.count(",") == 1:
        text, port_text = member.split(",")
        port_text = port_text.rsplit(":", 1)[-1]  # the CLI may write udp:PORT
        if not (port_text.isascii() and port_text.isdigit()):  # "²" is a digit, not a port
            return None
        port = int(port_text)
    try:
        return ipaddress.ip_address(text).packed, port
    except ValueError:
        return None


def sa_endpoints(sas: list[dict[str, Any]]) -> set[tuple[bytes, int]]:
    """The remote (address, port) of charon's IKE SAs (a list-sas answer)."""
    found: set[tuple[bytes, int]] = set()
    for item in sas:
        for sa in as_dict(item).values():
            sa = as_dict(sa)
            host = address(sa.get("remote-host"))
            if host is not None:
                found.add((host, vici_port(sa.get("remote-port"), 0)))
    return found


def sa_hosts(sas: list[dict[str, Any]]) -> set[bytes]:
    """The remote addresses of charon's IKE SAs (a list-sas answer)."""
    return {host for host, _port in sa_endpoints(sas)}


def still_held(
    remembered: Iterable[str], sas: list[dict[str, Any]] | None
) -> tuple[list[bytes], list[tuple[bytes, int]]]:
    """The remembered peers (whole addresses) and endpoints to keep steering: those
    charon holds an IKE SA with (an endpoint: at that port), or all of them when charon
    could not be asked (``sas`` None: keep steering, fail closed)."""
    peers: list[bytes] = []
    endpoints: list[tuple[bytes, int]] = []
    for member in remembered:
        parsed = member_of(member)
        if parsed is None:
            continue
        addr, port = parsed
        if port is None and addr not in peers:
            peers.append(addr)
        elif port is not None and (addr, port) not in endpoints:
            endpoints.append((addr, port))
    if sas is None:
        return peers, endpoints
    held = sa_endpoints(sas)
    hosts = {host for host, _port in held}
    return [p for p in peers if p in hosts], [e for e in endpoints if e in held]
