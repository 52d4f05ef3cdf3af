"""tcpencap.aio.connect.connect: a client connection for the engine's Connect, on loopback
with real sockets. The engine is a recording fake; the TcpProtocol the socket is handed to
is replaced by a recording asyncio protocol (its own tests are in test_tcp.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import tcpencap.aio.connect as connect_mod
from tcpencap.aio.connect import connect
from tcpencap.core.outputs import Connect
from tcpencap.wire.packet import addr_bytes


class FakeEngine:
    def __init__(self, next_ports: list[int]) -> None:
        self.next_ports = next_ports
        self.refused: list[tuple[int, int]] = []
        self.failed: list[tuple[float, int, int, str]] = []

    def connect_port_refused(self, conn_id: int, generation: int) -> int:
        self.refused.append((conn_id, generation))
        return self.next_ports.pop(0) if self.next_ports else 0

    def connect_failed(self, now: float, conn_id: int, generation: int, reason: str) -> None:
        self.failed.append((now, conn_id, generation, reason))


class Handed(asyncio.Protocol):
    """Stands in for TcpProtocol: records what it was made with and its transport."""

    made: list[Handed] = []

    def __init__(self, host: Any, conn_id: int, generation: int) -> None:
        self.args = (host, conn_id, generation)
        self.transport: asyncio.BaseTransport | None = None
        Handed.made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self.sockname = sock.getsockname()[:2]
        self.peername = sock.getpeername()[:2]
        self.nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        self.reuse = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)


@pytest.fixture(autouse=True)
def handed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Handed]]:
    Handed.made = []
    monkeypatch.setattr(connect_mod, "TcpProtocol", Handed)
    yield Handed.made


def host(next_ports: list[int] | None = None) -> SimpleNamespace:
    h = SimpleNamespace(
        engine=FakeEngine(next_ports or []), clock=SimpleNamespace(now=lambda: 42.0)
    )
    h.afters = 0

    def after() -> None:
        h.afters += 1

    h.after = after
    return h


def free_port(family: int = socket.AF_INET, addr: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


@pytest.fixture(params=["127.0.0.1", "::1"])
def listener(request: pytest.FixtureRequest) -> Iterator[tuple[str, socket.socket]]:
    addr = request.param
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.create_server((addr, 0), family=family) as srv:
        yield addr, srv


def run(coro: Any) -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(coro, 20)
        finally:
            for h in Handed.made:  # closed on the loop that made them
                if h.transport is not None:
                    h.transport.close()
            await asyncio.sleep(0)

    asyncio.run(main())


def test_the_socket_is_bound_to_the_engines_port_and_handed_over(listener, handed) -> None:
    addr, srv = listener
    family = srv.family
    h = host()
    port = free_port(family, addr)
    o = Connect(7, 3, addr_bytes(addr), port, addr_bytes(addr), srv.getsockname()[1])
    run(connect(h, o, reuse_address=False, timeout=5.0))
    (proto,) = handed
    assert proto.args == (h, 7, 3)
    assert proto.sockname == (addr, port)
    assert proto.peername == (addr, srv.getsockname()[1])
    assert proto.nodelay == 1 and not proto.reuse
    assert h.engine.failed == [] and h.engine.refused == []


def test_a_fixed_client_port_is_bound_with_reuse_address(listener, handed) -> None:
    addr, srv = listener
    h = host()
    o = Connect(1, 1, addr_bytes(addr), free_port(srv.family, addr), addr_bytes(addr),
                srv.getsockname()[1])  # fmt: skip
    run(connect(h, o, reuse_address=True, timeout=5.0))
    assert handed[0].reuse


def test_a_taken_port_asks_the_engine_for_another(handed) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        other = free_port()
        h = host([other])
        local = addr_bytes("127.0.0.1")
        o = Connect(5, 2, local, taken.getsockname()[1], local, srv.getsockname()[1])
        run(connect(h, o, reuse_address=False, timeout=5.0))
        assert h.engine.refused == [(5, 2)]
        assert handed[0].sockname == ("127.0.0.1", other)


def test_no_free_port_is_a_failure_the_engine_hears_of() -> None:
    h = host()
    local = addr_bytes("127.0.0.1")
    run(connect(h, Connect(5, 2, local, 0, local, 4500), reuse_address=False, timeout=5.0))
    assert h.engine.failed == [(42.0, 5, 2, "no local port free in client.port_range")]
    assert h.afters == 1  # what the engine asked for then is carried out


def test_eight_taken_ports_give_up() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        h = host([port] * 20)
        local = addr_bytes("127.0.0.1")
        run(connect(h, Connect(5, 2, local, port, local, 4500), reuse_address=False, timeout=5.0))
    assert len(h.engine.refused) == 8
    assert [f[3] for f in h.engine.failed] == ["no local port could be bound"]


def test_a_refused_connection_is_reported_with_its_reason(handed) -> None:
    h = host()
    local = addr_bytes("127.0.0.1")
    closed = free_port()
    run(
        connect(
            h, Connect(9, 1, local, free_port(), local, closed), reuse_address=False, timeout=5.0
        )
    )
    ((now, cid, gen, reason),) = h.engine.failed
    assert (now, cid, gen) == (42.0, 9, 1) and reason.startswith("[Errno 111] Connect call failed")
    assert handed == [] and h.afters == 1
