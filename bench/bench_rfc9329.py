"""Throughput of the RFC 9329 codec: frames/s encoding and decoding (not a test).

Run from the repo root: ``python3 -m bench.bench_rfc9329 [--count N]``. Decoding is measured
two ways: the stream fed in 64 KiB reads (a busy bulk connection) and one frame per read
(what a lightly loaded socket tends to deliver).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from tcpencap.wire.rfc9329 import NeedData, Role, StreamCodec, frame_esp, frame_ike

CHUNK = 64 * 1024
IKE_MSG = bytes(range(1, 9)) + bytes(8) + b"\x21\x20\x23\x08" + bytes(8) + bytes(272)  # 300 B
ESP_PKT = b"\xc1\x2a\x00\x01" + b"\x00\x00\x00\x01" + bytes(1392)  # 1400 B


def best_of(runs: int, fn: Callable[[], int]) -> float:
    """Best frames/s over a few runs (least disturbed by the rest of the machine)."""
    best = 0.0
    for _ in range(runs):
        t0 = time.perf_counter()
        frames = fn()
        best = max(best, frames / (time.perf_counter() - t0))
    return best


def encode(count: int, frame: Callable[[bytes], bytes], payload: bytes) -> Callable[[], int]:
    def run() -> int:
        for _ in range(count):
            frame(payload)
        return count

    return run


def decode_chunks(stream: bytes, count: int) -> Callable[[], int]:
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]

    def run() -> int:
        codec = StreamCodec(Role.ORIGINATOR)
        got = 0
        for chunk in chunks:
            codec.receive_data(chunk)
            while not isinstance(codec.next_event(), NeedData):
                got += 1
        assert got == count, got
        return got

    return run


def decode_per_frame(frame: bytes, count: int) -> Callable[[], int]:
    def run() -> int:
        codec = StreamCodec(Role.ORIGINATOR)
        got = 0
        for _ in range(count):
            codec.receive_data(frame)
            while not isinstance(codec.next_event(), NeedData):
                got += 1
        assert got == count, got
        return got

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200_000, help="frames per run")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    n = args.count
    codec = StreamCodec(Role.ORIGINATOR)
    cases = [
        ("encode IKE 300 B  frame_ike", encode(n, frame_ike, IKE_MSG)),
        ("encode IKE 300 B  send_ike", encode(n, codec.send_ike, IKE_MSG)),
        ("encode ESP 1400 B frame_esp", encode(n, frame_esp, ESP_PKT)),
        ("encode ESP 1400 B send_esp", encode(n, codec.send_esp, ESP_PKT)),
    ]
    for name, payload, frame in (
        ("IKE 300 B", IKE_MSG, frame_ike),
        ("ESP 1400 B", ESP_PKT, frame_esp),
    ):
        one = frame(payload)
        cases.append((f"decode {name:<10} 64 KiB reads", decode_chunks(one * n, n)))
        cases.append((f"decode {name:<10} 1 frame/read", decode_per_frame(one, n)))
    print(f"{n} frames per run, best of {args.runs}")
    for name, fn in cases:
        rate = best_of(args.runs, fn)
        print(f"  {name:<34} {rate:>12,.0f} frames/s")


if __name__ == "__main__":
    main()
