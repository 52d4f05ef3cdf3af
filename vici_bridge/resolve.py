"""Resolve swanctl connection names to their remote addresses through VICI get-conns."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Any

from .session import open_session, text

log = logging.getLogger("tcpencap.vici")


def remote_addrs_from_conns(
    conns: Iterable[dict[str, Any]], names: Iterable[str]
) -> dict[str, list[str]]:
    """Pure: pick the literal addresses of ``remote_addrs`` of the named connections.

    Host names are resolved; ranges, subnets and %any cannot be steered and are skipped.
    """
    wanted = set(names)
    found: dict[str, list[str]] = {}
    for item in conns:
        for name, conn in text(item).items():
            if name not in wanted:
                continue
            addrs: list[str] = []
            for raw in conn.get("remote_addrs", []):
                addrs.extend(_literal(name, raw))
            found[name] = addrs
    return found


def _literal(name: str, raw: str) -> list[str]:
    try:
        return [str(ipaddress.ip_address(raw))]
    except ValueError:
        pass
    if raw.startswith("%") or "/" in raw or _is_range(raw):
        log.warning("connection %s: remote %r is not a single address, not steered", name, raw)
        return []
    try:
        infos = socket.getaddrinfo(raw, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("connection %s: cannot resolve %r: %s", name, raw, exc)
        return []
    return sorted({str(ipaddress.ip_address(i[4][0])) for i in infos})


def _is_range(raw: str) -> bool:
    """strongSwan's ``FROM-TO`` address range (a host name may contain hyphens too)."""
    low, sep, high = raw.partition("-")
    if not sep:
        return False
    try:
        ipaddress.ip_address(low.strip())
        ipaddress.ip_address(high.strip())
    except ValueError:
        return False
    return True


def get_conns(uri: str) -> list[dict[str, Any]]:
    session = open_session(uri)
    try:
        return list(session.list_conns())
    finally:
        session.transport.close()


def list_sas(uri: str) -> list[dict[str, Any]]:
    session = open_session(uri)
    try:
        return [text(sa) for sa in session.list_sas()]
    finally:
        session.transport.close()


class ViciUnreachable(OSError):
    """charon's VICI socket did not answer within the wait."""


async def resolve_remote_addrs(
    uri: str, names: list[str], wait: float = 30.0
) -> dict[str, list[str]]:
    """Ask charon, retrying with backoff while it is not up yet (at most ``wait`` s);
    :class:`ViciUnreachable` when it never answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = 0.1
    while True:
        try:
            conns = await asyncio.to_thread(get_conns, uri)
        except OSError as exc:
            if loop.time() + delay > deadline:
                log.error("VICI %s unreachable (%s): connections %s not resolved", uri, exc, names)
                raise ViciUnreachable(str(exc)) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        found = remote_addrs_from_conns(conns, names)
        for name in names:
            if name not in found:
                log.warning("connection %s is not loaded in charon", name)
        return found
