"""Tests for StreamFront: the PROXY v2 stage, first-octet detection on a gateway, TLS over
memory BIOs (back to back, no sockets), the pin and the deadline. The clock is a float."""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.aio import tls as tls_contexts
from tcpencap.config import ConnectionConfig, GatewayConfig
from tcpencap.core.front import Addressed, Ended, FrontError, Secured, StreamFront, pin_of
from tcpencap.wire import proxy_v2
from tcpencap.wire.rfc9329 import PREFIX, frame_esp, frame_ike
from tests.tls_helpers import ServerCert, make_server_cert

T0 = 1000.0
TIMEOUT = 10.0
HOST = "vpn.lab.test"

IKE_MESSAGE = bytes(range(1, 9)) + bytes(8) + b"\x00\x20\x22\x08" + bytes(4) + b"\x00\x00\x00\x1c"
STREAM = PREFIX + frame_ike(IKE_MESSAGE) + frame_esp(b"\x00\x00\x10\x01" + bytes(60))
REPLY = frame_ike(IKE_MESSAGE[::-1]) + frame_esp(b"\xaa\xbb\xcc\xdd" + bytes(100))

chunk_sizes = st.lists(st.integers(1, 400), min_size=1, max_size=8)


# --- helpers ---------------------------------------------------------------------------


def pieces(data: bytes, sizes: Sequence[int]) -> Iterator[bytes]:
    """``data`` cut in chunks of the given sizes, cycled."""
    i = k = 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        yield data[i : i + n]
        i += n
        k += 1


def feed(front: StreamFront, data: bytes, sizes: Sequence[int] = (1 << 20,)) -> list[object]:
    """As the shell does: after a PROXY header names the client, admit it and resume."""
    events: list[object] = []
    for piece in pieces(data, sizes):
        got = front.receive_data(piece)
        events += got
        if any(isinstance(e, Addressed) and not e.header.local for e in got):
            events += front.resume()
    return events


def stream_of(events: list[object]) -> bytes:
    return b"".join(e for e in events if isinstance(e, bytes))


def not_bytes(events: list[object]) -> list[object]:
    return [e for e in events if not isinstance(e, bytes)]


def reason(exc: pytest.ExceptionInfo[FrontError]) -> str:
    return exc.value.reason


class Link:
    """A server and a client front, wired back to back."""

    def __init__(
        self, server: StreamFront, client: StreamFront, sizes: Sequence[int] = (1 << 20,)
    ) -> None:
        self.server, self.client, self.sizes = server, client, sizes
        self.at_server: list[object] = []
        self.at_client: list[object] = []

    def to_server(self, data: bytes) -> None:
        self.at_server += feed(self.server, data, self.sizes)

    def to_client(self, data: bytes) -> None:
        self.at_client += feed(self.client, data, self.sizes)

    def pump(self, rounds: int = 20) -> None:
        """Carry what either side has to send until neither has anything."""
        for _ in range(rounds):
            up, down = self.client.data_to_send(), self.server.data_to_send()
            if not up and not down:
                return
            self.to_server(up)
            self.to_client(down)
        raise AssertionError("the fronts keep talking")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_server_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    """A second CA and certificate, for the same name, that the server does not use."""
    return make_server_cert(tmp_path_factory.mktemp("other"), tag="other")


# The daemon's own contexts (tcpencap.aio.tls), built from settings as an operator writes them.


def server_context(certs: ServerCert) -> ssl.SSLContext:
    return tls_contexts.server_context(
        GatewayConfig(tls_listen=(("127.0.0.1", 443),), tls_cert=str(certs.cert),
                      tls_key=str(certs.key))
    )  # fmt: skip


def client_context(ca: Path) -> ssl.SSLContext:
    ctx = tls_contexts.client_context(ConnectionConfig("vpn", tls=True, tls_ca=str(ca)))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    return ctx


def pin_context() -> ssl.SSLContext:
    ctx = tls_contexts.client_context(ConnectionConfig("vpn", tls=True, tls_pin=b"\0" * 32))
    assert not ctx.check_hostname and ctx.verify_mode == ssl.CERT_NONE
    return ctx


