"""TcpProtocol's front handling (tcpencap/aio/tcp.py): PROXY v2 headers from trusted load
balancers, TLS listeners and TLS clients, driven through a fake transport inside a real
event loop, against a real Daemon (datapath python: its constructor starts nothing) and
its real engine. Only the steering rules and the raw injector, which need root, are
replaced by recorders."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tcpencap.aio.daemon import Daemon
from tcpencap.aio.tcp import TcpProtocol
from tcpencap.config import Config, parse_config
from tcpencap.core import reload as plans
from tcpencap.core.outputs import Connect
from tcpencap.core.rfc9329_conn import State
from tcpencap.wire import proxy_v2
from tcpencap.wire.ike import NON_ESP_MARKER
from tcpencap.wire.packet import addr_bytes, build_udp_packet
from tcpencap.wire.rfc9329 import PREFIX, frame_ike
from tests.tls_helpers import ServerCert, make_server_cert

DEADLINE = 0.05  # tls_handshake_timeout in these tests: also the PROXY header's deadline
PAST_DEADLINE = 0.2
CLIENT = "198.18.1.2"  # the client a proxy names
OTHER_CLIENT = "198.18.1.3"
STRANGER = "198.18.2.2"  # a peer not in proxy_protocol_from
PROXY = ("127.0.0.1", 51000)  # the load balancer's end of its connection
LOOPBACK_LOCAL = ("127.0.0.1", 4500)
NOT_LOCAL = "198.51.100.7"  # TEST-NET-2: never an address of this host
GATEWAY = "198.19.0.2"
HOST = "vpn.lab.test"


def ike_sa_init() -> bytes:
    """An IKEv2 IKE_SA_INIT request (initiator SPI set, responder SPI zero): a well-formed
    first message for the engine."""
    body = struct.pack("!BBH", 0, 0, 40) + b"x" * 36  # one payload (SA), the last
    head = bytes.fromhex("1122334455667788") + bytes(8)
    return head + struct.pack("!BBBBII", 33, 0x20, 34, 0x08, 0, 28 + len(body)) + body


FRAME = frame_ike(ike_sa_init())
STREAM = PREFIX + FRAME


def header(
    src: str = CLIENT, sport: int = 40000, dst: str = "127.0.0.1", dport: int = 4500
) -> bytes:
    return proxy_v2.build(src, sport, dst, dport)


# --- fakes ---------------------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """What TcpProtocol uses of a transport. ``close`` reports connection_lost on the next
    loop iteration, as asyncio's socket transports do."""

    def __init__(self, sockname: tuple[Any, ...], peername: tuple[Any, ...]) -> None:
        super().__init__()
        self.extra: dict[str, Any] = {"sockname": sockname, "peername": peername, "socket": None}
        self.written = bytearray()
        self.closed = False
        self.protocol: asyncio.Protocol | None = None
        self.lost = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.protocol is not None:
            asyncio.get_running_loop().call_soon(self._lose)

    def _lose(self) -> None:
        self.lost = True
        assert self.protocol is not None
        self.protocol.connection_lost(None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class FakeRules:
    """Stands in for nfq.rules.SteeringRules (ipset needs root)."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.removed: list[str] = []

    def steer(self, addr: str, port: int, on: bool) -> bool:
        name = f"{addr}:{port}" if port else addr
        (self.added if on else self.removed).append(name)
        return True


class FakeInjector:
    """Stands in for nfq.inject.RawInjector (raw sockets need root)."""

    def __init__(self) -> None:
        self.packets: list[tuple[bytes, Any]] = []

    def inject(self, packet: bytes, dst: Any) -> None:
        self.packets.append((packet, dst))

    def fds(self) -> tuple[int, ...]:
        return ()


# --- helpers -------------------------------------------------------------------------------


def config_text(gateway: list[str], top: tuple[str, ...] = (), connections: str = "") -> str:
    lines = [
        "tcpencap {",
        "  datapath = python",
        f"  tls_handshake_timeout = {int(DEADLINE * 1000)}ms",
    ]
    lines += [f"  {line}" for line in top]
    lines += ["  gateway {", *(f"    {line}" for line in gateway), "  }"]
    if connections:
        lines += ["  connections {", connections, "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def gw_config(*extra: str, proxies: str | None = "127.0.0.1") -> Config:
    lines = ["listen = 127.0.0.1:4500"]
    if proxies is not None:
        lines.append(f"proxy_protocol_from = {proxies}")
    return parse_config(config_text([*lines, *extra]))


def make_daemon(config: Config) -> Daemon:
    d = Daemon(config)
    assert d.datapath == "python" and d.engine.datapath.native is None
    d.rules = d.rfc9329.rules = FakeRules()  # type: ignore[assignment]
    d.injector = d.rfc9329.injector = FakeInjector()  # type: ignore[assignment]
    assert d.fronts.configure(config) == []
    return d


def open_conn(
    d: Daemon,
    peer: tuple[str, int] = PROXY,
    local: tuple[str, int] = LOOPBACK_LOCAL,
    tls_listener: bool = False,
) -> tuple[TcpProtocol, FakeTransport]:
    proto = TcpProtocol(d.rfc9329, tls_listener=tls_listener)
    tr = FakeTransport(local, peer)
    tr.protocol = proto
    proto.connection_made(tr)
    return proto, tr


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


async def settle() -> None:
    """Let the fake transports report connection_lost."""
    for _ in range(3):
        await asyncio.sleep(0)


def only_conn(d: Daemon) -> Any:
    (conn,) = d.engine.conns.values()
    return conn


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def injected_sources(d: Daemon) -> list[str]:
    inj = d.injector
    assert isinstance(inj, FakeInjector)
    return [str(ipaddress.ip_address(p[12:16])) for p, _ in inj.packets]


def assert_proxied_client_accepted(d: Daemon, proto: TcpProtocol, tr: FakeTransport) -> None:
    conn = only_conn(d)
    assert (conn.peer_text, conn.peer_port) == (CLIENT, 40000)
    assert conn.entry.peer == addr_bytes(CLIENT)
    assert (conn.local_text, conn.local_port) == LOOPBACK_LOCAL
    assert conn.state is State.OPEN  # the frame after the header reached the engine
    assert d.engine.admission.n_proxied == 0
    assert d.engine.admission.per_source == {f"{CLIENT}/32": 1}
    assert d.rfc9329.protocols == {conn.conn_id: proto}
    assert proto.registered and proto.front is None
    assert not tr.closed and tr.written == b""
    assert injected_sources(d) == [CLIENT]  # charon is given the client's IKE
    assert d.engine.events == {}


def cleanup(d: Daemon) -> None:
    d.rfc9329.timer.cancel()


# --- 1, 2: a proxy's connection names the client ---------------------------------------------


def test_proxied_connection_is_accepted_as_the_client_the_header_names() -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d)
        assert d.engine.admission.n_proxied == 1
        assert d.engine.conns == {} and d.rfc9329.protocols == {} and not proto.registered
        assert not tr.closed
        proto.data_received(header() + STREAM)
        assert_proxied_client_accepted(d, proto, tr)
        assert d.rules.added == [f"{CLIENT}:40000"]  # type: ignore[attr-defined]
        await asyncio.sleep(PAST_DEADLINE)  # the front's deadline no longer applies
        assert not tr.closed and d.engine.events == {}
        cleanup(d)

    run(body)


@pytest.mark.parametrize("size", [1, 2, 5, 13])
def test_header_split_across_many_reads(size: int) -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d)
        hdr = header()
        data = hdr + STREAM
        fed = 0
        for piece in pieces(data, size):
            proto.data_received(piece)
            fed += len(piece)
            if fed < len(hdr):
                assert d.engine.admission.n_proxied == 1 and d.engine.conns == {}
            else:
                assert d.engine.admission.n_proxied == 0 and len(d.engine.conns) == 1
        assert_proxied_client_accepted(d, proto, tr)
        cleanup(d)

    run(body)


def test_header_alone_then_the_stream_in_later_reads() -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d)
        proto.data_received(header())
        assert d.engine.admission.n_proxied == 0 and len(d.engine.conns) == 1
        assert only_conn(d).state is State.ACCEPTED
        await asyncio.sleep(PAST_DEADLINE)  # the header came in time: no proxy deadline
        assert not tr.closed and d.engine.events == {}
        proto.data_received(PREFIX)
        proto.data_received(FRAME)
        assert_proxied_client_accepted(d, proto, tr)
        cleanup(d)

    run(body)


# --- 3: which local address charon is told -------------------------------------------------


def test_header_destination_that_is_not_this_hosts_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d)
        with caplog.at_level(logging.WARNING, logger="tcpencap"):
            proto.data_received(header(dst=NOT_LOCAL) + STREAM)
        (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert f"{CLIENT}:40000 (via {PROXY[0]}:{PROXY[1]})" in line and NOT_LOCAL in line
        assert tr.closed and tr.written == b""
        assert d.engine.events == {"proxy-destination": 1}
        assert d.engine.admission.n_proxied == 0
        assert (
            d.engine.conns == {}
            and d.rfc9329.protocols == {}
            and d.engine.admission.per_source == {}
        )
        assert injected_sources(d) == []
        await settle()
        assert tr.lost and d.engine.admission.n_proxied == 0  # the slot is given back once only
        cleanup(d)

    run(body)


def test_socket_address_of_the_clients_family_is_used_as_it_is() -> None:
    """The balancer connected to a routable address of this host: that is charon's end,
    whatever the header names as its destination."""

    async def body() -> None:
        d = make_daemon(gw_config(proxies="10.0.0.0/8"))
        proto, tr = open_conn(d, peer=("10.1.2.3", 50000), local=(GATEWAY, 4500))
        assert d.engine.admission.n_proxied == 1
        proto.data_received(header(dst=NOT_LOCAL, dport=443) + STREAM)
        conn = only_conn(d)
        assert (conn.local_text, conn.local_port) == (GATEWAY, 4500)
        assert (conn.peer_text, conn.peer_port) == (CLIENT, 40000)
        assert not tr.closed and d.engine.events == {} and d.engine.admission.n_proxied == 0
        cleanup(d)

    run(body)


@pytest.mark.parametrize(
    ("dst", "accepted"), [("127.0.0.1", True), (NOT_LOCAL, False)], ids=["local", "not-local"]
)
def test_socket_address_of_the_other_family_takes_the_header_destination(
    dst: str, accepted: bool
) -> None:
    async def body() -> None:
        d = make_daemon(gw_config(proxies="2001:db8::/64"))
        proto, tr = open_conn(d, peer=("2001:db8::9", 50000), local=("2001:db8::2", 4500))
        proto.data_received(header(dst=dst, dport=4501) + STREAM)
        assert d.engine.admission.n_proxied == 0
        if accepted:
            conn = only_conn(d)
            assert (conn.local_text, conn.local_port) == ("127.0.0.1", 4501)
            assert (conn.peer_text, conn.peer_port) == (CLIENT, 40000)
            assert not tr.closed and d.engine.events == {}
        else:
            assert tr.closed and d.engine.conns == {}
            assert d.engine.events == {"proxy-destination": 1}
        cleanup(d)

    run(body)


# --- 4, 5: a header where one must be, and only there ----------------------------------------


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (STREAM, "proxy-missing"),
        (b"PROXY TCP4 198.18.1.2 127.0.0.1 40000 4500\r\n" + STREAM, "proxy-v1"),
        (b"\x16\x03\x01\x00\x05hello", "proxy-missing"),
    ],
    ids=["plain", "v1", "tls"],
)
def test_a_proxys_connection_without_a_v2_header_is_refused(first: bytes, reason: str) -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d)
        proto.data_received(first)
        assert tr.closed
        assert d.engine.events == {reason: 1}
        assert (
            d.engine.admission.n_proxied == 0 and d.engine.conns == {} and d.rfc9329.protocols == {}
        )
        await settle()
        assert d.engine.admission.n_proxied == 0
        cleanup(d)

    run(body)


def test_a_header_from_a_peer_not_listed_is_refused() -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d, peer=(STRANGER, 50000), local=(GATEWAY, 4500))
        assert d.engine.admission.n_proxied == 0  # not a proxy: accepted as itself at once
        conn = only_conn(d)
        assert conn.peer_text == STRANGER and d.rfc9329.protocols == {conn.conn_id: proto}
        proto.data_received(header() + STREAM)
        assert tr.closed
        assert d.engine.events == {"proxy-unexpected": 1}
        assert conn.drops == {"proxy-unexpected": 1}
        assert injected_sources(d) == []  # nothing of the stream reached charon
        await settle()
        assert (
            d.engine.conns == {} and d.rfc9329.protocols == {} and d.engine.admission.n_proxied == 0
        )
        assert d.engine.admission.per_source == {}
        cleanup(d)

    run(body)


def test_a_second_header_behind_the_proxys_is_refused() -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d)
        proto.data_received(header() + header(OTHER_CLIENT) + STREAM)
        assert tr.closed and d.engine.admission.n_proxied == 0
        assert d.engine.events == {"proxy-unexpected": 1}
        assert only_conn(d).drops == {"proxy-unexpected": 1}  # the named client's, counted
        assert injected_sources(d) == []
        await settle()
        assert (
            d.engine.conns == {}
            and d.rfc9329.protocols == {}
            and d.engine.admission.per_source == {}
        )
        cleanup(d)

    run(body)


def test_plain_stream_from_a_peer_not_listed_passes() -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d, peer=(STRANGER, 50000), local=(GATEWAY, 4500))
        proto.data_received(STREAM)
        conn = only_conn(d)
        assert conn.state is State.OPEN and conn.peer_text == STRANGER
        assert proto.front is None and not tr.closed and d.engine.events == {}
        assert injected_sources(d) == [STRANGER]
        cleanup(d)

    run(body)


# --- 6: a balancer's health check ------------------------------------------------------------


def test_local_header_then_nothing_is_closed_quietly_at_the_deadline() -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d)
        proto.data_received(proxy_v2.build_local())
        assert not tr.closed
        assert d.engine.conns == {} and d.rfc9329.protocols == {} and not proto.registered
        await asyncio.sleep(PAST_DEADLINE)
        assert tr.closed and tr.written == b""
        assert d.engine.admission.n_proxied == 0
        assert d.engine.events == {}  # health checks are not counted
        assert d.engine.conns == {}
        cleanup(d)

    run(body)


def test_local_header_closed_by_the_proxy_gives_the_slot_back() -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d)
        proto.data_received(proxy_v2.build_local())
        proto.connection_lost(None)
        assert d.engine.admission.n_proxied == 0
        await asyncio.sleep(PAST_DEADLINE)
        assert d.engine.admission.n_proxied == 0 and d.engine.events == {}
        cleanup(d)

    run(body)


@pytest.mark.parametrize("together", [False, True], ids=["later", "same-read"])
def test_data_after_a_local_header_is_refused(together: bool) -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d)
        if together:
            proto.data_received(proxy_v2.build_local() + STREAM)
        else:
            proto.data_received(proxy_v2.build_local())
            assert not tr.closed
            proto.data_received(STREAM)
        assert tr.closed
        assert d.engine.events == {"proxy-local": 1}
        assert d.engine.admission.n_proxied == 0 and d.engine.conns == {}
        await asyncio.sleep(PAST_DEADLINE)  # the timer does not count it twice
        assert d.engine.events == {"proxy-local": 1} and d.engine.admission.n_proxied == 0
        cleanup(d)

    run(body)


# --- 7, 8: a proxy's connection without its header ------------------------------------------


@pytest.mark.parametrize("partial", [b"", header()[:10], header()[:20]], ids=["none", "10", "20"])
def test_no_header_within_the_deadline(partial: bytes) -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d)
        if partial:
            proto.data_received(partial)
        await asyncio.sleep(DEADLINE / 2)
        assert not tr.closed and d.engine.admission.n_proxied == 1
        await asyncio.sleep(PAST_DEADLINE)
        assert tr.closed
        assert d.engine.events == {"proxy-timeout": 1}
        assert d.engine.admission.n_proxied == 0 and d.engine.conns == {}
        await settle()
        assert d.engine.admission.n_proxied == 0
        cleanup(d)

    run(body)


@pytest.mark.parametrize("partial", [b"", header()[:7]], ids=["none", "partial"])
def test_connection_lost_before_the_header_gives_the_slot_back(partial: bytes) -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d)
        if partial:
            proto.data_received(partial)
        assert d.engine.admission.n_proxied == 1
        proto.connection_lost(ConnectionResetError("reset"))
        assert d.engine.admission.n_proxied == 0
        proto.connection_lost(None)  # reported twice: still given back once
        assert d.engine.admission.n_proxied == 0
        await asyncio.sleep(PAST_DEADLINE)  # its deadline was cancelled with it
        assert d.engine.events == {} and not tr.closed
        assert d.engine.conns == {}
        cleanup(d)

    run(body)


def test_proxy_slots_are_bounded_by_max_pending() -> None:
    async def body() -> None:
        d = make_daemon(gw_config("max_pending = 2"))
        p1, t1 = open_conn(d, peer=("127.0.0.1", 1))
        _, t2 = open_conn(d, peer=("127.0.0.1", 2))
        assert d.engine.admission.n_proxied == 2 and not t1.closed and not t2.closed
        _, t3 = open_conn(d, peer=("127.0.0.1", 3))
        assert t3.closed and d.engine.events == {"limit-pending": 1}
        await settle()
        assert d.engine.admission.n_proxied == 2  # the refused one took no slot and gave none back
        p1.connection_lost(None)
        assert d.engine.admission.n_proxied == 1
        cleanup(d)

    run(body)


# --- 9: limits apply to the client the header names -----------------------------------------


def test_per_source_limit_applies_to_the_named_client() -> None:
    async def body() -> None:
        d = make_daemon(gw_config("max_per_source = 1"))
        p1, t1 = open_conn(d, peer=("127.0.0.1", 50001))
        p2, t2 = open_conn(d, peer=("127.0.0.1", 50002))  # the same proxy: not its limit
        assert d.engine.admission.n_proxied == 2 and not t2.closed
        p1.data_received(header(CLIENT, 40001) + STREAM)
        p2.data_received(header(CLIENT, 40002) + STREAM)
        assert not t1.closed and t2.closed
        assert d.engine.events == {"limit-per-source": 1}
        await settle()
        conn = only_conn(d)
        assert (conn.peer_text, conn.peer_port) == (CLIENT, 40001)
        assert d.rfc9329.protocols == {conn.conn_id: p1} and not p2.registered
        assert d.engine.admission.n_proxied == 0 and d.engine.admission.per_source == {
            f"{CLIENT}/32": 1
        }
        assert injected_sources(d) == [CLIENT]  # only the first one's IKE
        cleanup(d)

    run(body)


def test_per_source_limit_lets_different_clients_through_one_proxy() -> None:
    async def body() -> None:
        d = make_daemon(gw_config("max_per_source = 1"))
        p1, t1 = open_conn(d, peer=("127.0.0.1", 50001))
        p2, t2 = open_conn(d, peer=("127.0.0.1", 50002))
        p1.data_received(header(CLIENT, 40001) + STREAM)
        p2.data_received(header(OTHER_CLIENT, 40002) + STREAM)
        await settle()
        assert not t1.closed and not t2.closed and d.engine.events == {}
        peers = sorted((c.peer_text, c.peer_port) for c in d.engine.conns.values())
        assert peers == [(CLIENT, 40001), (OTHER_CLIENT, 40002)]
        assert set(d.rfc9329.protocols.values()) == {p1, p2}
        assert d.engine.admission.n_proxied == 0
        assert d.engine.admission.per_source == {f"{CLIENT}/32": 1, f"{OTHER_CLIENT}/32": 1}
        cleanup(d)

    run(body)


# --- 10: TLS listeners -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_server_cert(tmp_path_factory.mktemp("tls"), dns=HOST)


def tls_config(certs: ServerCert, *extra: str) -> Config:
    return parse_config(
        config_text(
            [
                "listen = 127.0.0.1:4500",
                "tls_listen = 127.0.0.1:443",
                f"tls_cert = {certs.cert}",
                f"tls_key = {certs.key}",
                *extra,
            ]
        )
    )


class TlsClient:
    """A client's TLS over memory BIOs, as a remote peer would run it."""

    def __init__(self, ca: Path) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cafile=str(ca))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=HOST)
        self.done = False

    def step(self, received: bytes = b"") -> bytes:
        """Feed what the server wrote; what the client has to send."""
        if received:
            self.incoming.write(received)
        if not self.done:
            try:
                self.obj.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                pass
        return self.outgoing.read()

    def send(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()

    def receive(self, records: bytes) -> bytes:
        self.incoming.write(records)
        out = b""
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                return out
            if not chunk:
                return out
            out += chunk


def handshake(proto: TcpProtocol, tr: FakeTransport, client: TlsClient, first: bytes) -> None:
    """``first``: what goes before the ClientHello (a PROXY header, or nothing)."""
    proto.data_received(first + client.step())
    finish_handshake(proto, tr, client)


def finish_handshake(proto: TcpProtocol, tr: FakeTransport, client: TlsClient) -> None:
    """Carry the records both ways until neither side has anything to say."""
    for _ in range(10):
        written = bytes(tr.written)
        tr.written.clear()
        out = client.step(written)
        if out:
            proto.data_received(out)
        if client.done and not out and not tr.written:
            return
    raise AssertionError("the handshake does not finish")


def test_tls_listener_takes_plain_rfc9329(certs: ServerCert) -> None:
    async def body() -> None:
        d = make_daemon(tls_config(certs))
        assert d.fronts.server is not None
        proto, tr = open_conn(d, peer=(STRANGER, 50000), local=(GATEWAY, 443), tls_listener=True)
        conn = only_conn(d)  # no proxy: accepted as itself before any data
        assert proto.registered and proto.front is not None
        proto.data_received(STREAM)
        assert proto.front is None  # plain from the first octet on
        assert conn.state is State.OPEN and injected_sources(d) == [STRANGER]
        assert not tr.closed and tr.written == b""
        await asyncio.sleep(PAST_DEADLINE)  # no TLS handshake deadline on plain
        assert not tr.closed and d.engine.events == {}
        proto.send(FRAME, True)
        assert tr.written == FRAME  # the engine's frames go out as they are
        cleanup(d)

    run(body)


def test_tls_listener_answers_a_client_hello_and_carries_the_stream(certs: ServerCert) -> None:
    async def body() -> None:
        d = make_daemon(tls_config(certs))
        proto, tr = open_conn(d, peer=(STRANGER, 50000), local=(GATEWAY, 443), tls_listener=True)
        client = TlsClient(certs.ca)
        hello = client.step()
        assert hello[0] == 0x16
        proto.data_received(hello)
        assert tr.written[:1] == b"\x16"  # the ServerHello's handshake record
        assert not tr.closed and d.engine.events == {}
        finish_handshake(proto, tr, client)
        assert client.done and client.obj.version() == "TLSv1.3"
        proto.data_received(client.send(STREAM))
        conn = only_conn(d)
        assert conn.state is State.OPEN and injected_sources(d) == [STRANGER]
        assert proto.front is not None and proto.front.tls  # TLS stays under the stream
        proto.send(FRAME, True)
        assert FRAME not in tr.written  # encrypted
        assert client.receive(bytes(tr.written)) == FRAME
        await asyncio.sleep(PAST_DEADLINE)  # the handshake finished in time
        assert not tr.closed and d.engine.events == {}
        cleanup(d)

    run(body)


def test_tls_listener_closes_a_handshake_that_does_not_finish(certs: ServerCert) -> None:
    async def body() -> None:
        d = make_daemon(tls_config(certs))
        proto, tr = open_conn(d, peer=(STRANGER, 50000), local=(GATEWAY, 443), tls_listener=True)
        proto.data_received(TlsClient(certs.ca).step())
        await asyncio.sleep(PAST_DEADLINE)
        assert tr.closed
        assert d.engine.events == {"tls-handshake-timeout": 1}
        await settle()
        assert d.engine.conns == {} and d.rfc9329.protocols == {}
        cleanup(d)

    run(body)


def test_proxied_tls_connection_is_admitted_before_its_handshake(certs: ServerCert) -> None:
    async def body() -> None:
        d = make_daemon(tls_config(certs, "proxy_protocol_from = 127.0.0.1"))
        proto, tr = open_conn(d, tls_listener=True, local=("127.0.0.1", 443))
        assert d.engine.admission.n_proxied == 1 and d.engine.conns == {}
        client = TlsClient(certs.ca)
        handshake(proto, tr, client, header(dport=443))
        assert client.done
        conn = only_conn(d)
        assert (conn.peer_text, conn.peer_port) == (CLIENT, 40000)
        assert (conn.local_text, conn.local_port) == ("127.0.0.1", 443)
        proto.data_received(client.send(STREAM))
        assert conn.state is State.OPEN and injected_sources(d) == [CLIENT]
        assert d.engine.admission.n_proxied == 0 and d.engine.events == {} and not tr.closed
        cleanup(d)

    run(body)


def test_refused_proxied_client_gets_no_tls_handshake(certs: ServerCert) -> None:
    async def body() -> None:
        d = make_daemon(tls_config(certs, "proxy_protocol_from = 127.0.0.1", "max_per_source = 1"))
        p1, t1 = open_conn(
            d, peer=("127.0.0.1", 50001), tls_listener=True, local=("127.0.0.1", 443)
        )
        p1.data_received(header(CLIENT, 40001, dport=443))
        assert len(d.engine.conns) == 1
        p2, t2 = open_conn(
            d, peer=("127.0.0.1", 50002), tls_listener=True, local=("127.0.0.1", 443)
        )
        p2.data_received(header(CLIENT, 40002, dport=443) + TlsClient(certs.ca).step())
        assert t2.closed and t2.written == b""  # refused before TLS looked at anything
        assert d.engine.events == {"limit-per-source": 1}
        assert d.engine.admission.n_proxied == 0 and len(d.engine.conns) == 1 and not t1.closed
        cleanup(d)

    run(body)


def test_tls_on_a_listener_without_tls_is_refused() -> None:
    async def body() -> None:
        d = make_daemon(gw_config())
        proto, tr = open_conn(d, peer=(STRANGER, 50000), local=(GATEWAY, 4500))
        proto.data_received(b"\x16\x03\x01\x00\x05hello")
        assert tr.closed and d.engine.events == {"tls-not-configured": 1}
        await settle()
        assert d.engine.conns == {}
        cleanup(d)

    run(body)


# --- 11: a TLS client connection whose CA cannot be read ------------------------------------


def client_setup(ca: str) -> tuple[Daemon, Connect, list[str]]:
    """A daemon with connection c1 (tls = yes, tls_ca ``ca``) and the engine's Connect for
    charon's first IKE packet to the gateway."""
    conn = "\n".join(
        [
            "    c1 {",
            f"      remote_addrs = {GATEWAY}",
            "      transport = tcp",
            "      tls = yes",
            f"      tls_ca = {ca}",
            "    }",
        ]
    )
    cfg = parse_config(config_text([], connections=conn))
    d = Daemon(cfg)
    d.rules = d.rfc9329.rules = FakeRules()  # type: ignore[assignment]
    d.injector = d.rfc9329.injector = FakeInjector()  # type: ignore[assignment]
    errors = d.fronts.configure(cfg)
    now = time.monotonic()
    intent = plans.intent_of(cfg)
    d.engine.apply(now, plans.plan(d.intent, intent))
    d.intent = intent
    d.engine.pull()
    packet = build_udp_packet(
        addr_bytes(CLIENT), addr_bytes(GATEWAY), 4500, 4500, NON_ESP_MARKER + ike_sa_init()
    )
    d.engine.outbound(now, packet)
    (connect,) = [o for o in d.engine.pull() if isinstance(o, Connect)]
    return d, connect, errors


def test_client_without_a_usable_ca_fails_its_connect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no-such-ca.pem"

    async def body() -> None:
        d, connect, errors = client_setup(str(missing))
        (line,) = errors
        assert "c1" in line and str(missing) in line
        with pytest.raises(OSError):
            d.fronts.client_front(time.monotonic(), addr_bytes(GATEWAY), d.intent.connections)
        proto = TcpProtocol(d.rfc9329, connect.conn_id, connect.generation)
        tr = FakeTransport((CLIENT, connect.local_port), (GATEWAY, 4500))
        tr.protocol = proto
        with caplog.at_level(logging.WARNING, logger="tcpencap"):
            proto.connection_made(tr)  # no exception escapes
        assert tr.closed and tr.written == b""
        assert not proto.registered and d.rfc9329.protocols == {}
        assert d.engine.conn(connect.conn_id) is None  # the connect failed: gone
        assert d.engine.totals["connect_failures"] == 1
        assert any(
            "connect failed" in r.getMessage() and "no TLS context" in r.getMessage()
            for r in caplog.records
        )
        await settle()
        assert d.rfc9329.protocols == {}
        cleanup(d)

    run(body)


def test_client_with_a_readable_ca_sends_its_client_hello(certs: ServerCert) -> None:
    """The same set-up with a CA that can be read: the front exists and speaks first."""

    async def body() -> None:
        d, connect, errors = client_setup(str(certs.ca))
        assert errors == []
        proto = TcpProtocol(d.rfc9329, connect.conn_id, connect.generation)
        tr = FakeTransport((CLIENT, connect.local_port), (GATEWAY, 4500))
        tr.protocol = proto
        proto.connection_made(tr)
        assert not tr.closed and tr.written[:1] == b"\x16"  # the ClientHello
        assert PREFIX not in tr.written  # the engine's prefix waits for the handshake
        assert proto.registered and d.rfc9329.protocols == {connect.conn_id: proto}
        assert proto.front is not None and proto.front.tls
        assert d.engine.conn(connect.conn_id).state is State.OPEN  # type: ignore[union-attr]
        cleanup(d)

    run(body)


def test_a_reload_with_an_unreadable_ca_keeps_the_context_in_use(
    certs: ServerCert, tmp_path: Path
) -> None:
    async def body() -> None:
        d, _, errors = client_setup(str(certs.ca))
        assert errors == []
        missing = str(tmp_path / "gone.pem")
        bad, _, _ = client_setup(missing)
        (line,) = d.fronts.configure(bad.config)
        assert "c1" in line and missing in line
        front = d.fronts.client_front(time.monotonic(), addr_bytes(GATEWAY), d.intent.connections)
        assert front is not None and front.tls
        cleanup(d)
        cleanup(bad)

    run(body)
