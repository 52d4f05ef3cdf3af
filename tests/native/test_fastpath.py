"""The native data path (tcpencap/native/fastpath.c) against the Python reference: the same
traffic must give the same bytes and the same decisions. Hypothesis drives the framer, the
packet builder, the flow cache and two whole engines; the queue reader and the batched
injection are checked on real sockets."""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfq.netlink import attr, nfnl_message
from tcpencap.core.outputs import Inject
from tcpencap.core.router import Router, Send
from tcpencap.core.table import ConnectionTable
from tcpencap.native import load
from tcpencap.wire import rfc9329
from tcpencap.wire.ike import NON_ESP_MARKER
from tcpencap.wire.packet import addr_bytes, build_udp_packet, parse_ip, parse_udp
from tests.core.test_rfc9329_engine import SPI_I, Wire, child_sa_event, esp, ike

NATIVE, WHY = load()


@pytest.fixture(autouse=True)
def _built() -> None:
    assert NATIVE is not None, f"the native extension must be built (scripts/setup.sh): {WHY}"


def native() -> Any:
    assert NATIVE is not None
    return NATIVE


# --- the framer ---------------------------------------------------------------------------

payloads = st.one_of(
    st.binary(max_size=9),  # empty, keepalive-sized, marker-only, too short
    st.just(b"\xff"),
    st.binary(max_size=60).map(lambda b: NON_ESP_MARKER + b),  # IKE (or marker only)
    st.tuples(st.integers(1, 2**32 - 1), st.binary(max_size=80)).map(
        lambda t: t[0].to_bytes(4, "big") + t[1]
    ),  # ESP, or too short for one
    st.integers(1400, 3000).map(lambda n: b"\x01\x02\x03\x04" + bytes(n)),  # big ESP
)
frames = st.one_of(
    payloads.map(lambda p: (len(p) + 2).to_bytes(2, "big") + p),
    st.binary(min_size=1, max_size=3),  # garbage: bad lengths, truncation
)
prefixes = st.one_of(st.just(rfc9329.PREFIX), st.binary(max_size=6), st.just(rfc9329.PREFIX[:3]))


@st.composite
def streams(draw: Any) -> tuple[rfc9329.Role, int, list[bytes], bool]:
    role = draw(st.sampled_from(list(rfc9329.Role)))
    body = b"".join(draw(st.lists(frames, max_size=12)))
    data = (draw(prefixes) if role is rfc9329.Role.RESPONDER else b"") + body
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    max_frame = draw(st.sampled_from([2, 7, 40, 1500, rfc9329.MAX_FRAME]))
    return role, max_frame, [c for c in chunks if c], draw(st.booleans())


def drain(codec: Any, step: Any) -> list[Any]:
    events = []
    for _ in range(10_000):
        ev = step(codec)
        events.append(ev)
        if isinstance(ev, rfc9329.NeedData | rfc9329.ConnectionClosed | rfc9329.ProtocolError):
            return events
    raise AssertionError("no end of events")


def feed(codec: Any, chunks: list[bytes], eof: bool, step: Any) -> list[Any]:
    events = []
    for chunk in [*chunks, *([b""] if eof else [])]:
        codec.receive_data(chunk)
        events += drain(codec, step)
        events.append(("state", codec.prefix_received, codec.frames_in, codec.bytes_buffered))
    return events


@given(streams())
@settings(max_examples=400, deadline=None)
def test_deframer_gives_the_events_of_the_stream_codec(s: Any) -> None:
    role, max_frame, chunks, eof = s
    ref = rfc9329.StreamCodec(role, max_frame=max_frame)
    nat = native().Deframer(role, max_frame=max_frame)
    assert feed(nat, chunks, eof, type(nat).next_event) == feed(
        ref, chunks, eof, type(ref).next_event
    )


def test_deframer_refuses_what_the_stream_codec_refuses() -> None:
    for bad in (1, 0x10000):
        with pytest.raises(ValueError, match="max_frame"):
            native().Deframer(rfc9329.Role.RESPONDER, max_frame=bad)
    d = native().Deframer(rfc9329.Role.ORIGINATOR)
    assert d.send_prefix() == rfc9329.PREFIX
    with pytest.raises(ValueError, match="already sent"):
        d.send_prefix()
    with pytest.raises(ValueError, match="only the TCP Originator"):
        native().Deframer(rfc9329.Role.RESPONDER).send_prefix()


