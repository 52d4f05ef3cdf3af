"""tcpencap.aio.rfc9329_service.Rfc9329Service: the RFC 9329 shell feeds the engine with the
loop's time and carries out what it outputs, and decides nothing. The engine is a recording
fake (on core's Engine: outputs pulled, one timer queue); the connections are recording
fakes; the loop and the listeners are real (loopback). Steering (``_steer``) and reload
(``apply``) are covered by the daemon's tests."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any

import pytest

import tcpencap.aio.rfc9329_service as service_mod
from tcpencap.aio.engine_timer import LoopClock
from tcpencap.aio.rfc9329_service import Rfc9329Service
from tcpencap.config import ClientConfig, Config, GatewayConfig
from tcpencap.core.engine import Engine
from tcpencap.core.outputs import Close, Connect, Inject, Output, Query, Transmit
from tcpencap.wire.packet import addr_bytes

NOW = 1000.0


class FakeEngine(Engine):
    """Records every input with its time; ``answer`` holds what the next input outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []
        self.answer: list[Output] = []
        self.conns: dict[int, Any] = {}
        self.datapath = SimpleNamespace(inject_batch=None)  # the reference path's: none
        self.rows: list[dict[str, Any]] = []

    def _input(self, *call: Any) -> None:
        self.calls.append(call)
        self._out += self.answer
        self.answer = []

    def outbound(self, now: float, packet: bytes) -> None:
        self._input("outbound", now, packet)

    def outbound_batch(self, now: float, misses: list[bytes], hits: list[Any]) -> None:
        self._input("outbound_batch", now, misses, hits)

    def vici_event(self, now: float, label: str, event: dict[str, Any]) -> None:
        self._input("vici_event", now, label, event)

    def vici_resync(self, now: float, sas: list[Any]) -> None:
        self._input("vici_resync", now, sas)

    def vici_state(self, now: float, connected: bool) -> None:
        self._input("vici_state", now, connected)

    def linger(self, now: float, peers: list[bytes], endpoints: list[Any]) -> None:
        self._input("linger", now, peers, endpoints)

    def sas_listed(self, now: float, purpose: str, sas: Any) -> None:
        self._input("sas_listed", now, purpose, sas)

    def connection_lost(self, now: float, conn_id: int, generation: int, reason: str) -> None:
        self._input("connection_lost", now, conn_id, generation, reason)

    def conn(self, conn_id: int) -> Any:
        return self.conns.get(conn_id)

    def shell_dropped(self, conn_id: int, reason: str, n: int = 1) -> None:
        self.calls.append(("shell_dropped", conn_id, reason, n))

    def log_limited(self, now: float, key: str, fmt: str, *args: object) -> None:
        self.calls.append(("log_limited", now, key, fmt % args))

    def stop(self) -> None:
        self._input("stop")

    def status(self, now: float) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]


class FakeProto:
    def __init__(self, conn_id: int) -> None:
        self.conn_id = conn_id
        self.calls: list[tuple[Any, ...]] = []
        self.front: Any = None

    def send(self, data: bytes, is_ike: bool, frames: int) -> None:
        self.calls.append(("send", data, is_ike, frames))

    def close(self) -> None:
        self.calls.append(("close",))

    def want_write(self) -> None:
        self.calls.append(("want_write",))

    def given_back(self, reason: str, counts: tuple[int, ...]) -> None:
        self.calls.append(("given_back", reason, counts))

    def report_writer(self) -> None:
        self.calls.append(("report_writer",))

    def report_lent(self) -> None:
        self.calls.append(("report_lent",))


