"""Draining a connection's received frames: each event its codec (or the native data
path) decoded goes where it is decided.

Counting and the frame-rate budget are applied per frame here; a connection's first
message, invalid frames and rate overruns are the gateway's rules (:mod:`gateway_door`),
closing is the engine's, each reached through the engine (:class:`Host`); ESP and IKE go
to the router, whose packets are emitted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from tcpencap.core.datapath import DataPath
from tcpencap.core.fast_path import FastPath
from tcpencap.core.gateway_door import GatewayDoor
from tcpencap.core.outputs import Inject, Output, count
from tcpencap.core.rfc9329_conn import Conn, Event, State
from tcpencap.core.router import Router
from tcpencap.core.timers import LogLimiter
from tcpencap.wire import rfc9329


class Host(Protocol):
    """What the drain uses of the engine: ``door`` checks a connection's first message
    and applies the flood rules, ``fast`` knows where an open connection's ESP goes;
    ``config`` is read at each drain, as a reload may change max_frame_rate."""

    config: Any
    router: Router
    datapath: DataPath
    log_limited: LogLimiter
    door: GatewayDoor
    fast: FastPath

    def close(self, conn: Conn, reason: str) -> None: ...


class FrameDrain:
    """``emit`` queues an output of the engine."""

    def __init__(self, host: Host, emit: Callable[[Output], None]) -> None:
        self._host = host
        self._emit = emit

    def drain(self, now: float, conn: Conn) -> None:
        h = self._host
        codec = conn.codec
        router = h.router
        door = h.door
        emit = self._emit
        cid = conn.conn_id
        read = h.datapath.read
        view = router.views.get(cid)
        # A data path that sinks ESP takes an open connection's ESP frames as packets
        # (as router.inbound_esp builds them) and gives back only the other events.
        sinks = h.datapath.sinks_esp and view is not None
        sink = h.fast.esp_template(view) if sinks else None
        budget = conn.frame_budget(now, h.config.gateway.max_frame_rate)
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
                door.over_rate(now, conn)
                return
            if t is rfc9329.ESPPacket:
                conn.frames_in += 1
                if conn.state is not State.OPEN and not door.admit_esp(now, conn, ev.data):
                    continue
                res = router.inbound_esp(cid, ev.data)
            elif t is rfc9329.IKEMessage:
                conn.frames_in += 1
                msg = ev.data
                if conn.state is not State.OPEN and not door.admit_ike(now, conn, msg):
                    continue
                conn.ike_received(msg)
                res = router.inbound_ike(cid, msg)
            elif t is rfc9329.NeedData:
                return
            elif t is rfc9329.PrefixReceived:
                if conn.state is State.ACCEPTED:
                    conn.handle(Event.PREFIX)
                    h.datapath.changed()
                continue
            elif t is rfc9329.Keepalive:
                count(conn.drops, "keepalive")
                continue
            elif t is rfc9329.InvalidFrame:
                h.log_limited(now, "invalid-frame", "%s: dropped frame: %s", conn, ev)
                door.invalid(now, conn, "invalid-frame")
                continue
            elif t is rfc9329.ConnectionClosed:
                h.close(conn, "peer closed the connection")
                return
            else:  # ProtocolError
                count(conn.drops, "protocol-error")
                h.close(conn, f"protocol error: {ev.reason}")
                return
            if type(res) is Inject:
                emit(res)
            elif res.reason == "frame-too-big":  # type: ignore[union-attr]
                h.log_limited(
                    now, "frame-too-big", "%s: dropped a frame no UDP datagram can carry", conn
                )
                door.invalid(now, conn, "frame-too-big")
            else:
                count(conn.drops, res.reason)  # type: ignore[union-attr]
