"""The send-buffer rule (tcpencap/core/send_buffer.py): the bound ESP and IKE are held to,
the flush-before-close deadline, and the native writer applying the same rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.core.send_buffer import (
    ESP_CONGESTED,
    FLUSH_BEFORE_CLOSE,
    IKE_CONGESTED,
    IKE_OVERSHOOT,
    congested,
    flush_deadline,
    ike_limit,
)
from tcpencap.native import load

LIMIT = 1000


def test_up_to_the_bound_everything_is_queued() -> None:
    assert congested(0, LIMIT, False) is None
    assert congested(LIMIT, LIMIT, False) is None
    assert congested(LIMIT, LIMIT, True) is None


def test_over_the_bound_esp_is_dropped_and_ike_overshoots() -> None:
    assert congested(LIMIT + 1, LIMIT, False) == ESP_CONGESTED
    assert congested(LIMIT + 1, LIMIT, True) is None
    assert ike_limit(LIMIT) == IKE_OVERSHOOT * LIMIT == 4 * LIMIT
    assert congested(ike_limit(LIMIT), LIMIT, True) is None
    assert congested(ike_limit(LIMIT) + 1, LIMIT, True) == IKE_CONGESTED
    assert congested(ike_limit(LIMIT) + 1, LIMIT, False) == ESP_CONGESTED


def test_flush_before_close_waits_only_for_octets_that_can_leave() -> None:
    assert flush_deadline(10.0, pending=True, failed=False) == 10.0 + FLUSH_BEFORE_CLOSE
    assert flush_deadline(10.0, pending=False, failed=False) is None
    assert flush_deadline(10.0, pending=True, failed=True) is None


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(0, 3000),
    writes=st.lists(st.tuples(st.integers(1, 1500), st.booleans()), max_size=40),
)
def test_the_native_writer_applies_the_same_rule(
    limit: int, writes: list[tuple[int, bool]]
) -> None:
    """A writer without socket keeps everything it admits: it admits exactly what
    ``congested`` admits, with the same factor."""
    native, why = load()
    if native is None:
        pytest.skip(f"native extension unavailable: {why}")
    w = native.TcpWriter(-1, limit)
    for size, is_ike in writes:
        expected = congested(w.pending, limit, is_ike) is None
        assert bool(w.write(bytes(size), is_ike)) is expected
