"""tcpencap.metrics.render: valid Prometheus text exposition (format 0.0.4), and counters
that never go backwards when a connection closes.

The output is read back with a small parser written here from the format's grammar, so the
checks do not trust the code that wrote it.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.aio.daemon import Daemon
from tcpencap.config import default_config
from tcpencap.core.rfc9329_engine import Conn, Rfc9329Engine, State
from tcpencap.core.role import Role
from tcpencap.metrics import render

row = Rfc9329Engine.row
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


@dataclass
class Family:
    name: str
    help: str | None = None
    type: str | None = None
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


def _labels(text: str, line: str) -> dict[str, str]:
    """``name="value",...`` with the escapes \\\\, \\" and \\n."""
    labels: dict[str, str] = {}
    i = 0
    while i < len(text):
        m = LABEL_NAME.match(text, i)
        assert m, f"bad label name in {line!r}"
        name = m.group()
        assert name not in labels, f"label {name} twice in {line!r}"
        i = m.end()
        assert text[i : i + 2] == '="', f'label {name} without =" in {line!r}'
        i += 2
        value = []
        while text[i] != '"':
            if text[i] == "\\":
                esc = text[i + 1]
                assert esc in '\\"n', f"bad escape \\{esc} in {line!r}"
                value.append("\n" if esc == "n" else esc)
                i += 2
            else:
                assert text[i] != "\n"
                value.append(text[i])
                i += 1
        labels[name] = "".join(value)
        i += 1
        if i < len(text):
            assert text[i] == ",", f"labels not separated by commas in {line!r}"
            i += 1
    return labels


def _value(text: str, line: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    assert re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text), f"value in {line!r}"
    return float(text)


