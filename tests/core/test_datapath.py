"""The data path interface (tcpencap.core.datapath): the Python reference and the native
adapter (tcpencap.native.datapath) give the engine the same events for the same stream,
and only the native one sinks ESP, caches flows and lends connections."""

from __future__ import annotations

from typing import Any

import pytest

from tcpencap.core.datapath import PythonDataPath
from tcpencap.native import load
from tcpencap.native.datapath import NativeDataPath
from tcpencap.wire import rfc9329
from tcpencap.wire.packet import addr_bytes

NATIVE, WHY = load()
LOCAL, PEER = addr_bytes("198.18.1.2"), addr_bytes("198.19.0.2")
TEMPLATE = (PEER, LOCAL, 4500, 4500)
IKE = bytes(8) + bytes(8) + b"\x21\x20\x22\x08" + bytes(4) + (28).to_bytes(4, "big")
ESP = (0x1234).to_bytes(4, "big") + bytes(4) + b"payload"
STREAM = (
    rfc9329.PREFIX
    + rfc9329.frame_ike(IKE)
    + rfc9329.frame_esp(ESP)
    + rfc9329.KEEPALIVE_FRAME
    + rfc9329.frame_esp(ESP)
    + rfc9329.frame_ike(IKE)
)


def paths() -> list[Any]:
    assert NATIVE is not None, f"the native extension must be built: {WHY}"
    return [PythonDataPath(), NativeDataPath(NATIVE)]


def events(dp: Any, esp_to: Any) -> list[tuple[str, int, int]]:
    codec = dp.codec(rfc9329.Role.RESPONDER, 65535)
    codec.receive_data(STREAM)
    out = []
    for _ in range(len(STREAM)):  # (bounded: a codec that never says NeedData fails)
        ev, esp, kept = dp.read(codec, esp_to)
        out.append((type(ev).__name__, esp, kept))
        if type(ev) is rfc9329.NeedData:
            return out
    raise AssertionError(f"no end of events: {out[-3:]}")


def test_without_a_sink_both_paths_give_every_frame_as_an_event() -> None:
    py, nat = paths()
    assert events(py, None) == events(nat, None)
    assert [e[0] for e in events(py, None)] == [
        "PrefixReceived",
        "IKEMessage",
        "ESPPacket",
        "Keepalive",
        "ESPPacket",
        "IKEMessage",
        "NeedData",
    ]


def test_the_python_path_never_sinks_esp() -> None:
    py, _ = paths()
    assert not py.sinks_esp
    assert events(py, TEMPLATE) == events(py, None)
    assert py.lend(object(), TEMPLATE, 10) is None
    assert (py.native, py.flows, py.inject_batch) == (None, None, None)


@pytest.mark.parametrize("index", [0, 1])
def test_every_state_change_is_a_new_epoch(index: int) -> None:
    dp = paths()[index]
    before = dp.epoch
    dp.changed()
    assert dp.epoch == before + 1