@pytest.fixture(scope="module")
def server_ctx(certs: ServerCert) -> ssl.SSLContext:
    return server_context(certs)


@pytest.fixture(scope="module")
def client_ctx(certs: ServerCert) -> ssl.SSLContext:
    return client_context(certs.ca)


def tls_server(ctx: ssl.SSLContext, *, proxy: bool = False) -> StreamFront:
    return StreamFront(T0, TIMEOUT, server_side=True, proxy=proxy, tls=ctx)


def tls_client(
    ctx: ssl.SSLContext, hostname: str | None = HOST, pin: bytes | None = None
) -> StreamFront:
    return StreamFront(T0, TIMEOUT, server_side=False, tls=ctx, server_hostname=hostname, pin=pin)


def secured_link(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, sizes: Sequence[int] = (1 << 20,)
) -> Link:
    link = Link(tls_server(server_ctx), tls_client(client_ctx), sizes)
    link.pump()
    assert link.server.secured is not None and link.client.secured is not None
    return link


# --- a gateway without PROXY and without TLS --------------------------------------------


def test_plain_gateway_passes_bytes_through() -> None:
    front = StreamFront(T0, TIMEOUT, server_side=True)
    assert not front.done and not front.tls
    assert front.receive_data(b"") == []
    assert not front.done
    assert front.receive_data(STREAM[:1]) == [STREAM[:1]]
    assert front.done  # decided by the first octet
    assert front.receive_data(STREAM[1:]) == [STREAM[1:]]
    assert front.header is None and front.secured is None and not front.tls
    assert front.send(REPLY) == REPLY
    assert front.data_to_send() == b""
    assert front.close_notify() == b""
    assert front.expired(T0 + 1e9) is None  # the engine's deadlines apply from here


@settings(max_examples=50, deadline=None)
@given(sizes=chunk_sizes)
def test_plain_gateway_any_chunking_keeps_the_stream(sizes: list[int]) -> None:
    front = StreamFront(T0, TIMEOUT, server_side=True)
    events = feed(front, STREAM, sizes)
    assert all(isinstance(e, bytes) for e in events)
    assert stream_of(events) == STREAM
    assert front.done


@pytest.mark.parametrize(
    "data",
    [
        b"\r\n\r\n",
        proxy_v2.build("192.0.2.7", 40000, "198.19.0.2", 443) + STREAM,
        proxy_v2.build_local(),
        b"PROXY TCP4 192.0.2.7 198.19.0.2 40000 443\r\n",
        b"P",
    ],
)
def test_proxy_header_without_proxy_configured(data: bytes) -> None:
    front = StreamFront(T0, TIMEOUT, server_side=True)
    with pytest.raises(FrontError) as exc:
        front.receive_data(data)
    assert reason(exc) == "proxy-unexpected"


def test_tls_on_a_listener_without_tls() -> None:
    front = StreamFront(T0, TIMEOUT, server_side=True)
    with pytest.raises(FrontError) as exc:
        front.receive_data(b"\x16\x03\x01\x00\x05hello")
    assert reason(exc) == "tls-not-configured"


def test_plain_client_is_done_from_the_start() -> None:
    front = StreamFront(T0, TIMEOUT, server_side=False)
    assert front.done and not front.tls
    assert front.expired(T0 + 1e9) is None
    assert front.send(STREAM) == STREAM
    # A client does not look at the first octet: whatever the gateway sends is the stream.
    assert front.receive_data(b"\x16\r\nP") == [b"\x16\r\nP"]


# --- a gateway behind a PROXY v2 load balancer -------------------------------------------


@pytest.mark.parametrize(
    ("src", "sport", "dst", "dport"),
    [("192.0.2.7", 40000, "198.19.0.2", 4500), ("2001:db8::7", 1, "2001:db8::2", 65535)],
)
def test_proxy_header_at_every_split(src: str, sport: int, dst: str, dport: int) -> None:
    raw = proxy_v2.build(src, sport, dst, dport)
    data = raw + STREAM
    for cut in range(len(data) + 1):
        front = StreamFront(T0, TIMEOUT, server_side=True, proxy=True)
        events = feed(front, data[:cut]) + feed(front, data[cut:])
        addressed = [e for e in events if isinstance(e, Addressed)]
        assert len(addressed) == 1, cut
        assert events[0] == addressed[0]
        h = addressed[0].header
        assert (h.source, h.source_port, h.destination, h.destination_port) == (
            src,
            sport,
            dst,
            dport,
        )
        assert not h.local and h.length == len(raw)
        assert front.header == h
        assert stream_of(events) == STREAM, cut
        assert front.done


