"""Reload as a plan: what must change to go from one configuration to the next (pure).

The shell first resolves connection names to addresses (the configuration, else charon's
``get-conns``), builds an :class:`Intent` for the old and the new configuration, and runs
the operations :func:`plan` returns, in order. Steering is only ever added before it is
removed, so a connection whose settings change never has a moment in which its IKE could
leave as UDP.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("tcpencap")

RESTART_ONLY = ("queue_num", "queues", "status_socket", "vici_socket", "metrics_listen")


@dataclass(frozen=True, slots=True)
class ConnIntent:
    """A connection that is carried over TCP (``transport`` tcp or fallback)."""

    name: str
    encapsulation: str  # rfc9329 | ctcp
    transport: str  # tcp | fallback
    peers: tuple[bytes, ...]
    port: int
    fallback_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Intent:
    connections: dict[str, ConnIntent] = field(default_factory=dict)
    listen: tuple[tuple[str, int], ...] = ()
    ctcp_listen: tuple[tuple[str, int], ...] = ()
    tls_listen: tuple[tuple[str, int], ...] = ()
    restart_only: tuple[tuple[str, Any], ...] = ()

    def ctcp_peers(self) -> dict[bytes, int]:
        return {
            p: c.port
            for c in self.connections.values()
            if c.encapsulation == "ctcp"
            for p in c.peers
        }


def endpoints_overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Two listen endpoints that would receive the same segments (same port, same address
    or a wildcard of the same family)."""
    if a[1] != b[1]:
        return False
    x, y = ipaddress.ip_address(a[0]), ipaddress.ip_address(b[0])
    return x.version == y.version and (x == y or x.is_unspecified or y.is_unspecified)


# --- operations -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notice:
    text: str


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int
    tls: bool = False  # a TLS listener (gateway.tls_listen)


@dataclass(frozen=True, slots=True)
class StopListening:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class SteerTcp:
    """Queue charon's UDP to these peers of connection ``name`` (RFC 9329, port ``port``)."""

    name: str
    peers: tuple[bytes, ...]
    port: int


@dataclass(frozen=True, slots=True)
class UnsteerTcp:
    name: str


@dataclass(frozen=True, slots=True)
class WatchFallback:
    """UDP first; TCP port ``port`` after ``timeout`` seconds without an answer."""

    name: str
    peers: tuple[bytes, ...]
    port: int
    timeout: float


@dataclass(frozen=True, slots=True)
class UnwatchFallback:
    name: str


@dataclass(frozen=True, slots=True)
class CtcpPeers:
    """The cTCP client peers (address -> TCP port) are now exactly these."""

    peers: dict[bytes, int]


@dataclass(frozen=True, slots=True)
class Settings:
    """The configuration whose live settings (limits, timeouts, frame sizes) apply from now
    on: the first operation of every reload, for the engine that reads them."""

    config: Any


Operation = (
    Notice | Listen | StopListening | SteerTcp | UnsteerTcp | WatchFallback | UnwatchFallback
    | CtcpPeers | Settings
)  # fmt: skip


def restart_only(config: Any) -> tuple[tuple[str, Any], ...]:
    """The settings a running daemon cannot change."""
    keys = tuple((k, getattr(config, k)) for k in RESTART_ONLY)
    return (*keys, ("ctcp_listen", tuple(config.gateway.ctcp_listen)))


def unresolved(new: Any, old: Any = None, known: Any = ()) -> list[str]:
    """Connections carried over TCP whose addresses must come from charon's get-conns: no
    remote_addrs, and new, changed since ``old`` or not among the ``known`` answers."""
    before = old.connections if old is not None else {}
    return [
        n
        for n, c in new.connections.items()
        if c.transport != "udp" and not c.remote_addrs and (n not in known or before.get(n) != c)
    ]


