"""charon's inbound CHILD SAs as the RFC 9329 gateway needs them: which peer each inbound
ESP SPI belongs to, and the remote port of its IKE SA.

A client that comes back on a new connection may send ESP first (RFC 9329 §6.1): that ESP
is admitted only for an SPI charon has an inbound SA for with that peer, and the new
connection then takes over the endpoint charon knows the SA by. Learnt from VICI events as
they come and replaced by each list-sas answer.
"""

from __future__ import annotations

from typing import Any

from tcpencap.core.vici_facts import children, dicts, esp_spi, inbound_changes, inbound_spis
from tcpencap.core.vici_facts import port as vici_port


class InboundSas:
    def __init__(self) -> None:
        self.spis: dict[int, bytes] = {}  # charon's inbound ESP SPI -> peer address
        self.ports: dict[int, int] = {}  # ... -> the remote port of its IKE SA

    def replace(self, sas: list[dict[str, Any]]) -> None:
        """charon's whole list (list-sas)."""
        self.spis = inbound_spis(sas)
        self.ports = inbound_ports(sas)

    def learn(self, label: str, up: bool, event: dict[str, Any]) -> None:
        """A VICI event: CHILD SAs up, rekeyed or down."""
        for spi, peer in inbound_changes(label, up, event):
            if peer is None:
                self.spis.pop(spi, None)
                self.ports.pop(spi, None)
            else:
                self.spis[spi] = peer
        if up or label == "child-rekey":
            self.ports.update(inbound_ports([event]))

    def of_peer(self, spi: int, peer: bytes) -> bool:
        """charon has an inbound SA with ``spi`` from ``peer``."""
        return self.spis.get(spi) == peer

    def port(self, spi: int) -> int:
        return self.ports.get(spi, 0)


def inbound_ports(items: list[dict[str, Any]]) -> dict[int, int]:
    """charon's inbound ESP SPI -> the remote port of its IKE SA, from list-sas items or
    events (a child-rekey's new SPIs included)."""
    ports: dict[int, int] = {}
    for item in items:
        for sa in dicts(item):
            port = vici_port(sa.get("remote-port"), 0)
            for child in children(sa):
                for c in (child, child.get("new")):
                    spi = esp_spi(c.get("spi-in")) if isinstance(c, dict) else None
                    if spi is not None and port:
                        ports[spi] = port
    return ports
