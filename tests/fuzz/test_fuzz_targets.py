"""Short hypothesis runs of every fuzz target (tests/fuzz/fuzz_targets.py).

CI runs FUZZ_EXAMPLES examples per target (default 200, a few seconds in all); a long run is
``FUZZ_EXAMPLES=200000 pytest tests/fuzz`` or, coverage-guided, ``python bench/fuzz.py``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.fuzz_targets import TARGETS

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target(name: str) -> None:
    target = TARGETS[name]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(max_size=2048))
    def run(data: bytes) -> None:
        target(data)

    run()


def test_targets_reach_their_success_paths() -> None:
    """The targets are not vacuous: fixed inputs drive each parser past its error checks
    (a target that always bailed out early would pass every fuzz run)."""
    from tcpencap.core.router import Send
    from tcpencap.wire import ctcp, rfc9329
    from tests.fuzz.fuzz_targets import Bytes, _inner, _outbound_packet, _router

    seg = ctcp.encapsulate(_inner(Bytes(b"\x01\x10" + b"x" * 16 + b"\x01")), sport=1,
                           dport=10000, seq=1, ack=1)  # fmt: skip
    assert ctcp.read_segment(seg).decap is not None
    codec = rfc9329.StreamCodec(rfc9329.Role.RESPONDER)
    codec.receive_data(b"IKETCP" + rfc9329.frame_esp(b"\x01" * 12))
    assert isinstance(codec.next_event(), rfc9329.PrefixReceived)
    assert isinstance(codec.next_event(), rfc9329.ESPPacket)
    router, _ = _router(Bytes(b"\x00\x00"))
    # ESP from the gateway (198.19.0.2:4500) to the gateway connection's endpoint 40000.
    pkt = _outbound_packet(Bytes(bytes([2, 1, 1, 1, 2, 1, 1, 1, 1, 0, 8]) + b"\x01" * 8 + bytes(2)))
    assert isinstance(router.outbound(pkt), Send), pkt.hex()
