"""iptables/ip6tables chains of the cTCP (Cisco IPsec over TCP) data path.

cTCP has no kernel socket: every segment is read from NFQUEUE and written through a raw
socket (protocols.md A.13). Chains, all owned by tcpencap and created in both families:

  raw PREROUTING -> TCPENCAP_CTCP_IN (first rule)
      -p tcp [-d LISTEN_ADDR] --dport LISTEN_PORT -m addrtype --dst-type LOCAL
                                                  -j NFQUEUE   (gateway listen ports)
      -p tcp -s PEER --sport PEER_PORT -m addrtype --dst-type LOCAL
                                                  -j NFQUEUE   (client: the cTCP peers)
    The raw table runs before conntrack and before the host TCP stack; the queue verdict
    is always DROP, so the kernel never sees these segments and never answers them. Only
    segments for this host's own addresses are queued: a wildcard listener must never act
    for a host behind a gateway that routes (what it forwards is not ours to answer). They
    go to a queue of their own (``inbound_queue``), apart from charon's packets.
  raw OUTPUT -> TCPENCAP_CTCP_LO (first rule)
      -m mark --mark CTCP_MARK -j CT --notrack    our own segments: no conntrack state
      -m mark --mark CTCP_MARK -j ACCEPT
      -p tcp [-s LISTEN_ADDR] --sport LISTEN_PORT -j DROP      anything else the host
      -p tcp -d PEER --dport PEER_PORT            -j DROP      stack sends on those tuples
    Our segments are told apart by the socket mark: the raw socket that sends them sets
    SO_MARK = CTCP_MARK (0x63746370, "ctcp"). Every other TCP packet on a cTCP 5-tuple
    (an RST or ACK of the host stack, a stray local socket) is dropped (A.6).
  mangle OUTPUT -> TCPENCAP_CTCP_OUT: charon's UDP 500/4500 to cTCP peers -> NFQUEUE
    (a :class:`nfq.rules.SteeringRules` with its own chain name): a client's peers by
    address, a gateway's by the UDP endpoint their IKE came from.

Only these chains and the three jump rules are ever touched. They outlive the daemon like
the steering rules do (nfq/rules.py): a stop or crash leaves them, so the queue drops what
nobody reads; the raw chains are made again at start, the steering set is kept and swapped.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Iterable

from .rules import SteeringRules, run_iptables

log = logging.getLogger("tcpencap.nfq")

CTCP_MARK = 0x63746370
IN_CHAIN = "TCPENCAP_CTCP_IN"
LO_CHAIN = "TCPENCAP_CTCP_LO"
OUT_CHAIN = "TCPENCAP_CTCP_OUT"
_RAW_JUMPS = (("PREROUTING", IN_CHAIN), ("OUTPUT", LO_CHAIN))

Endpoint = tuple[str, int]


def _run(family: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_iptables(family, *args, table="raw", check=check)


def _family(addr: str) -> int:
    return ipaddress.ip_address(addr).version


def _addr_match(flag: str, addr: str) -> list[str]:
    """``-d ADDR`` unless ADDR is the wildcard of its family."""
    return [] if ipaddress.ip_address(addr).is_unspecified else [flag, addr]


class CtcpRules:
    """The raw-table rules for fixed endpoints plus the per-peer UDP steering set."""

    def __init__(
        self, queue_num: int, *, inbound_queue: int | None = None, mark: int = CTCP_MARK
    ) -> None:
        self.queue_num = queue_num
        self.inbound_queue = queue_num if inbound_queue is None else inbound_queue
        self.mark = mark
        self.steering = SteeringRules(queue_num, chain=OUT_CHAIN, endpoints=True)
        self.installed = False

    def _queue(self) -> list[str]:
        """Segments from the wire: for local addresses only, into the inbound queue."""
        return ["-m", "addrtype", "--dst-type", "LOCAL",
                "-j", "NFQUEUE", "--queue-num", str(self.inbound_queue)]  # fmt: skip

    def install(self, listen: Iterable[Endpoint] = (), peers: Iterable[Endpoint] = ()) -> None:
        """Create the chains: ``listen`` are gateway (ADDR, PORT) endpoints, ``peers`` the
        (PEER, PORT) endpoints a client connects to. The steering set of a previous run
        stays in force (see SteeringRules.install)."""
        self._remove_raw(quiet=True)
        mark = f"0x{self.mark:x}"
        try:
            for fam in (4, 6):
                for builtin, chain in _RAW_JUMPS:
                    _run(fam, "-N", chain)
                    _run(fam, "-I", builtin, "1", "-j", chain)
                _run(fam, "-A", LO_CHAIN, "-m", "mark", "--mark", mark, "-j", "CT", "--notrack")
                _run(fam, "-A", LO_CHAIN, "-m", "mark", "--mark", mark, "-j", "ACCEPT")
            self.installed = True
            for addr, port in listen:
                fam, p = _family(addr), str(port)
                _run(fam, "-A", IN_CHAIN, "-p", "tcp", *_addr_match("-d", addr),
                     "--dport", p, *self._queue())  # fmt: skip
                _run(fam, "-A", LO_CHAIN, "-p", "tcp", *_addr_match("-s", addr),
                     "--sport", p, "-j", "DROP")  # fmt: skip
                log.info("cTCP: queueing TCP to %s port %d", addr, port)
            for fam in (4, 6):
                # A conntrack match (with no target: it changes nothing) makes the kernel
                # reassemble fragments before the raw table; CT --notrack alone does not with
                # iptables-nft, and the queue must see whole cTCP segments (docs/mtu.md).
                _run(fam, "-I", LO_CHAIN, "1", "-m", "conntrack", "--ctstate", "INVALID")
            for addr, port in peers:
                self.add_peer_endpoint(addr, port)
            self.steering.install()
        except BaseException:
            self._remove_raw(quiet=True)
            raise

    def release(self) -> None:
        """The daemon stops: every chain and set stays (fail-closed)."""
        self.steering.release()
        self.installed = False

    def remove(self, *, quiet: bool = False) -> None:
        """Delete jump rules (every copy), chains and the steering set; safe to call
        repeatedly."""
        self._remove_raw(quiet=quiet)
        self.steering.remove(quiet=quiet)
        self.installed = False

    def _remove_raw(self, *, quiet: bool) -> None:
        for fam in (4, 6):
            for builtin, chain in _RAW_JUMPS:
                for _ in range(64):
                    if _run(fam, "-D", builtin, "-j", chain, check=False).returncode:
                        break
                if _run(fam, "-F", chain, check=False).returncode == 0:
                    _run(fam, "-X", chain, check=False)
                    if not quiet:
                        log.info("removed raw chain %s (IPv%d)", chain, fam)

    def _peer_rules(self, addr: str, port: int) -> list[tuple[str, ...]]:
        p = str(port)
        return [
            (IN_CHAIN, "-p", "tcp", "-s", addr, "--sport", p, *self._queue()),
            (LO_CHAIN, "-p", "tcp", "-d", addr, "--dport", p, "-j", "DROP"),
        ]

    def add_peer_endpoint(self, addr: str, port: int) -> None:
        """Queue TCP from the cTCP peer ``addr``:``port`` (a client's server); only our
        marked raw segments may go to it."""
        for rule in self._peer_rules(addr, port):
            _run(_family(addr), "-A", *rule)
        log.info("cTCP: queueing TCP from %s port %d", addr, port)

    def remove_peer_endpoint(self, addr: str, port: int) -> None:
        for rule in self._peer_rules(addr, port):
            _run(_family(addr), "-D", *rule, check=False)

    def steer(self, addr: str, port: int, on: bool) -> bool:
        """charon's UDP steering, as :meth:`SteeringRules.steer` (a gateway's cTCP peer by
        its endpoint: another host behind its address keeps its own traffic)."""
        return self.steering.steer(addr, port, on)


def raw_chain_exists(chain: str, family: int = 4) -> bool:
    return _run(family, "-S", chain, check=False).returncode == 0