class FakeInjector:
    def __init__(self, error: OSError | None = None) -> None:
        self.error = error
        self.packets: list[tuple[bytes, bytes]] = []

    def inject(self, packet: bytes, dst: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.packets.append((packet, dst))

    def fds(self) -> tuple[int, int]:
        return (11, 12)


class Fronts:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def client_front(self, now: float, peer: bytes, connections: Any) -> Any:
        self.calls.append(("client", now, peer, connections))
        return "client-front"

    def server_front(self, now: float, host: str, tls: bool) -> Any:
        self.calls.append(("server", now, host, tls))
        return "server-front", True


def service(**kw: Any) -> tuple[Rfc9329Service, FakeEngine, list[Coroutine[Any, Any, None]]]:
    engine = FakeEngine()
    clock = LoopClock()
    clock.now = lambda: NOW
    spawned: list[Coroutine[Any, Any, None]] = []
    svc = Rfc9329Service(
        engine,
        clock,
        kw.get("config", Config()),
        rules=None,
        fronts=kw.get("fronts", Fronts()),
        connections=lambda: {"vpn": "intent"},
        spawn=spawned.append,
        list_sas=kw.get("list_sas", None),
    )
    return svc, engine, spawned


def test_a_queued_packet_goes_to_the_engine_and_its_frames_to_their_connections() -> None:
    svc, engine, _ = service()
    a, b = FakeProto(1), FakeProto(2)
    svc.register(a)
    svc.register(b)
    engine.answer = [
        Transmit(2, b"ike", is_ike=True),
        Transmit(1, b"esp", frames=3),
        Transmit(9, b"x"),
    ]
    svc.on_queued(b"packet")
    assert engine.calls == [("outbound", NOW, b"packet")]
    assert b.calls == [("send", b"ike", True, 1)] and a.calls == [("send", b"esp", False, 3)]
    assert engine.pull() == []  # every output carried out


def test_the_native_paths_leftovers_go_to_the_engine() -> None:
    svc, engine, _ = service()
    engine.answer = [Transmit(1, b"f")]
    proto = FakeProto(1)
    svc.register(proto)
    svc.on_queue_batch([b"miss"], [(1, b"hit", 1)])
    assert engine.calls == [("outbound_batch", NOW, [b"miss"], [(1, b"hit", 1)])]
    assert proto.calls == [("send", b"f", False, 1)]


def test_vici_inputs_are_fed_with_the_loops_time() -> None:
    svc, engine, _ = service()
    svc.vici_event("ike-updown", {"a": 1})
    svc.vici_resync([{"a": 1}])
    svc.vici_state(False)
    svc.linger([b"p"], [(b"e", 4500)])
    assert engine.calls == [
        ("vici_event", NOW, "ike-updown", {"a": 1}),
        ("vici_resync", NOW, [{"a": 1}]),
        ("vici_state", NOW, False),
        ("linger", NOW, [b"p"], [(b"e", 4500)]),
    ]


def test_close_closes_a_live_connection_or_reports_a_connecting_one_lost() -> None:
    svc, engine, _ = service()
    live = FakeProto(1)
    svc.register(live)
    engine.conns[2] = SimpleNamespace(generation=4)
    engine.answer = [Close(1, "idle"), Close(2, "stopping"), Close(3, "gone")]
    svc.on_queued(b"p")
    assert live.calls == [("close",)]
    assert ("connection_lost", NOW, 2, 4, "stopping") in engine.calls
    assert not any(c[0] == "connection_lost" and c[2] == 3 for c in engine.calls)


def test_a_connection_lost_while_connecting_may_output_again_and_that_is_carried_out() -> None:
    svc, engine, _ = service()
    other = FakeProto(7)
    svc.register(other)
    engine.conns[2] = SimpleNamespace(generation=1)
    engine.answer = [Close(2, "stopping")]
    original = engine.connection_lost

    def lost(now: float, conn_id: int, generation: int, reason: str) -> None:
        original(now, conn_id, generation, reason)
        engine._out.append(Transmit(7, b"after"))

    engine.connection_lost = lost  # type: ignore[method-assign]
    svc.on_queued(b"p")
    assert other.calls == [("send", b"after", False, 1)]


def test_inject_hands_the_packet_to_the_injector_and_counts_a_failure() -> None:
    svc, engine, _ = service()
    svc.injector = FakeInjector()
    engine.answer = [Inject(b"pkt", b"\x7f\0\0\1")]
    svc.on_queued(b"p")
    assert svc.injector.packets == [(b"pkt", b"\x7f\0\0\1")]
    svc.injector = FakeInjector(OSError(1, "Operation not permitted"))
    engine.answer = [Inject(b"pkt", b"\x7f\0\0\1")]
    svc.on_queued(b"p")
    assert ("shell_dropped", 0, "inject-failed", 1) in engine.calls
    assert (
        "log_limited",
        NOW,
        "inject",
        "injection failed: [Errno 1] Operation not permitted",
    ) in (engine.calls)


def test_the_native_inject_batch_is_sent_on_the_injectors_sockets() -> None:
    svc, engine, _ = service()
    svc.injector = FakeInjector()
    sent: list[tuple[int, ...]] = []

    class Batch:
        last_errno = 1

        def __len__(self) -> int:
            return 3

        def send(self, *fds: int) -> tuple[int, int]:
            sent.append(fds)
            return 1, 2

    engine.datapath.inject_batch = Batch()
    svc.on_queued(b"p")
    assert sent == [(11, 12)]
    assert ("shell_dropped", 0, "inject-failed", 2) in engine.calls


def test_connect_is_spawned_with_the_client_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[tuple[Any, ...]] = []

    async def fake_connect(host: Any, o: Connect, reuse: bool, timeout: float) -> None:
        got.append((host, o, reuse, timeout))

    monkeypatch.setattr(service_mod, "connect", fake_connect)
    cfg = Config(client=ClientConfig(port=4500, connect_timeout=2.5))
    svc, engine, spawned = service(config=cfg)
    o = Connect(1, 1, b"\0" * 4, 4500, b"\1" * 4, 4500)
    engine.answer = [o]
    svc.on_queued(b"p")
    (coro,) = spawned
    asyncio.run(coro)
    assert got == [(svc, o, True, 2.5)]  # a fixed client port: reuse the address


def test_a_query_asks_charon_and_hands_the_answer_to_the_engine() -> None:
    asked: list[str] = []

    async def list_sas(purpose: str) -> list[dict[str, Any]]:
        asked.append(purpose)
        return [{"sa": 1}]

    svc, engine, spawned = service(list_sas=list_sas)
    reply = FakeProto(5)
    svc.register(reply)
    engine.answer = [Query("sync")]
    svc.on_queued(b"p")
    (coro,) = spawned
    engine.answer = [Transmit(5, b"after the answer")]
    asyncio.run(coro)
    assert asked == ["sync"]
    assert engine.calls[-1] == ("sas_listed", NOW, "sync", [{"sa": 1}])
    assert reply.calls == [("send", b"after the answer", False, 1)]


def test_the_engines_timer_is_armed_and_fires_on_the_loop() -> None:
    async def main() -> list[float]:
        svc, engine, _ = service()
        loop = asyncio.get_running_loop()
        svc.clock.bind(loop)
        fired: list[float] = []
        done = asyncio.Event()

        def due(now: float) -> None:
            fired.append(now)
            done.set()

        at = loop.time() + 0.05
        engine.timer_queue.call_at(at, due)
        svc.after()
        await asyncio.wait_for(done.wait(), 5.0)
        assert fired[0] >= at
        return fired

    assert len(asyncio.run(main())) == 1


def test_a_connection_unregisters_only_itself() -> None:
    svc, _, _ = service()
    old, new = FakeProto(1), FakeProto(1)
    svc.register(old)
    svc.register(new)  # the id was given again
    svc.unregister(old)
    assert svc.protocols == {1: new}
    svc.unregister(new)
    assert svc.protocols == {}


def test_stalled_writers_and_given_back_connections_reach_their_protocols() -> None:
    svc, _, _ = service()
    a = FakeProto(1)
    svc.register(a)
    svc.on_stalled([1, 2])
    svc.given_back([(1, "closed", 3, 400, 2, 1), (2, "gone", 0, 0, 0, 0)])
    assert a.calls == [("want_write",), ("given_back", "closed", (3, 400, 2, 1))]


def test_what_a_connection_sees_of_the_service() -> None:
    fronts = Fronts()
    svc, _, _ = service(config=Config(gateway=GatewayConfig(max_buffer=1234)), fronts=fronts)
    assert svc.max_buffer == 1234
    svc.config = Config(gateway=GatewayConfig(max_buffer=99))  # a reload replaces it
    assert svc.max_buffer == 99
    peer = addr_bytes("198.19.0.2")
    assert svc.client_front(5.0, peer) == "client-front"
    assert svc.server_front(6.0, "198.18.1.2", True) == ("server-front", True)
    assert fronts.calls == [
        ("client", 5.0, peer, {"vpn": "intent"}),
        ("server", 6.0, "198.18.1.2", True),
    ]


def test_rows_say_which_connections_tls_carries_and_counts_are_reported() -> None:
    svc, engine, _ = service()
    tls, plain = FakeProto(1), FakeProto(2)
    tls.front = SimpleNamespace(secured=SimpleNamespace(version="TLSv1.3"))
    plain.front = SimpleNamespace(secured=None)
    svc.register(tls)
    svc.register(plain)
    engine.rows = [{"id": 1}, {"id": 2}, {"id": 3}]
    assert svc.rows(NOW) == [
        {"id": 1, "tls": "TLSv1.3"},
        {"id": 2, "tls": None},
        {"id": 3, "tls": None},
    ]
    svc.report_counts()
    assert tls.calls == plain.calls == [("report_writer",), ("report_lent",)]


def test_listeners_open_on_loopback_and_stop_closes_them_and_the_engine() -> None:
    async def main() -> None:
        svc, engine, _ = service()
        svc.clock.bind(asyncio.get_running_loop())
        await svc.listen("127.0.0.1", 0)
        await svc.listen("::1", 0, tls=True)
        servers = dict(svc.servers)
        assert set(servers) == {("127.0.0.1", 0), ("::1", 0)}
        port = servers[("127.0.0.1", 0)].sockets[0].getsockname()[1]
        assert (
            servers[("127.0.0.1", 0)].sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        )
        svc.stop_listening("127.0.0.1", 0)
        svc.stop_listening("127.0.0.1", 0)  # again: nothing to stop
        await servers[("127.0.0.1", 0)].wait_closed()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        live = FakeProto(1)
        svc.register(live)
        engine.answer = [Close(1, "stopping")]
        svc.stop()
        await asyncio.wait_for(servers[("::1", 0)].wait_closed(), 5)
        assert not servers[("::1", 0)].is_serving()
        assert engine.calls[-1] == ("stop",)
        assert live.calls == [("close",)]  # what stopping outputs is carried out

    asyncio.run(asyncio.wait_for(main(), 10))
