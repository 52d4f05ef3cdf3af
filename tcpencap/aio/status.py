"""The daemon's status: one JSON object for the control socket and /metrics."""

from __future__ import annotations

import os
from typing import Any, Protocol

from tcpencap.aio.engine_timer import LoopClock
from tcpencap.aio.rfc9329_service import Rfc9329Service
from tcpencap.core.outputs import bracket
from tcpencap.wire.packet import addr_text


class StatusSource(Protocol):
    """What the status reads of the daemon (the composition root), named here so that this
    module does not import it."""

    config: Any
    clock: LoopClock
    datapath: str
    started: float
    vici_state: str
    queues: list[Any]
    rules: Any
    inbound: Any
    ctcp: Any
    rfc9329: Rfc9329Service


def daemon_status(d: StatusSource) -> dict[str, Any]:
    """What ``tcpencap status`` prints and /metrics renders."""
    now = d.clock.now()
    qs = d.queues
    stats = [q.stats() for q in qs]
    e = d.rfc9329.engine
    d.rfc9329.report_counts()  # what the native path wrote and read counts below
    return {
        "pid": os.getpid(),
        "uptime": round(now - d.started, 1),
        "config": d.config.source,
        "vici": d.vici_state,
        "capabilities": f"{_cap_eff():x}",
        "datapath": d.datapath,
        "flows": e.datapath.flows.stats() if e.datapath.flows is not None else None,
        "inbound": d.inbound.stats() if d.inbound is not None else None,
        "listening": [f"{bracket(h)}:{p}" for h, p in d.config.gateway.listen],
        "listening_tls": [f"{bracket(h)}:{p}" for h, p in d.config.gateway.tls_listen],
        # addresses with anything steered: whole (a client's peers) or one endpoint of them
        "steered_peers": sorted(d.rules.peers | {a for a, _ in d.rules.steered_endpoints}),
        "steered_endpoints": sorted(f"{bracket(a)}:{p}" for a, p in d.rules.steered_endpoints),
        "client_peers": sorted(addr_text(p) for p in e.client_peers),
        "queue": {
            "num": d.config.queue_num,
            "queues": len(qs),
            "threads": sum(1 for q in qs if q.threaded),
            "packets": sum(s["packets"] for s in stats),
            "per_queue": {q.num: s["packets"] for q, s in zip(qs, stats, strict=True)},
            "errors": sum(q.errors for q in qs),
            "reads": sum(s["reads"] for s in stats),
            "verdict_errors": sum(q.verdict_errors for q in qs),
            "overruns": sum(q.overruns for q in qs),
        },
        "drops": _drops(d),
        "events": dict(e.events),
        "connections": d.rfc9329.rows(now) + (d.ctcp.status() if d.ctcp else []),
        "ctcp": d.ctcp.summary() if d.ctcp else None,
    }


def _drops(d: StatusSource) -> dict[str, int]:
    drops = dict(d.rfc9329.engine.router.drops)
    failed = d.inbound.stats()["inject_failed"] if d.inbound is not None else 0
    if failed:
        drops["inject-failed"] = drops.get("inject-failed", 0) + failed
    return drops


def _cap_eff() -> int:
    from tcpencap.aio.privileges import effective_caps

    try:
        return effective_caps()
    except OSError:
        return -1
