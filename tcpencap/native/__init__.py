"""The native data path (fastpath.c): the per-packet work of RFC 9329 in C.

It repeats decisions the Python path makes (tcpencap.core.router, tcpencap.wire.rfc9329),
which stays the reference; tests/native/test_fastpath.py feeds both the same traffic. ``load()``
says why the extension is not there when it is not, so the daemon can fall back.
"""

from __future__ import annotations

from types import ModuleType

from tcpencap.wire import rfc9329

_module: ModuleType | None = None
_error = ""

try:
    from tcpencap.native import _fastpath as _module  # type: ignore[no-redef]
except ImportError as exc:  # not built: no compiler or headers at install time
    _error = str(exc)
else:
    _module.bind_events(
        rfc9329._NEED_DATA,
        rfc9329._KEEPALIVE,
        rfc9329._PREFIX_RECEIVED,
        rfc9329._CLOSED,
        rfc9329.IKEMessage,
        rfc9329.ESPPacket,
        rfc9329.InvalidFrame,
        rfc9329.ProtocolError,
        rfc9329.Role.RESPONDER,
    )


def load() -> tuple[ModuleType | None, str]:
    """(the extension, "") or (None, why it cannot be loaded)."""
    if _module is None:
        return None, _error or "tcpencap.native._fastpath is not built"
    return _module, ""
