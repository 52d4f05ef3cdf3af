"""nfq.ipset: the request layouts, the reply parser (also on garbage), and the client
against the kernel in a private namespace, checked with the ipset CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nfq.ipset import (
    CMD_ADD,
    CMD_DEL,
    NLMSG_ERROR,
    create_request,
    destroy_request,
    member_request,
    parse_replies,
    protocol_request,
)
from tests.labkit.e2e import private_netns

REPO = Path(__file__).resolve().parents[2]


def attrs_of(msg: bytes) -> list[tuple[int, bytes]]:
    """Top-level (type, payload) pairs after nlmsghdr and nfgenmsg, read independently."""
    out, pos = [], 20
    while pos < len(msg):
        alen, atype = struct.unpack_from("=HH", msg, pos)
        out.append((atype, msg[pos + 4 : pos + alen]))
        pos += (alen + 3) & ~3
    return out


def test_header_of_every_request():
    for msg, cmd in (
        (protocol_request(1), 1),
        (create_request(7, "X", 4, 1), 2),
        (destroy_request(7, "X", 1), 3),
        (member_request(CMD_ADD, 7, "X", "198.18.0.1", 1), 9),
        (member_request(CMD_DEL, 7, "X", "198.18.0.1", 1), 10),
    ):
        length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", msg)
        assert length == len(msg) and length % 4 == 0
        assert (mtype, flags, seq, pid) == ((6 << 8) | cmd, 0x5, 1, 0)  # REQUEST | ACK


def test_create_names_type_revision_and_family():
    msg = create_request(7, "TCPENCAP_OUT_6", 6, 3)
    assert msg[16] == 10  # nfgenmsg family NFPROTO_IPV6
    assert attrs_of(msg) == [
        (1, b"\x07"),
        (2, b"TCPENCAP_OUT_6\0"),
        (3, b"hash:ip\0"),
        (4, b"\x00"),
        (5, b"\x0a"),
        (7 | 0x8000, b""),
    ]


def test_add_carries_the_address_in_network_order():
    v4 = attrs_of(member_request(CMD_ADD, 6, "S", "198.18.0.1", 1))
    assert v4[:2] == [(1, b"\x06"), (2, b"S\0")]
    assert v4[2] == (7 | 0x8000, struct.pack("=HH", 12, 1 | 0x8000) + struct.pack(
        "=HH", 8, 1 | 0x4000) + bytes([198, 18, 0, 1]))  # fmt: skip
    v6 = attrs_of(member_request(CMD_DEL, 6, "S", "fd00::1", 1))
    inner = v6[2][1]
    assert struct.unpack_from("=HH", inner, 4) == (20, 2 | 0x4000)
    assert inner[8:] == bytes.fromhex("fd000000000000000000000000000001")


def test_names_are_bounded():
    with pytest.raises(ValueError):
        destroy_request(7, "x" * 32, 1)
    destroy_request(7, "x" * 31, 1)


def _nlmsg(mtype: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, seq, 0) + body + b"\0" * (-len(body) % 4)


def test_replies_ack_error_and_attributes():
    ack = _nlmsg(NLMSG_ERROR, 5, struct.pack("=i", 0) + b"\0" * 16)
    err = _nlmsg(NLMSG_ERROR, 6, struct.pack("=i", -4097) + b"\0" * 16)
    proto = _nlmsg((6 << 8) | 1, 4, b"\x02\x00\x00\x00" + struct.pack("=HH", 5, 1) + b"\x07\0\0\0")
    got = parse_replies(proto + ack + err)
    assert got == [((6 << 8) | 1, 4, None, {1: b"\x07"}), (2, 5, 0, {}), (2, 6, 4097, {})]


@given(st.binary(max_size=400))
def test_garbage_replies_never_raise(data):
    for mtype, _seq, err, attrs in parse_replies(data):
        assert isinstance(mtype, int) and (err is None or isinstance(err, int))
        assert isinstance(attrs, dict)


# --- against the kernel -------------------------------------------------------------------


@pytest.fixture
def ns():
    with private_netns("te-ipset", ("ip", "ipset")) as name:
        yield name


def test_client_against_the_kernel(ns):
    code = textwrap.dedent(
        """
        import json, subprocess
        from nfq.ipset import IpsetError, IpsetSocket
        out = {}

        def listing():
            return subprocess.run(["ipset", "save"], capture_output=True, text=True).stdout

        def refused(fn, *args):
            try:
                fn(*args)
            except IpsetError as exc:
                return exc.errno
            return 0

        s = IpsetSocket()
        out["protocol"] = s.protocol
        s.create("T4", 4)
        s.create("T6", 6)
        s.create("T4", 4)  # again: no error, like ipset create -exist
        for a in ("198.18.0.1", "198.18.0.2", "198.18.0.1"):
            s.add("T4", a)
        s.add("T6", "fd00::7")
        out["full"] = listing()
        s.delete("T4", "198.18.0.1")
        out["missing_set"] = refused(s.add, "NOPE", "198.18.0.1")
        out["wrong_family"] = refused(s.add, "T4", "fd00::1")
        out["after_delete"] = listing()
        s.destroy("T4")
        s.destroy("T6")
        out["end"] = listing()
        print(json.dumps(out))
        """
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["protocol"] in (6, 7)
    full = res["full"].splitlines()
    assert "create T4 hash:ip family inet hashsize 1024 maxelem 65536" in full[0]
    assert sorted(x for x in full if x.startswith("add ")) == [
        "add T4 198.18.0.1",
        "add T4 198.18.0.2",
        "add T6 fd00::7",
    ]
    assert "family inet6" in [x for x in full if x.startswith("create T6")][0]
    assert res["missing_set"] == 2  # ENOENT
    assert res["wrong_family"] > 4096  # an ipset-specific refusal
    assert sorted(x for x in res["after_delete"].splitlines() if x.startswith("add ")) == [
        "add T4 198.18.0.2",
        "add T6 fd00::7",
    ]
    assert res["end"] == ""


def test_endpoint_members_carry_port_and_udp():
    """hash:ip,port members (a gateway's TCP peers as UDP endpoints, issue 23 finding 5):
    the port in network order, protocol UDP."""
    created = attrs_of(create_request(7, "E", 4, 1, "hash:ip,port"))
    assert (3, b"hash:ip,port\0") in created and (4, b"\x01") in created  # the CLI lists it
    data = attrs_of(member_request(CMD_ADD, 7, "E", "198.18.0.1", 1, port=4500))[2][1]
    ip = struct.pack("=HH", 12, 1 | 0x8000) + struct.pack("=HH", 8, 1 | 0x4000)
    ip += bytes([198, 18, 0, 1])
    port = struct.pack("=HH", 6, 4 | 0x4000) + (4500).to_bytes(2, "big") + b"\0\0"
    assert data == ip + port + struct.pack("=HH", 5, 7) + b"\x11\0\0\0"


def test_endpoints_against_the_kernel(ns):
    code = textwrap.dedent(
        """
        import json, subprocess
        from nfq.ipset import IpsetSocket
        s = IpsetSocket()
        s.create("E4", 4, "hash:ip,port")
        s.create("E6", 6, "hash:ip,port")
        s.add("E4", "198.18.0.1", 4500)
        s.add("E4", "198.18.0.1", 45678)
        s.add("E6", "fd00::7", 500)
        s.delete("E4", "198.18.0.1", 4500)
        print(subprocess.run(["ipset", "save"], capture_output=True, text=True).stdout)
        """
    )
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout  # fmt: skip
    adds = sorted(line for line in out.splitlines() if line.startswith("add "))
    assert adds == ["add E4 198.18.0.1,udp:45678", "add E6 fd00::7,udp:500"], out
