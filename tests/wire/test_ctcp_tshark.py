"""Wireshark's TCPENCAP dissector as a third-party check of our cTCP segments.

Core-produced segments are written to a pcap (raw IP link type) and decoded with tshark;
the trailer fields, the inner IKE SPI / ESP SPI and the checksums must read back as built.
Without tshark this test fails: the check is part of the acceptance criteria.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from tcpencap.wire.ctcp import encapsulate
from tcpencap.wire.packet import PROTO_ESP, addr_bytes, build_ipv4, build_ipv6, build_udp

V4A, V4B = addr_bytes("198.18.0.1"), addr_bytes("198.18.1.2")
V6A, V6B = addr_bytes("fd00::1"), addr_bytes("fd00:1::2")
SPI_I = bytes.fromhex("0102030405060708")
ESP_SPI = 0xC0FFEE01
LINKTYPE_RAW = 101
FIELDS = [
    "tcpencap.magic",
    "tcpencap.proto",
    "tcpencap.magic2",
    "tcpencap.zero",
    "tcpencap.seq",
    "isakmp.ispi",
    "esp.spi",
    "esp.sequence",
    "udp.srcport",
    "udp.dstport",
    "tcp.checksum.status",
    "ip.checksum.status",
]


def _ike_msg() -> bytes:
    """A bare IKEv1 Main Mode header (no payloads): enough for the ISAKMP dissector."""
    return SPI_I + bytes(8) + bytes([0, 0x10, 2, 0]) + bytes(4) + struct.pack("!I", 28)


def _ike(v6: bool) -> bytes:
    src, dst = (V6A, V6B) if v6 else (V4A, V4B)
    udp = build_udp(src, dst, 500, 500, _ike_msg())
    if v6:
        return build_ipv6(src, dst, 17, udp)
    return build_ipv4(src, dst, 17, udp, ident=0x1234)


def _esp(v6: bool, seq: int) -> bytes:
    body = struct.pack("!II", ESP_SPI, seq) + bytes(range(64))
    if v6:
        return build_ipv6(V6A, V6B, PROTO_ESP, body)
    return build_ipv4(V4A, V4B, PROTO_ESP, body)


def _write_pcap(path: Path, packets: list[bytes]) -> None:
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW))
        for i, p in enumerate(packets):
            f.write(struct.pack("<IIII", i, 0, len(p), len(p)) + p)


def test_tshark_decodes_ctcp_segments(tmp_path: Path) -> None:
    tshark = shutil.which("tshark")
    assert tshark, "tshark is required for this test (apt-get install tshark)"
    inner = [_ike(False), _esp(False, 1), _ike(True), _esp(True, 2)]
    # Distinct source ports: one TCP stream per packet, so none looks like a retransmission.
    segs = [
        encapsulate(p, sport=40000 + i, dport=10000, seq=1000, ack=2000)
        for i, p in enumerate(inner)
    ]
    pcap = tmp_path / "ctcp.pcap"
    _write_pcap(pcap, segs)
    cmd = [tshark, "-n", "-r", str(pcap), "-d", "tcp.port==10000,tcpencap"]
    cmd += ["-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE"]
    cmd += ["-T", "fields", "-E", "separator=|"]
    for f in FIELDS:
        cmd += ["-e", f]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    rows = [dict(zip(FIELDS, line.split("|"), strict=True)) for line in res.stdout.splitlines()]
    assert len(rows) == 4, res.stdout
    for i, row in enumerate(rows):
        assert row["tcpencap.magic"] == "21456c6910"
        assert row["tcpencap.magic2"] == "0100"
        assert row["tcpencap.zero"] == "00000000"
        assert row["tcp.checksum.status"] == "1"  # 1 = good
        assert row["ip.checksum.status"] == ("1" if i < 2 else "")  # IPv6 has none
    ike4, esp4, ike6, esp6 = rows
    for row, seq in ((ike4, "0x1234"), (ike6, "0x0000")):
        assert row["tcpencap.proto"] == "0x11"
        assert row["tcpencap.seq"] == seq
        assert row["isakmp.ispi"] == SPI_I.hex()
        assert (row["udp.srcport"], row["udp.dstport"]) == ("500", "500")
        assert row["esp.spi"] == ""
    for row, seq in ((esp4, "1"), (esp6, "2")):
        assert row["tcpencap.proto"] == "0x32"
        assert row["tcpencap.seq"] == "0x0000"
        assert row["esp.spi"] == f"0x{ESP_SPI:08x}"
        assert row["esp.sequence"] == seq
        assert row["isakmp.ispi"] == ""