def intent_of(config: Any, resolved: dict[str, list[str]] | None = None) -> Intent:
    """The TCP-relevant part of ``config``; ``resolved`` holds get-conns addresses for
    connections without ``remote_addrs``."""
    resolved = resolved or {}
    conns: dict[str, ConnIntent] = {}
    for name, c in config.connections.items():
        if c.transport == "udp":
            continue
        peers: list[bytes] = []
        for text in list(c.remote_addrs) or resolved.get(name, []):
            try:
                addr = ipaddress.ip_address(text).packed
            except ValueError:
                log.warning("connection %s: remote %r is not an address, skipped", name, text)
                continue
            if addr not in peers:
                peers.append(addr)
        if not peers:
            log.warning("connection %s: no remote address known, not steered", name)
        conns[name] = ConnIntent(
            name, c.encapsulation, c.transport, tuple(peers), c.remote_port, c.fallback_timeout
        )
    return Intent(
        conns,
        tuple(config.gateway.listen),
        tuple(config.gateway.ctcp_listen),
        tuple(config.gateway.tls_listen),
        restart_only(config),
    )


def _rfc9329(c: ConnIntent | None, transport: str) -> bool:
    return c is not None and c.encapsulation == "rfc9329" and c.transport == transport


def plan(old: Intent, new: Intent) -> list[Operation]:
    """Operations that take the daemon from ``old`` to ``new``: everything that starts
    (listeners, steering, fallback watches, cTCP peers) before everything that stops."""
    ops: list[Operation] = []
    old_keys, new_keys = dict(old.restart_only), dict(new.restart_only)
    for key, value in new_keys.items():
        if key in old_keys and old_keys[key] != value:
            ops.append(Notice(f"{key} changes only on restart"))
    # A listener that goes away and would take the port of a new one (the same endpoint
    # changing kind, plain <-> TLS, or an overlapping address) stops first: the kernel
    # refuses the second bind.
    new_eps = (*new.listen, *new.tls_listen)
    going = [ep for ep in old.listen if ep not in new.listen]
    going += [ep for ep in old.tls_listen if ep not in new.tls_listen]
    moved = [ep for ep in going if any(endpoints_overlap(ep, n) for n in new_eps)]
    ops += [StopListening(h, p) for h, p in moved]
    ops += [Listen(h, p) for h, p in new.listen if (h, p) not in old.listen]
    ops += [Listen(h, p, True) for h, p in new.tls_listen if (h, p) not in old.tls_listen]
    for name, c in new.connections.items():
        if old.connections.get(name) == c:
            continue
        if _rfc9329(c, "tcp"):
            ops.append(SteerTcp(name, c.peers, c.port))
        elif _rfc9329(c, "fallback"):
            ops.append(WatchFallback(name, c.peers, c.port, c.fallback_timeout))
    if old.ctcp_peers() != new.ctcp_peers():
        ops.append(CtcpPeers(new.ctcp_peers()))
    for name, c in old.connections.items():
        n = new.connections.get(name)
        if n == c:
            continue
        if _rfc9329(c, "fallback") and not _rfc9329(n, "fallback"):
            ops.append(UnwatchFallback(name))
        if _rfc9329(c, "tcp") and not _rfc9329(n, "tcp"):
            ops.append(UnsteerTcp(name))
    ops += [StopListening(h, p) for h, p in going if (h, p) not in moved]
    return ops


def describe(op: Operation) -> str:
    """One line for the log and the reload reply."""
    if isinstance(op, Notice):
        return op.text
    if isinstance(op, Listen):
        return f"listening on {_ep(op.host, op.port)}{' (TLS)' if op.tls else ''}"
    if isinstance(op, StopListening):
        return f"stopped listening on {_ep(op.host, op.port)}"
    if isinstance(op, SteerTcp):
        return f"connection {op.name}: TCP port {op.port} to {_peers(op.peers)}"
    if isinstance(op, WatchFallback):
        return f"connection {op.name}: UDP first, TCP port {op.port} after {op.timeout:g}s"
    if isinstance(op, UnwatchFallback):
        return f"connection {op.name}: no longer UDP-first with fallback"
    if isinstance(op, UnsteerTcp):
        return f"connection {op.name}: no longer over TCP"
    return f"cTCP peers: {_peers(tuple(op.peers)) or 'none'}"


def _ep(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peers(peers: tuple[bytes, ...]) -> str:
    return ", ".join(str(ipaddress.ip_address(p)) for p in peers)