def test_an_idle_deframer_gives_its_buffer_back() -> None:
    d = native().Deframer(rfc9329.Role.ORIGINATOR)
    big = esp(0x1234, 60_000)
    d.receive_data((len(big) + 2).to_bytes(2, "big") + big)
    assert d.allocated >= 60_000
    batch = native().InjectBatch()
    ev, n = d.pump(batch, addr_bytes("198.18.0.1"), addr_bytes("198.18.0.2"), 4500, 4500)
    assert (ev, n, len(batch)) == (rfc9329.NeedData(), 1, 1)
    assert d.allocated == 0


# --- inbound: frames to packets -----------------------------------------------------------

ADDRS = {4: ("198.18.0.1", "198.19.0.2"), 6: ("fd00::1", "fd00:1::2")}


@given(streams(), st.sampled_from([4, 6]), st.booleans(), st.integers(1, 65535))
@settings(max_examples=300, deadline=None)
def test_pump_injects_what_the_router_builds(s: Any, family: int, gateway: bool, port: int) -> None:
    role, max_frame, chunks, eof = s
    local, peer = (addr_bytes(a) for a in ADDRS[family])
    router = Router(ConnectionTable(), lambda _a: False)
    view = (
        router.add_gateway_conn(local, peer, port)
        if gateway
        else router.add_client_conn(local, peer)
    )
    cid = view.conn_id

    ref = rfc9329.StreamCodec(role, max_frame=max_frame)
    ref_packets: list[bytes] = []
    ref_keepalives = []

    def ref_step(codec: Any) -> Any:
        # pump's contract: ESP becomes packets as the router builds them (what no datagram
        # can carry is the engine's), keepalives are dropped and counted
        while True:
            ev = codec.next_event()
            if type(ev) is rfc9329.Keepalive:
                ref_keepalives.append(ev)
                continue
            if type(ev) is not rfc9329.ESPPacket:
                return ev
            res = router.inbound_esp(cid, ev.data)
            if not isinstance(res, Inject):
                return ev
            ref_packets.append(res.packet)

    batch = native().InjectBatch()
    args = (batch, view.entry.peer, view.entry.local, *router.ports_of(view, False))
    nat = native().Deframer(role, max_frame=max_frame)
    counted = []

    def nat_step(codec: Any) -> Any:
        ev, n = codec.pump(*args)
        counted.append(n)
        return ev

    assert feed(nat, chunks, eof, nat_step) == feed(ref, chunks, eof, ref_step)
    assert batch.take() == ref_packets
    assert sum(counted) == len(ref_packets)
    assert nat.keepalives == len(ref_keepalives)


# --- outbound: the flow cache -------------------------------------------------------------

POOL = {4: ["198.18.0.1", "198.18.0.2", "198.19.0.2"], 6: ["fd00::1", "fd00::2", "fd00:1::2"]}
SPIS = [0x100, 0x101, 0xC0FFEE01, 0xFFFFFFFF]
PORTS = [4500, 50000, 50001]


@st.composite
def outbound_packets(draw: Any, family: int) -> bytes:
    src, dst = (addr_bytes(draw(st.sampled_from(POOL[family]))) for _ in range(2))
    sport = draw(st.sampled_from([4500, 4500, 4500, 500]))
    dport = draw(st.sampled_from(PORTS))
    spi = draw(st.sampled_from([*SPIS, 0]))
    body = spi.to_bytes(4, "big") + draw(st.binary(min_size=0, max_size=40))
    p = bytearray(build_udp_packet(src, dst, sport, dport, body))
    mutation = draw(st.sampled_from(["none"] * 6 + ["frag", "options", "long", "short", "tcp"]))
    if mutation == "frag":
        p[6 if family == 4 else 7] |= 0x20
    elif mutation == "options" and family == 4:
        p[0] = 0x46
    elif mutation == "long":
        at = 2 if family == 4 else 4
        p[at : at + 2] = (int.from_bytes(p[at : at + 2], "big") + 4).to_bytes(2, "big")
    elif mutation == "short":
        p = p[: draw(st.integers(0, len(p)))]
    elif mutation == "tcp":
        p[9 if family == 4 else 6] = 6
    return bytes(p)