@settings(max_examples=100, deadline=None)
@given(
    addrs=st.one_of(
        st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
        st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)).filter(
            lambda t: t[0].ipv4_mapped is None and t[1].ipv4_mapped is None
        ),
    ),
    sport=st.integers(1, 65535),
    dport=st.integers(1, 65535),
    sizes=chunk_sizes.map(lambda s: [max(1, n // 20) for n in s]),
)
def test_proxy_header_any_chunking(addrs, sport: int, dport: int, sizes: list[int]) -> None:
    src, dst = (str(a) for a in addrs)
    front = StreamFront(T0, TIMEOUT, server_side=True, proxy=True)
    events = feed(front, proxy_v2.build(src, sport, dst, dport) + STREAM, sizes)
    assert [type(e) for e in not_bytes(events)] == [Addressed]
    assert isinstance(events[0], Addressed)
    h = events[0].header
    assert (h.source, h.source_port, h.destination, h.destination_port) == (src, sport, dst, dport)
    assert stream_of(events) == STREAM


def test_proxy_header_alone_then_stream() -> None:
    raw = proxy_v2.build("192.0.2.7", 40000, "198.19.0.2", 443)
    front = StreamFront(T0, TIMEOUT, server_side=True, proxy=True)
    [ev] = front.receive_data(raw)
    assert isinstance(ev, Addressed)
    # Without TLS on the listener no deadline is left (the engine's apply), but the first
    # stream octet is still checked.
    assert not front.done and front.expired(T0 + 1e9) is None
    assert front.resume() == []
    assert front.receive_data(b"") == []
    assert front.receive_data(STREAM) == [STREAM]
    assert front.done


def test_nothing_after_the_header_before_the_client_is_admitted(server_ctx, client_ctx) -> None:
    """The shell applies the client's limits first: until resume(), what follows the
    header (a ClientHello here) is kept, and no TLS work is done for it."""
    raw = proxy_v2.build("192.0.2.7", 40000, "198.19.0.2", 443)
    client = tls_client(client_ctx)
    hello = client.data_to_send()
    front = tls_server(server_ctx, proxy=True)
    [ev] = front.receive_data(raw + hello[:20])
    assert isinstance(ev, Addressed)
    assert front.receive_data(hello[20:]) == []
    assert front.data_to_send() == b"" and not front.tls
    assert front.resume() == []  # the handshake runs now: no event until it completes
    assert front.tls and front.data_to_send()  # the ServerHello and the rest


def test_a_clients_own_header_behind_the_proxys_is_refused() -> None:
    """A client behind the load balancer cannot smuggle a second header (its own claim)."""
    raw = proxy_v2.build("192.0.2.7", 40000, "198.19.0.2", 443)
    forged = proxy_v2.build("203.0.113.9", 500, "198.19.0.2", 443)
    front = StreamFront(T0, TIMEOUT, server_side=True, proxy=True)
    [ev] = front.receive_data(raw + forged + STREAM)
    assert isinstance(ev, Addressed)
    with pytest.raises(FrontError) as err:
        front.resume()
    assert err.value.reason == "proxy-unexpected"
    assert "second PROXY header" in err.value.detail


def test_proxy_header_alone_on_a_tls_listener_waits_for_the_first_octet(server_ctx) -> None:
    raw = proxy_v2.build("192.0.2.7", 40000, "198.19.0.2", 443)
    front = tls_server(server_ctx, proxy=True)
    [ev] = front.receive_data(raw)
    assert isinstance(ev, Addressed)
    assert not front.done and not front.tls
    assert front.expired(T0 + TIMEOUT).reason == "tls-handshake-timeout"
    assert front.resume() == []
    assert front.receive_data(STREAM) == [STREAM]  # plain RFC 9329 after the header
    assert front.done and not front.tls


def test_proxy_local_header_alone() -> None:
    front = StreamFront(T0, TIMEOUT, server_side=True, proxy=True)
    assert front.receive_data(proxy_v2.build_local()) == [Addressed(proxy_v2.ProxyHeader(16, True))]
    assert front.header == proxy_v2.ProxyHeader(16, True)
    assert front.receive_data(b"") == []
    # Nothing follows a health check: the front's deadline stays and closes it.
    assert not front.done
    assert front.expired(T0 + TIMEOUT - 0.5) is None
    err = front.expired(T0 + TIMEOUT)
    assert isinstance(err, FrontError) and err.reason == "proxy-local"
    assert err.quiet  # closed without a count: a health check is no failure
    with pytest.raises(FrontError) as exc:
        front.receive_data(STREAM[:1])  # a health check carries nothing of ours
    assert reason(exc) == "proxy-local" and not exc.value.quiet


def test_proxy_local_header_with_data() -> None:
    front = StreamFront(T0, TIMEOUT, server_side=True, proxy=True)
    with pytest.raises(FrontError) as exc:
        front.receive_data(proxy_v2.build_local() + STREAM)
    assert reason(exc) == "proxy-local"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (STREAM, "proxy-missing"),
        (b"\x16\x03\x01\x00\x05hello", "proxy-missing"),
        (b"PROXY TCP4 192.0.2.7 198.19.0.2 40000 443\r\n", "proxy-v1"),
        (proxy_v2.SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "proxy-malformed"),
    ],
)
def test_proxy_refusals(data: bytes, why: str) -> None:
    front = StreamFront(T0, TIMEOUT, server_side=True, proxy=True)
    with pytest.raises(FrontError) as exc:
        front.receive_data(data)
    assert reason(exc) == why


