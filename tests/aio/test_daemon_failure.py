"""A data-path thread that dies ends the daemon (exit code 1, so systemd's Restart=
starts a new one) instead of leaving it running with nothing reading: on 96634d6 one
MemoryError in the native inbound worker or queue reader left it dead while the status
looked normal."""

from __future__ import annotations

import asyncio
import threading

from nfq.queue import QueueReader
from tcpencap.aio.daemon import Daemon
from tcpencap.config import parse_config

CONF = "tcpencap {\n  gateway {\n    listen = 198.19.0.2:4500\n  }\n}\n"


class DyingWorker:
    def run(self, deliver: object) -> None:
        raise MemoryError

    def stop(self) -> None:
        pass


def test_a_dead_inbound_worker_stops_the_daemon_as_a_failure() -> None:
    async def scenario() -> Daemon:
        d = Daemon(parse_config(CONF, "/etc/tcpencap.conf"))
        d.inbound = DyingWorker()
        t = threading.Thread(target=d._run_inbound, args=(asyncio.get_running_loop(),))
        t.start()
        await asyncio.wait_for(d._stop.wait(), 5)
        t.join(5)
        return d

    d = asyncio.run(scenario())
    assert d.failure is not None and "MemoryError" in d.failure


def test_a_dead_queue_reader_thread_reports_its_failure() -> None:
    async def scenario() -> list[str]:
        failed: list[str] = []
        done = asyncio.Event()

        def on_failed(why: str) -> None:
            failed.append(why)
            done.set()

        q = QueueReader.__new__(QueueReader)  # no netlink socket: only the thread's part
        q.num, q.errors, q._worker = 4500, 0, DyingWorker()
        q._on_failed, q._loop = on_failed, asyncio.get_running_loop()
        t = threading.Thread(target=q._run_worker)
        t.start()
        await asyncio.wait_for(done.wait(), 5)
        t.join(5)
        return failed

    (why,) = asyncio.run(scenario())
    assert "queue 4500" in why and "MemoryError" in why


def test_run_raises_when_the_daemon_ended_on_a_failure(monkeypatch) -> None:
    """Daemon.run turns a recorded failure into RuntimeError (cli: exit code 1)."""

    async def scenario() -> BaseException | None:
        conf = CONF.replace("tcpencap {\n", "tcpencap {\n  drop_capabilities = no\n")
        d = Daemon(parse_config(conf, "/etc/tcpencap.conf"))

        async def start(loop: object) -> None:
            d.fail("the native inbound worker failed: MemoryError()")

        async def shutdown() -> None:
            pass

        class Bridge:
            def start(self) -> None:
                pass

        d.bridge = Bridge()
        monkeypatch.setattr(d, "_start", start)
        monkeypatch.setattr(d, "_shutdown", shutdown)
        monkeypatch.setattr(d, "_start_threads", lambda loop: None)
        try:
            await d.run()
        except RuntimeError as exc:
            return exc
        return None

    exc = asyncio.run(scenario())
    assert exc is not None and "MemoryError" in str(exc)
