"""Translate charon's VICI events and ``list-sas`` into connection-table updates (pure).

VICI is authenticated information: charon tells us which SPIs belong to which IKE SA at
which addresses, so here (and only here, besides charon's own outbound packets) an SPI may
be moved from one connection to another. Event shapes (strongSwan 5.9, values decoded to
str): ``ike-updown`` ``{"up": "yes"?, NAME: SA}``; ``child-updown`` the same with
``SA["child-sas"]``; ``ike-rekey`` ``{NAME: {"old": SA, "new": SA}}``; ``child-rekey``
``{NAME: SA}`` whose ``child-sas`` entries are ``{"old": CHILD, "new": CHILD}``;
``ike-update`` ``{"local-host", "local-port", "remote-host", "remote-port", NAME: SA}``
with the new endpoints at the top level and the old ones in the SA.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tcpencap.core.role import Role
from tcpencap.core.router import ConnView, Open, Router
from tcpencap.core.table import Bind, Entry
from tcpencap.core.vici_facts import address, as_dict, children, esp_spi, ike_spi, port

log = logging.getLogger("tcpencap.vici")

SA = dict[str, Any]
_GONE = frozenset({"DELETING", "DELETED", "DESTROYING"})
UNLISTED_GRACE = 10.0  # an IKE SPI charon does not list is unbound after this long


@dataclass(frozen=True, slots=True)
class Retire:
    """Connection ``conn_id`` carries no IKE SA any more: close it (``graceful`` = after
    the last IKE message has had time to leave)."""

    conn_id: int
    reason: str
    graceful: bool = True


@dataclass(frozen=True, slots=True)
class ExpireOld:
    """After an IKE rekey charon deletes the old SA with one more exchange on the same
    connection; its SPI stays routable for ``delay`` seconds, then is forgotten (charon
    sends no ike-updown for a rekeyed SA)."""

    conn_id: int
    spi: bytes
    delay: float = 5.0


@dataclass(frozen=True, slots=True)
class SpiLimit:
    """A CHILD SA's SPI was not indexed: its connection already holds max_spis."""

    conn_id: int
    spi: int


Effect = Retire | Open | ExpireOld | SpiLimit


def _sas(event: dict[str, Any]) -> Iterable[tuple[str, SA]]:
    for key, value in event.items():
        if isinstance(value, dict):
            yield key, value


