"""Draining a connection's received frames: each event its codec (or the native data
path) decoded goes where it is decided.

Counting and the frame-rate budget are applied per frame here; a connection's first
message, invalid frames and rate overruns are the gateway's rules (:mod:`gateway_door`),
closing is the engine's, reached through callbacks; ESP and IKE go to the router, whose
packets are emitted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tcpencap.core.datapath import DataPath, EspTemplate
from tcpencap.core.outputs import Inject, count
from tcpencap.core.rfc9329_conn import Conn, Event, State
from tcpencap.core.router import ConnView, Router
from tcpencap.core.timers import LogLimiter
from tcpencap.wire import rfc9329

Admit = Callable[[float, Conn, bytes], bool]


class FrameDrain:
    """``admit_esp``/``admit_ike``: the gateway's check of a connection's first message
    (False: the frame is dropped); ``max_frame_rate`` is read at each drain, as a reload
    may change it."""

    def __init__(
        self,
        router: Router,
        datapath: DataPath,
        emit: Callable[[Any], None],
        log_limited: LogLimiter,
        max_frame_rate: Callable[[], int],
        esp_template: Callable[[ConnView], EspTemplate],
        admit_esp: Admit,
        admit_ike: Admit,
        over_rate: Callable[[float, Conn], None],
        invalid: Callable[[float, Conn, str], None],
        close: Callable[[Conn, str], None],
    ) -> None:
        self._router = router
        self._datapath = datapath
        self._emit = emit
        self._log_limited = log_limited
        self._max_frame_rate = max_frame_rate
        self._esp_template = esp_template
        self._admit_esp = admit_esp
        self._admit_ike = admit_ike
        self._over_rate = over_rate
        self._invalid = invalid
        self._close = close

    def drain(self, now: float, conn: Conn) -> None:
        codec = conn.codec
        router = self._router
        emit = self._emit
        cid = conn.conn_id
        read = self._datapath.read
        view = router.views.get(cid)
        # A data path that sinks ESP takes an open connection's ESP frames as packets
        # (as router.inbound_esp builds them) and gives back only the other events.
        sinks = self._datapath.sinks_esp and view is not None
        sink = self._esp_template(view) if sinks else None
        budget = conn.frame_budget(now, self._max_frame_rate())
        while conn.state is not State.CLOSING:
            ev, esp, kept = read(codec, sink if conn.state is State.OPEN else None)
            if esp:
                conn.frames_in += esp
                conn.esp_frames += esp
            if kept:
                conn.drops["keepalive"] = conn.drops.get("keepalive", 0) + kept
            t = type(ev)
            if t is rfc9329.ESPPacket:
                conn.esp_frames += 1
            if conn.other_frames() > budget:  # every frame but ESP counts
                self._over_rate(now, conn)
                return
            if t is rfc9329.ESPPacket:
                conn.frames_in += 1
                if conn.state is not State.OPEN and not self._admit_esp(now, conn, ev.data):
                    continue
                res = router.inbound_esp(cid, ev.data)
            elif t is rfc9329.IKEMessage:
                conn.frames_in += 1
                msg = ev.data
                if conn.state is not State.OPEN and not self._admit_ike(now, conn, msg):
                    continue
                conn.ike_received(msg)
                res = router.inbound_ike(cid, msg)
            elif t is rfc9329.NeedData:
                return
            elif t is rfc9329.PrefixReceived:
                if conn.state is State.ACCEPTED:
                    conn.handle(Event.PREFIX)
                    self._datapath.changed()
                continue
            elif t is rfc9329.Keepalive:
                count(conn.drops, "keepalive")
                continue
            elif t is rfc9329.InvalidFrame:
                self._log_limited(now, "invalid-frame", "%s: dropped frame: %s", conn, ev)
                self._invalid(now, conn, "invalid-frame")
                continue
            elif t is rfc9329.ConnectionClosed:
                self._close(conn, "peer closed the connection")
                return
            else:  # ProtocolError
                count(conn.drops, "protocol-error")
                self._close(conn, f"protocol error: {ev.reason}")
                return
            if type(res) is Inject:
                emit(res)
            elif res.reason == "frame-too-big":  # type: ignore[union-attr]
                self._log_limited(
                    now, "frame-too-big", "%s: dropped a frame no UDP datagram can carry", conn
                )
                self._invalid(now, conn, "frame-too-big")
            else:
                count(conn.drops, res.reason)  # type: ignore[union-attr]
