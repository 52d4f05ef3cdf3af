"""The RFC 9329 connection on its own: the whole (state, event) table walked, and the
per-connection rules (held frames, frame-rate window, invalid frames, deadlines, reconnect)
with the time as an argument and no engine."""

from __future__ import annotations

import itertools

import pytest

from tcpencap.core.rfc9329_conn import (
    INITIAL,
    LEND_AFTER_FRAMES,
    MAX_RECONNECTS,
    PENDING_LIMIT,
    RECONNECT_BASE,
    RECONNECT_MAX,
    TRANSITIONS,
    UNLIMITED,
    Conn,
    Event,
    State,
    TransitionError,
)
from tcpencap.core.role import Role
from tcpencap.core.router import Router
from tcpencap.core.table import ConnectionTable
from tcpencap.wire import rfc9329

LOCAL, PEER = bytes([198, 18, 1, 2]), bytes([198, 19, 0, 2])
SPI = bytes(range(1, 9))
FINAL = {s for s in State if not any(f is s for f, _ in TRANSITIONS)}


def make(side: Role, now: float = 0.0) -> Conn:
    router = Router(ConnectionTable(), lambda addr: True)
    if side is Role.CLIENT:
        view = router.add_client_conn(LOCAL, PEER)
        wire_role = rfc9329.Role.ORIGINATOR
    else:
        view = router.add_gateway_conn(LOCAL, PEER, 40000)
        wire_role = rfc9329.Role.RESPONDER
    return Conn.new(now, view, side, rfc9329.StreamCodec(wire_role), "198.18.1.2", "198.19.0.2")


# --- the table ---------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)))
def test_every_pair_moves_by_the_table_or_raises(state: State, event: Event) -> None:
    conn = make(Role.GATEWAY)
    conn.state = state
    target = TRANSITIONS.get((state, event))
    if target is None:
        with pytest.raises(TransitionError):
            conn.handle(event)
        assert conn.state is state  # a refused event leaves no trace
    else:
        assert conn.handle(event) is target
        assert conn.state is target


def test_every_state_is_reachable_from_a_new_connection() -> None:
    seen = set(INITIAL.values())
    todo = list(seen)
    while todo:
        state = todo.pop()
        for (src, _event), dst in TRANSITIONS.items():
            if src is state and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    assert seen == set(State)


def test_closed_is_the_only_final_state_and_every_state_reaches_it() -> None:
    assert FINAL == {State.CLOSED}
    for state in State:
        assert (state, Event.LOST) in TRANSITIONS or state is State.CLOSED
    for event in Event:
        assert (State.CLOSED, event) not in TRANSITIONS


def test_new_connections_start_where_their_side_starts() -> None:
    assert make(Role.CLIENT).state is State.CONNECTING
    assert make(Role.GATEWAY).state is State.ACCEPTED


def test_a_reconnect_is_a_new_generation_not_a_move_back() -> None:
    lost = make(Role.CLIENT)
    lost.outstanding = b"request"
    lost.frames_out, lost.drops = 7, {"esp-congested": 2}
    with pytest.raises(TransitionError):  # only a closed connection is replaced
        lost.next_generation(rfc9329.StreamCodec(rfc9329.Role.ORIGINATOR))
    lost.handle(Event.LOST)
    lost.close_reason = "closed by peer"
    nxt = lost.next_generation(rfc9329.StreamCodec(rfc9329.Role.ORIGINATOR))
    assert lost.state is State.CLOSED  # the lost one stays closed
    assert nxt is not lost and nxt.state is State.CONNECTING
    assert (nxt.generation, nxt.attempt) == (1, 1)
    assert nxt.pending == [(b"request", True)]  # RFC 9329 §6.2: resent on the new one
    assert nxt.frames_out == 7 and nxt.drops == {"esp-congested": 2}
    assert nxt.close_reason == "" and nxt.conn_id == lost.conn_id


# --- per-connection rules ----------------------------------------------------------------


def test_frames_are_held_while_connecting_esp_only_up_to_the_limit() -> None:
    conn = make(Role.CLIENT)
    for _ in range(PENDING_LIMIT):
        assert not conn.send(b"esp", False)
    assert not conn.send(b"esp", False)
    assert conn.drops == {"esp-while-connecting": 1}
    assert not conn.send(b"ike", True)  # IKE is never dropped for the limit
    assert len(conn.pending) == PENDING_LIMIT + 1
    held = conn.connected()
    assert conn.state is State.OPEN and conn.pending == [] and len(held) == PENDING_LIMIT + 1
    assert conn.bytes_out == len(rfc9329.PREFIX)
    assert conn.send(b"esp", False) and conn.frames_out == 1