def test_missing_proxy_header_detected_on_first_octet() -> None:
    front = StreamFront(T0, TIMEOUT, server_side=True, proxy=True)
    with pytest.raises(FrontError) as exc:
        front.receive_data(b"I")
    assert reason(exc) == "proxy-missing"


def test_proxy_deadline() -> None:
    front = StreamFront(T0, TIMEOUT, server_side=True, proxy=True)
    raw = proxy_v2.build("192.0.2.7", 40000, "198.19.0.2", 443)
    assert front.receive_data(raw[:10]) == []
    assert front.expired(T0) is None
    assert front.expired(T0 + TIMEOUT - 0.001) is None
    err = front.expired(T0 + TIMEOUT)
    assert isinstance(err, FrontError) and err.reason == "proxy-timeout" and not err.quiet
    assert isinstance(front.expired(T0 + 2 * TIMEOUT), FrontError)
    # Once the header and the first octet are in, the front's deadline is gone.
    feed(front, raw[10:] + STREAM)
    assert front.done and front.expired(T0 + 1e9) is None


# --- TLS back to back --------------------------------------------------------------------


def test_tls_handshake_and_stream(server_ctx, client_ctx) -> None:
    server, client = tls_server(server_ctx), tls_client(client_ctx)
    assert client.tls and not client.done
    assert not server.tls and not server.done  # not before the first octet
    hello = client.data_to_send()
    assert hello[:1] == b"\x16"
    link = Link(server, client)
    link.to_server(hello)
    assert server.tls and server.secured is None
    link.pump()
    assert not_bytes(link.at_server) == [server.secured]
    assert not_bytes(link.at_client) == [client.secured]
    for front in (server, client):
        assert isinstance(front.secured, Secured)
        assert front.secured.version == "TLSv1.3"
        assert front.secured.cipher.startswith("TLS_")
        assert front.done and front.expired(T0 + 1e9) is None
    assert server.secured == client.secured

    wire = client.send(STREAM)
    assert wire and STREAM not in wire  # records, not the plain stream
    link.to_server(wire)
    link.pump()
    assert stream_of(link.at_server) == STREAM
    back = server.send(REPLY)
    assert back and REPLY not in back
    link.to_client(back)
    link.pump()
    assert stream_of(link.at_client) == REPLY


