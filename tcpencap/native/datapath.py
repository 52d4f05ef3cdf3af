"""The native data path: the C extension behind the engine's data path interface
(``tcpencap.core.datapath.DataPath``, matched by shape: this package imports no core).

It owns the C objects the engine must never build itself: the deframers, the flow cache
the shell classifies queued packets with, and the inject batch an open connection's ESP
goes into as packets, without an event per frame.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from tcpencap.wire import rfc9329

EspTemplate = tuple[bytes, bytes, int, int]  # as tcpencap.core.datapath names it


class NativeDataPath:
    sinks_esp = True

    def __init__(self, native: ModuleType) -> None:
        self.native = native
        self.flows = native.FlowCache()
        self.inject_batch = native.InjectBatch()
        self.epoch = 0
        self._synced: tuple[int, int] = (-1, -1)  # (table version, epoch) of the cache

    @classmethod
    def of(cls, native: ModuleType | None) -> NativeDataPath | None:
        """The native path of a loaded extension; None (the engine's Python path) without."""
        return cls(native) if native is not None else None

    def codec(self, role: rfc9329.Role, max_frame: int) -> Any:
        return self.native.Deframer(role, max_frame=max_frame)

    def read(self, codec: Any, esp_to: EspTemplate | None) -> tuple[Any, int, int]:
        if esp_to is None:
            return codec.next_event(), 0, 0
        ev, esp = codec.pump(self.inject_batch, *esp_to)
        kept = codec.keepalives  # dropped in C, counted by the engine
        if kept:
            codec.keepalives = 0
        return ev, esp, kept

    def changed(self) -> None:
        self.epoch += 1

    def sync(self, table_version: int) -> None:
        # An entry repeats one decision of the router's fast path plus "the connection is
        # open": valid while the table (its version) and connection states (the epoch) are.
        key = (table_version, self.epoch)
        if self._synced != key:
            self.flows.clear()
            self._synced = key

    def learn(self, packet: bytes, conn_id: int, table_version: int) -> None:
        self.sync(table_version)
        self.flows.install(packet, conn_id)

    def lend(self, codec: Any, esp_to: EspTemplate, max_rate: int) -> tuple[Any, ...] | None:
        return (codec, *esp_to, max_rate)
