"""charon's inbound SAs as the gateway keeps them (tcpencap.core.inbound_sas): learnt from
events, replaced by list-sas, asked by SPI and peer."""

from __future__ import annotations

from tcpencap.core.inbound_sas import InboundSas, inbound_ports

PEER = bytes([198, 18, 1, 2])


def child_event(spi_in: str, port: str = "50000", new: str | None = None) -> dict:
    child = {"spi-in": spi_in, "spi-out": "0badf00d"}
    if new is not None:
        child["new"] = {"spi-in": new, "spi-out": "0badf00e"}
    ike = {"remote-host": "198.18.1.2", "remote-port": port, "child-sas": {"c-1": child}}
    return {"up": "yes", "conn": ike}


def test_an_up_event_teaches_spi_peer_and_port_and_down_forgets() -> None:
    sas = InboundSas()
    sas.learn("child-updown", True, child_event("c0ffee01"))
    assert sas.of_peer(0xC0FFEE01, PEER) and not sas.of_peer(0xC0FFEE01, bytes(4))
    assert sas.port(0xC0FFEE01) == 50000
    sas.learn("child-updown", False, {"conn": child_event("c0ffee01")["conn"]})
    assert not sas.of_peer(0xC0FFEE01, PEER) and sas.port(0xC0FFEE01) == 0


def test_list_sas_replaces_everything() -> None:
    sas = InboundSas()
    sas.learn("child-updown", True, child_event("c0ffee01"))
    sas.replace([child_event("c0ffee02", "41000")])
    assert sas.spis == {0xC0FFEE02: PEER} and sas.ports == {0xC0FFEE02: 41000}


def test_ports_include_a_rekeys_new_spi() -> None:
    assert inbound_ports([child_event("c0ffee01", new="c0ffee03")]) == {
        0xC0FFEE01: 50000,
        0xC0FFEE03: 50000,
    }