@settings(max_examples=12, deadline=None)
@given(sizes=chunk_sizes, cuts=st.lists(st.integers(1, len(STREAM)), max_size=4))
def test_tls_any_chunking(server_ctx, client_ctx, sizes: list[int], cuts: list[int]) -> None:
    link = secured_link(server_ctx, client_ctx, sizes)
    assert link.server.secured.version == link.client.secured.version == "TLSv1.3"
    points = [0, *sorted(set(cuts)), len(STREAM)]
    for a, b in zip(points, points[1:], strict=False):
        if b > a:
            link.to_server(link.client.send(STREAM[a:b]))
            link.to_client(link.server.send(REPLY[a:b]))
    link.to_client(link.server.send(REPLY[len(STREAM) :]))
    link.pump()
    assert stream_of(link.at_server) == STREAM
    assert stream_of(link.at_client) == REPLY
    assert not_bytes(link.at_server) == [link.server.secured]
    assert not_bytes(link.at_client) == [link.client.secured]


def test_client_data_held_until_secured(server_ctx, client_ctx) -> None:
    server, client = tls_server(server_ctx), tls_client(client_ctx)
    assert client.send(STREAM[:6]) == b""
    assert client.send(STREAM[6:]) == b""
    assert client.held_octets == len(STREAM)
    link = Link(server, client)
    link.to_server(client.data_to_send())  # the ClientHello only
    assert stream_of(link.at_server) == b""
    link.to_client(server.data_to_send())
    assert client.secured is not None
    assert client.held_octets == 0
    link.pump()
    assert stream_of(link.at_server) == STREAM
    first = next(i for i, e in enumerate(link.at_server) if isinstance(e, bytes))
    assert link.at_server.index(server.secured) < first


def test_server_data_held_until_secured(server_ctx, client_ctx) -> None:
    server, client = tls_server(server_ctx), tls_client(client_ctx)
    link = Link(server, client)
    link.to_server(client.data_to_send())
    assert server.tls and server.secured is None
    assert server.send(REPLY) == b""
    assert server.held_octets == len(REPLY)
    link.pump()
    assert server.held_octets == 0
    assert stream_of(link.at_client) == REPLY


def test_proxy_header_and_client_hello_in_one_chunk(server_ctx, client_ctx) -> None:
    server = tls_server(server_ctx, proxy=True)
    client = tls_client(client_ctx)
    raw = proxy_v2.build("2001:db8::7", 50123, "2001:db8::2", 443)
    link = Link(server, client)
    link.to_server(raw + client.data_to_send())
    assert [type(e) for e in link.at_server] == [Addressed]
    assert link.at_server[0].header.source == "2001:db8::7"
    assert link.at_server[0].header.source_port == 50123
    assert server.tls
    # With the header in, a late handshake is a TLS timeout, not a PROXY one.
    assert server.expired(T0 + TIMEOUT).reason == "tls-handshake-timeout"
    link.pump()
    assert server.secured is not None and client.secured is not None
    link.to_server(client.send(STREAM))
    assert stream_of(link.at_server) == STREAM
    assert not_bytes(link.at_server) == [link.at_server[0], server.secured]


def test_tls_listener_takes_plain_rfc9329(server_ctx) -> None:
    front = tls_server(server_ctx)
    events = front.receive_data(STREAM)
    assert events == [STREAM]
    assert front.done and not front.tls and front.secured is None
    assert front.send(REPLY) == REPLY
    assert front.receive_data(b"\x16\x03") == [b"\x16\x03"]  # later octets are the stream


def test_tls_listener_refuses_unconfigured_proxy_header(server_ctx) -> None:
    with pytest.raises(FrontError) as exc:
        tls_server(server_ctx).receive_data(proxy_v2.build_local())
    assert reason(exc) == "proxy-unexpected"


# --- verification and the pin ------------------------------------------------------------


def handshake_error(server_ctx: ssl.SSLContext, client: StreamFront) -> FrontError:
    link = Link(tls_server(server_ctx), client)
    with pytest.raises(FrontError) as exc:
        link.pump()
    assert client.secured is None
    return exc.value


def test_unknown_ca_refused(server_ctx, other: ServerCert) -> None:
    err = handshake_error(server_ctx, tls_client(client_context(other.ca)))
    assert err.reason == "tls-verify"