@st.composite
def outbound_cases(draw: Any) -> tuple[int, list[Any], bool, list[bytes]]:
    family = draw(st.sampled_from([4, 6]))
    conns = draw(
        st.lists(
            st.tuples(
                st.sampled_from(POOL[family]),
                st.sampled_from(POOL[family]),
                st.sampled_from([0, *PORTS]),  # 0: a client connection
                st.lists(st.sampled_from(SPIS), max_size=3),
            ),
            max_size=4,
        )
    )
    packets = draw(st.lists(outbound_packets(family), max_size=30))
    return family, conns, draw(st.booleans()), packets


@given(outbound_cases())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_flow_cache_repeats_the_routers_decisions(case: Any) -> None:
    _family, conns, learn, packets = case
    table = ConnectionTable()
    router = Router(table, lambda _a: False)
    router.learn_esp = learn
    for local, peer, port, spis in conns:
        l_, p_ = addr_bytes(local), addr_bytes(peer)
        if port and table.by_endpoint(p_, port) is None:
            view = router.add_gateway_conn(l_, p_, port)
        else:
            view = router.add_client_conn(l_, p_)
        for spi in spis:
            table.bind_esp(view.conn_id, spi)
    flows = native().FlowCache()
    version = table.version

    def route(p: bytes) -> Any:
        nonlocal version
        if table.version != version:  # what the engine's _sync_flows does
            flows.clear()
            version = table.version
        res = router.outbound(p)
        if router.fast_hit and table.version == version:
            assert isinstance(res, Send) and flows.install(p, res.conn_id)
        return res

    for p in packets:
        before = table.version
        misses, hits = flows.classify([p])
        res = route(p)
        if hits:
            ((cid, data, n),) = hits
            assert router.fast_hit and isinstance(res, Send) and table.version == before
            assert (cid, data, n) == (res.conn_id, res.frame, 1)
        else:
            assert misses == [0]
    # A whole batch: one framed run per connection, packets in arrival order.
    for _ in range(3):
        before = table.version
        expected: dict[int, list[bytes]] = {}
        for p in packets:
            res = route(p)
            if router.fast_hit:
                expected.setdefault(res.conn_id, []).append(res.frame)
        if table.version == before:
            break
    else:
        return  # the learning path keeps rebinding (no VICI): no stable cache to check
    misses, hits = flows.classify(packets)
    assert {cid: (data, n) for cid, data, n in hits} == {
        cid: (b"".join(f), len(f)) for cid, f in expected.items()
    }
    assert len(misses) == len(packets) - sum(len(f) for f in expected.values())


def test_flow_cache_refuses_what_is_not_fast_path_esp() -> None:
    flows = native().FlowCache()
    src, dst = addr_bytes("198.18.0.1"), addr_bytes("198.19.0.2")
    assert not flows.install(build_udp_packet(src, dst, 4500, 4500, NON_ESP_MARKER + ike()), 1)
    assert not flows.install(build_udp_packet(src, dst, 500, 500, esp(0x100)), 1)
    assert flows.install(build_udp_packet(src, dst, 4500, 4500, esp(0x100)), 1)
    assert len(flows) == 1
    flows.clear()
    assert len(flows) == 0


# --- the queue reader (a datagram socket stands in for nfnetlink) -------------------------

NFQA_PACKET_HDR, NFQA_MARK, NFQA_PAYLOAD = 1, 3, 10


def queued(packet_id: int, payload: bytes | None) -> bytes:
    attrs = attr(NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 3))
    attrs += attr(NFQA_MARK, struct.pack("!I", 7))
    if payload is not None:
        attrs += attr(NFQA_PAYLOAD, payload)
    return nfnl_message(3, 0, attrs, seq=0, flags=0, res_id=4500)


