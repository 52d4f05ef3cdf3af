"""tcpencap.core.ike_guard: which of a TCP client's IKE packets to unsteered addresses are
dropped (MOBIKE probes of a TCP peer's SA) and which go out (everything else)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tcpencap.core.ike_guard import must_drop, tcp_ike_spis
from tcpencap.wire.ike import NON_ESP_MARKER
from tcpencap.wire.packet import addr_bytes, build_udp_packet

C, G, G2, OTHER = "198.18.1.2", "198.19.0.2", "198.19.0.3", "198.19.0.9"
C6, G6 = "fd00:18:1::2", "fd00:19::3"
TCP_SPI = bytes.fromhex("1122334455667788")
UDP_SPI = bytes.fromhex("8877665544332211")


def ike(spi_i: bytes, exchange: int = 37) -> bytes:
    body = b"\x00" * 8
    return (
        spi_i
        + bytes(8)
        + struct.pack("!BBBBII", 46, 0x20, exchange, 0x08, 1, 28 + len(body))
        + body
    )


def sent(dst: str, payload: bytes, sport: int = 4500, dport: int = 4500, src: str = C) -> bytes:
    return build_udp_packet(addr_bytes(src), addr_bytes(dst), sport, dport, payload)


def is_tcp(spi: bytes) -> bool:
    return spi == TCP_SPI


def test_a_mobike_probe_of_a_tcp_sa_to_another_gateway_address_is_dropped() -> None:
    assert must_drop(sent(G2, NON_ESP_MARKER + ike(TCP_SPI)), is_tcp)
    assert must_drop(sent(G6, NON_ESP_MARKER + ike(TCP_SPI), src=C6), is_tcp)
    # behind a NAT that moved the peer's port: the marker still goes with charon's 4500
    assert must_drop(sent(G2, NON_ESP_MARKER + ike(TCP_SPI), dport=61000), is_tcp)
    assert must_drop(sent(G2, ike(TCP_SPI), sport=500, dport=500), is_tcp)


def test_other_sas_and_everything_that_is_not_ike_go_out() -> None:
    assert not must_drop(sent(OTHER, NON_ESP_MARKER + ike(UDP_SPI)), is_tcp)
    assert not must_drop(sent(OTHER, ike(UDP_SPI, exchange=34), sport=500, dport=500), is_tcp)
    assert not must_drop(sent(OTHER, b"\xff"), is_tcp)  # NAT keepalive
    assert not must_drop(sent(OTHER, TCP_SPI[:4] + b"\x00" * 60), is_tcp)  # ESP
    assert not must_drop(b"\x45\x00", is_tcp)
    assert not must_drop(b"", is_tcp)


def test_tcp_spis_come_from_the_sas_with_tcp_peers() -> None:
    sas = [
        {"home": {"remote-host": G, "initiator-spi": TCP_SPI.hex()}},
        {"other": {"remote-host": OTHER, "initiator-spi": UDP_SPI.hex()}},
        {"junk": {"remote-host": G, "initiator-spi": "zz"}},
        {"junk2": "not a dict"},
    ]
    assert tcp_ike_spis(sas, [addr_bytes(G)]) == {TCP_SPI}
    assert tcp_ike_spis(sas, []) == set()


@given(st.binary(max_size=120), st.sampled_from([500, 4500, 61000]))
def test_any_payload_is_decided_without_raising(payload: bytes, dport: int) -> None:
    verdict = must_drop(sent(G2, payload, dport=dport), is_tcp)
    assert isinstance(verdict, bool)
    if verdict:  # only ever for an IKE header carrying the TCP SA's SPI
        assert TCP_SPI in payload


@given(st.binary(max_size=200))
def test_any_packet_is_decided_without_raising(packet: bytes) -> None:
    assert must_drop(packet, is_tcp) in (True, False)
