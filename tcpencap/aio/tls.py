"""SSL contexts for RFC 9329 over TLS: the gateway's, read from its certificate and key
files at start and on reload, and one per client connection, from its settings. Reading
files is I/O, so it lives in the shell; the TLS itself runs in tcpencap.core.front.

Both roles insist on TLS 1.3: both ends are RFC 9329 implementations, and 1.3's
encrypted handshake hides the certificate from the networks this is for."""

from __future__ import annotations

import ipaddress
import ssl
from typing import Any

from tcpencap.config import Config, ConnectionConfig, GatewayConfig
from tcpencap.core.front import StreamFront
from tcpencap.wire.packet import addr_text


def server_context(gw: GatewayConfig) -> ssl.SSLContext:
    """Raises OSError or ssl.SSLError when the files cannot be used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0  # clients never resume: each connection is a new handshake
    ctx.load_cert_chain(gw.tls_cert, gw.tls_key)
    return ctx


def client_context(conn: ConnectionConfig) -> ssl.SSLContext:
    """A CA file, the system's CAs, or (``tls_pin`` alone) no chain check: the pin is then
    the whole check, done by the front after the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if conn.tls_ca:
        ctx.load_verify_locations(cafile=conn.tls_ca)
    elif conn.tls_pin is not None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return ctx


class Fronts:
    """What the TCP protocol needs to build a connection's front: the contexts in use and
    the trusted proxies. A reload that cannot read the gateway's files keeps the previous
    context (the error is reported); connections already up keep theirs."""

    def __init__(self) -> None:
        self.server: ssl.SSLContext | None = None
        self._clients: dict[str, ssl.SSLContext] = {}  # by connection name
        self.proxies: tuple[Any, ...] = ()  # networks of trusted load balancers
        self._config: Config | None = None

    def configure(self, config: Config) -> list[str]:
        """Take ``config``'s settings, (re)reading the gateway's certificate and key and
        the clients' CA files; the errors, one line each. A connection whose CA cannot be
        read keeps the context it had; one that never had any cannot connect (it is
        never carried without TLS)."""
        self._config = config
        gw = config.gateway
        self.proxies = tuple(ipaddress.ip_network(n) for n in gw.proxy_protocol_from)
        errors: list[str] = []
        if not gw.tls_listen:
            self.server = None
        else:
            try:
                self.server = server_context(gw)
            except (OSError, ssl.SSLError) as exc:
                kept = " (keeping the certificate in use)" if self.server is not None else ""
                errors.append(
                    f"cannot load tls_cert {gw.tls_cert} / tls_key {gw.tls_key}: {exc}{kept}"
                )
        old, self._clients = self._clients, {}
        for conn in config.connections.values():
            if not conn.tls:
                continue
            try:
                self._clients[conn.name] = client_context(conn)
            except (OSError, ssl.SSLError) as exc:
                errors.append(f"connection {conn.name}: cannot load tls_ca {conn.tls_ca}: {exc}")
                if conn.name in old:
                    self._clients[conn.name] = old[conn.name]
        return errors

    def proxied(self, host: str) -> bool:
        """Must a connection from ``host`` begin with a PROXY header?"""
        if not self.proxies:
            return False
        addr = ipaddress.ip_address(host)
        return any(addr in net for net in self.proxies)

    def server_front(
        self, now: float, peer_host: str, tls_listener: bool
    ) -> tuple[StreamFront | None, bool]:
        """The front of a connection accepted from ``peer_host`` (on a TLS listener or
        not), and whether it must begin with a PROXY header. With proxies configured, every
        connection has a front: a header from anyone but them is refused by name."""
        proxied = self.proxied(peer_host)
        tls = self.server if tls_listener else None
        if not (proxied or tls is not None or self.proxies):
            return None, proxied
        assert self._config is not None  # proxies and contexts come with a configuration
        timeout = self._config.tls_handshake_timeout
        return StreamFront(now, timeout, server_side=True, proxy=proxied, tls=tls), proxied

    def client_front(
        self, now: float, peer: bytes, connections: dict[str, Any]
    ) -> StreamFront | None:
        """The front of a connection to ``peer``, for the configured connection (by name in
        ``connections``, the resolved intents) that reaches it with tls = yes. Raises
        OSError when that connection has no usable context."""
        cfg = self._config
        if cfg is None:
            return None
        for name, intent in connections.items():
            conn = cfg.connections.get(name)
            if conn is None or not conn.tls or peer not in intent.peers:
                continue
            ctx = self._clients.get(name)
            if ctx is None:
                raise OSError(f"connection {name}: no TLS context (tls_ca unreadable)")
            return StreamFront(
                now,
                cfg.tls_handshake_timeout,
                server_side=False,
                tls=ctx,
                server_hostname=conn.tls_sni or addr_text(peer),
                pin=conn.tls_pin,
            )
        return None
