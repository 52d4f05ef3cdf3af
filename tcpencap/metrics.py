"""Prometheus text exposition (format 0.0.4) of the daemon's status, pure.

Counters are cumulative over the daemon's life: the figures of closed connections are kept
in ``totals`` (folded in when a connection closes), so a scrape never goes backwards and the
packet path pays nothing for metrics.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tcpencap.core.totals import FLOW_KEYS as _FLOW_KEYS

PREFIX = "tcpencap"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in sorted(labels.items())) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(
        self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]
    ) -> None:
        full = f"{PREFIX}_{name}"
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            self.lines.append(f"{full}{_labels(labels)} {value:g}")


def render(status: dict[str, Any], totals: dict[str, Any]) -> str:
    """``status`` is Daemon.status(); ``totals`` holds the counters of closed connections:
    frames_in, frames_out, bytes_in, bytes_out (ints), drops (reason -> int), closed
    (reason -> int), connect_failures (int)."""
    w = _Writer()
    conns = status.get("connections", [])
    ctcp_totals = (status.get("ctcp") or {}).get("totals") or {}
    if ctcp_totals:  # closed cTCP flows, kept by the cTCP service
        merged = {k: totals.get(k, 0) + ctcp_totals.get(k, 0) for k in _FLOW_KEYS}
        drops_all: Counter[str] = Counter(totals.get("drops", {}))
        drops_all.update(ctcp_totals.get("drops", {}))
        totals = {**totals, **merged, "drops": dict(drops_all)}
    by_state: Counter[tuple[str, str, str]] = Counter()
    for c in conns:
        by_state[(c.get("encapsulation", "rfc9329"), c["side"], c["state"])] += 1
    w.metric(
        "connections",
        "gauge",
        "Live TCP connections by encapsulation, side and state.",
        [({"encapsulation": e, "side": s, "state": st}, n) for (e, s, st), n in by_state.items()]
        or [({}, 0)],
    )
    for key, help_text in (
        ("frames_in", "Frames received on TCP connections."),
        ("frames_out", "Frames sent on TCP connections."),
        ("bytes_in", "Octets received on TCP connections."),
        ("bytes_out", "Octets sent on TCP connections."),
    ):
        live = sum(c.get(key, 0) for c in conns)
        w.metric(f"{key}_total", "counter", help_text, [({}, live + totals.get(key, 0))])
    drops: Counter[str] = Counter(totals.get("drops", {}))
    for c in conns:
        drops.update(c.get("drops", {}))
    drops.update(status.get("drops", {}))
    w.metric(
        "drops_total",
        "counter",
        "Packets and frames dropped, by reason.",
        [({"reason": r}, n) for r, n in sorted(drops.items())],
    )
    w.metric(
        "closed_total",
        "counter",
        "Connections closed, by reason.",
        [({"reason": r}, n) for r, n in sorted(totals.get("closed", {}).items())],
    )
    events = status.get("events", {})
    w.metric(
        "deadline_failures_total",
        "counter",
        "Gateway connections closed for missing their prefix or first message in time.",
        [({}, events.get("deadline", 0))],
    )
    w.metric(
        "connect_failures_total",
        "counter",
        "Client connections whose TCP handshake failed.",
        [({}, totals.get("connect_failures", 0))],
    )
    w.metric(
        "limit_hits_total",
        "counter",
        "Resource limits hit, by limit.",
        [({"limit": k}, n) for k, n in sorted(events.items()) if k.startswith("limit-")],
    )
    w.metric(
        "front_failures_total",
        "counter",
        "Connections closed for their TLS or PROXY header, by reason (tls-*, proxy-*).",
        [({"reason": k}, n) for k, n in sorted(events.items()) if k.startswith(("tls-", "proxy-"))],
    )
    w.metric(
        "vici_connected",
        "gauge",
        "1 while the VICI event session to charon is up.",
        [({}, 1 if status.get("vici") == "connected" else 0)],
    )
    w.metric(
        "steered_peers",
        "gauge",
        "Peers whose UDP 500/4500 is queued to tcpencap.",
        [({}, len(status.get("steered_peers", [])))],
    )
    w.metric(
        "queue_packets_total",
        "counter",
        "Packets read from the NFQUEUE.",
        [({}, status.get("queue", {}).get("packets", 0))],
    )
    w.metric(
        "queue_reads_total",
        "counter",
        "Reads of the NFQUEUE socket (packets / reads is the batch size; one verdict each).",
        [({}, status.get("queue", {}).get("reads", 0))],
    )
    ctcp = status.get("ctcp") or {}
    if ctcp:
        w.metric(
            "ctcp_events_total",
            "counter",
            "cTCP service counters, by name.",
            [({"name": k}, v) for k, v in sorted(ctcp.get("counters", {}).items())],
        )
    w.metric(
        "uptime_seconds", "gauge", "Seconds since the daemon started.", [({}, status["uptime"])]
    )
    return "\n".join(w.lines) + "\n"
