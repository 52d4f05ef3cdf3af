"""The daemon's status: one JSON object for the control socket and /metrics."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from tcpencap.core.outputs import bracket
from tcpencap.wire.packet import addr_text

if TYPE_CHECKING:
    from tcpencap.aio.daemon import Daemon


def daemon_status(d: Daemon) -> dict[str, Any]:
    """What ``tcpencap status`` prints and /metrics renders."""
    now = time.monotonic()
    q = d.queue
    e = d.engine
    for proto in list(d.protocols.values()):
        proto.report_writer()  # what the native path wrote counts in the rows below
    return {
        "pid": os.getpid(),
        "uptime": round(now - d.started, 1),
        "config": d.config.source,
        "vici": d.vici_state,
        "capabilities": f"{_cap_eff():x}",
        "datapath": d.datapath,
        "flows": e.flows.stats() if e.flows is not None else None,
        "listening": [f"{bracket(h)}:{p}" for h, p in d.config.gateway.listen],
        "steered_peers": sorted(d.rules.peers),
        "client_peers": sorted(addr_text(p) for p in e.client_peers),
        "queue": {
            "num": d.config.queue_num,
            "packets": q.packets if q else 0,
            "errors": q.errors if q else 0,
            "reads": q.batches if q else 0,
            "verdict_errors": q.verdict_errors if q else 0,
            "overruns": q.overruns if q else 0,
        },
        "drops": dict(e.router.drops),
        "events": dict(e.events),
        "connections": e.status(now) + (d.ctcp.status() if d.ctcp else []),
        "ctcp": d.ctcp.summary() if d.ctcp else None,
    }


def _cap_eff() -> int:
    from tcpencap.aio.privileges import effective_caps

    try:
        return effective_caps()
    except OSError:
        return -1