def test_read_queue_parses_nfnetlink_and_frames_the_hits() -> None:
    src, dst = addr_bytes("198.18.0.1"), addr_bytes("198.19.0.2")
    hit = build_udp_packet(src, dst, 4500, 4500, esp(0x100))
    miss = build_udp_packet(src, dst, 500, 500, ike())
    flows = native().FlowCache()
    assert flows.install(hit, 9)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        assert flows.read_queue(b.fileno()) == (-1, 0, [], [], 0, [], 0)  # nothing waiting
        for dgram in (
            queued(5, hit),
            queued(6, miss),
            b"\x10\x00\x00\x00\x02\x00" + bytes(10),  # an NLMSG_ERROR: not a packet
            queued(8, hit),
            queued(9, None),  # a packet without payload (copy range 0): a miss
            queued(10, hit)[:-3],  # shorter than its header says: not trusted, skipped
        ):
            a.send(dgram)
        last_id, n, misses, hits, overruns, stalled, verdict = flows.read_queue(b.fileno())
    frame = (len(esp(0x100)) + 2).to_bytes(2, "big") + esp(0x100)
    # Packet 10 is settled by the next batch verdict that covers its id (or the queue's).
    assert (last_id, n, overruns, stalled, verdict) == (9, 4, 0, [], 0)
    assert hits == [(9, frame * 2, 2)]
    assert misses == [miss, b""]


def test_read_queue_writes_hits_to_the_writer_and_then_gives_the_verdict() -> None:
    src, dst = addr_bytes("198.18.0.1"), addr_bytes("198.19.0.2")
    hit = build_udp_packet(src, dst, 4500, 4500, esp(0x100))
    frame = (len(esp(0x100)) + 2).to_bytes(2, "big") + esp(0x100)
    flows = native().FlowCache()
    assert flows.install(hit, 9)
    q_kernel, q_ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tcp_ours, tcp_peer = socket.socketpair()
    with q_kernel, q_ours, tcp_ours, tcp_peer:
        q_ours.setblocking(False)
        writer = native().TcpWriter(tcp_ours.fileno(), 1 << 20)
        flows.set_writer(9, writer)
        q_kernel.send(queued(41, hit))
        q_kernel.send(queued(42, hit))
        assert flows.read_queue(q_ours.fileno(), 4500) == (42, 2, [], [], 0, [], 0)
        assert tcp_peer.recv(4096) == frame * 2  # written in C, in order
        assert (writer.direct_frames, writer.direct_bytes) == (2, 2 * len(frame))
        # the batch verdict followed the writes: NF_DROP up to id 42 on queue 4500
        verdict = q_kernel.recv(100)
        body = verdict[16:]
        assert struct.unpack("=IHH", verdict[:8]) == (len(verdict), (3 << 8) | 3, 1)
        assert body[:4] == b"\x00\x00\x11\x94" and body[8:] == struct.pack("!II", 0, 42)
        flows.drop_writer(9)
        q_kernel.send(queued(43, hit))
        assert flows.read_queue(q_ours.fileno())[3] == [(9, frame, 1)]  # back to Python


def test_writer_bounds_esp_and_ike_and_keeps_order() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        w = native().TcpWriter(a.fileno(), 10_000)
        chunk = bytes(range(256)) * 8
        sent = b""
        while w.pending <= 10_000:  # fill the socket, then the writer's own buffer
            assert w.write(chunk)
            sent += chunk
        assert not w.write(b"esp")  # over the bound: ESP is dropped and counted
        assert w.write(b"ike", True)  # IKE may overshoot, up to four times the bound
        sent += b"ike"
        while w.pending <= 40_000:
            assert w.write(chunk, True)
            sent += chunk
        assert not w.write(b"ike", True)
        assert (w.esp_dropped, w.ike_dropped) == (1, 1)
        got = b""
        b.setblocking(False)
        while len(got) < len(sent):
            try:
                got += b.recv(65536)
            except BlockingIOError:
                w.flush()
        assert got == sent and w.pending == 0
        w.close()
        assert not w.write(b"late") and w.fd == -1


def test_a_writer_without_socket_collects() -> None:
    w = native().TcpWriter(-1, 100)
    assert w.write(b"abc") and w.write(b"def")
    assert w.take() == b"abcdef" and w.pending == 0


