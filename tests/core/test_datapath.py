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
from tcpencap.wire.packet import addr_bytes, build_udp_packet

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


def test_the_native_path_sinks_esp_as_packets_and_counts_keepalives() -> None:
    _, nat = paths()
    assert nat.sinks_esp
    got = events(nat, TEMPLATE)
    assert [e[0] for e in got] == ["PrefixReceived", "IKEMessage", "IKEMessage", "NeedData"]
    assert sum(e[1] for e in got) == 2 and sum(e[2] for e in got) == 1
    packets = nat.inject_batch.take()
    expected = bytearray(build_udp_packet(PEER, LOCAL, 4500, 4500, ESP))
    expected[26:28] = b"\0\0"  # (over IPv4 the UDP checksum is optional: C leaves it 0)
    assert packets == [bytes(expected)] * 2


def test_the_flow_cache_is_forgotten_when_the_table_or_a_connection_changes() -> None:
    _, nat = paths()
    packet = build_udp_packet(LOCAL, PEER, 4500, 4500, ESP)
    nat.learn(packet, 7, table_version=1)
    assert len(nat.flows) == 1
    nat.sync(1)
    assert len(nat.flows) == 1  # nothing changed
    nat.changed()
    nat.sync(1)
    assert len(nat.flows) == 0  # a connection changed state
    nat.learn(packet, 7, table_version=1)
    nat.sync(2)
    assert len(nat.flows) == 0  # the table changed


def test_the_native_path_lends_what_its_inbound_worker_reads_with() -> None:
    _, nat = paths()
    codec = nat.codec(rfc9329.Role.RESPONDER, 65535)
    assert nat.lend(codec, TEMPLATE, 500) == (codec, *TEMPLATE, 500)
    assert NativeDataPath.of(None) is None


@pytest.mark.parametrize("index", [0, 1])
def test_every_state_change_is_a_new_epoch(index: int) -> None:
    dp = paths()[index]
    before = dp.epoch
    dp.changed()
    assert dp.epoch == before + 1