class SaSync:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.table = router.table
        # (connection, IKE SPI) bound but not in charon's last answer -> since when
        self._unlisted: dict[tuple[int, bytes], float] = {}

    # --- lookups ------------------------------------------------------------------------

    def _entry(self, sa: SA) -> Entry | None:
        spi = ike_spi(sa.get("initiator-spi"))
        if spi is None:
            return None
        local, remote = address(sa.get("local-host")), address(sa.get("remote-host"))
        if local is not None and remote is not None:
            entry = self.table.lookup_ike(local, remote, spi)
            if entry is not None:
                return entry
        return self.table.find_ike_spi(spi)

    def _bind_children(self, entry: Entry, sa: SA) -> list[Effect]:
        effects: list[Effect] = []
        for child in children(sa):
            spi = esp_spi(child.get("spi-out"))
            if spi is not None:
                effects += self._bind_esp(entry, spi)
        return effects

    def _bind_esp(self, entry: Entry, spi: int) -> list[Effect]:
        if self.table.move_esp(entry.conn_id, spi) is Bind.LIMIT:
            return [SpiLimit(entry.conn_id, spi)]
        return []

    def _retire_if_empty(self, entry: Entry, reason: str) -> list[Effect]:
        if entry.ike_spis or entry.ike_spis_old:
            return []
        return [Retire(entry.conn_id, reason)]

    # --- events -------------------------------------------------------------------------

    def handle(self, label: str, event: dict[str, Any]) -> list[Effect]:
        handler = getattr(self, "_on_" + label.replace("-", "_"), None)
        if handler is None:
            return []
        return handler(event)

    def _on_ike_updown(self, event: dict[str, Any]) -> list[Effect]:
        up = event.get("up") == "yes"
        effects: list[Effect] = []
        for _, sa in _sas(event):
            entry = self._entry(sa)
            if entry is None:
                continue
            spi = ike_spi(sa.get("initiator-spi"))
            assert spi is not None
            if up:
                self.table.move_ike(entry.conn_id, spi)
                effects += self._bind_children(entry, sa)
                continue
            self.table.unbind_ike(entry.conn_id, spi)
            for child in children(sa):
                espi = esp_spi(child.get("spi-out"))
                if espi is not None:
                    self.table.unbind_esp(entry.conn_id, espi)
            if not entry.ike_spis:
                # The last IKE SA is gone: rekeyed predecessors and CHILD SAs went with it.
                self.table.release(entry.conn_id)
            effects += self._retire_if_empty(entry, "IKE SA deleted")
        return effects

    def _on_child_updown(self, event: dict[str, Any]) -> list[Effect]:
        up = event.get("up") == "yes"
        effects: list[Effect] = []
        for _, sa in _sas(event):
            entry = self._entry(sa)
            if entry is None:
                continue
            for child in children(sa):
                espi = esp_spi(child.get("spi-out"))
                if espi is None:
                    continue
                if up:
                    effects += self._bind_esp(entry, espi)
                else:
                    self.table.unbind_esp(entry.conn_id, espi)
        return effects

    def _on_child_rekey(self, event: dict[str, Any]) -> list[Effect]:
        effects: list[Effect] = []
        for _, sa in _sas(event):
            entry = self._entry(sa)
            if entry is None:
                continue
            for pair in children(sa):
                new = esp_spi(as_dict(pair.get("new")).get("spi-out"))
                old = esp_spi(as_dict(pair.get("old")).get("spi-out"))
                if old is not None and old != new:
                    self.table.unbind_esp(entry.conn_id, old)
                if new is not None:
                    effects += self._bind_esp(entry, new)
        return effects

    def _on_ike_rekey(self, event: dict[str, Any]) -> list[Effect]:
        effects: list[Effect] = []
        for _, pair in _sas(event):
            old, new = as_dict(pair.get("old")), as_dict(pair.get("new"))
            entry = self._entry(old) or self._entry(new)
            old_spi, new_spi = ike_spi(old.get("initiator-spi")), ike_spi(new.get("initiator-spi"))
            if entry is None or new_spi is None:
                continue
            if old_spi is not None:
                self.table.rekey_ike(entry.conn_id, old_spi, new_spi)
                effects.append(ExpireOld(entry.conn_id, old_spi))
            else:
                self.table.move_ike(entry.conn_id, new_spi)
        return effects

    def expire_old(self, conn_id: int, spi: bytes) -> list[Effect]:
        entry = self.table.get(conn_id)
        if entry is None or spi not in entry.ike_spis_old:
            return []
        self.table.unbind_ike(conn_id, spi)
        return self._retire_if_empty(entry, "IKE SA deleted")

    def _on_ike_update(self, event: dict[str, Any]) -> list[Effect]:
        new_local, new_remote = address(event.get("local-host")), address(event.get("remote-host"))
        effects: list[Effect] = []
        for _, sa in _sas(event):
            # Only an authenticated SA moves anything: the responder's ike-update during
            # IKE_SA_INIT (unnamed SA, from 0.0.0.0) names an SPI anyone can choose.
            if sa.get("state") != "ESTABLISHED":
                continue
            spi = ike_spi(sa.get("initiator-spi"))
            old_local, old_remote = address(sa.get("local-host")), address(sa.get("remote-host"))
            if None in (spi, old_local, old_remote, new_local, new_remote):
                continue
            entry = self.table.lookup_ike(old_local, old_remote, spi)  # type: ignore[arg-type]
            if entry is None:
                continue
            view = self.router.views.get(entry.conn_id)
            if view is None:
                continue
            if view.side is Role.GATEWAY:
                effects += self._gateway_moved(entry, new_remote, event.get("remote-port"))
                continue
            if (entry.local, entry.peer) == (new_local, new_remote):
                continue
            if self.table.lookup_ike(new_local, new_remote, spi) is not None:
                continue  # the packet path already moved it
            moved: ConnView | None = self.router._follow_moved_sa(
                new_local, new_remote, spi, 4500, 4500
            )
            if moved is not None:
                effects.append(Open(moved.conn_id, new_local, new_remote, b""))
        return effects

    def _gateway_moved(self, entry: Entry, remote: bytes, port_text: Any) -> list[Effect]:
        """charon moved an SA to a new client endpoint (MOBIKE, or a reconnect from a new
        source port): the connection at that endpoint takes the SPIs, the old one is
        closed at once (its client has left it; its FIN may never arrive)."""
        try:
            port = int(port_text)
        except (TypeError, ValueError):
            return []
        if (entry.peer, entry.peer_port) == (remote, port):
            return []
        target = self.table.by_endpoint(remote, port)
        ike, esp = self.table.release(entry.conn_id)
        if target is not None:
            self.table.bind_all(target.conn_id, ike, esp, move=True)
        return [Retire(entry.conn_id, "SA moved to another connection", graceful=False)]

    def reconcile_esp(self, sas: list[dict[str, Any]]) -> None:
        """Make the ESP SPIs agree with ``list-sas``. charon emits no event for every CHILD
        SA it drops (the loser of a rekey collision, e.g. after a MOBIKE move with
        kernel-libipsec, just disappears), so the daemon calls this after rekeys and
        address updates and every so often."""
        live: set[int] = set()
        for item in sas:
            for _, sa in _sas(item):
                entry = self._entry(sa)
                for child in children(sa):
                    state = child.get("state")
                    if isinstance(state, str) and state in _GONE:
                        continue
                    spi = esp_spi(child.get("spi-out"))
                    if spi is None:
                        continue
                    live.add(spi)
                    if entry is not None:
                        self.table.move_esp(entry.conn_id, spi)
        for entry in list(self.table):
            for spi in entry.esp_spis - live:
                self.table.unbind_esp(entry.conn_id, spi)

    @property
    def unlisted_ike(self) -> int:
        """IKE SPIs in their grace: bound, but missing from charon's last answer."""
        return len(self._unlisted)

    def reconcile_ike(self, now: float, sas: list[dict[str, Any]]) -> list[Effect]:
        """Unbind IKE SPIs charon has not listed for ``UNLISTED_GRACE`` seconds. charon
        emits no event for an IKE SA that never came up: the redundant SA of a rekey
        collision, an IKE_SA_INIT it answered with a cookie or gave up on. The table
        learns their SPIs from the wire, so without this they would stay bound, and
        keep open a connection whose real SA is gone. The grace covers an SPI seen on
        the wire a moment before charon answered. A connection left with no IKE SA is
        retired."""
        live: set[bytes] = set()
        for item in sas:
            for _, sa in _sas(item):
                spi = ike_spi(sa.get("initiator-spi"))
                if spi is not None:
                    live.add(spi)
        unlisted = {
            (entry.conn_id, spi): self._unlisted.get((entry.conn_id, spi), now)
            for entry in self.table
            for spi in entry.ike_spis
            if spi not in live
        }
        self._unlisted = unlisted
        effects: list[Effect] = []
        for (conn_id, spi), since in list(unlisted.items()):
            if now - since < UNLISTED_GRACE:
                continue
            del unlisted[(conn_id, spi)]
            self.table.unbind_ike(conn_id, spi)
            entry = self.table.get(conn_id)
            if entry is not None and not entry.ike_spis and not entry.ike_spis_old:
                self.table.release(conn_id)
                effects.append(Retire(conn_id, "IKE SA unknown to charon"))
        return effects

    # --- resync -------------------------------------------------------------------------

    def resync(self, sas: list[dict[str, Any]]) -> list[Effect]:
        """Make the table agree with ``list-sas``: bind what charon has, unbind IKE SPIs
        charon no longer knows (except on connections still waiting for their first SA)."""
        live: set[bytes] = set()
        opened: list[Effect] = []
        for item in sas:
            for _, sa in _sas(item):
                spi = ike_spi(sa.get("initiator-spi"))
                if spi is None:
                    continue
                live.add(spi)
                entry = self._entry(sa)
                if entry is not None:
                    self.table.move_ike(entry.conn_id, spi)
                    opened += self._bind_children(entry, sa)
                    continue
                local, remote = address(sa.get("local-host")), address(sa.get("remote-host"))
                if (
                    local is not None
                    and remote is not None
                    and sa.get("state") == "ESTABLISHED"
                    and self.router.is_tcp_peer(remote)
                ):
                    # An SA that outlived its connection (tcpencap restarted): as TCP
                    # originator, re-establish it now rather than at the next packet.
                    view = self.router.add_client_conn(local, remote)
                    view.charon_sport = port(sa.get("local-port"), 4500)
                    view.charon_dport = port(sa.get("remote-port"), 4500)
                    self.table.bind_ike(view.conn_id, spi)
                    opened += self._bind_children(view.entry, sa)
                    opened.append(Open(view.conn_id, local, remote, b""))
        effects: list[Effect] = list(opened)
        for entry in list(self.table):
            stale = (entry.ike_spis | entry.ike_spis_old) - live
            if not stale:
                continue
            for spi in stale:
                self.table.unbind_ike(entry.conn_id, spi)
            if not entry.ike_spis and not entry.ike_spis_old:
                self.table.release(entry.conn_id)  # its CHILD SAs went with it
                effects.append(Retire(entry.conn_id, "IKE SA unknown to charon"))
        return effects
