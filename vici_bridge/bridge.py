"""The VICI adapter: one session for events, another for commands (a VICI connection
carries one command at a time). The vici package is blocking, so the event session runs
in a thread and hands everything to the asyncio loop; when charon goes away the data path
keeps running on what the table knows, and the bridge reconnects with backoff and resyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from .session import open_session, text

log = logging.getLogger("tcpencap.vici")

EVENTS = ["ike-updown", "ike-rekey", "child-updown", "child-rekey", "ike-update"]


class ViciBridge:
    def __init__(
        self,
        uri: str,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[str, dict[str, Any]], None],
        on_resync: Callable[[list[dict[str, Any]]], None],
        on_state: Callable[[str], None],
    ) -> None:
        self.uri = uri
        self.loop = loop
        self.on_event = on_event
        self.on_resync = on_resync
        self.on_state = on_state
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vici-events", daemon=True)
        self.reconnects = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                self._session()
                delay = 0.2
            except (OSError, Exception) as exc:  # the vici package raises plain Exceptions
                self._post(self.on_state, f"disconnected: {exc}")
                log.warning("VICI %s: %s; retrying in %.1fs", self.uri, exc, delay)
                self.reconnects += 1
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, 10.0)

    def _session(self) -> None:
        events = open_session(self.uri, timeout=None)
        # Register first, then resync: nothing that happens in between is lost.
        stream = events.listen(EVENTS, timeout=0.2)
        try:
            first = next(stream)
            commands = open_session(self.uri, timeout=10.0)
            try:
                sas = [text(sa) for sa in commands.list_sas()]
            finally:
                commands.transport.close()
            self._post(self.on_resync, sas)
            self._post(self.on_state, "connected")
            log.info("VICI %s: connected, %d IKE SA(s) known", self.uri, len(sas))
            self._deliver(first)
            for item in stream:
                if self._stop.is_set():
                    return
                self._deliver(item)
            raise OSError("event stream ended")
        finally:
            with contextlib.suppress(Exception):
                stream.close()  # unregisters while the socket is still open
            events.transport.close()

    def _deliver(self, item: tuple[Any, Any]) -> None:
        label, event = item
        if label is None:
            return
        self._post(self.on_event, label.decode(), text(event))
