"""tcpencap.core.totals: what closed connections carried, folded into running totals so the
cumulative metrics never go backwards."""

from __future__ import annotations

from tcpencap.core.totals import FLOW_KEYS, add_closed, new_totals


def test_new_totals_are_zero_with_the_callers_extra_keys():
    t = new_totals(closed={}, connect_failures=0)
    assert t == {
        "frames_in": 0, "frames_out": 0, "bytes_in": 0, "bytes_out": 0,
        "drops": {}, "closed": {}, "connect_failures": 0,
    }  # fmt: skip
    assert set(FLOW_KEYS) <= set(t)
    assert new_totals()["drops"] is not new_totals()["drops"]  # no shared dict between owners


def test_closed_connections_add_up_and_their_drops_merge_by_reason():
    t = new_totals(closed={"eof": 1})
    add_closed(t, 3, 4, 300, 400, {"bad_frame": 1})
    add_closed(t, 1, 0, 100, 0, {"bad_frame": 2, "rate": 5})
    add_closed(t, 0, 0, 0, 0, {})
    assert (t["frames_in"], t["frames_out"], t["bytes_in"], t["bytes_out"]) == (4, 4, 400, 400)
    assert t["drops"] == {"bad_frame": 3, "rate": 5}
    assert t["closed"] == {"eof": 1}  # extra keys are the caller's: left alone
