"""Facts in charon's VICI messages that the engine needs beyond the table (pure)."""

from __future__ import annotations

import ipaddress
from typing import Any


def packed(text: Any) -> bytes | None:
    try:
        return ipaddress.ip_address(text).packed if isinstance(text, str) else None
    except ValueError:
        return None


def spi_int(text: Any) -> int | None:
    """An ESP SPI as charon writes it (up to eight hex digits); None for anything else."""
    if not isinstance(text, str) or not 0 < len(text) <= 8:
        return None
    try:
        return int(text, 16) if text.isalnum() else None
    except ValueError:
        return None


def dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value.values() if isinstance(v, dict)] if isinstance(value, dict) else []


def inbound_changes(label: str, up: bool, event: dict[str, Any]) -> list[tuple[int, bytes | None]]:
    """charon's inbound ESP SPIs an event adds (with the peer's address) or removes (None)."""
    out: list[tuple[int, bytes | None]] = []
    if label == "ike-rekey":
        return out  # the CHILD SAs move with the IKE SA: nothing changes
    for sa in dicts(event):
        peer = packed(sa.get("remote-host"))
        for child in dicts(sa.get("child-sas")):
            pairs: list[tuple[Any, bool]] = [(child, up)]
            if label == "child-rekey":
                pairs = [(child.get("old"), False), (child.get("new"), True)]
            for c, add in pairs:
                spi = spi_int(c.get("spi-in")) if isinstance(c, dict) else None
                if spi is not None and (peer is not None or not add):
                    out.append((spi, peer if add else None))
    return out


def inbound_spis(sas: list[dict[str, Any]]) -> dict[int, bytes]:
    """charon's inbound ESP SPI -> peer address, from list-sas."""
    spis: dict[int, bytes] = {}
    for item in sas:
        for sa in dicts(item):
            peer = packed(sa.get("remote-host"))
            for child in dicts(sa.get("child-sas")):
                spi = spi_int(child.get("spi-in"))
                if spi is not None and peer is not None:
                    spis[spi] = peer
    return spis


def ike_spis(event: dict[str, Any]) -> list[bytes]:
    """The initiator SPIs of the IKE SAs an event names (a rekey's new one included)."""
    spis: list[bytes] = []
    for sa in dicts(event):
        for s in (sa, sa.get("new")):
            text = s.get("initiator-spi") if isinstance(s, dict) else None
            if isinstance(text, str) and len(text) == 16:
                try:
                    spis.append(bytes.fromhex(text))
                except ValueError:
                    pass
    return spis
