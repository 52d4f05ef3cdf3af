"""Opening a client connection for the engine's Connect output."""

from __future__ import annotations

import asyncio
import socket

from tcpencap.aio.sockopts import set_ipsec_bypass, set_nodelay
from tcpencap.aio.tcp import TcpProtocol
from tcpencap.aio.tcp_host import TcpHost
from tcpencap.core.outputs import Connect
from tcpencap.wire.packet import addr_text


async def connect(host: TcpHost, o: Connect, reuse_address: bool, timeout: float) -> None:
    """Bind the port the engine chose (another one if it is taken; ``reuse_address`` for a
    configured fixed port), connect within ``timeout``, and hand the socket to a
    TcpProtocol; report a failure."""
    loop = asyncio.get_running_loop()
    local, peer = addr_text(o.local), addr_text(o.peer)
    family = socket.AF_INET6 if len(o.local) == 16 else socket.AF_INET
    sock: socket.socket | None = None
    port: int | None = o.local_port
    try:
        for _ in range(8):
            if not port:
                raise OSError("no local port free in client.port_range")
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            set_ipsec_bypass(sock)
            set_nodelay(sock)
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((local, port))
                break
            except OSError:
                sock.close()
                sock = None
                port = host.engine.connect_port_refused(o.conn_id, o.generation)
        if sock is None:
            raise OSError("no local port could be bound")
        await asyncio.wait_for(loop.sock_connect(sock, (peer, o.port)), timeout)
        proto = TcpProtocol(host, o.conn_id, o.generation)
        await loop.create_connection(lambda: proto, sock=sock)
    except (OSError, TimeoutError) as exc:
        if sock is not None:
            sock.close()
        reason = str(exc) or type(exc).__name__
        host.engine.connect_failed(host.clock.now(), o.conn_id, o.generation, reason)
        host.after()