def parse_exposition(text: str) -> dict[str, Family]:
    """Parse and validate: HELP and TYPE at most once each and before the samples, samples
    of one family together, valid names, no repeated label set."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    families: dict[str, Family] = {}
    closed: set[str] = set()  # families whose samples are over
    current: str | None = None
    for line in text[:-1].split("\n"):
        assert line, "empty line"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                assert METRIC_NAME.fullmatch(name), f"bad metric name {name!r}"
                fam = families.setdefault(name, Family(name))
                assert not fam.samples, f"{parts[1]} of {name} after its samples"
                if parts[1] == "HELP":
                    assert fam.help is None, f"HELP of {name} twice"
                    fam.help = parts[3] if len(parts) > 3 else ""
                else:
                    assert fam.type is None, f"TYPE of {name} twice"
                    assert len(parts) == 4 and parts[3] in TYPES, f"bad TYPE line {line!r}"
                    fam.type = parts[3]
            continue
        m = re.fullmatch(r"([^{ ]+)(?:\{(.*)\})? (\S+)(?: (-?\d+))?", line)
        assert m, f"bad sample line {line!r}"
        name = m.group(1)
        assert METRIC_NAME.fullmatch(name), f"bad metric name in {line!r}"
        labels = _labels(m.group(2) or "", line)
        value = _value(m.group(3), line)
        fam = families.get(name)
        assert fam is not None and fam.type is not None, f"sample {name} without TYPE"
        if current != name:
            assert name not in closed, f"samples of {name} are not together"
            if current is not None:
                closed.add(current)
            current = name
        assert labels not in [s[0] for s in fam.samples], f"label set repeated: {line!r}"
        fam.samples.append((labels, value))
    return families


def value(fams: dict[str, Family], metric: str, **labels: str) -> float:
    (got,) = [v for lab, v in fams[metric].samples if lab == labels]
    return got


# --- the parser itself can fail -----------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "# TYPE a counter\n# TYPE a counter\na 1\n",
        "# HELP a x\n# HELP a y\n# TYPE a gauge\na 1\n",
        "a 1\n",
        '# TYPE a gauge\na{b="1"} 1\na{b="1"} 2\n',
        '# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x="1"} 1\n',
        "# TYPE 1a gauge\n1a 1\n",
        '# TYPE a gauge\na{1b="x"} 1\n',
        "# TYPE a gauge\na one\n",
        "# TYPE a gauge\na 1",
    ],
)
def test_parser_rejects(bad: str) -> None:
    with pytest.raises(AssertionError):
        parse_exposition(bad)


def test_parser_reads_escapes() -> None:
    fams = parse_exposition('# TYPE a gauge\na{b="x\\"y\\\\z\\nw"} 2.5e3\n')
    assert fams["a"].samples == [({"b": 'x"y\\z\nw'}, 2500.0)]


# --- render -------------------------------------------------------------------------------


def conn_row(i: int, **kw: Any) -> dict[str, Any]:
    row = {
        "id": i,
        "side": "gateway",
        "state": "open",
        "local": "198.19.0.2:4500",
        "peer": f"198.18.1.2:{40000 + i}",
        "ike_spis": [],
        "ike_spis_old": [],
        "esp_spis": [],
        "frames_in": 10 * i,
        "frames_out": 11 * i,
        "bytes_in": 1000 * i,
        "bytes_out": 1100 * i,
        "drops": {},
        "age": 1.0,
    }
    row.update(kw)
    return row


def status_of(conns: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    st = {
        "pid": 1,
        "uptime": 12.5,
        "config": "/etc/strongswan.d/tcpencap.conf",
        "vici": "connected",
        "listening": ["0.0.0.0:4500"],
        "steered_peers": ["198.18.1.2", "198.18.2.2"],
        "client_peers": [],
        "queue": {"packets": 77, "errors": 0, "reads": 12},
        "drops": {"no-connection": 2},
        "events": {"deadline": 1, "limit-connections": 3, "tls-verify": 2, "proxy-missing": 4},
        "connections": conns,
        "ctcp": None,
    }
    st.update(kw)
    return st


def empty_totals() -> dict[str, Any]:
    return {
        "frames_in": 0,
        "frames_out": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "drops": {},
        "closed": {},
        "connect_failures": 0,
    }


def test_render_is_valid_and_complete() -> None:
    conns = [
        conn_row(1, drops={"keepalive": 2}),
        conn_row(2, side="client", state="connecting"),
        conn_row(3, encapsulation="ctcp", state="established", drops={"keepalive": 1}),
    ]
    ctcp = {"queue": 4501, "packets": 9, "counters": {"stray": 4, "refused": 1}}
    totals = empty_totals() | {"frames_in": 5, "drops": {"esp-congested": 7}, "closed": {"x": 1}}
    fams = parse_exposition(render(status_of(conns, ctcp=ctcp), totals))
    for fam in fams.values():
        assert fam.help and fam.type, fam
        assert fam.name.startswith("tcpencap_"), fam.name
        if fam.type == "counter":
            assert fam.name.endswith("_total"), fam.name
            assert all(v >= 0 and math.isfinite(v) for _, v in fam.samples), fam
    g = "tcpencap_connections"
    assert fams[g].type == "gauge"
    assert sum(v for _, v in fams[g].samples) == len(conns)
    assert value(fams, g, encapsulation="rfc9329", side="client", state="connecting") == 1
    assert value(fams, g, encapsulation="ctcp", side="gateway", state="established") == 1
    assert value(fams, "tcpencap_frames_in_total") == 10 + 20 + 30 + 5
    assert value(fams, "tcpencap_bytes_out_total") == 1100 * 6
    assert value(fams, "tcpencap_drops_total", reason="keepalive") == 3
    assert value(fams, "tcpencap_drops_total", reason="esp-congested") == 7
    assert value(fams, "tcpencap_drops_total", reason="no-connection") == 2
    assert value(fams, "tcpencap_closed_total", reason="x") == 1
    assert value(fams, "tcpencap_limit_hits_total", limit="limit-connections") == 3
    assert value(fams, "tcpencap_deadline_failures_total") == 1
    assert value(fams, "tcpencap_front_failures_total", reason="tls-verify") == 2
    assert value(fams, "tcpencap_front_failures_total", reason="proxy-missing") == 4
    assert value(fams, "tcpencap_vici_connected") == 1
    assert value(fams, "tcpencap_steered_peers") == 2
    assert value(fams, "tcpencap_queue_packets_total") == 77
    assert value(fams, "tcpencap_queue_reads_total") == 12
    assert value(fams, "tcpencap_ctcp_events_total", name="stray") == 4
    assert value(fams, "tcpencap_uptime_seconds") == 12.5


def test_render_idle_daemon() -> None:
    fams = parse_exposition(render(status_of([], vici="not connected"), empty_totals()))
    assert sum(v for _, v in fams["tcpencap_connections"].samples) == 0
    assert value(fams, "tcpencap_vici_connected") == 0
    assert value(fams, "tcpencap_frames_in_total") == 0


def test_label_values_are_escaped() -> None:
    totals = empty_totals() | {"closed": {'odd "reason"\\\nline': 2}}
    fams = parse_exposition(render(status_of([]), totals))
    assert value(fams, "tcpencap_closed_total", reason='odd "reason"\\\nline') == 2


COUNTERS = ("frames_in", "frames_out", "bytes_in", "bytes_out")


def counters_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    fams = parse_exposition(text)
    return {
        (f.name, tuple(sorted(lab.items()))): v
        for f in fams.values()
        if f.type == "counter"
        for lab, v in f.samples
    }


def make_conn(daemon: Daemon, i: int, drops: dict[str, int], reason: str) -> Conn:
    """A connection with counters, as the engine holds it (no socket needed)."""
    e = daemon.engine
    side = Role.GATEWAY if i % 2 else Role.CLIENT
    view = e.router.add_client_conn(bytes([198, 18, 0, 1]), bytes([198, 18, 1, i % 250]))
    conn = e._new_conn(0.0, view, side, "198.18.0.1", f"198.18.1.{i % 250}")
    conn.frames_in, conn.frames_out = 3 * i + 1, 2 * i
    conn.bytes_in, conn.bytes_out = 100 * i + 7, 90 * i
    conn.drops = dict(drops)
    conn.close_reason = reason
    conn.state = State.OPEN
    return conn


drops_st = st.dictionaries(
    st.sampled_from(["keepalive", "invalid-frame", "esp-congested"]),
    st.integers(1, 50),
    max_size=3,
)


@settings(max_examples=50, deadline=None)
@given(
    specs=st.lists(
        st.tuples(
            drops_st,
            st.sampled_from(["closed by peer", "connect failed: refused", "protocol error: x"]),
        ),
        min_size=1,
        max_size=5,
    ),
    order=st.randoms(use_true_random=False),
)
def test_counters_do_not_go_backwards_when_connections_close(
    specs: list[tuple[dict[str, int], str]], order: Any
) -> None:
    """Close the connections one by one through the daemon's own bookkeeping
    (Daemon._fold_totals): every counter sample stays, and none decreases; the byte and
    frame totals stay exactly equal."""
    daemon = Daemon(default_config())
    conns = [make_conn(daemon, i, d, r) for i, (d, r) in enumerate(specs, start=1)]
    # Status rows are built by Rfc9329Engine.row, as the daemon builds them.
    live = list(conns)
    before = counters_of(render(status_of([row(c, 0.0) for c in live]), daemon.engine.totals))
    order.shuffle(conns)
    for conn in conns:
        totals_before = copy.deepcopy(daemon.engine.totals)
        daemon.engine.totals_fold(conn)
        live.remove(conn)
        after = counters_of(render(status_of([row(c, 0.0) for c in live]), daemon.engine.totals))
        for key, v in before.items():
            assert key in after, f"counter {key} vanished when a connection closed"
            assert after[key] >= v, f"counter {key} went back: {v} -> {after[key]}"
        for k in COUNTERS:
            name = f"tcpencap_{k}_total"
            assert after[(name, ())] == before[(name, ())], (name, totals_before)
        before = after
    assert not live
    closed = sum(v for (n, _), v in before.items() if n == "tcpencap_closed_total")
    assert closed == len(specs)
    failures = sum(1 for _, r in specs if r.startswith("connect failed"))
    assert before[("tcpencap_connect_failures_total", ())] == failures


def test_counter_fold_equivalence_simple() -> None:
    """render(status with the connection) equals render(status without it, totals folded)
    for every counter, as the brief of metrics.py promises."""
    daemon = Daemon(default_config())
    conn = make_conn(daemon, 4, {"keepalive": 3}, "closed by peer")
    with_conn = counters_of(render(status_of([Rfc9329Engine.row(conn, 0.0)]), daemon.engine.totals))
    daemon.engine.totals_fold(conn)
    without = counters_of(render(status_of([]), daemon.engine.totals))
    closed_key = ("tcpencap_closed_total", (("reason", "closed-by-peer"),))
    assert without.pop(closed_key) == 1
    assert with_conn == without