# --- injection through real raw sockets (root, loopback only) -----------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_injected_packets_reach_a_udp_socket(family: int) -> None:
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    host = "127.0.0.1" if family == 4 else "::1"
    rx = socket.socket(fam, socket.SOCK_DGRAM)
    raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with rx, raw4, raw6:
        rx.bind((host, 0))
        rx.settimeout(2)
        port = rx.getsockname()[1]
        d = native().Deframer(rfc9329.Role.ORIGINATOR)
        sizes = [8, 9, 101, 1400, 1401]  # odd sizes: the IPv6 checksum pads
        d.receive_data(b"".join((n + 2).to_bytes(2, "big") + esp(0x100, n - 8) for n in sizes))
        batch = native().InjectBatch()
        local = peer = addr_bytes(host)
        assert d.pump(batch, peer, local, 4500, port) == (rfc9329.NeedData(), len(sizes))
        assert batch.send(raw4.fileno(), raw6.fileno()) == (len(sizes), 0)
        got = [rx.recvfrom(4096) for _ in sizes]  # a bad checksum would never arrive
    assert [data for data, _ in got] == [esp(0x100, n - 8) for n in sizes]
    assert {addr[1] for _, addr in got} == {4500}


# --- two whole engines, back to back ------------------------------------------------------

ops = st.one_of(
    st.tuples(st.just("c_esp"), st.sampled_from(SPIS), st.integers(0, 300)),
    st.tuples(st.just("g_esp"), st.sampled_from(SPIS), st.integers(0, 300)),
    st.tuples(st.just("c_ike"), st.booleans(), st.just(0)),
    st.tuples(st.just("g_ike"), st.booleans(), st.just(0)),
    st.tuples(st.just("child"), st.sampled_from(SPIS), st.booleans()),
    st.tuples(st.just("break"), st.just(0), st.just(0)),
    st.tuples(st.just("wait"), st.sampled_from([0.1, 1.0, 40.0]), st.just(0)),
)


