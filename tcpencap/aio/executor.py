"""Carrying out an engine's outputs (the vocabulary of tcpencap.core.outputs), for either
engine: the shell supplies one callback per output type it can carry out, the executor
keeps the engine's order. An output type without a callback is an error (KeyError): an
engine asking for something its shell cannot do is a bug, not something to skip."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tcpencap.core.engine import Engine
from tcpencap.core.outputs import Output

Handler = Callable[[Any], None]
OnError = Callable[[Output, OSError], None]


class Executor:
    """``on_error``: called with an output whose callback raised OSError, and the error
    (the cTCP shell counts and logs it and carries on); without it the error propagates
    (the RFC 9329 shell's callbacks handle the errors they expect themselves)."""

    def __init__(self, handlers: Mapping[type, Handler], on_error: OnError | None = None) -> None:
        self._handlers: dict[type, Handler] = dict(handlers)
        self._on_error = on_error

    def execute(self, outs: Iterable[Output]) -> None:
        handlers = self._handlers
        on_error = self._on_error
        for o in outs:
            try:
                handlers[type(o)](o)
            except OSError as exc:
                if on_error is None:
                    raise
                on_error(o, exc)

    def drain(self, engine: Engine) -> None:
        """Everything the engine asked for, until it asks for nothing more: carrying out
        an output may feed it (a connection closed while it was connecting is lost)."""
        outs = engine.pull()
        while outs:
            self.execute(outs)
            outs = engine.pull()
