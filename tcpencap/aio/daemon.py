"""The daemon: the composition root. It builds the RFC 9329 engine, the cTCP service and
the adapters (NFQUEUE, rules, injection, VICI), feeds the engine what they deliver, and
executes what the engine outputs. One timer serves the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nfq.inject import RawInjector
from nfq.queue import QueueReader
from nfq.rules import SteeringRules
from vici_bridge.bridge import ViciBridge
from vici_bridge.resolve import ViciUnreachable, list_sas, resolve_remote_addrs

from tcpencap.aio.control import start_control, start_metrics
from tcpencap.aio.ctcp_service import CtcpService
from tcpencap.aio.engine_timer import LoopClock
from tcpencap.aio.ike_guard import IkeGuard
from tcpencap.aio.rfc9329_service import Rfc9329Service
from tcpencap.aio.status import daemon_status
from tcpencap.aio.tls import Fronts
from tcpencap.config import Config
from tcpencap.confparse import ConfError
from tcpencap.core import reload as plans
from tcpencap.core.outputs import bracket
from tcpencap.core.restart import still_held
from tcpencap.core.rfc9329_engine import Rfc9329Engine
from tcpencap.native import load as load_native
from tcpencap.native.datapath import NativeDataPath

log = logging.getLogger("tcpencap")


class Daemon:
    """``remove_rules``: take the netfilter rules and sets away at stop. By default they
    stay, so that charon's packets to TCP peers are dropped (queued, nobody reading) while
    tcpencap is down, never sent as UDP; ``tcpencap remove-rules`` takes them away."""

    def __init__(self, config: Config, remove_rules: bool = False) -> None:
        self.config = config
        self.remove_rules = remove_rules
        self.failure: str | None = None  # why the daemon ends on its own (exit code 1)
        self.datapath, native = choose_datapath(config.datapath)
        self.clock = LoopClock()  # the loop's, once it runs (run)
        self.engine = Rfc9329Engine(config, self.clock.now(), NativeDataPath.of(native))
        self.rules = SteeringRules(config.queue_num, queues=config.queues, endpoints=True)
        self.injector: RawInjector | None = None
        self.queues: list[QueueReader] = []
        self.others: list[asyncio.base_events.Server] = []  # control socket, metrics
        self.bridge: ViciBridge | None = None
        self.ctcp: CtcpService | None = None
        self.fronts = Fronts()  # TLS contexts and trusted proxies
        self.inbound: Any = None  # the native InboundWorker, reading open connections
        self._inbound_thread: threading.Thread | None = None
        self.intent = plans.Intent(restart_only=plans.restart_only(config))
        self.resolved: dict[str, list[str]] = {}  # get-conns answers, by connection name
        self.vici_state = "not connected"
        self.started = self.clock.now()
        self.rfc9329 = Rfc9329Service(
            self.engine,
            self.clock,
            config,
            self.rules,
            self.fronts,
            connections=lambda: self.intent.connections,
            spawn=self._spawn,
            list_sas=self._list_sas,
        )
        self.guard = IkeGuard(self)  # a TCP client's check of charon's other IKE
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def log_limited(self, key: str, fmt: str, *args: object) -> None:
        self.rfc9329.log_limited(key, fmt, *args)

    # --- charon: NFQUEUE, VICI, list-sas ------------------------------------------------

    def _start_threads(self, loop: asyncio.AbstractEventLoop) -> None:
        for queue in self.queues:
            queue.start_thread()
        if self.inbound is not None:
            self._inbound_thread = threading.Thread(
                target=self._run_inbound, args=(loop,), name="inbound", daemon=True
            )
            self._inbound_thread.start()

    def _run_inbound(self, loop: asyncio.AbstractEventLoop) -> None:
        """The inbound worker's thread; what it gives back is handled on the loop."""

        def deliver(items: list[tuple[Any, ...]]) -> None:
            loop.call_soon_threadsafe(self.rfc9329.given_back, items)

        try:
            self.inbound.run(deliver)
        except BaseException as exc:  # MemoryError included: the worker is gone for good
            log.exception("the native inbound worker failed")
            loop.call_soon_threadsafe(self.fail, f"the native inbound worker failed: {exc!r}")

    def fail(self, why: str) -> None:
        """A part of the data path is gone and cannot come back in this process: end it
        (exit code 1) so that systemd starts a new one; the rules stay meanwhile."""
        if self.failure is None:
            log.critical("%s: stopping, to be restarted", why)
            self.failure = why
        self._stop.set()

    def on_vici_event(self, label: str, event: dict[str, Any]) -> None:
        self.rfc9329.vici_event(label, event)
        self.guard.vici_event(label)

    def on_vici_resync(self, sas: list[dict[str, Any]]) -> None:
        self.rfc9329.vici_resync(sas)
        self.guard.vici_resync(sas)

    def on_vici_state(self, state: str) -> None:
        self.vici_state = state
        self.rfc9329.vici_state(state == "connected")

    # --- configuration: start-up and reload are the same plan ---------------------------

    async def _resolve(self, config: Config, names: list[str]) -> None:
        """Connection names without remote_addrs, through charon's get-conns."""
        if not names:
            return
        try:
            self.resolved.update(await resolve_remote_addrs(config.vici_socket, names))
            self.vici_state = "connected"
        except ViciUnreachable as exc:
            self.vici_state = f"unreachable: {exc}"

    async def apply_config(self, new: Config, prefix: str = "") -> list[str]:
        """Plan from the current intent to ``new``'s and run it; the lines to report. At
        start-up (no ``prefix``), a listener that cannot be opened is fatal."""
        await self._resolve(new, plans.unresolved(new, self.config, self.resolved))
        intent = plans.intent_of(new, self.resolved)
        ops = plans.plan(self.intent, intent)
        self.config = new
        changes: list[str] = []
        for tls_error in self.fronts.configure(new):
            if not prefix:
                raise OSError(tls_error)
            log.error("%s%s", prefix, tls_error)
            changes.append(tls_error)
        self.rfc9329.apply([plans.Settings(new), *ops])
        for op in ops:
            line = plans.describe(op)
            if isinstance(op, plans.Listen):
                try:
                    await self.rfc9329.listen(op.host, op.port, op.tls)
                except OSError as exc:
                    if not prefix:
                        raise
                    line = f"cannot listen on {bracket(op.host)}:{op.port}: {exc}"
            elif isinstance(op, plans.StopListening):
                self.rfc9329.stop_listening(op.host, op.port)
            elif isinstance(op, plans.CtcpPeers):
                await self._ctcp_apply(op)
            changes.append(line)
            log.info("%s%s", prefix, line)
        self.intent = intent
        self.rfc9329.after()
        return changes

    async def _ctcp_apply(self, op: plans.CtcpPeers) -> None:
        """The cTCP service starts with its first client peers."""
        if self.ctcp is None:
            assert self.injector is not None
            self.ctcp = CtcpService(
                self.config, self.injector, self.log_limited, ports=self.engine.ports
            )
            await self.ctcp.start(asyncio.get_running_loop())
        self.ctcp.apply([op])

    async def reload(self) -> dict[str, Any]:
        """Re-read the configuration; existing TCP connections are kept."""
        from tcpencap.config import load_config

        path = None if self.config.source == "(defaults)" else self.config.source
        try:
            new = load_config(path)
        except ConfError as exc:
            log.error("reload refused: %s", exc)
            return {"error": str(exc)}
        changes = await self.apply_config(new, "reload: ")
        self.guard.update(asyncio.get_running_loop())
        return {"ok": True, "changes": changes}

    # --- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return daemon_status(self)

    def totals(self) -> dict[str, Any]:
        return self.engine.totals

    # --- start and stop ---------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.clock.bind(loop)
        # Threads keep the capabilities they were created with: set-up runs on a pool
        # that is emptied before the drop, and a fresh one serves everything after it.
        setup_pool = ThreadPoolExecutor(thread_name_prefix="setup")
        loop.set_default_executor(setup_pool)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        try:
            await self._start(loop)
            setup_pool.shutdown(wait=True)
            loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="worker"))
            if self.config.drop_capabilities:
                from tcpencap.aio.privileges import keep_only

                try:
                    keep_only()
                    log.info("capabilities reduced to NET_ADMIN, NET_RAW, NET_BIND_SERVICE")
                except OSError as exc:
                    log.warning("could not drop capabilities: %s", exc)
            assert self.bridge is not None
            self.bridge.start()  # after the drop: its thread inherits the reduced set
            self._start_threads(loop)  # the native data path's, after the drop too
            log.info("tcpencap running (pid %d, %s data path)", os.getpid(), self.datapath)
            await self._stop.wait()
            log.info("stopping")
        finally:
            await self._shutdown()
        if self.failure is not None:
            raise RuntimeError(self.failure)

    async def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.injector = self.rfc9329.injector = RawInjector()
        cfg = self.config
        if self.engine.datapath.native is not None:
            self.inbound = self.engine.datapath.native.InboundWorker(*self.injector.fds())
            self.rfc9329.inbound = self.inbound
        if cfg.gateway.ctcp_listen:
            await self._ctcp_apply(plans.CtcpPeers({}))
        if self.guard.wanted():  # in the chain from the start: no moment unchecked
            self.rules.classify_queue = self.guard.queue_num
        self.rules.install()
        for k in range(cfg.queues):
            queue = QueueReader(
                cfg.queue_num + k,
                self.rfc9329.on_queued,
                self.rfc9329.batch.mark,
                flows=self.engine.ready_flows(),
                on_native_batch=self.rfc9329.on_queue_batch,
                on_stalled=self.rfc9329.on_stalled,
                native=self.engine.datapath.native,
                on_failed=self.fail,
            )
            queue.start(loop)
            self.queues.append(queue)
        if cfg.status_socket:
            self.others.append(await start_control(cfg.status_socket, self.status, self.reload))
        if cfg.metrics_listen:
            host, port = cfg.metrics_listen
            self.others.append(await start_metrics(host, port, self.status, self.totals))
            log.info("metrics on http://%s:%d/metrics", bracket(host), port)
        await self.apply_config(cfg)
        await self._take_over()
        self.guard.update(loop)
        self.bridge = ViciBridge(
            cfg.vici_socket, loop, self.on_vici_event, self.on_vici_resync, self.on_vici_state
        )

    async def _take_over(self) -> None:
        """The steering sets a previous run left: its peers that charon still holds SAs
        with stay steered (their packets are dropped until they reconnect), the others go
        now, in one swap of each set (tcpencap.core.restart)."""
        remembered = self.rules.remembered
        ctcp_rules = self.ctcp.rules if self.ctcp is not None else None
        ctcp_remembered = ctcp_rules.steering.remembered if ctcp_rules is not None else []
        sas = await self._list_sas("start") if remembered or ctcp_remembered else []
        self.rfc9329.linger(*still_held(remembered, sas))
        self.rules.commit()
        if self.ctcp is not None and ctcp_rules is not None:
            # a cTCP gateway's peers are endpoints; whole addresses are a client's
            # configured peers, which its configuration steers again
            self.ctcp.linger(still_held(ctcp_remembered, sas)[1])
            ctcp_rules.steering.commit()

    async def _list_sas(self, purpose: str) -> list[dict[str, Any]] | None:
        """charon's IKE SAs, or None (logged) when it cannot be asked."""
        try:
            sas: list[dict[str, Any]] = await asyncio.to_thread(list_sas, self.config.vici_socket)
        except OSError as exc:
            self.log_limited(f"list-sas-{purpose}", "cannot list SAs (%s): %s", purpose, exc)
            return None
        return sas

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.bridge is not None:
            await asyncio.to_thread(self.bridge.stop)
        for server in self.others:
            server.close()
        self.rfc9329.stop()
        for queue in self.queues:
            with contextlib.suppress(Exception):
                queue.stop()
        with contextlib.suppress(Exception):
            self.guard.stop()
        if self.inbound is not None:
            self.inbound.stop()
            if self._inbound_thread is not None:
                self._inbound_thread.join(2.0)
        if self.remove_rules:
            self.rules.remove()
        else:
            self.rules.release()
            log.info("netfilter rules kept: TCP peers' UDP is dropped until tcpencap is back")
        if self.ctcp is not None:
            with contextlib.suppress(Exception):
                await self.ctcp.stop(remove_rules=self.remove_rules)
        if self.injector is not None:
            self.injector.close()
        if self.config.status_socket and self.others:
            with contextlib.suppress(OSError):
                os.unlink(self.config.status_socket)
        await asyncio.sleep(0)


def choose_datapath(setting: str) -> tuple[str, Any]:
    """("native", the extension) or ("python", None); a wanted native path that cannot
    load is a warning, not a failure: the Python path carries the same traffic."""
    if setting == "python":
        return "python", None
    native, why = load_native()
    if native is None:
        log.warning("native data path unavailable (%s): using the Python data path", why)
        return "python", None
    return "native", native
