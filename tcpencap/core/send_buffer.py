"""The send side of one RFC 9329 connection: how much may wait in its buffer, and how long
its rest may take to leave when it is closed. Pure: sizes and times in, decisions out.

The same bound is applied by the native path's writer (tcpencap/native/src/writer.c); its
IKE factor is :data:`IKE_OVERSHOOT`, written here once and handed to the C side.
"""

from __future__ import annotations

# IKE may overshoot the buffer bound this many times: ESP is dropped as soon as the buffer
# is over the bound (a congested tunnel loses packets, as UDP would), IKE only far beyond
# it, so that a DELETE or a DPD answer still leaves a congested connection.
IKE_OVERSHOOT = 4

# Seconds a closing connection's writer gets to send what it holds (an IKE DELETE, say).
FLUSH_BEFORE_CLOSE = 5.0

ESP_CONGESTED = "esp-congested"
IKE_CONGESTED = "ike-congested"


def ike_limit(limit: int) -> int:
    """The bound IKE is held to, for a connection whose ``max_buffer`` is ``limit``."""
    return limit * IKE_OVERSHOOT


def congested(queued: int, limit: int, is_ike: bool) -> str | None:
    """None when a frame may be queued behind ``queued`` octets; otherwise the drop
    counter it is counted under."""
    if queued <= limit:
        return None
    if not is_ike:
        return ESP_CONGESTED
    return IKE_CONGESTED if queued > ike_limit(limit) else None


def flush_deadline(now: float, pending: bool, failed: bool) -> float | None:
    """When a closing connection must be closed although its writer still holds octets;
    None: close it now (nothing is waiting, or the socket failed and nothing will leave)."""
    return now + FLUSH_BEFORE_CLOSE if pending and not failed else None
