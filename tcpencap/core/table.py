"""The connection table: the one place that knows which TCP connection carries which SA.

Indexes, all dicts (O(1) per packet, no scans):
- IKE: (local IP, peer IP, IKE initiator SPI) -> connection id. Each connection has two SPI
  sets, current and previous, so an IKE rekey and the DELETE of the old SA that follows it
  stay on the same connection.
- ESP: (local IP, peer IP, SPI) -> connection id, at most ``max_spis`` per connection.
- endpoint: (peer IP, peer port) -> connection id, the UDP endpoint charon sees for it.
- pair: (local IP, peer IP) -> ids in creation order, so traffic that names no known SPI
  can still find the newest connection of that address pair.

Binding is first-come: an SPI bound to one connection is never silently moved to another
by :meth:`bind_ike`/:meth:`bind_esp`; only :meth:`move_esp`/:meth:`move_ike` (called on
authenticated information, i.e. VICI) do that.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

DEFAULT_MAX_SPIS = 16

Pair = tuple[bytes, bytes]


class Bind(enum.Enum):
    """The result of binding an SPI to a connection."""

    NEW = "new"
    ALREADY = "already"  # bound to this connection before
    CONFLICT = "conflict"  # bound to another connection: refused
    LIMIT = "limit"  # the connection already holds max_spis SPIs: refused
    UNKNOWN = "unknown"  # no such connection


@dataclass(slots=True)
class Entry:
    """What the table keeps per connection."""

    conn_id: int
    local: bytes
    peer: bytes
    peer_port: int = 0
    ike_spis: set[bytes] = field(default_factory=set)
    ike_spis_old: set[bytes] = field(default_factory=set)
    esp_spis: set[int] = field(default_factory=set)
    # Other peer ports charon knows this connection's SAs by (a resumed SA whose charon
    # endpoint is the previous connection's): also found by by_endpoint.
    aliases: list[int] = field(default_factory=list)

    @property
    def pair(self) -> Pair:
        return (self.local, self.peer)

    @property
    def carries_sa(self) -> bool:
        return bool(self.ike_spis or self.ike_spis_old or self.esp_spis)


class ConnectionTable:
    def __init__(self, max_spis: int = DEFAULT_MAX_SPIS) -> None:
        self.max_spis = max_spis
        self._ids = itertools.count(1)
        self._by_id: dict[int, Entry] = {}
        self._ike: dict[tuple[bytes, bytes, bytes], int] = {}
        self._esp: dict[tuple[bytes, bytes, int], int] = {}
        self._endpoint: dict[tuple[bytes, int], int] = {}
        self._pair: dict[Pair, list[int]] = {}
        # IKE SPI alone -> connection id: finds an SA whose addresses changed (MOBIKE)
        self._ike_spi: dict[bytes, list[int]] = {}
        # Bumped whenever by_endpoint() or lookup_esp() may answer differently: the native
        # data path's flow cache is valid for one version.
        self.version = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._by_id.values()))

    # --- connections ------------------------------------------------------------------

    def add(self, local: bytes, peer: bytes, peer_port: int = 0) -> Entry:
        """A new connection; with ``peer_port`` it is also found by its UDP endpoint."""
        entry = Entry(next(self._ids), local, peer, peer_port)
        self.version += 1
        self._by_id[entry.conn_id] = entry
        self._pair.setdefault(entry.pair, []).append(entry.conn_id)
        if peer_port:
            self._endpoint[(peer, peer_port)] = entry.conn_id
        return entry

    def get(self, conn_id: int) -> Entry | None:
        return self._by_id.get(conn_id)

    def remove(self, conn_id: int) -> Entry | None:
        """Drop a connection and every index entry that points at it."""
        entry = self._by_id.pop(conn_id, None)
        if entry is None:
            return None
        self.version += 1
        for spi in entry.ike_spis | entry.ike_spis_old:
            self._ike.pop((entry.local, entry.peer, spi), None)
            self._forget_spi(spi, conn_id)
        for espi in entry.esp_spis:
            self._esp.pop((entry.local, entry.peer, espi), None)
        for port in (entry.peer_port, *entry.aliases):
            if port and self._endpoint.get((entry.peer, port)) == conn_id:
                del self._endpoint[(entry.peer, port)]
        ids = self._pair.get(entry.pair)
        if ids is not None:
            ids.remove(conn_id)
            if not ids:
                del self._pair[entry.pair]
        return entry

    def by_endpoint(self, peer: bytes, port: int) -> Entry | None:
        cid = self._endpoint.get((peer, port))
        return None if cid is None else self._by_id[cid]

    def alias(self, conn_id: int, port: int) -> bool:
        """Find connection ``conn_id`` also by (its peer, ``port``), unless another
        connection holds that endpoint; True when added."""
        entry = self._by_id.get(conn_id)
        if entry is None or not port or (entry.peer, port) in self._endpoint:
            return False
        self._endpoint[(entry.peer, port)] = conn_id
        entry.aliases.append(port)
        self.version += 1
        return True

    def newest_for_pair(self, local: bytes, peer: bytes) -> Entry | None:
        ids = self._pair.get((local, peer))
        return self._by_id[ids[-1]] if ids else None

    def for_pair(self, local: bytes, peer: bytes) -> list[Entry]:
        return [self._by_id[i] for i in self._pair.get((local, peer), ())]

    # --- IKE --------------------------------------------------------------------------

    def lookup_ike(self, local: bytes, peer: bytes, spi_i: bytes) -> Entry | None:
        cid = self._ike.get((local, peer, spi_i))
        return None if cid is None else self._by_id[cid]

    def bind_ike(self, conn_id: int, spi_i: bytes) -> Bind:
        entry = self._by_id.get(conn_id)
        if entry is None:
            return Bind.UNKNOWN
        key = (entry.local, entry.peer, spi_i)
        owner = self._ike.get(key)
        if owner == conn_id:
            return Bind.ALREADY
        if owner is not None:
            return Bind.CONFLICT
        self._ike[key] = conn_id
        self._ike_spi.setdefault(spi_i, []).append(conn_id)
        entry.ike_spis.add(spi_i)
        return Bind.NEW

    def rekey_ike(self, conn_id: int, old_spi: bytes, new_spi: bytes) -> Bind:
        """The IKE SA ``old_spi`` was rekeyed to ``new_spi``: the old SPI moves to the
        previous set (still routed, for its DELETE), the new one becomes current."""
        entry = self._by_id.get(conn_id)
        if entry is None:
            return Bind.UNKNOWN
        if old_spi in entry.ike_spis:
            entry.ike_spis.discard(old_spi)
            entry.ike_spis_old.add(old_spi)
        return self.bind_ike(conn_id, new_spi)

    def unbind_ike(self, conn_id: int, spi_i: bytes) -> bool:
        entry = self._by_id.get(conn_id)
        if entry is None:
            return False
        key = (entry.local, entry.peer, spi_i)
        if self._ike.get(key) != conn_id:
            return False
        del self._ike[key]
        self._forget_spi(spi_i, conn_id)
        entry.ike_spis.discard(spi_i)
        entry.ike_spis_old.discard(spi_i)
        return True

    def find_ike_spi(self, spi_i: bytes) -> Entry | None:
        """The connection holding IKE SPI ``spi_i`` for any address pair (the newest binding)."""
        ids = self._ike_spi.get(spi_i)
        return self._by_id[ids[-1]] if ids else None

    def _forget_spi(self, spi_i: bytes, conn_id: int) -> None:
        ids = self._ike_spi.get(spi_i)
        if ids is not None and conn_id in ids:
            ids.remove(conn_id)
            if not ids:
                del self._ike_spi[spi_i]

    def move_ike(self, conn_id: int, spi_i: bytes) -> Bind:
        """Rebind an IKE SPI to ``conn_id`` even if another connection holds it (only on
        authenticated information: VICI, or the same peer reconnecting)."""
        entry = self._by_id.get(conn_id)
        if entry is None:
            return Bind.UNKNOWN
        owner = self._ike.get((entry.local, entry.peer, spi_i))
        if owner is not None and owner != conn_id:
            self.unbind_ike(owner, spi_i)
        return self.bind_ike(conn_id, spi_i)

    # --- ESP --------------------------------------------------------------------------

    def lookup_esp(self, local: bytes, peer: bytes, spi: int) -> Entry | None:
        cid = self._esp.get((local, peer, spi))
        return None if cid is None else self._by_id[cid]

    def bind_esp(self, conn_id: int, spi: int) -> Bind:
        entry = self._by_id.get(conn_id)
        if entry is None:
            return Bind.UNKNOWN
        key = (entry.local, entry.peer, spi)
        owner = self._esp.get(key)
        if owner == conn_id:
            return Bind.ALREADY
        if owner is not None:
            return Bind.CONFLICT
        if len(entry.esp_spis) >= self.max_spis:
            return Bind.LIMIT
        self._esp[key] = conn_id
        self.version += 1
        entry.esp_spis.add(spi)
        return Bind.NEW

    def unbind_esp(self, conn_id: int, spi: int) -> bool:
        entry = self._by_id.get(conn_id)
        if entry is None:
            return False
        key = (entry.local, entry.peer, spi)
        if self._esp.get(key) != conn_id:
            return False
        del self._esp[key]
        self.version += 1
        entry.esp_spis.discard(spi)
        return True

    def move_esp(self, conn_id: int, spi: int) -> Bind:
        """Rebind an ESP SPI to ``conn_id`` (authenticated information only)."""
        entry = self._by_id.get(conn_id)
        if entry is None:
            return Bind.UNKNOWN
        owner = self._esp.get((entry.local, entry.peer, spi))
        if owner is not None and owner != conn_id:
            if len(entry.esp_spis) >= self.max_spis:
                return Bind.LIMIT  # refused: the SPI stays routed to its owner
            self.unbind_esp(owner, spi)
        return self.bind_esp(conn_id, spi)

    # --- whole SAs ----------------------------------------------------------------------

    def release(self, conn_id: int) -> tuple[list[bytes], list[int]]:
        """Unbind every IKE SPI (both sets) and ESP SPI of a connection and return them, so
        another connection can take the SAs (reconnect, MOBIKE) or they can be dropped."""
        entry = self._by_id.get(conn_id)
        if entry is None:
            return [], []
        ike = list(entry.ike_spis | entry.ike_spis_old)
        esp = list(entry.esp_spis)
        for spi in ike:
            self.unbind_ike(conn_id, spi)
        for espi in esp:
            self.unbind_esp(conn_id, espi)
        return ike, esp

    def bind_all(
        self, conn_id: int, ike: list[bytes], esp: list[int], *, move: bool = False
    ) -> None:
        """Bind SPIs returned by :meth:`release` to ``conn_id``; with ``move`` (authenticated
        information only) they are taken from any other connection that holds them."""
        bind_ike, bind_esp = (
            (self.move_ike, self.move_esp) if move else (self.bind_ike, self.bind_esp)
        )
        for spi in ike:
            bind_ike(conn_id, spi)
        for espi in esp:
            bind_esp(conn_id, espi)

    def index_sizes(self) -> dict[str, int]:
        """Sizes of every index, for tests that check nothing stale is left."""
        return {
            "connections": len(self._by_id),
            "ike": len(self._ike),
            "esp": len(self._esp),
            "endpoint": len(self._endpoint),
            "pair": len(self._pair),
            "ike_spi": len(self._ike_spi),
        }
