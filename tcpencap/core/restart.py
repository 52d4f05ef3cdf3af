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


def member_address(member: str) -> bytes | None:
    """The address of a set member as ``ipset list`` writes it (``ADDR`` or
    ``ADDR,PORT``); None for anything else."""
    text = member.rsplit(",", 1)[0] if member.count(",") == 1 else member
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        return None


def sa_hosts(sas: list[dict[str, Any]]) -> set[bytes]:
    """The remote addresses of charon's IKE SAs (a list-sas answer)."""
    hosts: set[bytes] = set()
    for item in sas:
        for sa in as_dict(item).values():
            host = address(as_dict(sa).get("remote-host"))
            if host is not None:
                hosts.add(host)
    return hosts


def still_held(remembered: Iterable[str], sas: list[dict[str, Any]] | None) -> list[bytes]:
    """The remembered peers to keep steering: those charon holds an IKE SA with, or all
    of them when charon could not be asked (``sas`` None: keep steering, fail closed)."""
    peers = []
    for member in remembered:
        addr = member_address(member)
        if addr is not None and addr not in peers:
            peers.append(addr)
    if sas is None:
        return peers
    hosts = sa_hosts(sas)
    return [p for p in peers if p in hosts]
