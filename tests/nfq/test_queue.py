"""nfq.queue.QueueReader: every packet read from the queue goes to the handler, and every
read ends in one batch drop verdict (one by one if that fails); the read budget; the native
reader thread's rounds. The unit tests replace libnetfilter_queue (``NetfilterQueue``) by a
fake over a datagram socket pair, so the verdicts the reader sends are read back as bytes;
the kernel test runs the real thing in a private network namespace."""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import nfq.queue
from nfq.queue import QueueReader, _Budgeted
from nfq.verdict import BATCH_LEN, verdict_batch
from tests.nfq.queue_netns import PORT, QUEUE, ns, run_in_ns

__all__ = ["ns"]  # the fixture, used by name

NUM = 4500


class FakePacket:
    def __init__(self, pid: int, payload: bytes) -> None:
        self.id = pid
        self._payload = payload
        self.dropped = False

    def get_payload(self) -> bytes:
        return self._payload

    def drop(self) -> None:
        self.dropped = True


class FakeNfq:
    """libnetfilter_queue's side: its netlink socket is one end of a socket pair; each
    datagram the test writes to the other end is one queued packet (ids count up)."""

    made: list[FakeNfq] = []

    def __init__(self) -> None:
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.bound: tuple[Any, ...] | None = None
        self.unbound = False
        self.packets: list[FakePacket] = []
        self._next_id = 0
        FakeNfq.made.append(self)

    def bind(self, num: int, cb: Callable[[Any], None], max_len: int, sock_len: int) -> None:
        self.bound = (num, max_len, sock_len)
        self._cb = cb

    def get_fd(self) -> int:
        return self.ours.fileno()

    def queue(self, *payloads: bytes) -> None:
        for p in payloads:
            self.kernel.send(p)

    def _one(self, data: bytes) -> None:
        self._next_id += 1
        pkt = FakePacket(self._next_id, data)
        self.packets.append(pkt)
        self._cb(pkt)

    def run(self, block: bool = True) -> None:
        assert not block, "the reader must never block the loop"
        while True:
            try:
                data = self.ours.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            self._one(data)

    def run_socket(self, sock: Any) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            self._one(data)

    def verdicts(self) -> list[bytes]:
        """What the reader sent on the queue's socket."""
        out = []
        while True:
            try:
                out.append(self.kernel.recv(65536, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return out

    def unbind(self) -> None:
        self.unbound = True


class FakeLoop:
    """The event loop as the reader uses it: its reader callback is called by the test."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self.posted: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.posted_event = threading.Event()

    def add_reader(self, fd: int, cb: Callable[[], None]) -> None:
        self.readers[fd] = cb

    def remove_reader(self, fd: int) -> None:
        del self.readers[fd]

    def call_soon_threadsafe(self, fn: Callable[..., None], *args: Any) -> None:
        self.posted.append((fn, args))
        self.posted_event.set()


@pytest.fixture
def nfqs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeNfq]]:
    FakeNfq.made = []
    monkeypatch.setattr(nfq.queue, "NetfilterQueue", FakeNfq)
    yield FakeNfq.made
    for f in FakeNfq.made:
        f.ours.close()
        f.kernel.close()


def started(reader: QueueReader) -> tuple[FakeNfq, FakeLoop]:
    loop = FakeLoop()
    reader.start(loop)  # type: ignore[arg-type]
    (fake,) = FakeNfq.made
    return fake, loop


def readable(loop: FakeLoop, fake: FakeNfq) -> None:
    loop.readers[fake.get_fd()]()


def test_every_packet_of_a_read_reaches_the_handler_and_one_verdict_drops_them(nfqs) -> None:
    seen: list[bytes] = []
    marks: list[bool] = []
    reader = QueueReader(NUM, seen.append, marks.append, max_len=77)
    fake, loop = started(reader)
    assert fake.bound == (NUM, 77, nfq.queue.SOCK_RCVBUF)
    fake.queue(b"a", b"b", b"c")
    readable(loop, fake)
    assert seen == [b"a", b"b", b"c"] and marks == [True, False]
    # one message: NF_DROP for every id up to the last of the read
    assert fake.verdicts() == [verdict_batch(NUM, 3, seq=1)]
    fake.queue(b"d")
    readable(loop, fake)
    assert fake.verdicts() == [verdict_batch(NUM, 4, seq=2)]
    assert (reader.packets, reader.batches, reader.errors) == (4, 2, 0)
    assert reader.stats() == {"packets": 4, "reads": 2}
    assert not any(p.dropped for p in fake.packets)


def test_a_read_with_nothing_in_it_sends_no_verdict(nfqs) -> None:
    reader = QueueReader(NUM, lambda p: None)
    fake, loop = started(reader)
    readable(loop, fake)
    assert fake.verdicts() == [] and reader.batches == 1


def test_the_handlers_bug_costs_one_packet_not_the_queue(nfqs) -> None:
    seen: list[bytes] = []

    def handler(p: bytes) -> None:
        if p == b"bad":
            raise RuntimeError("a bug")
        seen.append(p)

    reader = QueueReader(NUM, handler)
    fake, loop = started(reader)
    fake.queue(b"a", b"bad", b"c")
    readable(loop, fake)
    assert seen == [b"a", b"c"] and reader.errors == 1
    assert fake.verdicts() == [verdict_batch(NUM, 3, seq=1)]  # the bad one is dropped too


def test_the_batch_closes_even_when_the_read_fails(nfqs) -> None:
    marks: list[bool] = []
    reader = QueueReader(NUM, lambda p: None, marks.append)
    fake, loop = started(reader)
    fake.queue(b"a")

    def broken(block: bool = True) -> None:
        fake._one(b"x")
        raise OSError(errno.ENOBUFS, "overrun")

    fake.run = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):
        readable(loop, fake)
    assert marks == [True, False]
    assert fake.verdicts() == [verdict_batch(NUM, 1, seq=1)]  # what was read is still dropped


class RefusingSocket:
    def send(self, data: bytes) -> int:
        raise OSError(errno.ENOBUFS, "no buffer space")

    def close(self) -> None:
        pass


def test_a_refused_batch_verdict_drops_the_packets_of_its_read_one_by_one(nfqs) -> None:
    reader = QueueReader(NUM, lambda p: None)
    fake, loop = started(reader)
    fake.queue(b"a")
    readable(loop, fake)  # a read whose verdict went out: settled
    real = reader._sock
    reader._sock = RefusingSocket()  # type: ignore[assignment]
    fake.queue(b"b", b"c")
    readable(loop, fake)
    assert [p.dropped for p in fake.packets] == [False, True, True]
    assert reader.verdict_errors == 1
    assert real is not None
    real.close()


def test_a_budget_bounds_the_reads_per_turn(nfqs) -> None:
    seen: list[bytes] = []
    reader = QueueReader(NUM, seen.append, budget=2)
    fake, loop = started(reader)
    fake.queue(b"1", b"2", b"3", b"4", b"5")
    readable(loop, fake)
    assert seen == [b"1", b"2"]
    assert fake.verdicts() == [verdict_batch(NUM, 2, seq=1)]
    readable(loop, fake)
    readable(loop, fake)
    assert seen == [b"1", b"2", b"3", b"4", b"5"]
    assert fake.verdicts() == [verdict_batch(NUM, 4, seq=2), verdict_batch(NUM, 5, seq=3)]


def test_budgeted_socket_says_eagain_once_spent() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        for i in range(3):
            b.send(b"%d" % i)
        budgeted = _Budgeted(a, 2)
        assert [budgeted.recv(10), budgeted.recv(10)] == [b"0", b"1"]
        with pytest.raises(BlockingIOError) as err:
            budgeted.recv(10)
        assert err.value.errno == errno.EAGAIN
        assert a.recv(10) == b"2"  # the rest is left for the next turn


def test_stop_removes_the_reader_closes_the_socket_and_unbinds(nfqs) -> None:
    reader = QueueReader(NUM, lambda p: None)
    fake, loop = started(reader)
    sock = reader._sock
    reader.stop()
    assert loop.readers == {} and fake.unbound
    assert sock is not None and sock.fileno() == -1


# --- the native reader thread -------------------------------------------------------------


class FakeWorker:
    """tcpencap.native's QueueWorker: ``run`` hands over ``rounds`` and returns (or raises)."""

    def __init__(self, flows: Any, fd: int, num: int) -> None:
        self.args = (flows, fd, num)
        self.rounds: list[tuple[Any, ...]] = []
        self.fail: BaseException | None = None
        self.stopped = False

    def run(self, deliver: Callable[[tuple[Any, ...]], None]) -> None:
        for r in self.rounds:
            deliver(r)
        if self.fail is not None:
            raise self.fail

    def stop(self) -> None:
        self.stopped = True

    def stats(self) -> dict[str, int]:
        return {"packets": 12, "reads": 3, "other": 9}


class FakeNative:
    QueueWorker = FakeWorker


def native_reader(**kw: Any) -> QueueReader:
    kw.setdefault("on_native_batch", lambda misses, hits: None)
    return QueueReader(NUM, lambda p: None, flows="flows", native=FakeNative, **kw)


def test_with_the_native_path_a_worker_reads_the_queue_not_the_loop(nfqs) -> None:
    reader = native_reader()
    fake, loop = started(reader)
    assert loop.readers == {} and reader.threaded
    assert reader._worker.args == ("flows", fake.get_fd(), NUM)
    assert reader.stats() == {"packets": 12, "reads": 3}


def test_without_on_native_batch_the_python_path_reads(nfqs) -> None:
    reader = QueueReader(NUM, lambda p: None, flows="flows", native=FakeNative)
    fake, loop = started(reader)
    assert not reader.threaded and fake.get_fd() in loop.readers


def test_a_round_reaches_the_loop_and_its_leftovers_the_callbacks(nfqs) -> None:
    calls: list[Any] = []
    reader = native_reader(
        on_batch=lambda start: calls.append(("batch", start)),
        on_native_batch=lambda misses, hits: calls.append(("native", misses, hits)),
        on_stalled=lambda ids: calls.append(("stalled", ids)),
    )
    fake, loop = started(reader)
    worker = reader._worker
    worker.rounds = [(9, 4, [b"miss"], [(1, b"hit", 1)], 2, [7], 0)]
    reader.start_thread()
    assert loop.posted_event.wait(5.0), "the round never reached the loop"
    reader._thread.join(5.0)
    ((fn, args),) = loop.posted
    fn(*args)  # the loop runs it
    assert calls == [
        ("stalled", [7]),
        ("batch", True),
        ("native", [b"miss"], [(1, b"hit", 1)]),
        ("batch", False),
    ]
    assert reader.overruns == 2 and fake.verdicts() == []  # C gave the verdict


def test_a_verdict_that_c_could_not_send_is_sent_again_from_python(nfqs) -> None:
    reader = native_reader()
    fake, _ = started(reader)
    reader._handle_round((41, 1, [], [], 0, [], errno.ENOBUFS))
    assert reader.verdict_errors == 1
    assert fake.verdicts() == [verdict_batch(NUM, 41, seq=1)]


def test_a_bug_in_a_rounds_callback_is_counted_and_the_batch_closed(nfqs) -> None:
    marks: list[bool] = []

    def broken(misses: list[bytes], hits: list[Any]) -> None:
        raise RuntimeError("a bug")

    reader = native_reader(on_batch=marks.append, on_native_batch=broken)
    started(reader)
    reader._handle_round((1, 1, [b"x"], [], 0, [], 0))
    assert reader.errors == 1 and marks == [True, False]


def test_a_dead_reader_thread_is_reported_on_the_loop(nfqs) -> None:
    failed: list[str] = []
    reader = native_reader(on_failed=failed.append)
    _, loop = started(reader)
    reader._worker.fail = MemoryError()
    reader.start_thread()
    assert loop.posted_event.wait(5.0)
    reader._thread.join(5.0)
    ((fn, args),) = loop.posted
    fn(*args)
    assert failed == [f"queue {NUM}: the reader thread failed: MemoryError()"]
    assert reader.errors == 1


def test_stop_stops_the_worker_and_joins_its_thread(nfqs) -> None:
    reader = native_reader()
    fake, _ = started(reader)
    worker = reader._worker
    reader.start_thread()
    thread = reader._thread
    reader.stop()
    assert worker.stopped and not thread.is_alive() and fake.unbound
    assert not reader.threaded


def test_a_verdict_batch_is_one_message_of_its_length(nfqs) -> None:
    reader = QueueReader(NUM, lambda p: None)
    fake, loop = started(reader)
    fake.queue(b"a")
    readable(loop, fake)
    (v,) = fake.verdicts()
    assert len(v) == BATCH_LEN


# --- against the kernel -------------------------------------------------------------------


def test_queue_reader_drops_every_packet_with_batch_verdicts(ns):
    res = run_in_ns(
        ns,
        f"""
        from nfq.queue import QueueReader
        seen, batches = [], []

        async def main():
            loop = asyncio.get_running_loop()
            reader = QueueReader({QUEUE}, seen.append, batches.append)
            reader.start(loop)
            for burst in range(10):
                for i in range(20):
                    tx.sendto(b"%d-%d" % (burst, i), ("127.0.0.1", {PORT}))
                await asyncio.sleep(0.05)
            out["stats"] = queue_stats()
            out["verdict_errors"] = reader.verdict_errors
            reader.stop()

        asyncio.run(main())
        out["seen"] = len(seen)
        out["payload_tails"] = sorted(p[28:].decode() for p in seen)[:3]
        out["received"] = len(received())
        out["reads"] = batches.count(False)
        """,
    )
    assert res["seen"] == 200
    assert res["payload_tails"] == ["0-0", "0-1", "0-10"]
    assert res["received"] == 0, "a queued packet got through: the drop verdict did not apply"
    assert res["stats"] == {"waiting": 0, "dropped": 0, "user_dropped": 0}
    assert res["verdict_errors"] == 0
    assert 1 <= res["reads"] <= 200
