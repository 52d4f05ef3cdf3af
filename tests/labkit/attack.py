"""Hostile RFC 9329 peers, run inside a lab namespace (``python -m tests.labkit.attack MODE``
with the checkout on PYTHONPATH): what a host that never authenticates can send a gateway.
Each mode is bounded in time, prints one JSON object of what it saw, and needs nothing but
the standard library.

  hold ADDR PORT SECONDS [BIND_ADDR BIND_PORT]
      one connection (from BIND_ADDR:BIND_PORT if given): prefix and an IKE_SA_INIT, then
      wait up to SECONDS for the gateway to close it; {"port", "how", "answered"}
  flood ADDR PORT SECONDS FRAME_HEX
      for SECONDS: connect, prefix and an IKE_SA_INIT, then FRAME_HEX repeated as fast as
      the socket takes it until the gateway closes; again; {"connections", "octets", "cut"}
  pending ADDR PORT SECONDS SOURCES_JSON PER_SOURCE
      PER_SOURCE idle connections from each source address, each opened again as soon as
      the gateway refuses or closes it, for SECONDS; {"opened", "refused", "closed"}
  probe ADDR PORT SECONDS
      two connections, one after the other, each waiting up to SECONDS for the gateway to close it:
      "no-payload", an IKE header announcing an SA payload that is not there; "too-big",
      an IKE_SA_INIT, then a 65508-octet ESP frame (longer than any IPv4 UDP datagram) and
      16 empty frames; {name: {"how", "elapsed"}}
  oneshot ADDR PORT COUNT SOURCES_JSON
      COUNT connections from each source address, one after another: prefix and an
      IKE_SA_INIT, wait for charon's answer (or 2 s), hang up; {"answered", "closed"}
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
import time
from typing import Any

PREFIX = b"IKETCP"


def frame(payload: bytes) -> bytes:
    return struct.pack("!H", len(payload) + 2) + payload


def ike_frame(msg: bytes) -> bytes:
    return frame(bytes(4) + msg)


def sa_init(spi_i: bytes | None = None) -> bytes:
    """An IKEv2 IKE_SA_INIT request charon answers: SA (aes128/sha256/sha256/x25519), KE,
    Nonce, each with its generic payload header."""

    def tr(last: bool, ttype: int, tid: int, attr: bytes = b"") -> bytes:
        return struct.pack("!BBHBBH", 0 if last else 3, 0, 8 + len(attr), ttype, 0, tid) + attr

    trs = tr(False, 1, 12, b"\x80\x0e\x00\x80") + tr(False, 2, 5) + tr(False, 3, 12)
    trs += tr(True, 4, 31)
    prop = struct.pack("!BBHBBBB", 0, 0, 8 + len(trs), 1, 1, 0, 4) + trs
    sa = struct.pack("!BBH", 34, 0, 4 + len(prop)) + prop
    ke = struct.pack("!BBHHH", 40, 0, 8 + 32, 31, 0) + os.urandom(32)
    nonce = struct.pack("!BBH", 0, 0, 4 + 32) + os.urandom(32)
    body = sa + ke + nonce
    spi = spi_i or os.urandom(8)
    return spi + bytes(8) + struct.pack("!BBBBII", 33, 0x20, 34, 0x08, 0, 28 + len(body)) + body


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _open(addr: str, port: int, bind: tuple[str, int] | None, timeout: float) -> socket.socket:
    s = socket.socket(_family(addr), socket.SOCK_STREAM)
    s.settimeout(timeout)
    if bind is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(bind)
    s.connect((addr, port))
    return s


def _wait_close(s: socket.socket, seconds: float) -> tuple[str, int]:
    """Read until the gateway closes or ``seconds`` pass: (how, octets received)."""
    end = time.monotonic() + seconds
    got = 0
    try:
        while True:
            s.settimeout(max(0.01, end - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                return "eof", got
            got += len(chunk)
    except TimeoutError:
        return "still-open", got
    except ConnectionResetError:
        return "reset", got


def hold(addr: str, port: int, seconds: float, bind: tuple[str, int] | None) -> dict[str, Any]:
    try:
        s = _open(addr, port, bind, 5.0)
    except OSError as exc:
        return {"how": f"connect-failed: {exc.strerror}"}
    with s:
        sport = s.getsockname()[1]
        s.sendall(PREFIX + ike_frame(sa_init()))
        how, got = _wait_close(s, seconds)
    return {"port": sport, "how": how, "answered": got > 0}


def flood(addr: str, port: int, seconds: float, unit: bytes) -> dict[str, Any]:
    blob = unit * max(1, 65536 // len(unit))
    end = time.monotonic() + seconds
    stats = {"connections": 0, "octets": 0, "cut": 0, "refused": 0}
    while time.monotonic() < end:
        try:
            s = _open(addr, port, None, 2.0)
        except OSError:
            stats["refused"] += 1
            time.sleep(0.05)
            continue
        stats["connections"] += 1
        with s:
            try:
                s.sendall(PREFIX + ike_frame(sa_init()))
                while time.monotonic() < end:
                    stats["octets"] += s.send(blob)
            except TimeoutError:
                continue  # the gateway stopped reading: keep it busy from a new one
            except OSError:
                stats["cut"] += 1
    return stats


async def _pending(addr: str, port: int, seconds: float, sources: list[str], per: int) -> Any:
    stats = {"opened": 0, "refused": 0, "closed": 0}
    end = time.monotonic() + seconds

    async def one(src: str) -> None:
        while time.monotonic() < end:
            try:
                sock = socket.socket(_family(addr), socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.bind((src, 0))
                await asyncio.wait_for(
                    asyncio.get_running_loop().sock_connect(sock, (addr, port)), 2
                )
                r, w = await asyncio.open_connection(sock=sock)
            except (TimeoutError, OSError):
                sock.close()
                stats["refused"] += 1
                await asyncio.sleep(0.05)
                continue
            stats["opened"] += 1
            try:
                left = max(0.01, end - time.monotonic())
                if await asyncio.wait_for(r.read(1), left) == b"":
                    stats["closed"] += 1
            except TimeoutError:
                pass
            except OSError:
                stats["closed"] += 1
            w.close()

    await asyncio.gather(*(one(src) for src in sources for _ in range(per)))
    return stats


def oneshot(addr: str, port: int, count: int, sources: list[str]) -> dict[str, Any]:
    stats = {"answered": 0, "closed": 0, "refused": 0}
    for src in sources:
        for _ in range(count):
            try:
                s = _open(addr, port, (src, 0), 5.0)
            except OSError:
                stats["refused"] += 1
                continue
            with s:
                s.sendall(PREFIX + ike_frame(sa_init()))
                s.settimeout(2.0)
                try:
                    if s.recv(65536):
                        stats["answered"] += 1
                except (TimeoutError, OSError):
                    pass
            stats["closed"] += 1
    return stats


def probe_cases() -> dict[str, bytes]:
    header = sa_init()[:16] + struct.pack("!BBBBII", 33, 0x20, 34, 0x08, 0, 28)
    big = frame(b"\x12\x34\x56\x78" + bytes(65504))
    return {
        "no-payload": PREFIX + ike_frame(header),
        "too-big": PREFIX + ike_frame(sa_init()) + big + frame(b"") * 16,
    }


def probe(addr: str, port: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def one(name: str, data: bytes) -> None:
        with _open(addr, port, None, 5.0) as s:
            t0 = time.monotonic()
            s.sendall(data)
            how, _ = _wait_close(s, seconds)
        out[name] = {"how": how, "elapsed": round(time.monotonic() - t0, 2)}

    # One after the other, in the cases' order: both come from one source, and the gateway
    # cools down a source whose connection it cut for invalid frames ("too-big"), which would
    # refuse a "no-payload" connection accepted after it (seen on a loaded host).
    for name, data in probe_cases().items():
        one(name, data)
    return out


def main(argv: list[str]) -> dict[str, Any]:
    mode, addr, port = argv[0], argv[1], int(argv[2])
    if mode == "hold":
        bind = (argv[4], int(argv[5])) if len(argv) > 5 else None
        return hold(addr, port, float(argv[3]), bind)
    if mode == "flood":
        return flood(addr, port, float(argv[3]), bytes.fromhex(argv[4]))
    if mode == "pending":
        return asyncio.run(_pending(addr, port, float(argv[3]), json.loads(argv[4]), int(argv[5])))
    if mode == "probe":
        return probe(addr, port, float(argv[3]))
    if mode == "oneshot":
        return oneshot(addr, port, int(argv[3]), json.loads(argv[4]))
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
