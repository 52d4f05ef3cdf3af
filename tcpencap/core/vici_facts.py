"""Reading charon's VICI messages (pure): its values are whatever charon, or a bug, sends,
so every reader here returns data or None and never raises. Used by the SA sync and by the
engine for what it needs beyond the table."""

from __future__ import annotations

import ipaddress
from typing import Any


def as_dict(value: Any) -> dict[str, Any]:
    """VICI values are whatever charon (or a bug) sends: treat anything but a dict as empty."""
    return value if isinstance(value, dict) else {}


def children(sa: dict[str, Any]) -> list[dict[str, Any]]:
    return dicts(sa.get("child-sas"))


def address(text: Any) -> bytes | None:
    if not text or not isinstance(text, str):
        return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    return None if addr.is_unspecified else addr.packed


def ike_spi(text: Any) -> bytes | None:
    if not text or not isinstance(text, str):
        return None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return raw if len(raw) == 8 and raw != bytes(8) else None


def esp_spi(text: Any) -> int | None:
    """An ESP SPI as VICI writes it (spi-in, spi-out): up to 8 hex digits, not zero."""
    if not isinstance(text, str) or not 0 < len(text) <= 8:
        return None
    if any(c not in "0123456789abcdefABCDEF" for c in text):
        return None
    return int(text, 16) or None


def port(text: Any, default: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        return default
    return value if 0 < value < 65536 else default


def dicts(value: Any) -> list[dict[str, Any]]:
    """The values of ``value`` that are dicts (VICI's named sections)."""
    return [v for v in as_dict(value).values() if isinstance(v, dict)]


def inbound_changes(label: str, up: bool, event: dict[str, Any]) -> list[tuple[int, bytes | None]]:
    """charon's inbound ESP SPIs an event adds (with the peer's address) or removes (None)."""
    out: list[tuple[int, bytes | None]] = []
    if label == "ike-rekey":
        return out  # the CHILD SAs move with the IKE SA: nothing changes
    for sa in dicts(event):
        peer = address(sa.get("remote-host"))
        for child in children(sa):
            pairs: list[tuple[Any, bool]] = [(child, up)]
            if label == "child-rekey":
                pairs = [(child.get("old"), False), (child.get("new"), True)]
            for c, add in pairs:
                spi = esp_spi(c.get("spi-in")) if isinstance(c, dict) else None
                if spi is not None and (peer is not None or not add):
                    out.append((spi, peer if add else None))
    return out


def inbound_spis(sas: list[dict[str, Any]]) -> dict[int, bytes]:
    """charon's inbound ESP SPI -> peer address, from list-sas."""
    spis: dict[int, bytes] = {}
    for item in sas:
        for sa in dicts(item):
            peer = address(sa.get("remote-host"))
            for child in children(sa):
                spi = esp_spi(child.get("spi-in"))
                if spi is not None and peer is not None:
                    spis[spi] = peer
    return spis


def ike_spis(event: dict[str, Any]) -> list[bytes]:
    """The initiator SPIs of the IKE SAs an event names (a rekey's new one included)."""
    spis: list[bytes] = []
    for sa in dicts(event):
        for s in (sa, as_dict(sa.get("new"))):
            spi = ike_spi(s.get("initiator-spi"))
            if spi is not None:
                spis.append(spi)
    return spis
