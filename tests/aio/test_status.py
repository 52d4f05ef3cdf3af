"""tcpencap.aio.status.daemon_status: one JSON object gathered from the daemon's parts;
the parts are fakes with the figures the status must add up and name."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

from tcpencap.aio.privileges import effective_caps
from tcpencap.aio.status import daemon_status
from tcpencap.config import Config, GatewayConfig
from tcpencap.wire.packet import addr_bytes


class Queue:
    def __init__(self, num: int, packets: int, reads: int, threaded: bool, **counts: int) -> None:
        self.num, self._stats, self.threaded = num, {"packets": packets, "reads": reads}, threaded
        self.errors = counts.get("errors", 0)
        self.verdict_errors = counts.get("verdict_errors", 0)
        self.overruns = counts.get("overruns", 0)

    def stats(self) -> dict[str, int]:
        return dict(self._stats)


class Rfc9329:
    def __init__(self) -> None:
        self.engine = SimpleNamespace(
            datapath=SimpleNamespace(flows=None),
            client_peers={addr_bytes("198.19.0.3"): 1, addr_bytes("198.19.0.2"): 1},
            events={"admitted": 2},
            router=SimpleNamespace(drops={"no-conn": 5, "inject-failed": 1}),
        )
        self.reported = 0

    def report_counts(self) -> None:
        self.reported += 1

    def rows(self, now: float) -> list[dict[str, Any]]:
        return [{"id": 1, "at": now}]


class Ctcp:
    def status(self) -> list[dict[str, Any]]:
        return [{"id": 2}]

    def summary(self) -> dict[str, Any]:
        return {"flows": 1}


def source(**over: Any) -> SimpleNamespace:
    d = SimpleNamespace(
        config=Config(
            gateway=GatewayConfig(
                listen=(("0.0.0.0", 4500), ("::", 4500)), tls_listen=(("fd00::1", 443),)
            ),
            queue_num=4500,
            source="/etc/tcpencap.conf",
        ),  # fmt: skip
        clock=SimpleNamespace(now=lambda: 110.04),
        datapath="python",
        started=10.0,
        vici_state="connected",
        queues=[
            Queue(4500, 10, 3, True, errors=1, overruns=2),
            Queue(4501, 5, 2, False, verdict_errors=4),
        ],
        rules=SimpleNamespace(
            peers={"198.19.0.9"}, steered_endpoints={("198.19.0.8", 4500), ("fd00::8", 500)}
        ),
        inbound=SimpleNamespace(stats=lambda: {"inject_failed": 3}),
        ctcp=Ctcp(),
        rfc9329=Rfc9329(),
    )
    for k, v in over.items():
        setattr(d, k, v)
    return d


def test_the_status_adds_up_the_parts() -> None:
    d = source()
    st = daemon_status(d)
    json.dumps(st)  # it goes out as JSON: nothing in it that JSON cannot carry
    assert st["pid"] == os.getpid() and st["uptime"] == 100.0
    assert st["config"] == "/etc/tcpencap.conf" and st["vici"] == "connected"
    assert st["capabilities"] == f"{effective_caps():x}"
    assert st["listening"] == ["0.0.0.0:4500", "[::]:4500"]
    assert st["listening_tls"] == ["[fd00::1]:443"]
    assert st["steered_peers"] == ["198.19.0.8", "198.19.0.9", "fd00::8"]
    assert st["steered_endpoints"] == ["198.19.0.8:4500", "[fd00::8]:500"]
    assert st["client_peers"] == ["198.19.0.2", "198.19.0.3"]
    assert st["queue"] == {
        "num": 4500,
        "queues": 2,
        "threads": 1,
        "packets": 15,
        "per_queue": {4500: 10, 4501: 5},
        "errors": 1,
        "reads": 5,
        "verdict_errors": 4,
        "overruns": 2,
    }
    # the native inbound worker's failed injections join the router's
    assert st["drops"] == {"no-conn": 5, "inject-failed": 4}
    assert st["events"] == {"admitted": 2}
    assert st["connections"] == [{"id": 1, "at": 110.04}, {"id": 2}]
    assert st["ctcp"] == {"flows": 1} and st["flows"] is None
    assert st["inbound"] == {"inject_failed": 3}
    assert d.rfc9329.reported == 1  # the native path's counts are taken first


def test_without_ctcp_inbound_worker_or_failures() -> None:
    st = daemon_status(source(ctcp=None, inbound=None))
    assert st["ctcp"] is None and st["inbound"] is None
    assert st["connections"] == [{"id": 1, "at": 110.04}]
    assert st["drops"] == {"no-conn": 5, "inject-failed": 1}


def test_the_router_drops_are_not_changed_by_reading_them() -> None:
    d = source()
    daemon_status(d)
    daemon_status(d)
    assert d.rfc9329.engine.router.drops == {"no-conn": 5, "inject-failed": 1}


def test_the_flow_cache_figures_when_the_native_path_runs() -> None:
    d = source()
    d.rfc9329.engine.datapath.flows = SimpleNamespace(stats=lambda: {"entries": 7})
    assert daemon_status(d)["flows"] == {"entries": 7}


def test_capabilities_that_cannot_be_read_show_as_minus_one(monkeypatch) -> None:
    import tcpencap.aio.privileges as privileges

    def unreadable(pid: object = "self") -> int:
        raise PermissionError("no /proc")

    monkeypatch.setattr(privileges, "effective_caps", unreadable)
    assert daemon_status(source())["capabilities"] == "-1"
