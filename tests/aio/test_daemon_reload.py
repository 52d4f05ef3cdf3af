"""Daemon-level regression tests of four reload bugs.

Each scenario starts a real :class:`tcpencap.aio.daemon.Daemon` with its own ``_start`` on a
real configuration file (explicit ``remote_addrs``), rewrites the file and calls
``Daemon.reload``. Only the parts that need root are replaced by recording fakes: raw
injection, the NFQUEUE readers, the steering rules (``nfq.rules.SteeringRules``), the cTCP
rules (``nfq.ctcp_rules.CtcpRules``), the cTCP raw sender, the VICI bridge and ``list-sas``.

Each ``test_reload_*`` below failed on the old daemon (commit b0e0bf9, ``Daemon.reload`` in
tcpencap/daemon.py); see the closing note of the issue:

1. fallback -> tcp kept the connection's FallbackMonitor entry; the next poll with no SA
   in charon un-steered the peer although the configuration says TCP;
2. tcp -> udp stayed steered;
3. a changed ctcp connection kept the cTCP service's start-up peers;
4. a fallback connection added by reload was never polled.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest

import nfq.ctcp_rules
import nfq.queue
import tcpencap.aio.ctcp_service as ctcp_service_mod
import tcpencap.aio.daemon as daemon_mod
import tcpencap.core.sa_questions as questions_mod
from tcpencap.aio.daemon import Daemon
from tcpencap.config import load_config
from tcpencap.core.outputs import Query

POLL = 0.05  # FALLBACK_POLL in these tests, seconds

# --------------------------------------------------------------------------- fakes


class FakeSteeringRules:
    """Stands in for nfq.rules.SteeringRules: records add_peer/remove_peer."""

    def __init__(self, queue_num: int = 0, **_: object) -> None:
        self._peers: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.remembered: list[str] = []  # what a previous run left in the set
        self.steering = self  # CtcpRules' steering set is a SteeringRules

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    def install(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def set_classify(self, queue: int | None) -> None:
        self.classify = queue

    def release(self) -> None:
        pass

    def remove(self, *, quiet: bool = False) -> None:
        pass

    def add_peer(self, peer: str) -> bool:
        peer = str(ipaddress.ip_address(peer))
        self.calls.append(("add", peer))
        new = peer not in self._peers
        self._peers.add(peer)
        return new

    def remove_peer(self, peer: str) -> bool:
        peer = str(ipaddress.ip_address(peer))
        self.calls.append(("remove", peer))
        had = peer in self._peers
        self._peers.discard(peer)
        return had

    def steer(self, addr: str, port: int, on: bool) -> bool:
        """As SteeringRules.steer: a whole address here (these tests steer no endpoint)."""
        assert port == 0, "an endpoint steered in a test of whole-address steering"
        return self.add_peer(addr) if on else self.remove_peer(addr)


class FakeCtcpRules(FakeSteeringRules):
    """Stands in for nfq.ctcp_rules.CtcpRules: also records the peer endpoints."""

    instances: list[FakeCtcpRules] = []

    def __init__(self, queue_num: int = 0, **_: object) -> None:
        super().__init__()
        self.endpoints: set[tuple[str, int]] = set()
        self.installed_with: tuple[list[Any], list[Any]] | None = None
        FakeCtcpRules.instances.append(self)

    def install(self, listen=(), peers=()) -> None:  # type: ignore[override]
        self.installed_with = (list(listen), list(peers))
        for addr, port in peers:
            self.add_peer_endpoint(addr, port)

    def add_peer_endpoint(self, addr: str, port: int) -> None:
        self.calls.append(("add-endpoint", f"{addr}:{port}"))
        self.endpoints.add((addr, port))

    def remove_peer_endpoint(self, addr: str, port: int) -> None:
        self.calls.append(("remove-endpoint", f"{addr}:{port}"))
        self.endpoints.discard((addr, port))


class FakeQueueReader:
    def __init__(self, num, handler, on_batch=None, **native) -> None:
        self.num = num
        self.packets = self.errors = self.batches = self.verdict_errors = self.overruns = 0

    threaded = False

    def start(self, loop) -> None:
        pass

    def start_thread(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"packets": 0, "reads": 0}

    def stop(self) -> None:
        pass


class FakeVerdictQueue:
    def __init__(self, num, decide) -> None:
        self.num, self.decide = num, decide

    def start(self, loop) -> None:
        pass

    def stop(self) -> None:
        pass


class FakeInjector:
    def inject(self, packet: bytes, dst: bytes) -> None:
        pass

    def fds(self) -> tuple[int, int]:
        return -1, -1

    def close(self) -> None:
        pass


class FakeSender:
    def __init__(self, *a, **k) -> None:
        pass

    def send(self, data: bytes, dst: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class FakeBridge:
    def __init__(self, *a, **k) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class FakeListSas:
    """Stands in for vici_bridge.resolve.list_sas: answers ``answer`` and records when it
    was asked (the daemon calls it in a thread, purpose-less; the purpose is recorded
    through Rfc9329Service._query below)."""

    def __init__(self) -> None:
        self.answer: list[dict[str, Any]] = []
        self.asked: list[float] = []

    def __call__(self, uri: str) -> list[dict[str, Any]]:
        self.asked.append(time.monotonic())
        return [dict(item) for item in self.answer]


@pytest.fixture
def list_sas(monkeypatch) -> FakeListSas:
    fake = FakeListSas()
    monkeypatch.setattr(daemon_mod, "list_sas", fake)
    monkeypatch.setattr("vici_bridge.resolve.list_sas", fake)
    return fake


@pytest.fixture(autouse=True)
def no_root(monkeypatch):
    monkeypatch.setattr(daemon_mod, "RawInjector", FakeInjector)
    monkeypatch.setattr(daemon_mod, "QueueReader", FakeQueueReader)
    monkeypatch.setattr("tcpencap.aio.ike_guard.VerdictQueue", FakeVerdictQueue)
    monkeypatch.setattr(daemon_mod, "ViciBridge", FakeBridge)
    monkeypatch.setattr(daemon_mod, "SteeringRules", FakeSteeringRules)
    monkeypatch.setattr(nfq.queue, "QueueReader", FakeQueueReader)  # imported by CtcpService
    monkeypatch.setattr(nfq.ctcp_rules, "CtcpRules", FakeCtcpRules)
    monkeypatch.setattr(ctcp_service_mod, "RawSender", FakeSender)
    FakeCtcpRules.instances.clear()


# --------------------------------------------------------------------------- harness


def write_conf(path: Path, connections: str) -> None:
    sock = path.parent / "ctl.sock"
    path.write_text(
        f"tcpencap {{\n    status_socket = {sock}\n    connections {{\n{connections}    }}\n}}\n"
    )


def conn(name: str, **keys: str) -> str:
    body = "".join(f"            {k} = {v}\n" for k, v in keys.items())
    return f"        {name} {{\n{body}        }}\n"


class Harness:
    """A started daemon, its fake rules and the purposes list-sas was asked for."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.rules: FakeSteeringRules = daemon.rules  # type: ignore[assignment]
        self.purposes: list[str] = []

    async def reload(self, path: Path, connections: str) -> list[str]:
        write_conf(path, connections)
        reply = await self.d.reload()
        assert reply.get("ok"), reply
        return reply["changes"]


