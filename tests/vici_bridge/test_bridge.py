"""vici_bridge.bridge.ViciBridge: the event session in its thread, handing charon's events,
the resync and the connection state to the asyncio loop, and reconnecting when charon
goes. The VICI sessions are fakes (``open_session`` replaced): a scripted charon whose
event stream is fed by the test."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import vici_bridge.bridge as bridge_mod
from vici_bridge.bridge import EVENTS, ViciBridge

URI = "unix:///run/fake/charon.vici"
END = object()  # charon closes the event stream
SAS = [{"gw": {"state": b"ESTABLISHED", "initiator-spi": b"1122334455667788"}}]


class FakeTransport:
    def __init__(self, charon: FakeCharon, kind: str) -> None:
        self.charon, self.kind = charon, kind

    def close(self) -> None:
        self.charon.log.append(("close", self.kind))


class FakeSession:
    def __init__(self, charon: FakeCharon, kind: str) -> None:
        self.charon = charon
        self.transport = FakeTransport(charon, kind)

    def listen(self, events: list[str], timeout: float) -> Iterator[tuple[Any, Any]]:
        # like vici's: registration happens at the first next(), (None, None) when idle
        self.charon.log.append(("listen", tuple(events), timeout))
        self.charon.log.append(("register",))
        try:
            while True:
                try:
                    item = self.charon.events.get(timeout=timeout)
                except queue.Empty:
                    self.charon.log.append(("idle",))
                    yield None, None
                    continue
                if item is END:
                    return
                yield item
        finally:
            self.charon.log.append(("unregister",))

    def list_sas(self) -> list[dict[str, Any]]:
        self.charon.log.append(("list-sas",))
        return self.charon.sas


class FakeCharon:
    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.events: queue.Queue[Any] = queue.Queue()
        self.sas = SAS
        self.refuse = 0  # connections refused before charon answers

    def open_session(self, uri: str, timeout: float | None = 5.0) -> FakeSession:
        assert uri == URI
        if self.refuse:
            self.refuse -= 1
            self.log.append(("refused",))
            raise ConnectionRefusedError(111, "Connection refused")
        kind = "events" if timeout is None else "commands"
        self.log.append(("open", kind, timeout))
        return FakeSession(self, kind)


@pytest.fixture
def charon(monkeypatch: pytest.MonkeyPatch) -> FakeCharon:
    fake = FakeCharon()
    monkeypatch.setattr(bridge_mod, "open_session", fake.open_session)
    return fake


class Seen:
    """What the bridge posted to the loop, in order."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []

    def of(self, kind: str) -> list[Any]:
        return [v for k, v in self.posts if k == kind]


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for ``cond`` on the loop, with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run_bridge(body: Callable[[ViciBridge, Seen], Any]) -> Seen:
    seen = Seen()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        b = ViciBridge(
            URI,
            loop,
            on_event=lambda label, ev: seen.posts.append(("event", (label, ev))),
            on_resync=lambda sas: seen.posts.append(("resync", sas)),
            on_state=lambda state: seen.posts.append(("state", state)),
        )
        b.start()
        try:
            await body(b, seen)
        finally:
            b.stop()
        assert not b._thread.is_alive(), "the event thread did not stop"

    asyncio.run(main())
    return seen


def test_it_registers_then_resyncs_then_delivers_events_in_order(charon: FakeCharon) -> None:
    charon.events.put((b"ike-updown", {"gw": {"state": b"DELETING"}}))
    charon.events.put((b"child-rekey", {"gw": {"child-sas": [b"a"]}}))

    async def body(b: ViciBridge, seen: Seen) -> None:
        await until(lambda: len(seen.of("event")) == 2)

    seen = run_bridge(body)
    assert seen.posts == [
        ("resync", [{"gw": {"state": "ESTABLISHED", "initiator-spi": "1122334455667788"}}]),
        ("state", "connected"),
        ("event", ("ike-updown", {"gw": {"state": "DELETING"}})),
        ("event", ("child-rekey", {"gw": {"child-sas": ["a"]}})),
    ]
    # registered before the list: nothing that happens in between is lost
    assert charon.log[:6] == [
        ("open", "events", None),
        ("listen", tuple(EVENTS), 0.2),
        ("register",),
        ("open", "commands", 10.0),
        ("list-sas",),
        ("close", "commands"),
    ]


def test_idle_ticks_are_not_events(charon: FakeCharon) -> None:
    async def body(b: ViciBridge, seen: Seen) -> None:
        await until(lambda: seen.of("state") == ["connected"])
        await until(lambda: ("idle",) in charon.log)  # a (None, None) went to the bridge
        charon.events.put((b"ike-update", {}))
        await until(lambda: len(seen.of("event")) == 1)

    seen = run_bridge(body)
    assert seen.of("event") == [("ike-update", {})]


def test_charon_away_at_start_is_reported_and_retried(charon: FakeCharon) -> None:
    charon.refuse = 2

    async def body(b: ViciBridge, seen: Seen) -> None:
        await until(lambda: "connected" in seen.of("state"))
        assert b.reconnects == 2

    seen = run_bridge(body)
    states = seen.of("state")
    assert states[:2] == ["disconnected: [Errno 111] Connection refused"] * 2
    assert states[2] == "connected" and seen.posts[2][0] == "resync"


def test_a_lost_event_stream_reconnects_and_resyncs(charon: FakeCharon) -> None:
    async def body(b: ViciBridge, seen: Seen) -> None:
        await until(lambda: seen.of("state") == ["connected"])
        charon.sas = []
        charon.events.put(END)
        await until(lambda: seen.of("state")[-1:] == ["connected"] and len(seen.of("resync")) == 2)

    seen = run_bridge(body)
    assert seen.of("state") == ["connected", "disconnected: event stream ended", "connected"]
    assert seen.of("resync")[1] == []
    # the stream is closed (unregistering) before its socket goes
    first_close = charon.log.index(("close", "events"))
    assert charon.log[first_close - 1] == ("unregister",)


def test_stop_ends_the_thread_and_nothing_is_posted_after(charon: FakeCharon) -> None:
    async def body(b: ViciBridge, seen: Seen) -> None:
        await until(lambda: seen.of("state") == ["connected"])
        b.stop()
        assert not b._thread.is_alive()
        charon.events.put((b"ike-updown", {}))
        assert charon.events.qsize() == 1  # nobody reads the stream any more

    seen = run_bridge(body)
    assert seen.of("event") == []
    # the open stream is closed, which unregisters, while its socket is still open
    assert charon.log[-2:] == [("unregister",), ("close", "events")]
