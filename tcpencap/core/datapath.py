"""How the RFC 9329 engine moves ESP: the data path interface, and its Python reference.

The engine decides; a data path carries. It makes the stream codec of each connection, reads
events out of it (an accelerated path may hand an open connection's ESP straight to its own
sink and report only how many), keeps a cache of outbound decisions valid while nothing it
depends on changed, and may lend an open connection to a reader of its own. Implementations:

- :class:`PythonDataPath` here: the reference; every frame is an event, ESP becomes Inject
  outputs of the engine, nothing is cached or lent.
- ``tcpencap.native.datapath.NativeDataPath``: the C extension (deframer, flow cache,
  inject batch, inbound worker); ``tests/test_native.py`` holds it equal to the reference.
- a kernel path (espintcp) would be a third: the kernel reads and sinks ESP itself.

Everything here is called on the engine's thread with the engine's state; the shell reads
``flows``, ``inject_batch`` and ``native`` (the extension its workers are built from).
"""

from __future__ import annotations

from typing import Any, Protocol

from tcpencap.wire import rfc9329

# Where an open connection's ESP goes as UDP-encapsulated packets for charon:
# (source, destination, source port, destination port), as router.inbound_esp builds them.
EspTemplate = tuple[bytes, bytes, int, int]


class DataPath(Protocol):
    native: Any  # the extension the shell builds writers and workers from, or None
    flows: Any  # the cache the shell classifies queued packets with, or None
    inject_batch: Any  # inbound ESP packets collected for the shell to send, or None
    sinks_esp: bool  # read() may deliver an open connection's ESP itself
    epoch: int  # bumped by changed(): cached flows of another epoch are stale

    def codec(self, role: rfc9329.Role, max_frame: int) -> Any:
        """The stream codec of a new connection (``rfc9329.StreamCodec``'s interface)."""
        ...

    def read(self, codec: Any, esp_to: EspTemplate | None) -> tuple[Any, int, int]:
        """(the codec's next event, ESP frames delivered to ``esp_to`` before it,
        keepalives dropped before it). Without ``esp_to`` every frame is an event."""
        ...

    def changed(self) -> None:
        """A connection changed state: what the flow cache decided before may be wrong."""
        ...

    def sync(self, table_version: int) -> None:
        """Forget cached flows decided at another table version or epoch."""
        ...

    def learn(self, packet: bytes, conn_id: int, table_version: int) -> None:
        """Cache that ``packet``'s flow goes to ``conn_id`` (an open connection, decided at
        ``table_version`` and this epoch)."""
        ...

    def lend(self, codec: Any, esp_to: EspTemplate, max_rate: int) -> tuple[Any, ...] | None:
        """What the shell hands its inbound worker to read a connection for the engine
        (``max_rate``: frames a second, 0 for none), or None: this path lends nothing."""
        ...


class PythonDataPath:
    """The reference: every frame is an event the engine handles; nothing cached or lent."""

    native = None
    flows = None
    inject_batch = None
    sinks_esp = False

    def __init__(self) -> None:
        self.epoch = 0

    def codec(self, role: rfc9329.Role, max_frame: int) -> rfc9329.StreamCodec:
        return rfc9329.StreamCodec(role, max_frame=max_frame)

    def read(self, codec: Any, esp_to: EspTemplate | None) -> tuple[Any, int, int]:
        return codec.next_event(), 0, 0

    def changed(self) -> None:
        self.epoch += 1

    def sync(self, table_version: int) -> None:
        pass

    def learn(self, packet: bytes, conn_id: int, table_version: int) -> None:
        pass

    def lend(self, codec: Any, esp_to: EspTemplate, max_rate: int) -> tuple[Any, ...] | None:
        return None
