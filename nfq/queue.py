"""Read an NFQUEUE inside the asyncio loop.

Every queued packet gets its verdict in the callback: DROP, because the shim carries it
over TCP itself (or it is a keepalive or garbage that must not leave as UDP).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from netfilterqueue import NetfilterQueue

log = logging.getLogger("tcpencap.nfq")

QUEUE_MAXLEN = 4096
SOCK_RCVBUF = 4 * 1024 * 1024


class QueueReader:
    """Binds queue ``num`` and calls ``handler(payload_bytes)`` for every packet.

    Every read of the queue socket handles all packets waiting in it; ``on_batch``
    brackets that run (True before, False after) so the caller can coalesce its own
    writes, e.g. one TCP send per connection instead of one per packet.
    """

    def __init__(
        self,
        num: int,
        handler: Callable[[bytes], None],
        on_batch: Callable[[bool], None] | None = None,
    ) -> None:
        self.num = num
        self._handler = handler
        self._on_batch = on_batch
        self.batches = 0
        self._nfq = NetfilterQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.packets = 0
        self.errors = 0

    def _callback(self, pkt: object) -> None:
        data = pkt.get_payload()  # type: ignore[attr-defined]
        pkt.drop()  # type: ignore[attr-defined]
        self.packets += 1
        try:
            self._handler(data)
        except Exception:  # a bug in one packet's path must not stop the queue
            self.errors += 1
            log.exception("error handling a queued packet")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._nfq.bind(self.num, self._callback, max_len=QUEUE_MAXLEN, sock_len=SOCK_RCVBUF)
        self._loop = loop
        loop.add_reader(self._nfq.get_fd(), self._on_readable)

    def _on_readable(self) -> None:
        self.batches += 1
        if self._on_batch is None:
            self._nfq.run(block=False)
            return
        self._on_batch(True)
        try:
            self._nfq.run(block=False)
        finally:
            self._on_batch(False)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._nfq.get_fd())
            self._loop = None
        self._nfq.unbind()
