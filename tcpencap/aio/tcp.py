"""The asyncio protocol of one RFC 9329 TCP connection: feeds the engine what the socket
delivers and writes what the engine transmits. Decisions are the engine's (and the send
buffer's rule is tcpencap.core.send_buffer's); this file only knows about transports: write
batching and the native writer. It sees the shell through :class:`TcpHost` only.

On the native data path the socket's send side belongs to a TcpWriter (tcpencap.native):
the queue reader writes the ESP it recognises straight into it, in C, and the engine's own
frames go through the same buffer, so both keep their order. asyncio still reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from tcpencap.aio.engine_timer import EngineTimer
from tcpencap.aio.sockopts import set_ipsec_bypass, set_nodelay
from tcpencap.aio.tcp_front import FrontHandling, host_text
from tcpencap.aio.tcp_host import TcpHost
from tcpencap.core.front import StreamFront
from tcpencap.core.send_buffer import IKE_OVERSHOOT, congested, flush_deadline

log = logging.getLogger("tcpencap")


class TcpProtocol(FrontHandling, asyncio.Protocol):
    """A gateway connection is given its id by the engine when it is accepted; a client
    connection is created for the engine's Connect (id and generation known)."""

    def __init__(
        self, host: TcpHost, conn_id: int = 0, generation: int = 0, tls_listener: bool = False
    ) -> None:
        self.host = host
        self.engine = host.engine
        self.conn_id = conn_id
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.registered = False
        self._wbuf: list[bytes] = []  # frames of the current queue batch
        self._wlen = 0
        self.writer: Any = None  # the native path's TcpWriter
        self._fd = -1
        self._writing = False  # add_writer is armed for the writer's rest
        self._close_pending = False
        self._flush_timer = EngineTimer(self._close_now)  # for the writer's rest at close
        self._reported = (0, 0, 0, 0)  # writer counters already handed to the engine
        self.lent = False  # the native inbound worker reads this connection
        self.tls_listener = tls_listener
        self.front: StreamFront | None = None  # PROXY header and TLS, while there are any
        self._front_timer = EngineTimer(self._front_due)  # the front's deadline
        self._proxy_slot = False  # admitted as a proxy's connection, no header yet
        self._sockname: tuple[str, int] = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                set_nodelay(sock)
                set_ipsec_bypass(sock)
        now = self.host.clock.now()
        host = self.host
        if self.conn_id:  # client
            conn = self.engine.conn(self.conn_id)
            try:
                if conn is not None:
                    self.front = host.client_front(now, conn.entry.peer)
            except OSError as exc:  # never without TLS: the connect fails (and is retried)
                self.engine.connect_failed(now, self.conn_id, self.generation, str(exc))
                transport.close()
                host.after()
                return
            if self.front is not None:
                self._arm_front()
                self._write_raw(self.front.data_to_send())  # the ClientHello
            if self.engine.connected(now, self.conn_id, self.generation):
                self._register(self.conn_id)
            else:
                transport.close()  # closed while it was connecting: this socket is not wanted
        else:
            local = transport.get_extra_info("sockname")
            peer = transport.get_extra_info("peername")
            self._sockname = (host_text(local[0]), local[1])
            peer_host = host_text(peer[0])
            self.front, proxied = host.server_front(now, peer_host, self.tls_listener)
            if self.front is not None:
                self._arm_front()
            if proxied:
                # Admitted (within the limits) until its header names the client.
                self._proxy_slot = self.engine.admit_proxied(now, self._peer_name())
                if not self._proxy_slot:
                    transport.close()
            else:
                self._accept(now, self._sockname, (peer_host, peer[1]))
        host.after()

    def _accept(self, now: float, local: tuple[str, int], peer: tuple[str, int]) -> bool:
        cid = self.engine.accept(now, local[0], local[1], peer[0], peer[1])
        if cid is None:
            if self.transport is not None:
                self.transport.close()
            return False
        self._register(cid)
        return True

    def _register(self, cid: int) -> None:
        self.conn_id = cid
        self.registered = True
        self.host.register(self)
        if self.front is None or self.front.done and not self.front.tls:
            self.front = None
            self._attach_native()

    def _attach_native(self) -> None:
        """The native writer takes the socket's send side (plain RFC 9329 only: TLS
        records are written by asyncio)."""
        tr = self.transport
        sock = tr.get_extra_info("socket") if tr is not None else None
        if self.engine.datapath.native is None or sock is None or self.writer is not None:
            return
        # Its own descriptor of the socket: asyncio refuses add_writer on the
        # transport's, and a closed transport cannot leave the writer a reused number.
        self._fd = os.dup(sock.fileno())
        self.writer = self.engine.datapath.native.TcpWriter(
            self._fd, self.host.max_buffer, IKE_OVERSHOOT
        )
        self.engine.datapath.flows.set_writer(self.conn_id, self.writer)

    def _write_raw(self, data: bytes) -> None:
        tr = self.transport
        if data and tr is not None and not tr.is_closing():
            tr.write(data)

    # --- the native writer ------------------------------------------------------------

    def want_write(self) -> None:
        if not self._writing and self.writer is not None and self._fd >= 0:
            self._writing = True
            asyncio.get_running_loop().add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        w = self.writer
        if w is None or w.flush() == 0 or w.error:
            self._stop_writing()
            if self._close_pending:
                self._close_now()

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_writer(self._fd)

    def report_writer(self) -> None:
        """Hand the engine what the writer sent or dropped on its behalf since last time."""
        w = self.writer
        if w is None or not self.registered:
            return
        now = (w.direct_frames, w.direct_bytes, w.esp_dropped, w.ike_dropped)
        delta = [a - b for a, b in zip(now, self._reported, strict=True)]
        self._reported = now
        if any(delta):
            self.engine.fast_path_sent(self.conn_id, *delta)

    def _detach_writer(self) -> None:
        self.take_back()  # the worker must let go before the descriptor closes
        w, self.writer = self.writer, None
        if w is None:
            return
        self._stop_writing()
        flows = self.engine.datapath.flows
        if flows is not None:
            flows.drop_writer(self.conn_id)
        w.close()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # --- lending the receive side to the native inbound worker -------------------------

    def maybe_lend(self) -> None:
        """An open connection's reading goes to the inbound worker (asyncio pauses)."""
        inbound = self.host.inbound
        tr = self.transport
        if (
            inbound is None
            or self.lent
            or not self.registered
            or self._fd < 0
            or self._close_pending
            or tr is None
            or tr.is_closing()
        ):
            return
        args = self.engine.lend_args(self.conn_id)
        if args is None:
            return
        tr.pause_reading()
        try:
            inbound.attach(self.conn_id, self._fd, *args, now=self.host.clock.now())
        except (OSError, ValueError) as exc:
            tr.resume_reading()
            why = f"conn {self.conn_id}: not lent to the worker: %s"
            self.engine.log_limited(self.host.clock.now(), "lend", why, exc)
            return
        self.lent = True

    def given_back(self, reason: str, counts: tuple[int, ...]) -> None:
        """The worker stopped reading: a frame for the engine, EOF, an error or a flood."""
        if not self.lent:
            return
        self.lent = False
        now = self.host.clock.now()
        self.engine.lent_received(
            now, self.conn_id, self.generation, counts, drain=True, over_rate=reason == "rate"
        )
        self.host.after()
        if reason == "frame":
            self.maybe_lend()  # still open: back to the worker
        if not self.lent and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()  # asyncio reads again (and sees EOF or the error)

    def take_back(self) -> None:
        """Before the socket closes: the worker lets go (its counts go to the engine)."""
        if not self.lent:
            return
        self.lent = False
        inbound = self.host.inbound
        counts = inbound.detach(self.conn_id) if inbound is not None else None
        if counts is not None:
            self.engine.lent_received(
                self.host.clock.now(), self.conn_id, self.generation, counts, drain=False
            )

    def report_lent(self) -> None:
        inbound = self.host.inbound
        if self.lent and inbound is not None:
            counts = inbound.counts(self.conn_id)
            if counts is not None and any(counts):
                self.engine.lent_received(
                    self.host.clock.now(), self.conn_id, self.generation, counts, drain=False
                )

    def data_received(self, data: bytes) -> None:
        if self.front is not None:
            self._through_front(data)
            self.host.after()
            return
        if self.registered:
            self.engine.receive_data(self.host.clock.now(), self.conn_id, self.generation, data)
            self.host.after()
            self.maybe_lend()

    def eof_received(self) -> bool | None:
        if self.registered:
            self.engine.eof_received(self.host.clock.now(), self.conn_id, self.generation)
            self.host.after()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush_timer.cancel()
        self._front_timer.cancel()
        self._release_proxy_slot()
        if not self.registered:
            return
        self.report_writer()
        self._detach_writer()  # takes the connection back from the inbound worker first
        self.registered = False
        self.host.unregister(self)
        error = str(exc) if exc else None
        self.engine.connection_lost(self.host.clock.now(), self.conn_id, self.generation, error)
        self.host.after()

    def pause_writing(self) -> None:  # backpressure is the buffer bound in send()
        pass

    def resume_writing(self) -> None:
        pass

    def send(self, frame: bytes, is_ike: bool, frames: int = 1) -> None:
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        w = self.writer
        if w is not None:  # the writer applies the same bound and counts its drops
            if not w.write(frame, is_ike, frames):
                if is_ike:
                    self._log_ike_dropped()
            elif w.pending:
                self.want_write()
            return
        size = tr.get_write_buffer_size() + self._wlen
        if self.front is not None:
            size += self.front.held_octets
        congestion = congested(size, self.host.max_buffer, is_ike)
        if congestion is not None:
            self.engine.shell_dropped(self.conn_id, congestion, 1 if is_ike else frames)
            if is_ike:
                self._log_ike_dropped()
            return
        batch = self.host.batch
        if batch.active:
            if not self._wbuf:
                batch.dirty.append(self)
            self._wbuf.append(frame)
            self._wlen += len(frame)
        elif self.front is not None:
            self._write_raw(self.front.send(frame))
        else:
            tr.write(frame)

    def _log_ike_dropped(self) -> None:
        self.engine.log_limited(
            self.host.clock.now(),
            "ike-congested",
            "conn %d: IKE dropped: send buffer full",
            self.conn_id,
        )

    def flush_writes(self) -> None:
        """One write (one send syscall) for all frames of a queue batch."""
        buf, self._wbuf, self._wlen = self._wbuf, [], 0
        tr = self.transport
        if buf and tr is not None and not tr.is_closing():
            data = buf[0] if len(buf) == 1 else b"".join(buf)
            tr.write(data if self.front is None else self.front.send(data))

    def close(self) -> None:
        self.take_back()  # what arrives now is not delivered (the engine is closing it)
        w = self.writer
        if w is not None:
            flows = self.engine.datapath.flows
            if flows is not None:
                flows.drop_writer(self.conn_id)  # nothing new is written from now on
            if self._close_pending:
                return
            due = flush_deadline(self.host.clock.now(), bool(w.pending), bool(w.error))
            if due is not None:
                # the last frames (an IKE DELETE, say) leave before the connection closes
                self._close_pending = True
                self.want_write()
                self._flush_timer.arm(due)
                return
        self._close_now()

    def _close_now(self) -> None:
        self.report_writer()
        self._detach_writer()
        if self.front is not None and self.front.tls:
            self._write_raw(self.front.close_notify())
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
