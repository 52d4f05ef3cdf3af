"""The control socket (``tcpencap status`` / ``reload``) and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from tcpencap.metrics import render

Status = Callable[[], dict[str, Any]]


async def start_control(
    path: str, status: Status, reload: Callable[[], Awaitable[dict[str, Any]]]
) -> asyncio.base_events.Server:
    """A root-only unix socket: one command line in, one JSON reply out."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            cmd = line.decode(errors="replace").strip()
            if cmd == "status":
                reply: dict[str, Any] = status()
            elif cmd == "reload":
                reply = await reload()
            else:
                reply = {"error": f"unknown command {cmd!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    old = os.umask(0o077)
    try:
        return await asyncio.start_unix_server(client, path=path)
    finally:
        os.umask(old)


async def start_metrics(
    host: str, port: int, status: Status, totals: Callable[[], dict[str, Any]]
) -> asyncio.base_events.Server:
    """HTTP/1.0 GET /metrics in the Prometheus text format; anything else is a 404."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = head.split(b" ", 2)
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                body = render(status(), totals()).encode()
                code, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, code, ctype = b"not found\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(client, host, port)


async def query_status(path: str, timeout: float = 5.0, command: str = "status") -> dict[str, Any]:
    """Send one command (``status`` or ``reload``) to the control socket; its JSON reply."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    writer.write(command.encode() + b"\n")
    await writer.drain()
    # The daemon closes after its one reply, which grows with the connections (about
    # 300 octets each): read to EOF, not a line, so no stream limit applies.
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    return json.loads(data)
