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
(fail-closed). That is why the chains and sets outlive the daemon (stop, restart, crash)
and go only when asked (``tcpencap remove-rules``, run by strongswan.service's stop):

  install()  keeps what a previous run left (its sets' members are what ``remembered``
             reports: ``ADDR`` and ``ADDR,PORT``) and starts a staging set beside each
             set; every peer or endpoint steered from now on goes into both.
  commit()   swaps the staging sets in (``ipset swap``: one instant, no flush), so the
             previous run's members that nobody steered again stop being queued only now.
  release()  the daemon stops: everything stays.   remove(): everything goes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import shlex
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


def staging_name(live: str) -> str:
    """The set a starting daemon fills before it replaces the ``live`` set's members."""
    return f"{live}n"


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
        self.staging = False  # between install() and commit()
        self.remembered: list[str] = []  # the members a previous run left, at install()
        self.classify_queue: int | None = None  # see set_classify

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    @property
    def steered_endpoints(self) -> frozenset[tuple[str, int]]:
        return frozenset(self._endpoints)

    def _sets_of(self, fam: int) -> list[tuple[str, str]]:
        """(name, ipset type) of the sets this chain matches, for one family."""
        sets = [(set_name(self.chain, fam), "hash:ip")]
        if self.endpoints:
            sets.append((endpoint_set_name(self.chain, fam), "hash:ip,port"))
        return sets

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
        """Make sure the sets, the chain and the jump exist, keeping whatever a previous
        run left in force (its members are in ``remembered``); start a staging set.
        Nothing is removed here: a gap would let charon's packets out as UDP."""
        self.remembered = []
        for fam in (4, 6):
            for live, kind in self._sets_of(fam):
                staged = staging_name(live)
                try:
                    self.remembered += self._members(live)
                except RuleError:
                    self._ipset(
                        lambda ips, fam=fam, live=live, kind=kind: ips.create(live, fam, kind)
                    )
                with contextlib.suppress(RuleError):  # a crashed start's
                    self._ipset(lambda ips, staged=staged: ips.destroy(staged))
                self._ipset(
                    lambda ips, fam=fam, staged=staged, kind=kind: ips.create(staged, fam, kind)
                )
            self._ensure_chain(fam)
        self.installed = self.staging = True
        if self.remembered:
            log.info("steering set of a previous run kept: %s", ", ".join(self.remembered))
        for peer in sorted(self._peers):
            self._add(peer)
        for addr, port in sorted(self._endpoints):
            self._add_endpoint(addr, port)

    def _members(self, name: str) -> list[str]:
        try:
            if self._sets is None:
                self._sets = IpsetSocket()
            return self._sets.members(name)
        except OSError as exc:
            raise RuleError(f"ipset: {exc}") from exc

    def _wanted(self, fam: int) -> list[list[str]]:
        """The chain's rules, in order: the steered peers, then (on a TCP client) charon's
        IKE to anyone else, for the per-packet check of tcpencap.core.ike_guard."""
        rules = [self._queue_rule(fam)]
        if self.endpoints:
            rules.append(self._queue_rule(fam, endpoints=True))
        if self.classify_queue is not None:
            # not what tcpencap injects towards charon (to a local address)
            q = ["-m", "addrtype", "!", "--dst-type", "LOCAL"]
            q += ["-j", "NFQUEUE", "--queue-num", str(self.classify_queue)]
            payload = "0x0>>0x16&0x3c@0x8=0x0" if fam == 4 else "0x30=0x0"  # the marker
            rules.append(["-p", "udp", "-m", "udp", "--sport", "500", *q])
            rules.append(["-p", "udp", "-m", "udp", "--sport", "4500", "-m", "u32", "--u32",
                          payload, *q])  # fmt: skip
        return rules

    def set_classify(self, queue: int | None) -> None:
        """Queue charon's IKE to unsteered addresses to ``queue`` (None: stop)."""
        if queue == self.classify_queue:
            return
        self.classify_queue = queue
        if self.installed:
            for fam in (4, 6):
                self._ensure_chain(fam)

    def _ensure_chain(self, fam: int) -> None:
        """The chain holding exactly the wanted rules, and the jump to it first in OUTPUT;
        a rule that differs (another queue number) goes after the right ones are in."""
        wanted = self._wanted(fam)
        if _run(fam, "-S", self.chain, check=False).returncode:
            _run(fam, "-N", self.chain)
        for i, rule in enumerate(wanted, start=1):  # in this order: steered sets first
            if _run(fam, "-C", self.chain, *rule, check=False).returncode:
                _run(fam, "-I", self.chain, str(i), *rule)
        lines = _run(fam, "-S", self.chain).stdout.splitlines()[1:]
        listed = [shlex.split(line)[2:] for line in lines]
        if all(rule in listed for rule in wanted):  # spelt as iptables does: the rest is stale
            for spec in listed:
                if spec not in wanted:
                    _run(fam, "-D", self.chain, *spec, check=False)
        if _run(fam, "-C", "OUTPUT", *self._jump(), check=False).returncode:
            _run(fam, "-I", "OUTPUT", "1", *self._jump())
        for _ in range(64):  # jumps of the older per-peer layout
            if _run(fam, "-D", "OUTPUT", "-j", self.chain, check=False).returncode:
                break

    def commit(self) -> None:
        """The staging set becomes the steering set in one step (``ipset swap``); the
        previous run's members that were not steered again stop being queued now."""
        if not self.staging:
            return
        for fam in (4, 6):
            for live, _kind in self._sets_of(fam):
                staged = staging_name(live)
                try:
                    self._ipset(lambda ips, live=live, staged=staged: ips.swap(live, staged))
                except RuleError as exc:
                    if live != set_name(self.chain, fam):
                        raise
                    # Another set type (an older tcpencap's): no swap between types.
                    log.info("steering set %s: %s; replacing it", live, exc)
                    self._replace(fam)
                with contextlib.suppress(RuleError):
                    self._ipset(lambda ips, staged=staged: ips.destroy(staged))
        self.staging = False

    def _replace(self, fam: int) -> None:
        """Replace a live set that cannot be swapped, queueing by the staging set (which
        holds the same peers) while the live one is made again: no moment unsteered."""
        live = set_name(self.chain, fam)
        staged = staging_name(live)
        by_staged = self._queue_rule(fam)
        by_staged[by_staged.index(live)] = staged
        _run(fam, "-I", self.chain, "1", *by_staged)
        while _run(fam, "-D", self.chain, *self._queue_rule(fam), check=False).returncode == 0:
            pass
        for line in _run(fam, "-S", self.chain).stdout.splitlines()[1:]:
            if live in line.split():
                _run(fam, "-D", self.chain, *line.split()[2:], check=False)
        self._ipset(lambda ips: ips.destroy(live))
        self._ipset(lambda ips: ips.create(live, fam))
        for peer in self._peers:
            if ipaddress.ip_address(peer).version == fam:
                self._ipset(lambda ips, peer=peer: ips.add(live, peer))
        _run(fam, "-I", self.chain, "1", *self._queue_rule(fam))
        _run(fam, "-D", self.chain, *by_staged, check=False)

    def release(self) -> None:
        """The daemon stops: the chains and sets stay (a queue nobody reads drops). A
        staging set not committed yet goes: the live set holds its peers and more."""
        if self.staging:
            for fam in (4, 6):
                for live, _kind in self._sets_of(fam):
                    with contextlib.suppress(RuleError):
                        self._ipset(lambda ips, live=live: ips.destroy(staging_name(live)))
            self.staging = False
        if self._sets is not None:
            self._sets.close()
            self._sets = None
        self.installed = False

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
            for live in (set_name(self.chain, fam), endpoint_set_name(self.chain, fam)):
                for name in (live, staging_name(live)):
                    with contextlib.suppress(RuleError):  # absent, or still in use
                        self._ipset(lambda ips, name=name: ips.destroy(name))
        self.installed = self.staging = False

    def _add(self, peer: str) -> None:
        fam = ipaddress.ip_address(peer).version
        self._ipset(lambda ips: ips.add(set_name(self.chain, fam), peer))
        if self.staging:
            self._ipset(lambda ips: ips.add(staging_name(set_name(self.chain, fam)), peer))

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

    def remove_peer(self, peer: str) -> bool:
        peer = str(ipaddress.ip_address(peer))
        if peer not in self._peers:
            return False
        self._peers.discard(peer)
        if self.installed:
            fam = ipaddress.ip_address(peer).version
            try:
                self._ipset(lambda ips: ips.delete(set_name(self.chain, fam), peer))
                if self.staging:
                    self._ipset(
                        lambda ips: ips.delete(staging_name(set_name(self.chain, fam)), peer)
                    )
            except RuleError as exc:
                log.warning("could not remove %s from the steering set: %s", peer, exc)
        log.info("no longer steering %s", peer)
        return True

    def _add_endpoint(self, addr: str, port: int) -> None:
        name = endpoint_set_name(self.chain, ipaddress.ip_address(addr).version)
        self._ipset(lambda ips: ips.add(name, addr, port))
        if self.staging:
            self._ipset(lambda ips: ips.add(staging_name(name), addr, port))

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
                if self.staging:
                    self._ipset(lambda ips: ips.delete(staging_name(name), ep[0], port))
            except RuleError as exc:
                log.warning("could not remove %s from the steering set: %s", _ep_text(ep), exc)
        log.info("no longer steering endpoint %s", _ep_text(ep))
        return True

    def steer(self, addr: str, port: int, on: bool) -> bool:
        """Start (``on``) or stop queueing charon's UDP to ``addr``: the whole address, or
        with ``port`` only that UDP endpoint (a gateway's TCP peer, whose address other
        hosts behind the same NAT may share over plain UDP). The one entry point the shells'
        ``Steer`` output uses; True when something changed."""
        if port:
            return self.add_endpoint(addr, port) if on else self.remove_endpoint(addr, port)
        return self.add_peer(addr) if on else self.remove_peer(addr)


def _ep_text(ep: tuple[str, int]) -> str:
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


def chain_exists(chain: str = DEFAULT_CHAIN, family: int = 4) -> bool:
    """For tests and status: does the chain exist in the current namespace?"""
    return _run(family, "-S", chain, check=False).returncode == 0


def list_rules(family: int = 4) -> str:
    return _run(family, "-S", check=False).stdout
