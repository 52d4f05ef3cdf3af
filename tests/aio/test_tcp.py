"""TcpProtocol's send side on the Python path (tcpencap/aio/tcp.py), through the narrow
TcpHost the RFC 9329 service gives it: the send-buffer bound of core/send_buffer.py (ESP
dropped over it, IKE up to IKE_OVERSHOOT times it), drops counted on the connection by the
engine, and a queue batch's frames leaving in one write."""

from __future__ import annotations

import asyncio

from tcpencap.core.rfc9329_conn import State
from tcpencap.core.send_buffer import IKE_OVERSHOOT
from tests.aio.test_tcp_front import (
    STREAM,
    FakeTransport,
    cleanup,
    gw_config,
    make_daemon,
    only_conn,
    open_conn,
)

LIMIT = 100_000


class BufferedTransport(FakeTransport):
    """A transport whose kernel buffer holds ``queued`` octets the peer has not taken."""

    queued = 0

    def get_write_buffer_size(self) -> int:
        return self.queued


def open_plain() -> tuple:
    d = make_daemon(gw_config(f"max_buffer = {LIMIT}", proxies=None))
    proto, tr = open_conn(d, peer=("198.18.1.2", 40000), local=("198.19.0.2", 4500))
    proto.data_received(STREAM)
    conn = only_conn(d)
    assert conn.state is State.OPEN and proto.registered and proto.front is None
    buffered = BufferedTransport(tr.extra["sockname"], tr.extra["peername"])
    proto.transport = buffered
    return d, proto, buffered, conn


def test_over_the_bound_esp_is_dropped_on_the_connection_and_ike_overshoots() -> None:
    async def body() -> None:
        d, proto, tr, conn = open_plain()
        tr.queued = LIMIT
        proto.send(b"esp-at-the-bound", False)
        assert tr.written == b"esp-at-the-bound"
        tr.queued = LIMIT + 1
        proto.send(b"esp", False, frames=3)
        assert conn.drops.get("esp-congested") == 3
        proto.send(b"ike", True)
        assert tr.written.endswith(b"ike") and "ike-congested" not in conn.drops
        tr.queued = LIMIT * IKE_OVERSHOOT + 1
        proto.send(b"ike2", True)
        assert not tr.written.endswith(b"ike2")
        assert conn.drops.get("ike-congested") == 1
        assert d.engine.events.get("ike-congested") == 1  # logged (limited) as well
        assert d.engine.router.drops == {}  # the connection's, not the host's
        cleanup(d)

    asyncio.run(body())


def test_a_queue_batch_leaves_in_one_write() -> None:
    async def body() -> None:
        d, proto, tr, _ = open_plain()
        writes: list[bytes] = []
        tr.write = lambda data: writes.append(bytes(data))  # type: ignore[method-assign]
        batch = d.rfc9329.batch
        batch.mark(True)
        proto.send(b"one", False)
        proto.send(b"two", True)
        assert writes == [] and batch.dirty == [proto]
        batch.mark(False)
        assert writes == [b"onetwo"] and batch.dirty == []
        proto.send(b"three", False)  # outside a batch: at once
        assert writes == [b"onetwo", b"three"]
        cleanup(d)

    asyncio.run(body())


def test_a_gone_connection_counts_on_the_host() -> None:
    async def body() -> None:
        d, proto, tr, conn = open_plain()
        d.engine.conns.pop(conn.conn_id)
        tr.queued = LIMIT + 1
        proto.send(b"esp", False)
        assert d.engine.router.drops == {"esp-congested": 1}
        cleanup(d)

    asyncio.run(body())
