"""Read an NFQUEUE inside the asyncio loop.

Every queued packet is dropped: the shim carries it over TCP itself (or it is a keepalive
or garbage that must not leave as UDP). The drop is one batch verdict per read of the queue,
sent after the caller has flushed its writes, so the data leaves before the bookkeeping.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from netfilterqueue import NetfilterQueue

from .verdict import verdict_batch

log = logging.getLogger("tcpencap.nfq")

QUEUE_MAXLEN = 4096
SOCK_RCVBUF = 4 * 1024 * 1024


class QueueReader:
    """Binds queue ``num`` and calls ``handler(payload_bytes)`` for every packet.

    Every read of the queue socket handles all packets waiting in it; ``on_batch``
    brackets that run (True before, False after) so the caller can coalesce its own
    writes, e.g. one TCP send per connection instead of one per packet.

    With ``flows`` (tcpencap.native's FlowCache, which the engine clears whenever its
    table changed) and ``native`` (the extension) the socket is read by a QueueWorker on a
    thread of its own instead. It writes the packets it knows to their connections'
    TcpWriters and gives the batch verdict itself. Only the rest reaches Python:
    ``on_native_batch(misses, hits)`` (hits: framed for a connection without writer) and
    ``on_stalled(conn_ids)`` (writers with octets the socket did not take).
    libnetfilter_queue binds the queue.

    ``max_len`` bounds the packets the kernel holds for this queue (beyond, it drops them);
    ``budget`` bounds the netlink reads per turn of the event loop, so a queue that strangers
    fill (cTCP's segments from the wire) cannot keep the loop from the others.
    """

    def __init__(
        self,
        num: int,
        handler: Callable[[bytes], None],
        on_batch: Callable[[bool], None] | None = None,
        *,
        flows: Any = None,
        on_native_batch: Callable[[list[bytes], list[tuple[int, bytes, int]]], None] | None = None,
        on_stalled: Callable[[list[int]], None] | None = None,
        native: Any = None,
        on_failed: Callable[[str], None] | None = None,
        max_len: int = QUEUE_MAXLEN,
        budget: int | None = None,
    ) -> None:
        self.num = num
        self.max_len = max_len
        self.budget = budget
        self._handler = handler
        self._on_batch = on_batch
        self._flows = flows if on_native_batch is not None and native is not None else None
        self._on_native_batch = on_native_batch
        self._on_stalled = on_stalled
        self._native = native
        self._on_failed = on_failed  # the reader thread died: called on the loop
        self._worker: Any = None
        self._thread: threading.Thread | None = None
        self.overruns = 0  # the kernel dropped queued packets (ENOBUFS on the socket)
        self.batches = 0
        self._nfq = NetfilterQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None  # the queue's netlink socket, for verdicts
        self._held: list[object] = []  # packets of this read, waiting for the batch verdict
        self._seq = 0
        self.packets = 0
        self.errors = 0
        self.verdict_errors = 0

    def _callback(self, pkt: object) -> None:
        data = pkt.get_payload()  # type: ignore[attr-defined]
        self._held.append(pkt)
        self.packets += 1
        try:
            self._handler(data)
        except Exception:  # a bug in one packet's path must not stop the queue
            self.errors += 1
            log.exception("error handling a queued packet")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._nfq.bind(self.num, self._callback, max_len=self.max_len, sock_len=SOCK_RCVBUF)
        fd = self._nfq.get_fd()
        self._sock = socket.socket(fileno=os.dup(fd))
        if self.budget is not None:
            self._sock.setblocking(False)
        self._loop = loop
        if self._flows is not None:
            # The thread starts in start_thread(): after the daemon's capability drop,
            # since a thread keeps the capabilities it was created with.
            self._worker = self._native.QueueWorker(self._flows, fd, self.num)
            return
        loop.add_reader(fd, self._on_readable)

    def start_thread(self) -> None:
        """Start the native reader thread (no-op on the Python path)."""
        if self._worker is not None and self._thread is None:
            self._thread = threading.Thread(
                target=self._run_worker, name=f"queue-{self.num}", daemon=True
            )
            self._thread.start()

    @property
    def threaded(self) -> bool:
        return self._worker is not None

    def stats(self) -> dict[str, int]:
        """packets and reads, from whichever reads the queue."""
        if self._worker is not None:
            st = self._worker.stats()
            return {"packets": st["packets"], "reads": st["reads"]}
        return {"packets": self.packets, "reads": self.batches}

    def _read(self) -> None:
        if self.budget is None:
            self._nfq.run(block=False)
        else:
            assert self._sock is not None
            self._nfq.run_socket(_Budgeted(self._sock, self.budget))

    def _on_readable(self) -> None:
        self.batches += 1
        try:
            if self._on_batch is None:
                self._read()
                return
            self._on_batch(True)
            try:
                self._read()
            finally:
                self._on_batch(False)
        finally:
            self._settle()

    def _run_worker(self) -> None:
        """The worker thread: reads the queue in C until stop()."""
        assert self._worker is not None
        try:
            self._worker.run(self._deliver)
        except BaseException as exc:  # MemoryError included: nothing reads the queue now
            log.exception("queue %d: the reader thread failed", self.num)
            self.errors += 1
            if self._on_failed is not None and self._loop is not None:
                why = f"queue {self.num}: the reader thread failed: {exc!r}"
                self._loop.call_soon_threadsafe(self._on_failed, why)

    def _deliver(self, result: tuple[Any, ...]) -> None:
        """On the worker thread: what Python must see goes to the event loop."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._handle_round, result)

    def _handle_round(self, result: tuple[Any, ...]) -> None:
        """One read's leftovers, on the event loop: stalled writers, misses, a verdict that
        C could not send."""
        last_id, _n, misses, hits, overruns, stalled, verdict_errno = result
        if overruns:
            self.overruns += overruns
            log.warning("queue %d: the kernel dropped queued packets (socket full)", self.num)
        try:
            if stalled and self._on_stalled is not None:
                self._on_stalled(stalled)
            if (misses or hits) and self._on_native_batch is not None:
                if self._on_batch is not None:
                    self._on_batch(True)
                try:
                    self._on_native_batch(misses, hits)
                finally:
                    if self._on_batch is not None:
                        self._on_batch(False)
        except Exception:  # a bug in one batch's path must not stop the queue
            self.errors += 1
            log.exception("error handling queued packets")
        if verdict_errno:
            self.verdict_errors += 1
            log.warning("queue %d: batch verdict failed (%s), again from Python", self.num,
                        os.strerror(verdict_errno))  # fmt: skip
            self._verdict(last_id)

    def _send_verdict(self, last_id: int) -> OSError | None:
        """NF_DROP for every packet up to ``last_id``, one message; the error if it failed."""
        self._seq += 1
        assert self._sock is not None
        try:
            self._sock.send(verdict_batch(self.num, last_id, seq=self._seq))
        except OSError as exc:
            self.verdict_errors += 1
            return exc
        return None

    def _verdict(self, last_id: int) -> None:
        for attempt in (1, 2):
            exc = self._send_verdict(last_id)
            if exc is None:
                return
            log.warning("queue %d: batch verdict failed (%s), attempt %d", self.num, exc, attempt)

    def _settle(self) -> None:
        """Drop every packet of this read with one verdict; one by one if that fails."""
        held = self._held
        if not held:
            return
        self._held = []
        exc = self._send_verdict(held[-1].id)  # type: ignore[attr-defined]
        if exc is None:
            return
        log.warning("queue %d: batch verdict failed (%s), dropping one by one", self.num, exc)
        for pkt in held:
            try:
                pkt.drop()  # type: ignore[attr-defined]
            except OSError as exc:
                log.warning("queue %d: verdict for packet failed: %s", self.num, exc)

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.stop()  # run() sees it within its 0.2 s poll
            if self._thread is not None:
                self._thread.join(2.0)
                if self._thread.is_alive():
                    log.warning("queue %d: the reader thread did not stop", self.num)
            self._worker = self._thread = None
        elif self._loop is not None:
            self._loop.remove_reader(self._nfq.get_fd())
        self._loop = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._nfq.unbind()


class _Budgeted:
    """The queue socket as ``run_socket`` reads it, out of reads after ``budget``: it then
    says EAGAIN, and the event loop comes back to the rest after the others' turn."""

    def __init__(self, sock: socket.socket, budget: int) -> None:
        self._sock = sock
        self._left = budget

    def recv(self, size: int) -> bytes:
        if self._left <= 0:
            raise BlockingIOError(errno.EAGAIN, "read budget spent")
        self._left -= 1
        return self._sock.recv(size)
