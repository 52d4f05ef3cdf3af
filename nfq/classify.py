"""A queue whose packets each get their own verdict: accepted (they leave as they are) or
dropped, as ``decide(payload)`` says. For the few packets that must be looked at one by one
(on a TCP client: charon's IKE to addresses that are not steered, see
tcpencap.core.ike_guard); everything carried over TCP goes through QueueReader instead.

With no reader bound the kernel drops what is queued here too: while tcpencap is down, none
of charon's IKE leaves a TCP client unchecked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from netfilterqueue import NetfilterQueue

log = logging.getLogger("tcpencap.nfq")


class VerdictQueue:
    def __init__(self, num: int, decide: Callable[[bytes], bool]) -> None:
        self.num = num
        self._decide = decide  # True: accept
        self._nfq = NetfilterQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.accepted = self.dropped = self.errors = 0

    def _callback(self, pkt: object) -> None:
        try:
            ok = self._decide(pkt.get_payload())  # type: ignore[attr-defined]
        except Exception:  # a bug must not let a packet out unchecked, nor stop the queue
            self.errors += 1
            log.exception("queue %d: error deciding a packet; dropped", self.num)
            ok = False
        if ok:
            self.accepted += 1
            pkt.accept()  # type: ignore[attr-defined]
        else:
            self.dropped += 1
            pkt.drop()  # type: ignore[attr-defined]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._nfq.bind(self.num, self._callback, max_len=1024)
        self._loop = loop
        loop.add_reader(self._nfq.get_fd(), lambda: self._nfq.run(block=False))

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._nfq.get_fd())
            self._loop = None
        self._nfq.unbind()
