"""The report: every phase's figures beside the same run's UDP baseline, as text tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.bench_lab.common import BUSY


def _get(d: dict[str, Any], *path: Any) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _cmp(a: float | None, b: float | None, kind: str, spec: str) -> str:
    """``b`` against the baseline ``a``: xRATIO, or +DIFF and xRATIO ("diff")."""
    if a is None or b is None:
        return "-"
    ratio = f"x{b / a:.2f}" if a else ""
    return ratio if kind == "ratio" else f"{b - a:+{spec}} {ratio}".strip()


def _cpu(phase: dict[str, Any], streams: int, proc: str) -> float | None:
    return _get(phase, f"tcp_{streams}", "cpu_seconds_per_gb", proc)


def _cpu_sum(phase: dict[str, Any], streams: int, pred: Callable[[str], bool]) -> float | None:
    """Sum of the CPU s/GB of the phase's processes that ``pred`` selects; None if none."""
    per = _get(phase, f"tcp_{streams}", "cpu_seconds_per_gb") or {}
    vals = [v for k, v in per.items() if pred(k)]
    return sum(vals) if vals and None not in vals else None


def _cpu_procs(phase: dict[str, Any]) -> list[str]:
    keys: dict[str, None] = {}
    for s in (1, 4):
        keys |= dict.fromkeys(_get(phase, f"tcp_{s}", "cpu_seconds_per_gb") or {})
    return list(keys)


Row = tuple[str, str, str, str]


def phase_rows(u: dict[str, Any], t: dict[str, Any]) -> list[Row]:
    """The rows of one phase against the UDP baseline ``u``: (metric, UDP, phase, vs UDP).
    A metric the phase did not measure has no row."""
    rows: list[Row] = []

    def add(path: tuple[Any, ...], scale: float, spec: str, label: str, kind: str) -> None:
        a, b = _get(u, *path), _get(t, *path)
        if b is None:
            return
        a2 = a * scale if a is not None else None
        rows.append((label, _fmt(a2, spec), _fmt(b * scale, spec), _cmp(a2, b * scale, kind, spec)))

    def pair(label: str, get: Callable[[dict[str, Any], int], float | None]) -> None:
        a, b = [get(u, s) for s in (1, 4)], [get(t, s) for s in (1, 4)]
        if b == [None, None]:
            return
        cells = [" / ".join(_fmt(x, ".2f") for x in v) for v in (a, b)]
        cmps = " / ".join(_cmp(x, y, "ratio", ".2f") for x, y in zip(a, b, strict=True))
        rows.append((label, cells[0], cells[1], cmps))

    add(("tcp_1", "bits_per_second"), 1e-9, ".3f", "TCP 1 stream Gbit/s", "ratio")
    add(("tcp_4", "bits_per_second"), 1e-9, ".3f", "TCP 4 streams Gbit/s", "ratio")
    add(("ping", "median_ms"), 1, ".3f", "ping RTT median ms", "diff")
    add(("ping", "p99_ms"), 1, ".3f", "ping RTT p99 ms", "diff")
    add(("flood", "received_pps"), 1, ".0f", "UDP flood received pkt/s", "ratio")
    add(("flood", "loss_percent"), 1, ".1f", "UDP flood loss %", "diff")
    add(("flood", "receiver_seconds"), 1, ".1f", "UDP flood receiver span s", "diff")
    add(("flood", "received_pps_receiver_span"), 1, ".0f", "  pkt/s over receiver span", "ratio")
    for proc in _cpu_procs(t):
        pair(f"CPU s/GB {proc} (P1 / P4)", lambda ph, s, p=proc: _cpu(ph, s, p))
    for side in ("c1", "gw"):
        pair(
            f"CPU s/GB all of {side} (P1 / P4)",
            lambda ph, s, sd=side: _cpu_sum(ph, s, lambda k: k.endswith("_" + sd)),
        )
    pair("CPU s/GB both sides (P1 / P4)", lambda ph, s: _cpu_sum(ph, s, lambda k: True))
    add(("setup", "median_s"), 1e3, ".1f", "IKE+CHILD set-up median ms", "diff")
    uscale = u.get("scale") or []
    for i, sc in enumerate(t.get("scale") or []):
        us = uscale[i] if i < len(uscale) and uscale[i].get("n") == sc.get("n") else {}
        n = sc.get("n")
        for key, spec, what in (
            ("established_gw", "d", "established (gw)"),
            ("sas_per_second", ".1f", "set-up SAs/s"),
        ):
            a, b = us.get(key), sc.get(key)
            cmp = _cmp(a, b, "ratio", spec) if key == "sas_per_second" else ""
            rows.append((f"scale N={n} {what}", _fmt(a, spec), _fmt(b, spec), cmp))
        rss = f"{_fmt(sc.get('gw_rss_before_kib'), 'd')} -> {_fmt(sc.get('gw_rss_after_kib'), 'd')}"
        rows.append((f"scale N={n} gw tcpencap RSS KiB", "", rss, ""))
        rows.append(
            (f"scale N={n} gw KiB/connection", "", _fmt(sc.get("gw_kib_per_conn"), ".1f"), "")
        )
        conns = _fmt(sc.get("gw_tcp_connections"), "d")
        rows.append((f"scale N={n} gw tcpencap connections", "", conns, ""))
    return rows


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned first column, the others right-aligned, widths from the content."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    out = [line(header), "-" * len(line(header))]
    return out + [line(r) for r in rows]