def by_kind(packets: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(ESP, IKE) packets, each in order: the native path sends them through two channels."""
    kinds: tuple[list[bytes], list[bytes]] = ([], [])
    for p in packets:
        u = parse_udp(parse_ip(p).payload)
        ike_ = u.dport == 500 or u.payload[:4] == NON_ESP_MARKER
        kinds[ike_].append(p)
    return kinds


def observe(w: Wire) -> Any:
    def conns(e: Any) -> Any:
        return [
            (c.conn_id, c.state, c.frames_in, c.frames_out, c.bytes_out, dict(c.drops))
            for c in e.conns.values()
        ]

    return (
        by_kind(w.charon_c),
        by_kind(w.charon_g),
        conns(w.c),
        conns(w.g),
        dict(w.c.router.drops),
        dict(w.g.router.drops),
    )


def play(w: Wire, script: list[Any]) -> list[Any]:
    seen = []
    w.g.vici_state(w.now, True)
    w.client_sends(ike())
    for op, a, b in script:
        gw = list(w.g.conns.values())
        port = gw[-1].peer_port if gw else 50000
        if op == "c_esp":
            w.client_sends(esp(a, b), 4500, 4500)
        elif op == "g_esp":
            w.gw_sends(esp(a, b), dport=port)
        elif op == "c_ike":
            w.client_sends(NON_ESP_MARKER + ike(exchange=37, np=46 if a else 33), 4500, 4500)
        elif op == "g_ike":
            w.gw_sends(NON_ESP_MARKER + ike(spi_r=SPI_I, response=True), dport=port)
        elif op == "child":
            ev = child_sa_event(a, up=b)
            ev["c1-gw"]["remote-port"] = str(port)
            w.g.vici_event(w.now, "child-updown", ev)
            w.pump()
        elif op == "break":
            if w.links:
                w.break_link(next(iter(w.links)), "reset")
                w.pump()
        else:
            w.advance(a)
        seen.append(observe(w))
    return seen


@given(st.lists(ops, max_size=25))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_engines_on_both_paths_deliver_the_same_packets(script: list[Any]) -> None:
    assert play(Wire(native=native()), script) == play(Wire(native=None), script)


# --- the setting, and the fallback --------------------------------------------------------


def test_datapath_setting_and_fallback(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    from tcpencap.aio import daemon

    assert daemon.choose_datapath("python") == ("python", None)
    assert daemon.choose_datapath("auto") == ("native", NATIVE)
    assert daemon.choose_datapath("native") == ("native", NATIVE)
    monkeypatch.setattr(daemon, "load_native", lambda: (None, "no _fastpath module"))
    for setting in ("native", "auto"):
        caplog.clear()
        assert daemon.choose_datapath(setting) == ("python", None)
        assert "native data path unavailable (no _fastpath module)" in caplog.text
        assert caplog.records[-1].levelname == "WARNING"


# --- the inbound worker (a stream socket pair stands in for TCP; loopback only) -----------


@contextlib.contextmanager
def inbound_worker() -> Iterator[tuple[Any, queue.Queue[Any], socket.socket, socket.socket]]:
    """A running InboundWorker on raw sockets, the queue it gives connections back on, and
    the socket pair's end it reads (the other end is the peer). Stopped on the way out."""
    raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    peer_end, ours = socket.socketpair()
    given: queue.Queue[Any] = queue.Queue()
    worker = native().InboundWorker(raw4.fileno(), raw6.fileno())
    thread = threading.Thread(target=worker.run, args=(given.put,), daemon=True)
    with raw4, raw6, peer_end, ours:
        thread.start()
        try:
            yield worker, given, peer_end, ours
        finally:
            worker.stop()
            thread.join(2)
    assert not thread.is_alive()


def test_inbound_worker_injects_esp_and_gives_back_the_rest() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, inbound_worker() as (worker, given, peer_end, ours):
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(2)
        port = rx.getsockname()[1]
        local = addr_bytes("127.0.0.1")
        d = native().Deframer(rfc9329.Role.ORIGINATOR)
        worker.attach(7, ours.fileno(), d, local, local, 4500, port, 0)
        with pytest.raises(RuntimeError, match="lent"):
            d.next_event()  # the worker owns it now
        frames = [esp(0x100 + i, 50 + i) for i in range(3)]
        peer_end.sendall(b"".join((len(f) + 2).to_bytes(2, "big") + f for f in frames))
        assert [rx.recv(4096) for _ in frames] == frames
        ike_frame = NON_ESP_MARKER + ike()
        late = esp(0x200)
        peer_end.sendall(
            (len(ike_frame) + 2).to_bytes(2, "big") + ike_frame
            + (len(late) + 2).to_bytes(2, "big") + late
        )  # fmt: skip
        ((cid, reason, n, nbytes, reads, _),) = given.get(timeout=2)
        assert (cid, reason, n) == (7, "frame", 3) and nbytes > 0 and reads >= 1
        # the frames the engine must see wait, unread, in the deframer
        assert d.next_event() == rfc9329.IKEMessage(ike())
        assert d.next_event() == rfc9329.ESPPacket(late)
        worker.attach(7, ours.fileno(), d, local, local, 4500, port, 0)
        assert worker.counts(7) == (0, 0, 0, 0)
        peer_end.shutdown(socket.SHUT_WR)
        ((cid, reason, n, _, _, _),) = given.get(timeout=2)
        assert (cid, reason, n) == (7, "eof", 0)
        assert worker.detach(7) is None  # given back already
        worker.attach(8, ours.fileno(), native().Deframer(rfc9329.Role.ORIGINATOR), local,
                      local, 4500, port, 0)  # fmt: skip
        assert worker.detach(8) == (0, 0, 0, 0) and worker.stats()["lent"] == 0
    assert worker.stats()["injected"] == 3


def test_inbound_worker_holds_keepalives_not_esp_to_the_rate() -> None:
    """ESP is the tunnel's traffic (a 1 Gbit/s tunnel is 90,000 frames a second): 500 ESP
    frames at a 100 frames/s limit pass; 500 keepalives go back over the rate."""
    with inbound_worker() as (worker, given, peer_end, ours):
        local = addr_bytes("127.0.0.1")
        d = native().Deframer(rfc9329.Role.RESPONDER)
        d.receive_data(rfc9329.PREFIX)
        assert d.next_event() == rfc9329.PrefixReceived()
        worker.attach(3, ours.fileno(), d, local, local, 50000, 9, 100)  # 100 frames/s
        f = esp(0x100)
        peer_end.sendall(((len(f) + 2).to_bytes(2, "big") + f) * 500)
        deadline, esp_frames = time.monotonic() + 5, 0
        while esp_frames < 500:  # counts() gives what came since the last call
            counts = worker.counts(3)
            assert counts is not None and given.empty(), (counts, given.queue)
            esp_frames += counts[0]
            assert time.monotonic() < deadline, esp_frames
            time.sleep(0.01)
        peer_end.sendall(rfc9329.KEEPALIVE_FRAME * 500)
        ((cid, reason, _, _, _, keepalives),) = given.get(timeout=2)
        assert (cid, reason) == (3, "rate") and 100 < keepalives <= 500


def test_inbound_worker_drops_keepalives_itself_and_counts_them_toward_the_rate() -> None:
    """Finding 8 of issue 23: every keepalive went back to Python (one thread hand-off and
    one engine pass per 3 octets), and none counted toward max_frame_rate."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, inbound_worker() as (worker, given, peer_end, ours):
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(2)
        local = addr_bytes("127.0.0.1")
        d = native().Deframer(rfc9329.Role.RESPONDER)
        d.receive_data(rfc9329.PREFIX)
        assert d.next_event() == rfc9329.PrefixReceived()
        worker.attach(4, ours.fileno(), d, local, local, 4500, rx.getsockname()[1], 1000)
        f = esp(0x100)
        peer_end.sendall(rfc9329.KEEPALIVE_FRAME * 50 + (len(f) + 2).to_bytes(2, "big") + f)
        assert rx.recv(4096) == f  # the ESP behind them went out, nothing came back
        assert given.empty() and worker.counts(4) == (1, 3 * 50 + len(f) + 2, 1, 50)
        peer_end.sendall(rfc9329.KEEPALIVE_FRAME * 2000)  # keepalives alone: over 1000/s
        ((cid, reason, n, _, _, keepalives),) = given.get(timeout=2)
        assert (cid, reason, n) == (4, "rate", 0) and 900 < keepalives <= 1001  # 51 before


@pytest.mark.parametrize("family", [4, 6])
def test_esp_no_datagram_can_carry_goes_to_the_engine(family: int) -> None:
    """Finding 9: an ESP frame of 65508 octets or more (IPv4; 65528 for IPv6) overflowed the
    injected packet's 16-bit lengths; pump and the inbound worker hand it to the engine."""
    limit = 65507 if family == 4 else 65527
    peer = addr_bytes("198.18.0.1" if family == 4 else "fd00::1")
    local = addr_bytes("198.18.0.2" if family == 4 else "fd00::2")
    fits, too_big = esp(0x1234, limit - 8), esp(0x1234, limit - 7)
    d = native().Deframer(rfc9329.Role.ORIGINATOR)
    d.receive_data(b"".join((len(p) + 2).to_bytes(2, "big") + p for p in (fits, too_big)))
    batch = native().InjectBatch()
    ev, n = d.pump(batch, peer, local, 4500, 4500)
    assert (ev, n) == (rfc9329.ESPPacket(too_big), 1)
    (packet,) = batch.take()
    assert len(packet) == (20 if family == 4 else 40) + 8 + limit
    assert parse_udp(parse_ip(packet).payload).payload == fits


def test_inbound_worker_gives_back_esp_no_datagram_can_carry() -> None:
    with inbound_worker() as (worker, given, peer_end, ours):
        local = addr_bytes("127.0.0.1")
        d = native().Deframer(rfc9329.Role.ORIGINATOR)
        worker.attach(5, ours.fileno(), d, local, local, 4500, 9, 0)
        big = esp(0x100, 65507 - 7)
        peer_end.sendall((len(big) + 2).to_bytes(2, "big") + big)
        ((cid, reason, n, _, _, _),) = given.get(timeout=2)
        assert (cid, reason, n) == (5, "frame", 0)
        assert d.next_event() == rfc9329.ESPPacket(big)
