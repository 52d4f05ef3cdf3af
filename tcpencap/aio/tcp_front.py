"""The front of a TCP connection in the shell: a load balancer's PROXY v2 header and TLS
(tcpencap.core.front does the bytes; this mixin of TcpProtocol admits the client the
header names, runs the front's deadline and reports its failures to the engine)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from tcpencap.aio.engine_timer import EngineTimer
from tcpencap.aio.sockopts import is_local_address
from tcpencap.aio.tcp_host import TcpHost
from tcpencap.core.front import Addressed, FrontError, Secured, StreamFront
from tcpencap.core.outputs import bracket

log = logging.getLogger("tcpencap")


def host_text(text: str) -> str:
    return str(ipaddress.ip_address(text.split("%")[0]))


class FrontHandling:
    """TcpProtocol's part that deals with its ``front`` (None once there is none)."""

    host: TcpHost
    engine: Any
    transport: asyncio.Transport | None
    front: StreamFront | None
    registered: bool
    conn_id: int
    generation: int
    _front_timer: EngineTimer
    _proxy_slot: bool
    _sockname: tuple[str, int]

    def _accept(self, now: float, local: tuple[str, int], peer: tuple[str, int]) -> bool:
        raise NotImplementedError

    def _attach_native(self) -> None:
        raise NotImplementedError

    def _write_raw(self, data: bytes) -> None:
        raise NotImplementedError

    def _arm_front(self) -> None:
        """After every input of the front: its deadline, or none once it has passed it."""
        self._front_timer.arm(self.front.deadline if self.front is not None else None)

    def _front_due(self) -> None:
        """The front decides (StreamFront.expired); this carries it out."""
        front = self.front
        if front is None:
            return
        failure = front.expired(self.host.clock.now())
        if failure is None:
            self._arm_front()  # early: wait for the rest
        elif failure.quiet:  # a health check's connection that did not close by itself
            self._release_proxy_slot()
            if self.transport is not None:
                self.transport.close()
        else:
            self._front_failed(failure)
            self.host.after()

    def _peer_name(self) -> str:
        """The socket's peer as the logs write it (IPv6 in brackets)."""
        tr = self.transport
        peer = tr.get_extra_info("peername") if tr is not None else None
        return f"{bracket(host_text(peer[0]))}:{peer[1]}" if peer else "?"

    def _release_proxy_slot(self) -> None:
        if self._proxy_slot:
            self._proxy_slot = False
            self.engine.proxied_done()

    def _front_failed(self, exc: FrontError) -> None:
        now = self.host.clock.now()
        if self.registered:
            self.engine.front_failed(now, self.conn_id, self.generation, exc.reason, exc.detail)
            return
        self._release_proxy_slot()
        tr = self.transport
        name = self._peer_name()
        header = self.front.header if self.front is not None else None
        if header is not None and not header.local:
            name = f"{bracket(header.source)}:{header.source_port} (via {name})"
        self.engine.front_refused(now, exc.reason, name, exc.detail)
        if tr is not None:
            tr.close()

    def _through_front(self, data: bytes) -> None:
        """Bytes before (or beneath) the RFC 9329 stream."""
        front = self.front
        assert front is not None
        try:
            events = front.receive_data(data)
            while events:
                ev = events.pop(0)
                if isinstance(ev, Addressed) and not ev.header.local:
                    if not self._admit_proxied(ev.header):
                        return
                    events[:0] = front.resume()  # what followed the header
                else:
                    self._deliver(ev)
        except FrontError as exc:
            self._write_raw(front.data_to_send())  # TLS's alert tells the peer why
            self._front_failed(exc)
            return
        self._write_raw(front.data_to_send())
        if front.done and not front.tls and self.registered:
            self.front = None  # plain from here on
            self._attach_native()
        self._arm_front()

    def _deliver(self, ev: Any) -> None:
        now = self.host.clock.now()
        if isinstance(ev, bytes):
            if self.registered:
                self.engine.receive_data(now, self.conn_id, self.generation, ev)
        elif isinstance(ev, Addressed):
            pass  # LOCAL, the proxy's own connection: not accepted, closed at the deadline
        elif isinstance(ev, Secured):
            log.info("conn %d: TLS up (%s, %s)", self.conn_id, ev.version, ev.cipher)
        elif self.registered:  # Ended: TLS close_notify
            self.engine.eof_received(now, self.conn_id, self.generation)

    def _admit_proxied(self, header: Any) -> bool:
        """The proxy named the client: accept it (its limits apply) before anything else
        of the connection, a TLS handshake included, is looked at."""
        self._release_proxy_slot()
        local, peer = self._proxied_ends(header)
        return self._accept(self.host.clock.now(), local, peer)

    def _proxied_ends(self, h: Any) -> tuple[tuple[str, int], tuple[str, int]]:
        """The ends charon sees: the client the proxy names, and this host's address. Where
        the proxy connected over loopback or in the other family, the socket's address is
        none charon knows, and the header's destination is used: only if it is an address
        of this host, or the packets given to charon would be routed away."""
        local = self._sockname
        sock_addr = ipaddress.ip_address(local[0])
        if sock_addr.is_loopback or sock_addr.version != ipaddress.ip_address(h.source).version:
            if not is_local_address(h.destination):
                raise FrontError(
                    "proxy-destination",
                    f"the PROXY header's destination {h.destination} is not an address of "
                    "this host (a balancer elsewhere must connect in the client's family)",
                )
            local = (h.destination, h.destination_port)
        return local, (h.source, h.source_port)
