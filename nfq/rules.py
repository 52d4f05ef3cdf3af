"""tcpencap's own iptables/ip6tables chains and ipsets.

Layout (both families, ``mangle`` table so it runs before any filter rule an admin has):
  OUTPUT  -> -p udp -m multiport --sports 500,4500 -j TCPENCAP_OUT   (inserted once, first)
  TCPENCAP_OUT: -m set --match-set TCPENCAP_OUT_4 dst -j NFQUEUE --queue-num N
                -m set --match-set TCPENCAP_OUT_EP4 dst,dst -j NFQUEUE --queue-num N
  ipset TCPENCAP_OUT_4 (hash:ip, IPv4) / TCPENCAP_OUT_6 (hash:ip, IPv6): the steered peers
  (a client's configured gateways); TCPENCAP_OUT_EP4 / _EP6 (hash:ip,port, only with
  ``endpoints``): a gateway's TCP peers as the UDP endpoints charon sees, so another host
  behind the same address (a NAT) keeps talking plain UDP.

A packet that is not UDP from charon's ports never enters the chain, and a steered peer is
one hash lookup, whatever the number of peers. With a rule per peer, every packet the host
sent walked all of them: 1000 peers made each packet cost about 30 microseconds more
(bench/bench_steering.py). The sets are changed over netlink (nfq/ipset.py), not by a
process per peer.

Only chains and sets tcpencap owns are ever changed; the single jump rule is the only thing
added to a built-in chain. Without a reader bound to the queue the kernel drops queued
packets, so a TCP peer's traffic never leaks out as UDP while tcpencap is down
(fail-closed); stale chains and sets of a crashed run are removed at start.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import subprocess
from collections.abc import Callable, Iterable

from .ipset import IpsetSocket

log = logging.getLogger("tcpencap.nfq")

TABLE = "mangle"
DEFAULT_CHAIN = "TCPENCAP_OUT"


class RuleError(RuntimeError):
    pass


def _tool(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def run_iptables(
    family: int, *args: str, table: str = TABLE, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """One iptables/ip6tables call (waiting up to 5 s for the xtables lock); RuleError
    with the command and its message when ``check`` and it fails."""
    argv = [_tool(family), "-w", "5", "-t", table, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuleError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def _run(family: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_iptables(family, *args, check=check)


def set_name(chain: str, family: int) -> str:
    """The ipset holding the peers of ``chain`` for one address family."""
    return f"{chain}_{family}"


def endpoint_set_name(chain: str, family: int) -> str:
    """The ipset holding the steered UDP endpoints of ``chain`` for one address family."""
    return f"{chain}_EP{family}"


class SteeringRules:
    """The steering set: peers whose UDP 500/4500 goes to the queue instead of the wire."""

    def __init__(
        self,
        queue_num: int,
        *,
        queues: int = 1,
        chain: str = DEFAULT_CHAIN,
        ike_ports: Iterable[int] = (500, 4500),
        endpoints: bool = False,
    ) -> None:
        self.queue_num = queue_num
        self.queues = queues
        self.chain = chain
        self.ike_ports = ",".join(str(p) for p in ike_ports)
        self.endpoints = endpoints  # also a set of UDP endpoints (add_endpoint)
        self._peers: set[str] = set()
        self._endpoints: set[tuple[str, int]] = set()
        self._sets: IpsetSocket | None = None  # opened at first use
        self.installed = False

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    @property
    def steered_endpoints(self) -> frozenset[tuple[str, int]]:
        return frozenset(self._endpoints)

    def _ipset(self, op: Callable[[IpsetSocket], None]) -> None:
        """Run one ipset request; a refusal (or no ipset in the kernel) is a RuleError."""
        try:
            if self._sets is None:
                self._sets = IpsetSocket()
            op(self._sets)
        except OSError as exc:
            raise RuleError(f"ipset: {exc}") from exc

    def _jump(self) -> list[str]:
        return ["-p", "udp", "-m", "multiport", "--sports", self.ike_ports, "-j", self.chain]

    def _queue_rule(self, family: int, endpoints: bool = False) -> list[str]:
        name = (endpoint_set_name if endpoints else set_name)(self.chain, family)
        return [
            "-m",
            "set",
            "--match-set",
            name,
            "dst,dst" if endpoints else "dst",
            "-j",
            "NFQUEUE",
            # Several queues: spread by the packet's address pair (the kernel hashes source
            # and destination), so one peer's packets stay in one queue and in order;
            # --queue-cpu-fanout would spread by CPU and reorder a peer's packets.
            *(
                ["--queue-balance", f"{self.queue_num}:{self.queue_num + self.queues - 1}"]
                if self.queues > 1
                else ["--queue-num", str(self.queue_num)]
            ),
        ]

    def install(self) -> None:
        """Remove anything a crashed run left, then create the sets, chains and jumps."""
        self.remove(quiet=True)
        for fam in (4, 6):
            self._ipset(lambda ips, fam=fam: ips.create(set_name(self.chain, fam), fam))
            if self.endpoints:
                ep_set = endpoint_set_name(self.chain, fam)
                self._ipset(lambda ips, n=ep_set, fam=fam: ips.create(n, fam, "hash:ip,port"))
            _run(fam, "-N", self.chain)
            _run(fam, "-A", self.chain, *self._queue_rule(fam))
            if self.endpoints:
                _run(fam, "-A", self.chain, *self._queue_rule(fam, endpoints=True))
            _run(fam, "-I", "OUTPUT", "1", *self._jump())
        self.installed = True
        for peer in sorted(self._peers):
            self._add(peer)
        for addr, port in sorted(self._endpoints):
            self._add_endpoint(addr, port)

    def remove(self, *, quiet: bool = False) -> None:
        """Delete the jump rules (every copy, also of the older per-peer layout), the
        chains and then the sets they used; safe to call repeatedly."""
        for fam in (4, 6):
            for jump in (self._jump(), ["-j", self.chain]):
                for _ in range(64):
                    if _run(fam, "-D", "OUTPUT", *jump, check=False).returncode:
                        break
            if _run(fam, "-F", self.chain, check=False).returncode == 0:
                _run(fam, "-X", self.chain, check=False)
                if not quiet:
                    log.info("removed %s chain %s", _tool(fam), self.chain)
            for name in (set_name(self.chain, fam), endpoint_set_name(self.chain, fam)):
                with contextlib.suppress(RuleError):  # absent, or still in use by a stale rule
                    self._ipset(lambda ips, name=name: ips.destroy(name))
        self.installed = False

    def _add(self, peer: str) -> None:
        fam = ipaddress.ip_address(peer).version
        self._ipset(lambda ips: ips.add(set_name(self.chain, fam), peer))

    def add_peer(self, peer: str) -> bool:
        """Steer ``peer``; True when it was new."""
        peer = str(ipaddress.ip_address(peer))
        if peer in self._peers:
            return False
        self._peers.add(peer)
        if self.installed:
            self._add(peer)
        log.info("steering UDP 500/4500 to %s into queue %d", peer, self.queue_num)
        return True

    def _add_endpoint(self, addr: str, port: int) -> None:
        name = endpoint_set_name(self.chain, ipaddress.ip_address(addr).version)
        self._ipset(lambda ips: ips.add(name, addr, port))

    def add_endpoint(self, addr: str, port: int) -> bool:
        """Steer charon's UDP to ``addr``:``port`` only; True when it was new."""
        if not self.endpoints:
            raise RuleError("these rules were made without an endpoint set")
        ep = (str(ipaddress.ip_address(addr)), port)
        if ep in self._endpoints:
            return False
        self._endpoints.add(ep)
        if self.installed:
            self._add_endpoint(*ep)
        log.info("steering UDP 500/4500 to endpoint %s into queue %d", _ep_text(ep), self.queue_num)
        return True

    def remove_endpoint(self, addr: str, port: int) -> bool:
        ep = (str(ipaddress.ip_address(addr)), port)
        if ep not in self._endpoints:
            return False
        self._endpoints.discard(ep)
        if self.installed:
            name = endpoint_set_name(self.chain, ipaddress.ip_address(ep[0]).version)
            try:
                self._ipset(lambda ips: ips.delete(name, ep[0], port))
            except RuleError as exc:
                log.warning("could not remove %s from the steering set: %s", _ep_text(ep), exc)
        log.info("no longer steering endpoint %s", _ep_text(ep))
        return True

    def remove_peer(self, peer: str) -> bool:
        peer = str(ipaddress.ip_address(peer))
        if peer not in self._peers:
            return False
        self._peers.discard(peer)
        if self.installed:
            fam = ipaddress.ip_address(peer).version
            try:
                self._ipset(lambda ips: ips.delete(set_name(self.chain, fam), peer))
            except RuleError as exc:
                log.warning("could not remove %s from the steering set: %s", peer, exc)
        log.info("no longer steering %s", peer)
        return True


def _ep_text(ep: tuple[str, int]) -> str:
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


def chain_exists(chain: str = DEFAULT_CHAIN, family: int = 4) -> bool:
    """For tests and status: does the chain exist in the current namespace?"""
    return _run(family, "-S", chain, check=False).returncode == 0


def list_rules(family: int = 4) -> str:
    return _run(family, "-S", check=False).stdout
