"""The shared executor (tcpencap/aio/executor.py): outputs reach the shell's callback for
their type, in the engine's order; errors propagate, or go to ``on_error`` (the cTCP way:
count, log, carry on); ``drain`` pulls until the engine is quiet."""

from __future__ import annotations

from typing import Any

import pytest

from tcpencap.aio.executor import Executor
from tcpencap.core.engine import Engine
from tcpencap.core.outputs import Close, Inject, Output, Query, SendRaw, Steer, Transmit


def recorder(log: list[Any], name: str) -> Any:
    return lambda o: log.append((name, o))


def test_each_output_reaches_its_callback_in_order() -> None:
    log: list[Any] = []
    ex = Executor({Transmit: recorder(log, "tx"), Inject: recorder(log, "inj")})
    outs = [Transmit(1, b"a"), Inject(b"p", b"\x7f\x00\x00\x01"), Transmit(2, b"b")]
    ex.execute(outs)
    assert log == [("tx", outs[0]), ("inj", outs[1]), ("tx", outs[2])]


def test_an_output_without_a_callback_is_an_error() -> None:
    ex = Executor({Transmit: lambda o: None})
    with pytest.raises(KeyError):
        ex.execute([Query("start")])


def test_os_errors_propagate_without_on_error() -> None:
    def fail(o: Output) -> None:
        raise OSError("no route")

    ex = Executor({Inject: fail})
    with pytest.raises(OSError, match="no route"):
        ex.execute([Inject(b"p", b"\x7f\x00\x00\x01")])


def test_on_error_takes_an_os_error_and_the_rest_still_runs() -> None:
    log: list[Any] = []
    errors: list[tuple[Output, OSError]] = []

    def fail(o: Output) -> None:
        raise OSError("raw socket gone")

    ex = Executor(
        {SendRaw: fail, Steer: recorder(log, "steer")},
        on_error=lambda o, exc: errors.append((o, exc)),
    )
    tx, steer = SendRaw(b"seg", b"\x01\x02\x03\x04"), Steer(b"\x01\x02\x03\x04", True)
    ex.execute([tx, steer])
    assert [(o, str(e)) for o, e in errors] == [(tx, "raw socket gone")]
    assert log == [("steer", steer)]


def test_other_errors_are_never_swallowed() -> None:
    def broken(o: Output) -> None:
        raise ValueError("bug")

    ex = Executor({Close: broken}, on_error=lambda o, exc: None)
    with pytest.raises(ValueError):
        ex.execute([Close(3, "x")])


class FeedingEngine(Engine):
    """Carrying out a Close feeds it: it answers with one more output, once."""

    def __init__(self) -> None:
        super().__init__()
        self._out.append(Close(7, "retired"))

    def lost(self, conn_id: int) -> None:
        self._out.append(Steer(b"\x0a\x00\x00\x01", False))


def test_drain_runs_what_carrying_out_produced() -> None:
    engine = FeedingEngine()
    log: list[Any] = []

    def close(o: Close) -> None:
        log.append(o)
        engine.lost(o.conn_id)

    ex = Executor({Close: close, Steer: recorder(log, "steer")})
    ex.drain(engine)
    assert [type(x[1]) if isinstance(x, tuple) else type(x) for x in log] == [Close, Steer]
    assert engine.pull() == []