async def start(path: Path) -> Harness:
    """A Daemon on the config at ``path``, started by its own _start (fakes for root)."""
    d = Daemon(load_config(str(path)))
    h = Harness(d)
    real_query = d.rfc9329._query

    async def recording_query(purpose: str) -> None:
        h.purposes.append(purpose)
        await real_query(purpose)

    d.rfc9329._query = recording_query  # type: ignore[method-assign]
    await d._start(asyncio.get_running_loop())
    return h


async def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def P(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def connecting(name: str, spi: str = "0102030405060708") -> list[dict[str, Any]]:
    """list-sas: one IKE SA of ``name`` still in IKE_SA_INIT (UDP unanswered)."""
    return [{name: {"state": "CONNECTING", "initiator-spi": spi, "remote-host": "0.0.0.0"}}]


# --------------------------------------------------------------------------- bug 1


def test_reload_fallback_to_tcp_drops_fallback_monitor_entry(tmp_path, monkeypatch, list_sas):
    """fallback -> tcp: the FallbackMonitor forgets the connection, so a later poll that
    finds no SA of it does not un-steer its peer."""
    monkeypatch.setattr(questions_mod, "FALLBACK_POLL", POLL)
    path = tmp_path / "tcpencap.conf"
    # "hotel" stays a fallback connection throughout, so the fallback poll keeps running.
    hotel = conn(
        "hotel",
        transport="fallback",
        remote_addrs="198.18.0.9",
        remote_port="4500",
        fallback_timeout="1h",
    )
    office_fb = conn(
        "office",
        transport="fallback",
        remote_addrs="198.18.0.1",
        remote_port="4500",
        fallback_timeout="200ms",
    )
    office_tcp = conn("office", transport="tcp", remote_addrs="198.18.0.1", remote_port="4500")
    write_conf(path, office_fb + hotel)

    async def scenario():
        h = await start(path)
        d, rules = h.d, h.rules
        try:
            assert set(d.engine.fallback.conns) == {"office", "hotel"}
            assert "198.18.0.1" not in rules.peers, "fallback peer steered at start"

            # UDP stays unanswered: through the real poll, office falls back to TCP.
            list_sas.answer = connecting("office")
            assert await wait_for(lambda: "198.18.0.1" in rules.peers), (
                f"fallback never switched to TCP: polls {h.purposes}"
            )
            assert d.engine.fallback.conns["office"].on_tcp

            # The administrator makes it TCP for good.
            changes = await h.reload(path, office_tcp + hotel)
            assert "connection office: TCP port 4500 to 198.18.0.1" in changes, changes
            assert "connection office: no longer UDP-first with fallback" in changes, changes
            assert d.config.connections["office"].transport == "tcp"
            assert "office" not in d.engine.fallback.conns
            assert set(d.engine.fallback.conns) == {"hotel"}
            assert "198.18.0.1" in rules.peers
            assert d.engine.client_peers.get(P("198.18.0.1")) == 4500
            assert d.engine.steering.reasons(P("198.18.0.1")) == {"tcp:office"}

            # Consequence: charon holds no SA of office; let the fallback poll fire.
            list_sas.answer = []
            calls_before = len(rules.calls)
            polls_before = h.purposes.count("fallback")
            assert await wait_for(lambda: h.purposes.count("fallback") >= polls_before + 5), (
                f"fallback poll stopped after reload: {h.purposes}"
            )
            await asyncio.sleep(2 * POLL)  # let the last answers land
            # A poll that was already in flight at reload time, answered the same way.
            await d.rfc9329._query("fallback")

            assert "198.18.0.1" in rules.peers, (
                f"peer un-steered by a fallback poll: rules calls {rules.calls}"
            )
            assert ("remove", "198.18.0.1") not in rules.calls[calls_before:], rules.calls
            assert d.engine.client_peers.get(P("198.18.0.1")) == 4500
            assert "198.18.0.9" not in rules.peers  # hotel: still UDP first
        finally:
            await d._shutdown()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- bug 2


def test_reload_tcp_to_udp_unsteers_peer(tmp_path, list_sas):
    path = tmp_path / "tcpencap.conf"
    write_conf(path, conn("office", transport="tcp", remote_addrs="198.18.0.2", remote_port="4500"))

    async def scenario():
        h = await start(path)
        d, rules = h.d, h.rules
        try:
            assert "198.18.0.2" in rules.peers, "tcp conn not steered at start"
            assert P("198.18.0.2") in d.engine.client_peers

            changes = await h.reload(
                path, conn("office", transport="udp", remote_addrs="198.18.0.2", remote_port="4500")
            )
            assert changes == ["connection office: no longer over TCP"], changes
            assert d.config.connections["office"].transport == "udp"
            assert "198.18.0.2" not in rules.peers, rules.calls
            assert rules.calls[-1] == ("remove", "198.18.0.2"), rules.calls
            assert P("198.18.0.2") not in d.engine.client_peers
            assert P("198.18.0.2") not in d.engine.steering.peers()
        finally:
            await d._shutdown()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- bug 3


def test_reload_changed_ctcp_connection_updates_ctcp_service(tmp_path, list_sas):
    path = tmp_path / "tcpencap.conf"
    write_conf(
        path, conn("cisco", encapsulation="ctcp", remote_addrs="198.18.0.3", remote_port="10000")
    )

    async def scenario():
        h = await start(path)
        d = h.d
        try:
            assert d.ctcp is not None and d.ctcp.engine is not None, "no cTCP service"
            assert d.ctcp.engine.peers == {P("198.18.0.3"): 10000}
            assert len(FakeCtcpRules.instances) == 1
            crules = FakeCtcpRules.instances[0]
            assert crules.endpoints == {("198.18.0.3", 10000)}
            assert crules.peers == {"198.18.0.3"}
            service, calls_before = d.ctcp, len(crules.calls)

            # The gateway moved: new address and port.
            changes = await h.reload(
                path,
                conn("cisco", encapsulation="ctcp", remote_addrs="198.18.0.4", remote_port="10443"),
            )
            assert changes == ["cTCP peers: 198.18.0.4"], changes
            assert d.ctcp is service and len(FakeCtcpRules.instances) == 1, "service rebuilt"
            assert d.ctcp.engine.peers == {P("198.18.0.4"): 10443}
            assert d.ctcp.peers == {P("198.18.0.4"): 10443}
            assert crules.endpoints == {("198.18.0.4", 10443)}
            assert crules.peers == {"198.18.0.4"}
            # New before old: the new endpoint is queued before the old one stops.
            calls = crules.calls[calls_before:]
            assert calls == [
                ("add-endpoint", "198.18.0.4:10443"),
                ("add", "198.18.0.4"),
                ("remove-endpoint", "198.18.0.3:10000"),
                ("remove", "198.18.0.3"),
            ], calls
            # cTCP peers are not RFC 9329 steering.
            assert not h.rules.peers and not d.engine.client_peers
        finally:
            await d._shutdown()

    asyncio.run(scenario())


def test_a_ctcp_gateway_starts_its_service_with_no_client_peers(tmp_path, list_sas):
    """gateway.ctcp_listen alone (no cTCP client connection): the cTCP service starts with
    the daemon, listening, with an empty peer set, and a reload that changes nothing keeps
    that one service."""
    path = tmp_path / "tcpencap.conf"
    sock = tmp_path / "ctl.sock"
    path.write_text(
        f"tcpencap {{\n    status_socket = {sock}\n"
        "    gateway {\n        ctcp_listen = 198.18.0.1:10000\n    }\n}\n"
    )

    async def scenario():
        h = await start(path)
        d = h.d
        try:
            assert d.ctcp is not None and d.ctcp.engine is not None, "no cTCP service"
            assert d.ctcp.peers == {}
            [crules] = FakeCtcpRules.instances
            assert crules.installed_with == ([("198.18.0.1", 10000)], [])
            service = d.ctcp
            reply = await d.reload()
            assert reply.get("ok") and reply["changes"] == [], reply
            assert d.ctcp is service and len(FakeCtcpRules.instances) == 1
        finally:
            await d._shutdown()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- bug 4


def test_reload_added_fallback_connection_is_polled(tmp_path, monkeypatch, list_sas):
    monkeypatch.setattr(questions_mod, "FALLBACK_POLL", POLL)
    path = tmp_path / "tcpencap.conf"
    base = conn("office", transport="tcp", remote_addrs="198.18.0.6", remote_port="4500")
    write_conf(path, base)
    hotel = conn(
        "hotel",
        transport="fallback",
        remote_addrs="198.18.0.5",
        remote_port="4500",
        fallback_timeout="300ms",
    )

    async def scenario():
        h = await start(path)
        d, rules = h.d, h.rules
        try:
            await asyncio.sleep(5 * POLL)
            assert "fallback" not in h.purposes, "polled without a fallback connection"

            list_sas.answer = connecting("hotel")
            reloaded = time.monotonic()
            changes = await h.reload(path, base + hotel)
            assert changes == ["connection hotel: UDP first, TCP port 4500 after 0.3s"], changes
            assert set(d.engine.fallback.conns) == {"hotel"}
            assert "198.18.0.5" not in rules.peers, "fallback peer steered before the timeout"

            assert await wait_for(lambda: "fallback" in h.purposes), (
                f"fallback connection added by reload never polled: {h.purposes}"
            )
            assert list_sas.asked, "list-sas never called"
            # The SA stays CONNECTING: once it is older than fallback_timeout, TCP.
            assert await wait_for(lambda: "198.18.0.5" in rules.peers), (
                f"CONNECTING SA never made hotel fall back: polls {h.purposes}"
            )
            assert time.monotonic() - reloaded >= 0.3
            assert h.purposes.count("fallback") >= 2
            assert d.engine.fallback.conns["hotel"].on_tcp
            assert d.engine.client_peers.get(P("198.18.0.5")) == 4500
            assert "198.18.0.6" in rules.peers  # office untouched
        finally:
            await d._shutdown()

    asyncio.run(scenario())


def test_reload_added_fallback_connection_is_polled_by_handle_timer(tmp_path, list_sas):
    """The same at the engine's clock: the poll after reload is one FALLBACK_POLL away."""
    path = tmp_path / "tcpencap.conf"
    base = conn("office", transport="tcp", remote_addrs="198.18.0.6", remote_port="4500")
    write_conf(path, base)
    hotel = conn("hotel", transport="fallback", remote_addrs="198.18.0.5", remote_port="4500")

    async def scenario():
        h = await start(path)
        d = h.d
        try:
            d.engine.pull()
            await h.reload(path, base + hotel)
            due = d.engine.get_timer()
            assert due is not None and due <= time.monotonic() + questions_mod.FALLBACK_POLL
            d.engine.handle_timer(time.monotonic() + questions_mod.FALLBACK_POLL + 0.01)
            assert Query("fallback") in d.engine.pull()
        finally:
            await d._shutdown()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- control


def test_reload_unchanged_config_changes_nothing(tmp_path, monkeypatch, list_sas):
    monkeypatch.setattr(questions_mod, "FALLBACK_POLL", POLL)
    path = tmp_path / "tcpencap.conf"
    conns = (
        conn("office", transport="tcp", remote_addrs="198.18.0.6", remote_port="4500")
        + conn("hotel", transport="fallback", remote_addrs="198.18.0.5", remote_port="4500")
        + conn("cisco", encapsulation="ctcp", remote_addrs="198.18.0.3", remote_port="10000")
    )
    write_conf(path, conns)

    async def scenario():
        h = await start(path)
        d, rules = h.d, h.rules
        try:
            crules = FakeCtcpRules.instances[0]
            before = (
                sorted(rules.peers),
                dict(d.engine.client_peers),
                sorted(d.engine.fallback.conns),
                dict(d.ctcp.engine.peers),
                sorted(crules.endpoints),
                len(rules.calls),
                len(crules.calls),
            )
            monitor = d.engine.fallback.conns["hotel"]
            changes = await h.reload(path, conns)
            assert changes == []
            after = (
                sorted(rules.peers),
                dict(d.engine.client_peers),
                sorted(d.engine.fallback.conns),
                dict(d.ctcp.engine.peers),
                sorted(crules.endpoints),
                len(rules.calls),
                len(crules.calls),
            )
            assert after == before
            assert d.engine.fallback.conns["hotel"] is monitor
            assert len(FakeCtcpRules.instances) == 1
        finally:
            await d._shutdown()

    asyncio.run(scenario())
