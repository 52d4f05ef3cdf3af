"""What one RFC 9329 TCP connection (tcpencap.aio.tcp) sees of the shell that runs it: a
narrow interface, so that the connection's code depends on these few callbacks and not on
the daemon (the composition root), and no import goes back up to it."""

from __future__ import annotations

from typing import Any, Protocol

from tcpencap.aio.engine_timer import LoopClock
from tcpencap.core.front import StreamFront


class WriteBatch:
    """The frames of one NFQUEUE batch leave with one send per connection: while
    ``active``, connections given frames wait in ``dirty`` and are flushed at its end."""

    __slots__ = ("active", "dirty")

    def __init__(self) -> None:
        self.active = False
        self.dirty: list[Any] = []  # TcpProtocols holding frames of the current batch

    def mark(self, start: bool) -> None:
        """The queue reader's batch callback: a batch starts, or ends (flush)."""
        self.active = start
        if not start and self.dirty:
            dirty, self.dirty = self.dirty, []
            for proto in dirty:
                proto.flush_writes()


class TcpHost(Protocol):
    """The RFC 9329 service as its connections see it."""

    engine: Any  # the RFC 9329 engine: every decision
    clock: LoopClock  # the time the engine is fed
    batch: WriteBatch
    inbound: Any  # the native inbound worker, or None

    @property
    def max_buffer(self) -> int:
        """The send-buffer bound (gateway.max_buffer), as configured now."""
        ...

    def after(self) -> None:
        """Execute what the engine asked for; after every input given to it."""
        ...

    def register(self, proto: Any) -> None:
        """``proto`` carries its connection id: the engine's Transmit and Close reach it."""
        ...

    def unregister(self, proto: Any) -> None: ...

    def client_front(self, now: float, peer: bytes) -> StreamFront | None:
        """The front (TLS) of a client connection to ``peer``; raises OSError when the
        configuration wants TLS and there is no context to speak it."""
        ...

    def server_front(
        self, now: float, peer_host: str, tls_listener: bool
    ) -> tuple[StreamFront | None, bool]:
        """The front of an accepted connection, and whether it must begin with a PROXY
        header (its peer is a trusted load balancer)."""
        ...
