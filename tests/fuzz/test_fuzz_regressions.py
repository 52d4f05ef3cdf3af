"""Regression tests for what fuzzing and the hostile-client lab test found.

Each test reproduces one finding with the smallest input found; it fails until the code
is fixed, then guards the fix.
"""

from __future__ import annotations

import struct

from tcpencap.core.router import Router, Send
from tcpencap.core.sa_sync import SaSync
from tcpencap.core.table import ConnectionTable
from tcpencap.wire.packet import addr_bytes, build_udp_packet

GW, CLIENT = addr_bytes("198.19.0.2"), addr_bytes("198.18.1.2")
SPI_I, SPI_R = bytes.fromhex("1111111111111111"), bytes.fromhex("2222222222222222")


def _gateway_with_sa() -> tuple[Router, int]:
    router = Router(ConnectionTable(), lambda addr: False)
    honest = router.add_gateway_conn(GW, CLIENT, 40000).conn_id
    router.table.bind_ike(honest, SPI_I)
    router.table.bind_esp(honest, 0xAAAAAAAA)
    return router, honest


def test_reconcile_esp_survives_a_non_text_child_state() -> None:
    """Found by bench/fuzz.py (target vici): SaSync.reconcile_esp raised
    ``TypeError: unhashable type: 'dict'`` (or 'list') at ``child.get("state") in _GONE``
    when a CHILD SA's "state" is not a string. Every other VICI value is type-checked
    (sync.py: "treat anything but a dict as empty"); in the daemon the exception ends the
    reconcile task, so the ESP SPIs are not reconciled that time."""
    router, honest = _gateway_with_sa()
    sync = SaSync(router)
    sas = [
        {
            "c1-gw": {
                "initiator-spi": SPI_I.hex(),
                "local-host": "198.19.0.2",
                "remote-host": "198.18.1.2",
                "child-sas": {"c1-gw-1": {"state": {}, "spi-out": "aaaaaaaa"}},
            }
        }
    ]
    sync.reconcile_esp(sas)  # must not raise
    sas[0]["c1-gw"]["child-sas"]["c1-gw-1"]["state"] = ["INSTALLED"]
    sync.reconcile_esp(sas)
    assert router.table.get(honest).esp_spis == {0xAAAAAAAA}


def _sa_init_response(spi_i: bytes) -> bytes:
    """charon's IKE_SA_INIT response (here with a notify only, as for NO_PROPOSAL_CHOSEN):
    it echoes the initiator SPI of the request, whoever sent that request."""
    notify = struct.pack("!BBHBBH", 0, 0, 8, 0, 0, 14)
    hdr = spi_i + SPI_R + struct.pack("!BBBBII", 41, 0x20, 34, 0x20, 0, 28 + len(notify))
    return bytes(4) + hdr + notify  # non-ESP marker: sent from port 4500


def test_sa_init_quoting_an_honest_spi_does_not_move_the_sa() -> None:
    """Found by the hostile-client lab test (tests/lab/test_e2e_hostile.py, attacker run from
    the honest client's own address, i.e. a host behind the same NAT): a new connection
    sends an IKE_SA_INIT request whose initiator SPI is the honest client's. charon answers
    it on the new connection, the answer echoes that SPI, and Router.outbound, seeing
    charon send an IKE SPI held by another connection of the same address pair to this
    endpoint (Bind.CONFLICT), calls _take_ike: the honest SA's IKE and ESP SPIs move to the
    attacker's connection and the honest connection is retired. In the lab: the gateway's
    ESP for the client went to the attacker (26 frames) and 25 of 59 pings were lost until
    the attacker closed. An unauthenticated IKE_SA_INIT answer must not move an SA (an
    authenticated move arrives as ike-update over VICI, or as an exchange protected by the
    SA's keys)."""
    router, honest = _gateway_with_sa()
    attacker = router.add_gateway_conn(GW, CLIENT, 40001).conn_id
    res = router.outbound(build_udp_packet(GW, CLIENT, 4500, 40001, _sa_init_response(SPI_I)))
    assert isinstance(res, Send) and res.conn_id == attacker  # the answer goes to its asker
    entry = router.table.get(honest)
    assert entry.ike_spis == {SPI_I}, "the honest IKE SA moved to the attacker's connection"
    assert entry.esp_spis == {0xAAAAAAAA}, "the honest ESP SPI moved with it"
    assert honest not in router.emptied, "the honest connection would be retired"
