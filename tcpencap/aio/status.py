"""The daemon's status: one JSON object for the control socket and /metrics."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tcpencap.aio.engine_timer import loop_time
from tcpencap.core.outputs import bracket
from tcpencap.wire.packet import addr_text

if TYPE_CHECKING:
    from tcpencap.aio.daemon import Daemon


def daemon_status(d: Daemon) -> dict[str, Any]:
    """What ``tcpencap status`` prints and /metrics renders."""
    now = loop_time()
    qs = d.queues
    stats = [q.stats() for q in qs]
    e = d.engine
    for proto in list(d.protocols.values()):
        proto.report_writer()  # what the native path wrote and read counts below
        proto.report_lent()
    return {
        "pid": os.getpid(),
        "uptime": round(now - d.started, 1),
        "config": d.config.source,
        "vici": d.vici_state,
        "capabilities": f"{_cap_eff():x}",
        "datapath": d.datapath,
        "flows": e.flows.stats() if e.flows is not None else None,
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
        "connections": _with_tls(d, e.status(now)) + (d.ctcp.status() if d.ctcp else []),
        "ctcp": d.ctcp.summary() if d.ctcp else None,
    }


def _drops(d: Daemon) -> dict[str, int]:
    drops = dict(d.engine.router.drops)
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


def _with_tls(d: Daemon, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each RFC 9329 row says whether TLS carries it (the front is the shell's)."""
    for row in rows:
        proto = d.protocols.get(row["id"])
        front = proto.front if proto is not None else None
        row["tls"] = front.secured.version if front is not None and front.secured else None
    return rows