def short(label: str) -> str:
    """A phase's label as the report prints it: UDP, RFC9329/native, cTCP/python, ..."""
    if label in ("udp", "socat"):
        return {"udp": "UDP", "socat": "socat relays"}[label]
    kind, _, rest = label.partition("/")
    name = {"rfc9329": "RFC9329", "rfc9329-tls": "RFC9329+TLS", "ctcp": "cTCP",
            "openvpn": "OpenVPN"}.get(kind, kind)  # fmt: skip
    return f"{name}/{rest}" if rest else name


def _is_relay(proc: str, side: str) -> bool:
    """tcpencap, openvpn or socat on ``side`` ("_c1", "_gw"): not charon."""
    return proc.endswith(side) and not proc.startswith("charon")


def summary_rows(phases: dict[str, Any]) -> list[tuple[str, ...]]:
    """One line per phase: throughput, RTT and CPU per GB next to the UDP baseline."""
    u = phases.get("udp", {})
    rows = []
    for label, t in phases.items():
        cells = [short(label) + (" FAILED" if "error" in t else "")]
        for s in (1, 4):
            a, b = _get(u, f"tcp_{s}", "bits_per_second"), _get(t, f"tcp_{s}", "bits_per_second")
            cmp = "" if label == "udp" or a is None else " " + _cmp(a, b, "ratio", ".3f")
            cells.append("-" if b is None else f"{b / 1e9:.3f}{cmp}")
        a, b = _get(u, "ping", "median_ms"), _get(t, "ping", "median_ms")
        cmp = "" if label == "udp" or a is None else f" ({_cmp(a, b, 'diff', '.2f')})"
        cells.append("-" if b is None else f"{b:.2f}{cmp}")
        for s in (1, 4):
            relay = [_cpu_sum(t, s, lambda k, sd=sd: _is_relay(k, sd)) for sd in ("_c1", "_gw")]
            cells.append(" / ".join(_fmt(x, ".2f") for x in relay) if relay != [None] * 2 else "-")
        for s in (1, 4):
            a, b = _cpu_sum(u, s, lambda k: True), _cpu_sum(t, s, lambda k: True)
            cmp = "" if label == "udp" or a is None else " " + _cmp(a, b, "ratio", ".2f")
            cells.append("-" if b is None else f"{b:.2f}{cmp}")
        rows.append(tuple(cells))
    return rows


def conditions(phase: dict[str, Any]) -> str:
    """Load average at the phase's start and other processes' CPU use during it."""
    load = (phase.get("loadavg_at_start") or [None])[0]
    others = phase.get("others_cpu_per_second")
    flag = " BUSY" if (others or 0) > BUSY else ""
    return f"load {_fmt(load, '.2f')}, others {_fmt(others, '.2f')} CPU/s{flag}"


