"""nfq.inject.RawInjector: a whole IP packet handed to the local stack through the raw
sockets arrives at the local UDP socket it is addressed to (IPv4 and IPv6, on loopback).
Needs root (raw sockets): fails loudly without."""

from __future__ import annotations

import fcntl
import os
import select
import socket
from collections.abc import Iterator

import pytest

from nfq.inject import RawInjector
from tcpencap.wire.packet import addr_bytes, build_udp_packet


@pytest.fixture
def injector() -> Iterator[RawInjector]:
    assert os.geteuid() == 0, "raw sockets need root"
    inj = RawInjector()
    try:
        yield inj
    finally:
        inj.close()


def receive(sock: socket.socket, timeout: float = 2.0) -> tuple[bytes, tuple]:
    """One datagram within ``timeout`` (a deadline, not a sleep)."""
    ready, _, _ = select.select([sock], [], [], timeout)
    assert ready, "nothing arrived"
    return sock.recvfrom(2048)


@pytest.mark.parametrize(
    ("family", "local"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_an_injected_packet_reaches_the_local_socket_it_is_for(
    injector: RawInjector, family: int, local: str
) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as rx:
        rx.bind((local, 0))
        port = rx.getsockname()[1]
        dst = addr_bytes(local)
        # the source is what charon sees as the peer: the packet's own, not the socket's
        injector.inject(build_udp_packet(dst, dst, 4500, port, b"ike over tcp"), dst)
        injector.inject(build_udp_packet(dst, dst, 4501, port, b"second"), dst)
        data, src = receive(rx)
        assert data == b"ike over tcp" and src[:2] == (local, 4500)
        assert receive(rx)[0] == b"second"


def test_fds_are_the_two_open_raw_sockets(injector: RawInjector) -> None:
    v4, v6 = injector.fds()
    for fd, family in ((v4, socket.AF_INET), (v6, socket.AF_INET6)):
        s = socket.socket(fileno=os.dup(fd))
        try:
            assert (s.family, s.type, s.proto) == (family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK  # never stalls the loop
        finally:
            s.close()


def test_close_closes_both_sockets() -> None:
    inj = RawInjector()
    v4, v6 = inj.fds()
    inj.close()
    for fd in (v4, v6):
        with pytest.raises(OSError):
            os.fstat(fd)
