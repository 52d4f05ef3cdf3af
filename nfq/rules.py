"""tcpencap's own iptables/ip6tables chains.

Layout (both families, ``mangle`` table so it runs before any filter rule an admin has):
  OUTPUT  -> jump to TCPENCAP_OUT (inserted once, first)
  TCPENCAP_OUT: one rule per steered peer:
      -d PEER -p udp -m multiport --sports 500,4500 -j NFQUEUE --queue-num N

Only rules in chains tcpencap owns are ever changed; the single jump rule is the only thing
added to a built-in chain. Without a reader bound to the queue the kernel drops queued
packets, so a TCP peer's traffic never leaks out as UDP while tcpencap is down
(fail-closed); stale chains of a crashed run are removed at start.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Iterable

log = logging.getLogger("tcpencap.nfq")

TABLE = "mangle"
DEFAULT_CHAIN = "TCPENCAP_OUT"


class RuleError(RuntimeError):
    pass


def _tool(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def _run(family: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [_tool(family), "-w", "5", "-t", TABLE, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuleError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


class SteeringRules:
    """The steering set: peers whose UDP 500/4500 goes to the queue instead of the wire."""

    def __init__(
        self,
        queue_num: int,
        *,
        chain: str = DEFAULT_CHAIN,
        ike_ports: Iterable[int] = (500, 4500),
    ) -> None:
        self.queue_num = queue_num
        self.chain = chain
        self.ike_ports = ",".join(str(p) for p in ike_ports)
        self._peers: set[str] = set()
        self.installed = False

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    def _peer_rule(self, peer: str) -> list[str]:
        return [
            "-d",
            peer,
            "-p",
            "udp",
            "-m",
            "multiport",
            "--sports",
            self.ike_ports,
            "-j",
            "NFQUEUE",
            "--queue-num",
            str(self.queue_num),
        ]

    def install(self) -> None:
        """Remove anything a crashed run left, then create the chains and jump rules."""
        self.remove(quiet=True)
        for fam in (4, 6):
            _run(fam, "-N", self.chain)
            _run(fam, "-I", "OUTPUT", "1", "-j", self.chain)
        self.installed = True
        for peer in sorted(self._peers):
            self._add_rule(peer)

    def remove(self, *, quiet: bool = False) -> None:
        """Delete the jump rules (every copy) and the chains; safe to call repeatedly."""
        for fam in (4, 6):
            for _ in range(64):
                if _run(fam, "-D", "OUTPUT", "-j", self.chain, check=False).returncode:
                    break
            if _run(fam, "-F", self.chain, check=False).returncode == 0:
                _run(fam, "-X", self.chain, check=False)
                if not quiet:
                    log.info("removed %s chain %s", _tool(fam), self.chain)
        self.installed = False

    def _add_rule(self, peer: str) -> None:
        fam = ipaddress.ip_address(peer).version
        _run(fam, "-A", self.chain, *self._peer_rule(peer))

    def add_peer(self, peer: str) -> bool:
        """Steer ``peer``; True when it was new."""
        peer = str(ipaddress.ip_address(peer))
        if peer in self._peers:
            return False
        self._peers.add(peer)
        if self.installed:
            self._add_rule(peer)
        log.info("steering UDP 500/4500 to %s into queue %d", peer, self.queue_num)
        return True

    def remove_peer(self, peer: str) -> bool:
        peer = str(ipaddress.ip_address(peer))
        if peer not in self._peers:
            return False
        self._peers.discard(peer)
        if self.installed:
            fam = ipaddress.ip_address(peer).version
            _run(fam, "-D", self.chain, *self._peer_rule(peer), check=False)
        log.info("no longer steering %s", peer)
        return True


def chain_exists(chain: str = DEFAULT_CHAIN, family: int = 4) -> bool:
    """For tests and status: does the chain exist in the current namespace?"""
    return _run(family, "-S", chain, check=False).returncode == 0


def list_rules(family: int = 4) -> str:
    return _run(family, "-S", check=False).stdout
