"""The asyncio protocol of one RFC 9329 TCP connection: feeds the engine what the socket
delivers and writes what the engine transmits. Decisions are the engine's; this file only
knows about transports: write batching and the send-buffer bound."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from typing import TYPE_CHECKING

from tcpencap.aio.sockopts import set_ipsec_bypass, set_nodelay
from tcpencap.core.outputs import count

if TYPE_CHECKING:
    from tcpencap.aio.daemon import Daemon

IKE_HARD_LIMIT_FACTOR = 4  # IKE may overshoot the send buffer bound this many times


def host_text(text: str) -> str:
    return str(ipaddress.ip_address(text.split("%")[0]))


class TcpProtocol(asyncio.Protocol):
    """A gateway connection is given its id by the engine when it is accepted; a client
    connection is created for the engine's Connect (id and generation known)."""

    def __init__(self, daemon: Daemon, conn_id: int = 0, generation: int = 0) -> None:
        self.daemon = daemon
        self.engine = daemon.engine
        self.conn_id = conn_id
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.registered = False
        self._wbuf: list[bytes] = []  # frames of the current queue batch
        self._wlen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                set_nodelay(sock)
                set_ipsec_bypass(sock)
        now = time.monotonic()
        d = self.daemon
        if self.conn_id:  # client
            if self.engine.connected(now, self.conn_id, self.generation):
                d.protocols[self.conn_id] = self
                self.registered = True
            else:
                transport.close()  # closed while it was connecting: this socket is not wanted
        else:
            local = transport.get_extra_info("sockname")
            peer = transport.get_extra_info("peername")
            cid = self.engine.accept(
                now, host_text(local[0]), local[1], host_text(peer[0]), peer[1]
            )
            if cid is None:
                transport.close()
            else:
                self.conn_id = cid
                d.protocols[cid] = self
                self.registered = True
        d.after()

    def data_received(self, data: bytes) -> None:
        if self.registered:
            self.engine.receive_data(time.monotonic(), self.conn_id, self.generation, data)
            self.daemon.after()

    def eof_received(self) -> bool | None:
        if self.registered:
            self.engine.eof_received(time.monotonic(), self.conn_id, self.generation)
            self.daemon.after()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.registered:
            return
        self.registered = False
        d = self.daemon
        if d.protocols.get(self.conn_id) is self:
            del d.protocols[self.conn_id]
        error = str(exc) if exc else None
        self.engine.connection_lost(time.monotonic(), self.conn_id, self.generation, error)
        d.after()

    def pause_writing(self) -> None:  # backpressure is the buffer bound in send()
        pass

    def resume_writing(self) -> None:
        pass

    def send(self, frame: bytes, is_ike: bool, frames: int = 1) -> None:
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        size = tr.get_write_buffer_size() + self._wlen
        limit = self.daemon.config.gateway.max_buffer
        if size > limit:
            drops = self.daemon.drops_of(self.conn_id)
            if not is_ike:
                drops["esp-congested"] = drops.get("esp-congested", 0) + frames
                return
            if size > limit * IKE_HARD_LIMIT_FACTOR:
                count(drops, "ike-congested")
                self.daemon.log_limited("ike-congested", "conn %d: IKE dropped: send buffer full",
                                        self.conn_id)  # fmt: skip
                return
        if self.daemon.batching:
            if not self._wbuf:
                self.daemon.dirty.append(self)
            self._wbuf.append(frame)
            self._wlen += len(frame)
        else:
            tr.write(frame)

    def flush_writes(self) -> None:
        """One write (one send syscall) for all frames of a queue batch."""
        buf, self._wbuf, self._wlen = self._wbuf, [], 0
        tr = self.transport
        if buf and tr is not None and not tr.is_closing():
            tr.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
