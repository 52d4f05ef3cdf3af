"""tcpencap.native.datapath.NativeDataPath: the C extension behind the engine's data path
interface sinks ESP into its inject batch as packets, keeps the flow cache in step with the
table and the connections, and lends what its inbound worker reads with. (Its agreement
with the Python reference path is in tests/core/test_datapath.py.)"""

from __future__ import annotations

from tcpencap.native.datapath import NativeDataPath
from tcpencap.wire import rfc9329
from tcpencap.wire.packet import build_udp_packet
from tests.core.test_datapath import ESP, LOCAL, NATIVE, PEER, TEMPLATE, WHY, events


def native_path() -> NativeDataPath:
    assert NATIVE is not None, f"the native extension must be built: {WHY}"
    return NativeDataPath(NATIVE)


def test_the_native_path_sinks_esp_as_packets_and_counts_keepalives() -> None:
    nat = native_path()
    assert nat.sinks_esp
    got = events(nat, TEMPLATE)
    assert [e[0] for e in got] == ["PrefixReceived", "IKEMessage", "IKEMessage", "NeedData"]
    assert sum(e[1] for e in got) == 2 and sum(e[2] for e in got) == 1
    packets = nat.inject_batch.take()
    expected = bytearray(build_udp_packet(PEER, LOCAL, 4500, 4500, ESP))
    expected[26:28] = b"\0\0"  # (over IPv4 the UDP checksum is optional: C leaves it 0)
    assert packets == [bytes(expected)] * 2


def test_the_flow_cache_is_forgotten_when_the_table_or_a_connection_changes() -> None:
    nat = native_path()
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
    nat = native_path()
    codec = nat.codec(rfc9329.Role.RESPONDER, 65535)
    assert nat.lend(codec, TEMPLATE, 500) == (codec, *TEMPLATE, 500)
    assert NativeDataPath.of(None) is None


def test_a_cache_entry_is_learnt_for_the_table_it_was_decided_on() -> None:
    nat = native_path()
    packet = build_udp_packet(LOCAL, PEER, 4500, 4500, ESP)
    nat.learn(packet, 7, table_version=1)
    nat.learn(packet, 7, table_version=2)  # the table changed in between: cleared first
    assert len(nat.flows) == 1
    nat.sync(2)
    assert len(nat.flows) == 1


def test_without_a_sink_every_frame_is_an_event_and_nothing_is_injected() -> None:
    nat = native_path()
    got = events(nat, None)
    assert [e[0] for e in got].count("ESPPacket") == 2 and sum(e[1] for e in got) == 0
    assert nat.inject_batch.take() == []


def test_each_codec_is_a_new_deframer_for_its_role_and_frame_limit() -> None:
    nat = native_path()
    a = nat.codec(rfc9329.Role.RESPONDER, 100)
    b = nat.codec(rfc9329.Role.RESPONDER, 100)
    assert a is not b
    a.receive_data(rfc9329.PREFIX + rfc9329.frame_esp(ESP + bytes(200)))  # over 100 octets
    assert type(a.next_event()).__name__ == "PrefixReceived"
    err = a.next_event()
    assert type(err).__name__ == "ProtocolError" and "exceeds max_frame 100" in err.reason
    b.receive_data(rfc9329.PREFIX + rfc9329.frame_esp(ESP))  # b is untouched by a's error
    assert [type(b.next_event()).__name__ for _ in range(2)] == ["PrefixReceived", "ESPPacket"]