def test_wrong_hostname_refused(server_ctx, certs: ServerCert) -> None:
    err = handshake_error(server_ctx, tls_client(client_context(certs.ca), "vpn.other.test"))
    assert err.reason == "tls-verify"


def test_right_ca_and_ip_san_accepted(server_ctx, certs: ServerCert) -> None:
    link = Link(tls_server(server_ctx), tls_client(client_context(certs.ca), "198.19.0.2"))
    link.pump()
    assert link.client.secured is not None


def test_wrong_pin_refused(server_ctx, other: ServerCert) -> None:
    err = handshake_error(server_ctx, tls_client(pin_context(), None, pin_of(other.der)))
    assert err.reason == "tls-pin"


def test_right_pin_accepted(server_ctx, certs: ServerCert) -> None:
    client = tls_client(pin_context(), None, pin_of(certs.der))
    link = Link(tls_server(server_ctx), client)
    link.pump()
    assert client.secured is not None and client.secured.version == "TLSv1.3"
    link.to_server(client.send(STREAM))
    assert stream_of(link.at_server) == STREAM


def test_pin_with_unverified_other_ca_server(certs: ServerCert, other: ServerCert) -> None:
    # The pin alone decides: a server of an unknown CA passes when its certificate is pinned.
    client = tls_client(pin_context(), None, pin_of(other.der))
    link = Link(tls_server(server_context(other)), client)
    link.pump()
    assert client.secured is not None
    assert pin_of(other.der) != pin_of(certs.der)


def test_pin_of() -> None:
    assert len(pin_of(b"x")) == 32
    assert pin_of(b"x") != pin_of(b"y")
    assert pin_of(b"") == bytes.fromhex(
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


# --- broken handshakes and the deadline --------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x00\x05hello" + b"junk" * 8,
        b"\x16\x03\x01\x00\x05hello",
        b"\x16\x03\x01\x00\x01\x01" + bytes(40),
    ],
)
def test_garbage_handshake(server_ctx, data: bytes) -> None:
    front = tls_server(server_ctx)
    with pytest.raises(FrontError) as exc:
        front.receive_data(data)
    assert reason(exc) == "tls-handshake"


def test_server_handshake_timeout(server_ctx, client_ctx) -> None:
    server, client = tls_server(server_ctx), tls_client(client_ctx)
    hello = client.data_to_send()
    assert server.receive_data(hello[:20]) == []
    assert server.tls and not server.done
    assert server.expired(T0 + TIMEOUT - 0.5) is None
    err = server.expired(T0 + TIMEOUT)
    assert isinstance(err, FrontError) and err.reason == "tls-handshake-timeout"


def test_client_handshake_timeout(client_ctx) -> None:
    client = tls_client(client_ctx)
    assert client.expired(T0 + TIMEOUT - 0.5) is None
    err = client.expired(T0 + TIMEOUT + 3)
    assert isinstance(err, FrontError) and err.reason == "tls-handshake-timeout"


def test_deadline_gone_after_handshake(server_ctx, client_ctx) -> None:
    link = secured_link(server_ctx, client_ctx)
    assert link.server.expired(T0 + 1e9) is None
    assert link.client.expired(T0 + 1e9) is None


# --- close_notify ------------------------------------------------------------------------


def test_close_notify_ends_the_stream(server_ctx, client_ctx) -> None:
    link = secured_link(server_ctx, client_ctx)
    link.to_server(link.client.send(STREAM))
    alert = link.client.close_notify()
    assert alert
    link.to_server(alert)
    assert link.at_server[-1] == Ended()
    assert stream_of(link.at_server) == STREAM  # data before the alert is still delivered


def test_close_notify_from_server(server_ctx, client_ctx) -> None:
    link = secured_link(server_ctx, client_ctx)
    link.to_client(link.server.close_notify())
    assert link.at_client[-1] == Ended()


def test_close_notify_before_tls_is_nothing(server_ctx, client_ctx) -> None:
    assert tls_client(client_ctx).close_notify() == b""  # handshake not done
    assert tls_server(server_ctx).close_notify() == b""
