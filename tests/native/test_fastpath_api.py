"""The two optional arguments the native parts take from Python, so that a rule tcpencap
decides in Python is not written again in C: TcpWriter's ``ike_factor`` (the send bound IKE
may overshoot, aio/tcp.py's IKE_HARD_LIMIT_FACTOR) and InboundWorker.attach's ``now`` (the
engine's time, which begins the worker's frame-rate window: src/frame_rate.h says why the
two clocks agree). Both default to what the extension did before they existed."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tcpencap.native import load
from tcpencap.wire import rfc9329

NATIVE, WHY = load()


def native() -> Any:
    assert NATIVE is not None, f"the native extension must be built (scripts/setup.sh): {WHY}"
    return NATIVE


def ike_admitted(writer: Any, frame: bytes) -> int:
    """How many IKE frames the writer queues before its bound drops one."""
    n = 0
    while writer.write(frame, True):
        n += 1
        assert n < 1000
    return n


def test_ike_may_overshoot_the_bound_by_ike_factor_four_when_not_given() -> None:
    frame = bytes(10)
    writer = native().TcpWriter(-1, 100)  # fd -1: collecting, nothing is sent
    # IKE is queued while at most limit * 4 octets wait: after 0, 10, ..., 400 of them
    assert ike_admitted(writer, frame) == 41
    assert writer.ike_dropped == 1 and writer.pending == 410
    assert not writer.write(frame)  # ESP only while at most limit (100) octets wait
    assert writer.esp_dropped == 1


@pytest.mark.parametrize("factor", [1, 2, 7])
def test_ike_factor_is_the_callers(factor: int) -> None:
    frame = bytes(10)
    for writer in (
        native().TcpWriter(-1, 100, factor),
        native().TcpWriter(fd=-1, limit=100, ike_factor=factor),
    ):
        assert ike_admitted(writer, frame) == 10 * factor + 1
        assert writer.pending == 100 * factor + 10


def test_ike_factor_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="ike_factor"):
        native().TcpWriter(-1, 100, 0)


@contextlib.contextmanager
def worker_with_conn(
    max_rate: int, **attach: float
) -> Iterator[tuple[queue.Queue[Any], socket.socket]]:
    """A running InboundWorker (no raw sockets: only keepalives arrive, nothing is
    injected) with one lent gateway connection; yields the queue it gives it back on and
    the peer's end of the connection."""
    peer_end, ours = socket.socketpair()
    given: queue.Queue[Any] = queue.Queue()
    worker = native().InboundWorker(-1, -1)
    thread = threading.Thread(target=worker.run, args=(given.put,), daemon=True)
    with peer_end, ours:
        d = native().Deframer(rfc9329.Role.RESPONDER)
        d.receive_data(rfc9329.PREFIX)
        assert d.next_event() == rfc9329.PrefixReceived()
        lo = bytes([127, 0, 0, 1])
        worker.attach(1, ours.fileno(), d, lo, lo, 4500, 4500, max_rate, **attach)
        thread.start()
        try:
            yield given, peer_end
        finally:
            worker.stop()
            thread.join(2)
    assert not thread.is_alive()


def keepalives_over_a_second(given: queue.Queue[Any], peer_end: socket.socket) -> Any:
    """3 keepalives, 1.2 s, 3 more: within 5 frames/s unless one window spans them all.
    -> what the worker gave back, or None."""
    peer_end.sendall(rfc9329.KEEPALIVE_FRAME * 3)
    time.sleep(1.2)
    peer_end.sendall(rfc9329.KEEPALIVE_FRAME * 3)
    try:
        return given.get(timeout=0.5)
    except queue.Empty:
        return None


def test_attach_without_now_reads_the_clock_itself() -> None:
    with worker_with_conn(5) as (given, peer_end):
        assert keepalives_over_a_second(given, peer_end) is None  # two windows


def test_attach_now_begins_the_rate_window_on_the_engines_clock() -> None:
    """A window that begins an hour from now (time.monotonic(), the engine's clock) has not
    ended 1.2 s later: the worker compares its own clock readings with the caller's time,
    so all six keepalives fall in that one window and go over 5 a second."""
    with worker_with_conn(5, now=time.monotonic() + 3600) as (given, peer_end):
        (back,) = keepalives_over_a_second(given, peer_end)
        assert back[:2] == (1, "rate") and back[5] == 6


def test_attach_now_must_be_a_number() -> None:
    worker = native().InboundWorker(-1, -1)
    a, b = socket.socketpair()
    with a, b:
        d = native().Deframer(rfc9329.Role.ORIGINATOR)
        lo = bytes([127, 0, 0, 1])
        with pytest.raises(TypeError):
            worker.attach(1, a.fileno(), d, lo, lo, 4500, 4500, 5, now="soon")
        assert worker.stats()["lent"] == 0
        assert d.next_event() == rfc9329.NeedData()  # not lent: still Python's
