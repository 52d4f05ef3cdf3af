"""The few ipset commands tcpencap needs, spoken over netlink (NFNL_SUBSYS_IPSET).

Messages are built and parsed by pure functions; :class:`IpsetSocket` is a small blocking
client around them (each request is acknowledged before the call returns, so a peer is in
its set before charon's next packet). A library would do the same with a second event loop
and ~10 MB of imports (include/uapi/linux/netfilter/ipset/ip_set.h has the numbers).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Callable

from .netlink import NFGENMSG, NLATTR, NLM_F_ACK, NLM_F_REQUEST, NLMSGHDR, attr, nfnl_message

NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
CMD_PROTOCOL, CMD_CREATE, CMD_DESTROY, CMD_SWAP, CMD_LIST, CMD_ADD, CMD_DEL = 1, 2, 3, 6, 7, 9, 10
ATTR_PROTOCOL, ATTR_SETNAME, ATTR_TYPENAME, ATTR_REVISION, ATTR_FAMILY, ATTR_DATA = 1, 2, 3, 4, 5, 7
ATTR_SETNAME2 = ATTR_TYPENAME  # the second set of a swap
ATTR_ADT = 8  # a listing's members, each an ATTR_DATA
ATTR_IP, ATTR_IPADDR_IPV4, ATTR_IPADDR_IPV6 = 1, 1, 2
ATTR_PORT, ATTR_PROTO = 4, 7  # inside ATTR_DATA, for hash:ip,port
IPPROTO_UDP = 17
REVISION = {"hash:ip": 0, "hash:ip,port": 1}
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NLMSG_ERROR = 2  # acknowledgement or refusal
NFPROTO = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6
PROTOCOL_MIN, PROTOCOL_MAX = 6, 7  # what this module speaks
MAXNAMELEN = 32  # with the terminating NUL
IPSET_ERR_PRIVATE = 4096

_NLMSGERR = struct.Struct("=i")


class IpsetError(OSError):
    """A request the kernel refused; ``errno`` is its (positive) error code."""


def _name(name: str) -> bytes:
    raw = name.encode() + b"\0"
    if len(raw) > MAXNAMELEN:
        raise ValueError(f"ipset name longer than {MAXNAMELEN - 1}: {name!r}")
    return attr(ATTR_SETNAME, raw)


def message(cmd: int, attrs: bytes, seq: int, family: int = 0) -> bytes:
    """An acknowledged ipset request: nlmsghdr, nfgenmsg, then ``attrs``."""
    flags = NLM_F_REQUEST | NLM_F_ACK
    return nfnl_message(NFNL_SUBSYS_IPSET, cmd, attrs, seq=seq, flags=flags, family=family)


def protocol_request(seq: int) -> bytes:
    return message(CMD_PROTOCOL, attr(ATTR_PROTOCOL, bytes([PROTOCOL_MIN])), seq)


def create_request(protocol: int, name: str, family: int, seq: int, kind: str = "hash:ip") -> bytes:
    """A set of ``kind`` (hash:ip for whole addresses, hash:ip,port for UDP endpoints) for
    ``family`` 4 or 6, at the oldest revision both every kernel with ipset and the ipset
    CLI know (the CLI cannot list a hash:ip,port of revision 0)."""
    attrs = b"".join(
        (
            attr(ATTR_PROTOCOL, bytes([protocol])),
            _name(name),
            attr(ATTR_TYPENAME, kind.encode() + b"\0"),
            attr(ATTR_REVISION, bytes([REVISION[kind]])),
            attr(ATTR_FAMILY, bytes([NFPROTO[family]])),
            attr(ATTR_DATA | NLA_F_NESTED, b""),
        )
    )
    return message(CMD_CREATE, attrs, seq, NFPROTO[family])


def destroy_request(protocol: int, name: str, seq: int) -> bytes:
    return message(CMD_DESTROY, attr(ATTR_PROTOCOL, bytes([protocol])) + _name(name), seq)


def swap_request(protocol: int, name: str, other: str, seq: int) -> bytes:
    """Exchange two sets of the same type: a rule matching ``name`` sees ``other``'s
    members from this instant on, with no moment in between."""
    attrs = attr(ATTR_PROTOCOL, bytes([protocol])) + _name(name)
    attrs += attr(ATTR_SETNAME2, other.encode() + b"\0")
    return message(CMD_SWAP, attrs, seq)


def list_request(protocol: int, name: str, seq: int) -> bytes:
    attrs = attr(ATTR_PROTOCOL, bytes([protocol])) + _name(name)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return nfnl_message(NFNL_SUBSYS_IPSET, CMD_LIST, attrs, seq=seq, flags=flags)


def _nested(data: bytes) -> list[tuple[int, bytes]]:
    """The attributes inside a nested one, in order (types without the flag bits)."""
    out = []
    pos = 0
    while pos + NLATTR.size <= len(data):
        alen, atype = NLATTR.unpack_from(data, pos)
        if alen < NLATTR.size:
            break
        out.append((atype & 0x3FFF, data[pos + NLATTR.size : pos + alen]))
        pos += alen + (-alen % 4)
    return out


def members_of(adt: bytes) -> list[str]:
    """The addresses of a listing's ATTR_ADT: ``ADDR`` or, for a set with ports,
    ``ADDR,PORT`` (the ipset tool's spelling)."""
    out = []
    for atype, entry in _nested(adt):
        if atype != ATTR_DATA:
            continue
        addr, port = None, None
        for etype, value in _nested(entry):
            if etype == ATTR_IP:
                for kind, raw in _nested(value):
                    if kind in (ATTR_IPADDR_IPV4, ATTR_IPADDR_IPV6):
                        addr = str(ipaddress.ip_address(raw))
            elif etype == ATTR_PORT and len(value) == 2:
                port = struct.unpack("!H", value)[0]
        if addr is not None:
            out.append(addr if port is None else f"{addr},{port}")
    return out


def member_request(cmd: int, protocol: int, name: str, addr: str, seq: int, port: int = 0) -> bytes:
    """ADD or DEL of one address (its family picks the attribute), or with ``port`` of one
    UDP endpoint (a hash:ip,port member)."""
    ip = ipaddress.ip_address(addr)
    kind = ATTR_IPADDR_IPV4 if ip.version == 4 else ATTR_IPADDR_IPV6
    data = attr(ATTR_IP | NLA_F_NESTED, attr(kind | NLA_F_NET_BYTEORDER, ip.packed))
    if port:
        data += attr(ATTR_PORT | NLA_F_NET_BYTEORDER, port.to_bytes(2, "big"))
        data += attr(ATTR_PROTO, bytes([IPPROTO_UDP]))
    attrs = attr(ATTR_PROTOCOL, bytes([protocol])) + _name(name)
    attrs += attr(ATTR_DATA | NLA_F_NESTED, data)
    return message(cmd, attrs, seq, NFPROTO[ip.version])


def parse_replies(data: bytes) -> list[tuple[int, int, int | None, dict[int, bytes]]]:
    """(type, seq, error or None, top-level attributes) of every message in ``data``;
    error is 0 for an acknowledgement and a positive code for a refusal."""
    out = []
    off = 0
    while off + NLMSGHDR.size <= len(data):
        length, mtype, _flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size or off + length > len(data):
            break
        body = data[off + NLMSGHDR.size : off + length]
        if mtype == NLMSG_ERROR:
            (err,) = _NLMSGERR.unpack_from(body, 0)
            out.append((mtype, seq, -err, {}))
        else:
            attrs: dict[int, bytes] = {}
            pos = NFGENMSG.size
            while pos + NLATTR.size <= len(body):
                alen, atype = NLATTR.unpack_from(body, pos)
                if alen < NLATTR.size:
                    break
                attrs[atype & 0x3FFF] = body[pos + NLATTR.size : pos + alen]
                pos += alen + (-alen % 4)
            out.append((mtype, seq, None, attrs))
        off += length + (-length % 4)
    return out


def error_text(code: int) -> str:
    if code >= IPSET_ERR_PRIVATE:
        return f"ipset error {code}"
    return os.strerror(code)


class IpsetSocket:
    """A blocking netlink socket for ipset requests in the current network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(5.0)
        self._seq = 0
        reply = self._request(protocol_request)
        kernel = reply.get(ATTR_PROTOCOL, bytes([PROTOCOL_MIN]))[0]
        if kernel < PROTOCOL_MIN:
            raise IpsetError(0, f"kernel ipset protocol {kernel} is older than {PROTOCOL_MIN}")
        self.protocol = min(kernel, PROTOCOL_MAX)

    def _request(self, build: Callable[[int], bytes]) -> dict[int, bytes]:
        """Send the request ``build(seq)`` makes; the attributes of its reply, if any."""
        self._seq += 1
        seq = self._seq
        self._sock.send(build(seq))
        found: dict[int, bytes] = {}
        while True:
            for _mtype, rseq, err, attrs in parse_replies(self._sock.recv(65536)):
                if rseq != seq:
                    continue
                if err is None:
                    found = attrs
                elif err == 0:
                    return found
                else:
                    raise IpsetError(err, error_text(err))

    def create(self, name: str, family: int, kind: str = "hash:ip") -> None:
        self._request(lambda seq: create_request(self.protocol, name, family, seq, kind))

    def destroy(self, name: str) -> None:
        self._request(lambda seq: destroy_request(self.protocol, name, seq))

    def swap(self, name: str, other: str) -> None:
        self._request(lambda seq: swap_request(self.protocol, name, other, seq))

    def members(self, name: str) -> list[str]:
        """Every member of ``name`` (an IpsetError if there is no such set)."""
        self._seq += 1
        seq = self._seq
        self._sock.send(list_request(self.protocol, name, seq))
        found: list[str] = []
        while True:
            data = self._sock.recv(1 << 20)
            off = 0
            while off + NLMSGHDR.size <= len(data):
                length, mtype, _flags, rseq, _pid = NLMSGHDR.unpack_from(data, off)
                if length < NLMSGHDR.size:
                    break
                body = data[off + NLMSGHDR.size : off + length]
                off += length + (-length % 4)
                if rseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return found
                if mtype == NLMSG_ERROR:
                    (err,) = _NLMSGERR.unpack_from(body, 0)
                    if err:
                        raise IpsetError(-err, error_text(-err))
                    return found
                for atype, value in _nested(body[NFGENMSG.size :]):
                    if atype == ATTR_ADT:
                        found += members_of(value)

    def add(self, name: str, addr: str, port: int = 0) -> None:
        self._request(lambda seq: member_request(CMD_ADD, self.protocol, name, addr, seq, port))

    def delete(self, name: str, addr: str, port: int = 0) -> None:
        self._request(lambda seq: member_request(CMD_DEL, self.protocol, name, addr, seq, port))

    def close(self) -> None:
        self._sock.close()