def test_a_closing_connection_drops_what_charon_sends() -> None:
    conn = make(Role.GATEWAY)
    conn.handle(Event.CLOSE)
    assert not conn.send(b"ike", True) and not conn.send(b"esp", False)
    assert conn.drops == {"ike-on-closed": 1, "esp-on-closed": 1}
    assert conn.ending


def test_a_response_clears_the_outstanding_request() -> None:
    conn = make(Role.CLIENT)
    conn.outstanding = b"req"
    request = bytes(19) + b"\x08" + bytes(8)
    conn.ike_received(request)
    assert conn.outstanding == b"req" and conn.got_ike
    conn.ike_received(bytes(19) + b"\x20" + bytes(8))
    assert conn.outstanding is None


def test_the_frame_budget_holds_gateways_per_one_second_window() -> None:
    assert make(Role.CLIENT).frame_budget(5.0, 10) == UNLIMITED
    conn = make(Role.GATEWAY, now=0.0)
    assert conn.frame_budget(0.5, 10) == 10
    conn.codec.frames_in = 8
    assert conn.frame_budget(0.9, 10) == 10  # the same window
    assert conn.frame_budget(1.0, 10) == 18  # a new one starts at the frames seen
    conn.esp_frames = 5
    assert conn.other_frames() == 8  # ESP counts until an SA is seen
    conn.sa_seen = True
    assert conn.other_frames() == 3


def test_invalid_frames_close_a_gateway_connection_at_the_limit() -> None:
    gw, cl = make(Role.GATEWAY), make(Role.CLIENT)
    assert not gw.invalid_frame("invalid-frame", 2)
    assert gw.invalid_frame("invalid-frame", 2)
    assert gw.drops == {"invalid-frame": 2}
    assert not cl.invalid_frame("invalid-frame", 1)  # the client never cuts its gateway


def test_first_message_deadlines() -> None:
    conn = make(Role.GATEWAY)
    assert conn.first_message_overdue()
    assert conn.first_ike_problem(b"short") != "" and conn.first_spi is None
    conn.handle(Event.PREFIX)
    assert conn.first_message_overdue()
    conn.first_message(3.0)
    assert conn.first_at == 3.0 and not conn.first_message_overdue()
    assert conn.sa_overdue()
    conn.sa_seen = True
    assert not conn.sa_overdue()


def test_retire_and_reconnect_rules() -> None:
    cl, gw = make(Role.CLIENT), make(Role.GATEWAY)
    assert cl.retire_delay(True) < gw.retire_delay(True) and cl.retire_delay(False) == 0.0
    assert cl.may_retire()
    cl.entry.ike_spis.add(SPI)
    assert not cl.may_retire()
    assert not cl.reconnects(False)  # it never carried IKE
    cl.got_ike = True
    assert cl.reconnects(False) and not cl.reconnects(True)
    cl.attempt = MAX_RECONNECTS
    assert not cl.reconnects(False)
    gw.got_ike = True
    gw.entry.ike_spis.add(SPI)
    assert not gw.reconnects(False)  # only the TCP originator reconnects (§6.1)
    delays = []
    for attempt in (1, 2, 3, 30):
        cl.attempt = attempt
        delays.append(cl.reconnect_delay())
    assert delays == [RECONNECT_BASE, 2 * RECONNECT_BASE, 4 * RECONNECT_BASE, RECONNECT_MAX]


def test_a_connection_is_lent_once_it_carries_esp_with_an_sa() -> None:
    gw = make(Role.GATEWAY)
    gw.handle(Event.PREFIX)
    gw.first_message(0.0)
    gw.frames_in = LEND_AFTER_FRAMES
    assert not gw.lendable()  # its ESP still counts toward the frame rate
    gw.sa_seen = True
    assert gw.lendable()
    gw.frames_in = LEND_AFTER_FRAMES - 1
    assert not gw.lendable()


def test_what_the_data_path_did_is_counted() -> None:
    conn = make(Role.GATEWAY)
    conn.received_elsewhere(3, 300, 2, 1)
    conn.sent_elsewhere(4, 400, 1, 0)
    assert (conn.frames_in, conn.esp_frames, conn.bytes_in, conn.reads_in) == (3, 3, 300, 2)
    assert (conn.frames_out, conn.bytes_out) == (4, 400)
    assert conn.drops == {"keepalive": 1, "esp-congested": 1}
