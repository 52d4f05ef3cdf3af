"""Figures of closed connections, kept so the metrics never go backwards (pure)."""

from __future__ import annotations

from typing import Any

FLOW_KEYS = ("frames_in", "frames_out", "bytes_in", "bytes_out")


def new_totals(**extra: Any) -> dict[str, Any]:
    """Zeroed totals of closed connections, as ``add_closed`` folds into them; ``extra``
    adds the daemon's own keys (closed reasons, connect failures)."""
    return {**dict.fromkeys(FLOW_KEYS, 0), "drops": {}, **extra}


def add_closed(
    totals: dict[str, Any],
    frames_in: int,
    frames_out: int,
    bytes_in: int,
    bytes_out: int,
    drops: dict[str, int],
) -> None:
    """Fold a closed connection's counters into ``totals`` (the daemon's, the cTCP
    service's), so the cumulative metrics never go backwards."""
    for key, n in zip(FLOW_KEYS, (frames_in, frames_out, bytes_in, bytes_out), strict=True):
        totals[key] += n
    for reason, n in drops.items():
        totals["drops"][reason] = totals["drops"].get(reason, 0) + n
