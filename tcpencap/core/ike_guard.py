"""On a TCP client: which of charon's IKE packets to unsteered addresses must not leave (pure).

The steering set holds the addresses a client knows its TCP peers by. MOBIKE (RFC 4555) also
sends IKE to other addresses of the same SA: probes to the gateway's additional addresses,
or from a new local address. Those packets would leave as UDP, and on a network that blocks
or watches UDP that one packet gives the user away. IKE SPIs are in the clear, so the packet
itself says which SA it belongs to: one of a TCP peer's SAs is dropped (MOBIKE then finds
that path dead, and the SA stays on TCP), anything else goes out as before.

Only IKE is asked (UDP 500, and 4500 behind the non-ESP marker, picked by the kernel rule):
ESP to a new address only follows an address update that IKE completed on that path, which
these drops prevent, and so ESP, keepalives and other peers' traffic never reach the queue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from tcpencap.core.vici_facts import address, as_dict, ike_spi
from tcpencap.wire.ike import NATT_PORT, Kind, classify_udp_payload
from tcpencap.wire.packet import PROTO_UDP, PacketError, parse_ip, parse_udp


def tcp_ike_spis(sas: list[dict[str, Any]], tcp_peers: Iterable[bytes]) -> set[bytes]:
    """The initiator SPIs (what every IKE header carries first) of charon's IKE SAs with
    a TCP peer, from a list-sas answer."""
    peers = set(tcp_peers)
    spis: set[bytes] = set()
    for item in sas:
        for sa in as_dict(item).values():
            sa = as_dict(sa)
            if address(sa.get("remote-host")) in peers:
                spi = ike_spi(sa.get("initiator-spi"))
                if spi is not None:
                    spis.add(spi)
    return spis


def must_drop(packet: bytes, is_tcp_sa: Callable[[bytes], bool]) -> bool:
    """True for an IKE packet of a TCP peer's SA (by its initiator SPI); False for
    anything else, including what cannot be read (it names no SA of a TCP peer)."""
    try:
        ip = parse_ip(packet)
        if ip.proto != PROTO_UDP:
            return False
        udp = parse_udp(ip.payload)
    except PacketError:
        return False
    # The non-ESP marker goes with charon's 4500 whatever port the peer's NAT chose.
    port = NATT_PORT if NATT_PORT in (udp.sport, udp.dport) else udp.dport
    c = classify_udp_payload(port, udp.payload)
    if c.kind is not Kind.IKE or c.ike is None:
        return False
    return is_tcp_sa(c.ike.spi_i)