def relay_rows(phases: dict[str, Any]) -> list[tuple[str, ...]]:
    """Each phase's user-space relay (tcpencap, openvpn) per side and stream count, with
    its ratio to socat's in the same run."""
    floor = phases.get("socat", {})
    rows = []
    for label, t in phases.items():
        procs = [k for k in _cpu_procs(t) if not k.startswith("charon")]
        if not procs:
            continue
        cells = [short(label), procs[0].rsplit("_", 1)[0]]
        for s in (1, 4):
            for side in ("_c1", "_gw"):
                v = _cpu_sum(t, s, lambda k, sd=side: _is_relay(k, sd))
                f = _cpu_sum(floor, s, lambda k, sd=side: _is_relay(k, sd))
                cmp = f" x{v / f:.1f}" if v is not None and f and label != "socat" else ""
                cells.append(f"{_fmt(v, '.2f')}{cmp}")
        rows.append(tuple(cells))
    return rows


def report(res: dict[str, Any]) -> str:
    phases: dict[str, Any] = res.get("phases", {})
    u = phases.get("udp", {})
    lines: list[str] = []
    for label, t in phases.items():
        if label == "udp":
            continue
        lines += ["", f"== {short(label)}: {t.get('title', '')} =="]
        lines.append(conditions(t) + "; UDP baseline: " + (conditions(u) if u else "not run"))
        rows = phase_rows(u, t)
        st = t.get("tcpencap_status") or {}
        used = [f"{h} {st[h]['datapath']}" for h in ("c1", "gw") if "datapath" in st.get(h, {})]
        if used:
            lines.append("data path in effect (tcpencap status): " + ", ".join(used))
        if rows:
            lines += table(("metric", "UDP baseline", short(label), "vs UDP"), rows)
        if "error" in t:
            lines.append(f"phase FAILED: {t['error'][:500]}")
    floor = res.get("floor") or {}
    if "direct" in floor:
        lines += [
            "",
            "== hop floor: UDP echo RTT, direct and through relay pairs (hop_floor.py) ==",
        ]
        rows = [("direct UDP echo median ms", _fmt(floor["direct"].get("median_ms"), ".3f"), "")]
        for key, name in (("socat", "C relays (socat)"), ("asyncio", "asyncio relays")):
            if key in floor:
                added = _fmt(floor[key].get("added_ms"), "+.3f")
                rows.append(
                    (f"via {name} median ms", _fmt(floor[key].get("median_ms"), ".3f"), added)
                )
        lines += table(("metric", "value", "added"), rows)
    if phases:
        lines += ["", "== summary: each figure beside this run's UDP baseline =="]
        header = (
            "phase",
            "P1 Gbit/s",
            "P4 Gbit/s",
            "ping median ms",
            "relay s/GB P1 c1 / gw",
            "P4 c1 / gw",
            "all s/GB P1",
            "all P4",
        )
        lines += table(header, summary_rows(phases))
        lines.append(
            "P1/P4: iperf3 TCP with 1/4 streams; relay = CPU s/GB of tcpencap, openvpn or socat "
            "per side; all = of every watched process of both sides, charon included"
        )
        relay = relay_rows(phases)
        if relay:
            lines += ["", "== user-space relay CPU s/GB per side, against socat's (the C floor) =="]
            header = ("phase", "relay", "c1 P1", "gw P1", "c1 P4", "gw P4")
            lines += table(header, relay)
        busy = [
            f"{short(k)} {v['others_cpu_per_second']:.2f}"
            for k, v in phases.items()
            if (v.get("others_cpu_per_second") or 0) > BUSY
        ]
        if busy:
            lines += [
                "",
                "machine busy (CPU/s used by processes outside this lab): " + ", ".join(busy),
            ]
    errs = []
    for label, t in phases.items():
        if "error" in t:
            errs.append(f"{label}: phase FAILED: {t['error'].splitlines()[-1][:300]}")
        for k, v in t.items():
            if isinstance(v, dict) and "error" in v:
                errs.append(f"{label}.{k}: {v['error'][:300]}")
        errs += [
            f"{label}.scale N={sc.get('n')}: {sc['error']}"
            for sc in t.get("scale") or []
            if "error" in sc
        ]
    if isinstance(res.get("floor"), dict) and "error" in res["floor"]:
        errs.append(f"floor: {res['floor']['error']}")
    if errs:
        lines += ["", "errors:", *("  " + e for e in errs)]
    return "\n".join(lines)
