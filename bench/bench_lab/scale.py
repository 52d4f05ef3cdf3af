"""The gateway scale test: N childless IKE SAs from c1 at once, their set-up rate and
tcpencap's memory per connection, and their teardown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.bench_lab.common import progress
from bench.bench_lab.confs import scale_names
from bench.bench_lab.procs import rss_kib
from tests.labkit import Host, Lab, vici_to_str


@contextlib.contextmanager
def up_counter(host: Host, event: str, prefix: str) -> Iterator[Callable[[], tuple[int, float]]]:
    """Count ``event`` (ike-updown/child-updown) 'up' events of IKE SAs named ``prefix``*;
    yields a function that returns (count, monotonic time of the latest)."""
    assert host.charon
    state = {"n": 0, "last": time.monotonic()}
    stop = threading.Event()
    ready = threading.Event()
    sess = host.charon.session()

    def run() -> None:
        try:
            gen = sess.listen([event], timeout=0.2)
            ready.set()
            for name, msg in gen:
                if stop.is_set():
                    break
                if name is None:
                    continue
                msg = vici_to_str(msg)  # keys and values as str, whatever vici returned
                if msg.get("up") != "yes":
                    continue
                if any(k.startswith(prefix) for k in msg if k != "up"):
                    state["n"] += 1
                    state["last"] = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - reported through the counter's silence
            progress(f"event listener stopped: {exc}")
        finally:
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.2)  # the listen registration is sent before the first yield
    try:
        yield lambda: (state["n"], state["last"])
    finally:
        stop.set()
        thread.join(2)
        with contextlib.suppress(OSError):
            sess.transport.socket.close()


def count_scale_sas(host: Host) -> int:
    """IKE SAs named scale* in state ESTABLISHED (they have no CHILD_SA by design)."""
    assert host.charon
    return sum(
        1
        for entry in host.charon.list_sas()
        for name, sa in entry.items()
        if name.startswith("scale") and sa.get("state") == "ESTABLISHED"
    )


async def _read_status(path: str, timeout: float) -> bytes:
    """The control socket's reply read to EOF (the daemon closes after one reply): unlike a
    StreamReader.readline() with the default 64 KiB limit, any size fits."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    try:
        writer.write(b"status\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def gw_status(gw: Host) -> dict[str, Any]:
    """Connection count from ``tcpencap status --json``; if the CLI fails, its exact error
    and the count read from the control socket directly (a filesystem socket, reachable
    from outside the namespace), with the reply's size. The CLI fails once the one-line JSON
    reply passes 64 KiB (asyncio's default StreamReader limit in query_status's readline):
    about 270 bytes per connection, so from roughly 240 connections on."""
    res: dict[str, Any] = {}
    try:
        res["gw_tcp_connections"] = len(gw.tcpencap_status()["connections"])
        return res
    except Exception as exc:  # noqa: BLE001 - a figure missing, not a failed run
        # lab's LabError carries the command's stderr at its end: keep the end
        res["gw_status_error"] = f"{type(exc).__name__}: {str(exc)[-300:]}"
    try:
        raw = asyncio.run(_read_status(str(gw.dir / "tcpencap.ctl"), 10))
        res["gw_status_reply_bytes"] = len(raw)
        res["gw_tcp_connections"] = len(json.loads(raw)["connections"])
    except Exception as exc:  # noqa: BLE001
        res["gw_status_direct_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return res


def vici_fire(host: Host, cmd: str, names: list[str], key: str) -> list[str]:
    """Send ``cmd`` (initiate/terminate) for each name without waiting (timeout -1)."""
    assert host.charon
    errors = []
    sess = host.charon.session(timeout=30)
    try:
        for name in names:
            try:
                for _ in getattr(sess, cmd)({key: name, "timeout": -1, "loglevel": -1}):
                    pass
            except Exception as exc:  # noqa: BLE001 - collected and reported
                errors.append(f"{name}: {exc}")
    finally:
        sess.transport.socket.close()
    return errors


def scale(lab: Lab, n: int, tcp: bool, budget: float) -> dict[str, Any]:
    """Initiate n childless scale IKE SAs at once from c1; rate and gateway tcpencap memory
    (RSS after - RSS before) / n."""
    c1, gw = lab.clients[0], lab.gw
    names = scale_names(n)
    res: dict[str, Any] = {"n": n}
    gpid = gw.tcpencap.pid if tcp and gw.tcpencap else None
    cpid = c1.tcpencap.pid if tcp and c1.tcpencap else None
    if gpid:
        res["gw_rss_before_kib"] = rss_kib(gpid)
    if cpid:
        res["c1_rss_before_kib"] = rss_kib(cpid)
    with up_counter(c1, "ike-updown", "scale") as counter:
        t = time.monotonic()
        errors = vici_fire(c1, "initiate", names, "ike")
        fired = time.monotonic() - t
        deadline = t + budget
        last_n, last_change = 0, time.monotonic()
        while time.monotonic() < deadline:
            got, _ = counter()
            if got >= n:
                break
            if got != last_n:
                last_n, last_change = got, time.monotonic()
                progress(f"  scale {n}: {got} up")
            elif time.monotonic() - last_change > 30:
                break  # no progress for 30 s: charon's retransmits have given up or stalled
            time.sleep(0.25)
        got, last = counter()
    elapsed = last - t if got else None
    res |= {
        "initiate_calls_s": round(fired, 3),
        "up_events": got,
        "seconds_to_last_up": elapsed,
        "sas_per_second": (got / elapsed) if elapsed else None,
        "initiate_errors": errors[:3],
    }
    time.sleep(1.0)  # let the daemons settle before sampling
    res["established_c1"] = count_scale_sas(c1)
    res["established_gw"] = count_scale_sas(gw)
    if gpid:
        res["gw_rss_after_kib"] = rss_kib(gpid)
        delta = res["gw_rss_after_kib"] - res["gw_rss_before_kib"]
        res["gw_kib_per_conn"] = delta / n
        res["gw_kib_per_established"] = delta / max(1, res["established_gw"])
        res |= gw_status(gw)
    if cpid:
        res["c1_rss_after_kib"] = rss_kib(cpid)
        res["c1_kib_per_conn"] = (res["c1_rss_after_kib"] - res["c1_rss_before_kib"]) / n
    return res


def scale_teardown(lab: Lab, n: int, budget: float = 60) -> int:
    """Terminate all scale IKE SAs; returns how many are left on c1 after ``budget``."""
    c1 = lab.clients[0]
    vici_fire(c1, "terminate", scale_names(n), "ike")
    deadline = time.monotonic() + budget
    left = count_scale_sas(c1)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = count_scale_sas(c1)
    return left
