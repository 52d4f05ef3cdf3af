"""The RFC 9329 engine without I/O: a client and a gateway engine joined back to back by
fake TCP connections, with a fake clock. What charon sends is fed as UDP packets
(``outbound``); what charon would receive is the engines' Inject outputs."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from tcpencap.config import parse_config
from tcpencap.core import reload as plans
from tcpencap.core.outputs import Close, Connect, Inject, Query, Steer, Transmit
from tcpencap.core.rfc9329_conn import RECONNECT_BASE, State
from tcpencap.core.rfc9329_engine import Rfc9329Engine
from tcpencap.core.sa_questions import FALLBACK_POLL
from tcpencap.core.sa_sync import UNLISTED_GRACE
from tcpencap.native import load as load_native
from tcpencap.native.datapath import NativeDataPath
from tcpencap.wire import rfc9329
from tcpencap.wire.ike import NON_ESP_MARKER
from tcpencap.wire.packet import addr_bytes, build_udp_packet, parse_ip, parse_udp

C, G = "198.18.1.2", "198.19.0.2"
CB, GB = addr_bytes(C), addr_bytes(G)
SPI_I = bytes.fromhex("1122334455667788")
SPI_R = bytes.fromhex("99aabbccddeeff00")


NATIVE, NATIVE_ERROR = load_native()
_datapath: dict[str, Any] = {"native": None}


@pytest.fixture(autouse=True, params=["python", "native"])
def datapath(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both data paths: the Python reference and the C one."""
    if request.param == "native":
        assert NATIVE is not None, f"the native extension must be built: {NATIVE_ERROR}"
        _datapath["native"] = NATIVE
    else:
        _datapath["native"] = None
    yield request.param
    _datapath["native"] = None


def make_engine(cfg: Any, now: float) -> Rfc9329Engine:
    return Rfc9329Engine(cfg, now, NativeDataPath.of(_datapath["native"]))


def feed_outbound(e: Rfc9329Engine, now: float, packet: bytes) -> None:
    """What the daemon's queue reader does with one queued packet, on either path."""
    flows = e.ready_flows()
    if flows is None:
        e.outbound(now, packet)
        return
    misses, hits = flows.classify([packet])
    e.outbound_batch(now, [packet] if misses else [], hits)


def injected(e: Rfc9329Engine, outs: list[Any]) -> list[bytes]:
    """The packets an engine handed to charon: Inject outputs, then the native batch."""
    packets = [o.packet for o in outs if isinstance(o, Inject)]
    if e.datapath.inject_batch is not None:
        packets += e.datapath.inject_batch.take()
    return packets


def client_config(transport: str = "tcp", timeout: str = "2s") -> Any:
    return parse_config(
        "tcpencap {\n connections {\n  c1-gw {\n"
        f"   remote_addrs = {G}\n   transport = {transport}\n   fallback_timeout = {timeout}\n"
        "  }\n }\n}\n",
        "/etc/strongswan.d/tcpencap.conf",
    )


def gateway_config(**gw: str) -> Any:
    lines = "".join(f"  {k} = {v}\n" for k, v in gw.items())
    return parse_config(
        f"tcpencap {{\n gateway {{\n  listen = {G}:4500\n{lines} }}\n}}\n", "/etc/tcpencap.conf"
    )


def ike(
    exchange: int = 34,
    spi_r: bytes = bytes(8),
    response: bool = False,
    np: int = 33,
    spi_i: bytes = SPI_I,
) -> bytes:
    flags = 0x20 if response else 0x08
    body = payload(b"x" * 36)
    n = 28 + len(body)
    return spi_i + spi_r + struct.pack("!BBBBII", np, 0x20, exchange, flags, 0, n) + body


def payload(data: bytes, next_payload: int = 0) -> bytes:
    """One IKE payload: generic header (next payload, flags, length) and ``data``."""
    return struct.pack("!BBH", next_payload, 0, 4 + len(data)) + data


def esp(spi: int, n: int = 40) -> bytes:
    return spi.to_bytes(4, "big") + (1).to_bytes(4, "big") + b"e" * n


def from_charon(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    return build_udp_packet(addr_bytes(src), addr_bytes(dst), sport, dport, payload)


class Wire:
    """The two engines, fake TCP between them, and a fake clock. ``pump`` delivers every
    output until both engines are quiet."""

    def __init__(self, client_cfg: Any = None, gw_cfg: Any = None, native: Any = "fixture") -> None:
        self.now = 100.0
        if native == "fixture":
            native = _datapath["native"]
        # (each engine its own data path: its flow cache, inject batch and epoch)
        self.c = Rfc9329Engine(client_cfg or client_config(), self.now, NativeDataPath.of(native))
        self.g = Rfc9329Engine(gw_cfg or gateway_config(), self.now, NativeDataPath.of(native))
        self.links: dict[int, tuple[int, int]] = {}  # gateway conn -> (client conn, gen)
        self.to_gw: dict[tuple[int, int], int] = {}
        self.charon_c: list[bytes] = []  # packets injected to the client's charon
        self.charon_g: list[bytes] = []
        self.steered_c: set[bytes] = set()
        self.steered_g: set[tuple[bytes, int]] = set()  # gateway: endpoints
        self.queries: list[tuple[str, str]] = []
        self.sas: list[dict[str, Any]] = []  # what list-sas answers
        self.refuse_connect = False
        self.client_port = 40000
        self.intent = plans.Intent(restart_only=plans.restart_only(self.c.config))
        self.configure(self.c.config)

    def configure(self, cfg: Any) -> list[plans.Operation]:
        new = plans.intent_of(cfg)
        ops = plans.plan(self.intent, new)
        self.intent = new
        self.c.config = cfg
        self.c.apply(self.now, ops)
        self.pump()
        return ops

    def pump(self) -> None:
        for _ in range(1000):
            moved = self._deliver_client(self.c.pull()) + self._deliver_gw(self.g.pull())
            for e, charon in ((self.c, self.charon_c), (self.g, self.charon_g)):
                if e.datapath.inject_batch is not None and len(e.datapath.inject_batch):
                    charon += e.datapath.inject_batch.take()
                    moved += 1
            if not moved:
                return
        raise AssertionError("engines never went quiet")

    def _deliver_client(self, outs: list[Any]) -> int:
        for o in outs:
            if isinstance(o, Connect):
                self._connect(o)
            elif isinstance(o, Transmit):
                gid = self.to_gw.get((o.conn_id, self.c.conns[o.conn_id].generation))
                if gid is not None:
                    self.g.receive_data(self.now, gid, 0, o.data)
            elif isinstance(o, Close):
                self._break_from_client(o.conn_id)
            elif isinstance(o, Inject):
                self.charon_c.append(o.packet)
            elif isinstance(o, Steer):
                (self.steered_c.add if o.on else self.steered_c.discard)(o.peer)
            elif isinstance(o, Query):
                self.queries.append(("c", o.purpose))
                self.c.sas_listed(self.now, o.purpose, self.sas)
        return len(outs)

    def _deliver_gw(self, outs: list[Any]) -> int:
        for o in outs:
            if isinstance(o, Transmit):
                link = self.links.get(o.conn_id)
                if link is not None:
                    self.c.receive_data(self.now, link[0], link[1], o.data)
            elif isinstance(o, Close):
                self.break_link(o.conn_id, "closed by the gateway")
            elif isinstance(o, Inject):
                self.charon_g.append(o.packet)
            elif isinstance(o, Steer):
                assert o.port, o  # a gateway steers endpoints, never whole addresses
                (self.steered_g.add if o.on else self.steered_g.discard)((o.peer, o.port))
            elif isinstance(o, Query):
                self.queries.append(("g", o.purpose))
                self.g.sas_listed(self.now, o.purpose, self.sas)
        return len(outs)

    def _connect(self, o: Connect) -> None:
        if self.refuse_connect:
            self.c.connect_failed(self.now, o.conn_id, o.generation, "refused")
            return
        self.client_port += 1
        gid = self.g.accept(self.now, G, o.port, C, self.client_port)
        if gid is None:
            self.c.connection_lost(self.now, o.conn_id, o.generation, "reset")
            return
        self.links[gid] = (o.conn_id, o.generation)
        self.to_gw[(o.conn_id, o.generation)] = gid
        self.c.connected(self.now, o.conn_id, o.generation)

    def break_link(self, gid: int, why: str | None = None) -> None:
        """The TCP connection of gateway conn ``gid`` is gone, on both sides."""
        link = self.links.pop(gid, None)
        self.g.connection_lost(self.now, gid, 0, why)
        if link is not None:
            self.to_gw.pop(link, None)
            self.c.connection_lost(self.now, link[0], link[1], why)

    def _break_from_client(self, cid: int) -> None:
        gen = self.c.conns[cid].generation if cid in self.c.conns else 0
        gid = self.to_gw.pop((cid, gen), None)
        self.c.connection_lost(self.now, cid, gen, None)
        if gid is not None:
            self.links.pop(gid, None)
            self.g.connection_lost(self.now, gid, 0, None)

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = [t for t in (self.c.get_timer(), self.g.get_timer()) if t is not None]
            if not due or min(due) > end:
                break
            self.now = max(self.now, min(due))
            self.c.handle_timer(self.now)
            self.g.handle_timer(self.now)
            self.pump()
        self.now = end

    # charon's packets
    def client_sends(self, payload: bytes, sport: int = 500, dport: int = 500) -> None:
        feed_outbound(self.c, self.now, from_charon(C, G, sport, dport, payload))
        self.pump()

    def gw_sends(self, payload: bytes, dport: int) -> None:
        feed_outbound(self.g, self.now, from_charon(G, C, 4500, dport, payload))
        self.pump()

    def gw_conn(self) -> Any:
        (conn,) = self.g.conns.values()
        return conn


def udp_payload(packet: bytes) -> tuple[int, int, bytes]:
    u = parse_udp(parse_ip(packet).payload)
    return u.sport, u.dport, u.payload


# --- the data path ------------------------------------------------------------------------


def test_ike_and_esp_cross_both_ways() -> None:
    w = Wire()
    assert w.steered_c == {GB}
    w.client_sends(ike())
    conn = w.gw_conn()
    assert conn.state is State.OPEN and w.steered_g == {(CB, w.client_port)}
    # The gateway's charon sees the client as its own NAT-T endpoint (TCP source port).
    sport, dport, payload = udp_payload(w.charon_g[-1])
    assert (sport, dport, payload) == (conn.peer_port, 4500, NON_ESP_MARKER + ike())
    w.gw_sends(NON_ESP_MARKER + ike(spi_r=SPI_R, response=True), dport=conn.peer_port)
    # The client's charon sees the reply on the ports it sent from.
    assert udp_payload(w.charon_c[-1]) == (500, 500, ike(spi_r=SPI_R, response=True))
    w.client_sends(esp(0xC0FFEE01), 4500, 4500)
    assert udp_payload(w.charon_g[-1])[2] == esp(0xC0FFEE01)
    w.gw_sends(esp(0xBEEF0001), dport=conn.peer_port)
    assert udp_payload(w.charon_c[-1]) == (4500, 4500, esp(0xBEEF0001))
    # Without VICI the first packet of a flow teaches the table, the second the native
    # cache, and the third is framed by it (the gateway learns from every packet).
    for n in (60, 61):
        w.client_sends(esp(0xC0FFEE01, n), 4500, 4500)
        w.gw_sends(esp(0xBEEF0001, n), dport=conn.peer_port)
        assert udp_payload(w.charon_g[-1])[2] == esp(0xC0FFEE01, n)
        assert udp_payload(w.charon_c[-1]) == (4500, 4500, esp(0xBEEF0001, n))
    if w.c.datapath.flows is not None:
        assert w.c.datapath.flows.stats()["hits"] == 1 and w.g.datapath.flows.stats()["hits"] == 0


def test_nat_keepalives_never_cross() -> None:
    w = Wire()
    w.client_sends(ike())
    before = len(w.charon_g)
    w.client_sends(b"\xff", 4500, 4500)
    assert len(w.charon_g) == before


# --- reconnect ----------------------------------------------------------------------------


def test_client_reconnects_with_backoff_and_resends_the_outstanding_request() -> None:
    w = Wire()
    w.client_sends(ike())
    w.gw_sends(NON_ESP_MARKER + ike(spi_r=SPI_R, response=True), dport=w.gw_conn().peer_port)
    request = ike(exchange=35, spi_r=SPI_R, np=46)  # IKE_AUTH request, no answer yet
    w.client_sends(NON_ESP_MARKER + request, 4500, 4500)
    seen = len(w.charon_g)
    (old_gid,) = w.g.conns
    w.break_link(old_gid, "reset by peer")
    (cconn,) = w.c.conns.values()
    assert cconn.state is State.CONNECTING and cconn.attempt == 1
    w.advance(RECONNECT_BASE * 0.9)
    assert cconn.state is State.CONNECTING  # the backoff has not passed
    w.advance(RECONNECT_BASE * 0.2)
    assert cconn.state is State.OPEN and cconn.generation == 1
    new = [c for c in w.g.conns.values() if c.conn_id != old_gid]
    assert len(new) == 1 and new[0].state is State.OPEN
    assert udp_payload(w.charon_g[-1])[2] == NON_ESP_MARKER + request
    assert len(w.charon_g) == seen + 1


def test_failed_connects_back_off_exponentially() -> None:
    w = Wire()
    w.client_sends(ike())
    w.gw_sends(NON_ESP_MARKER + ike(spi_r=SPI_R, response=True), dport=w.gw_conn().peer_port)
    (gid,) = w.g.conns
    w.refuse_connect = True
    w.break_link(gid, "reset")
    (cid,) = w.c.conns  # each reconnect is the connection's next generation (a new Conn)
    w.advance(RECONNECT_BASE + 0.01)  # attempt 1 fails
    assert w.c.conns[cid].attempt == 2
    w.advance(2 * RECONNECT_BASE - 0.02)
    assert w.c.conns[cid].attempt == 2  # the second delay is twice the first
    w.advance(0.03)
    assert w.c.conns[cid].attempt == 3


def test_gateway_hands_orphaned_sas_to_the_reconnected_client() -> None:
    """The gateway's connection dies; the client returns with ESP alone (an SA resuming,
    §6.1): the ESP is admitted because its SPI is known for the pair, and the new
    connection takes over the old one's SPIs."""
    w = Wire()
    w.client_sends(ike())
    gconn = w.gw_conn()
    w.gw_sends(esp(0xBEEF0001), dport=gconn.peer_port)  # charon's ESP teaches the SPI
    assert 0xBEEF0001 in gconn.entry.esp_spis
    w.break_link(gconn.conn_id, "reset")
    assert gconn.conn_id not in w.g.conns and w.g.orphans
    w.c.conns.clear()  # the client's tcpencap restarted: its next ESP opens a new connection
    w.c.router.views.clear()
    w.c.table = w.c.router.table = type(w.c.table)()
    w.client_sends(esp(0xBEEF0001), 4500, 4500)
    new = w.gw_conn()
    assert new.state is State.OPEN and new.conn_id != gconn.conn_id
    assert 0xBEEF0001 in new.entry.esp_spis and SPI_I in new.entry.ike_spis
    assert not w.g.orphans


# --- admission and limits -----------------------------------------------------------------


def raw_gateway(**gw: str) -> tuple[Rfc9329Engine, int]:
    g = make_engine(gateway_config(**gw), 0.0)
    gid = g.accept(0.0, G, 4500, C, 50000)
    assert gid is not None
    return g, gid


def closes(g: Rfc9329Engine) -> list[str]:
    return [o.reason for o in g.pull() if isinstance(o, Close)]


def test_prefix_alone_meets_the_first_message_deadline() -> None:
    g, gid = raw_gateway(first_message_timeout="5s")
    g.receive_data(1.0, gid, 0, rfc9329.PREFIX)
    g.handle_timer(4.9)
    assert closes(g) == []
    g.handle_timer(5.0)
    assert closes(g) == ["first-message deadline"]
    assert g.events["deadline"] == 1


@pytest.mark.parametrize(
    "frame",
    [
        NON_ESP_MARKER + b"\x00" * 60,  # garbage after the marker (the attack that pinned slots)
        NON_ESP_MARKER + ike()[:-1],  # header length beyond the frame
        NON_ESP_MARKER + ike() + b"\x00",  # header length short of the frame
        NON_ESP_MARKER + ike(exchange=99),  # no such exchange type
        NON_ESP_MARKER + bytes(8) + ike()[8:],  # initiator SPI zero
        esp(0x12345678),  # ESP for an SPI nobody knows
    ],
    ids=["garbage", "long-header", "short-header", "exchange", "zero-spi", "unknown-esp"],
)
def test_only_a_well_formed_first_message_passes_the_deadline(frame: bytes) -> None:
    g, gid = raw_gateway()
    g.vici_state(0.5, True)  # charon's inbound SPIs are known (none here)
    data = rfc9329.PREFIX + len(frame + b"..").to_bytes(2, "big") + frame
    g.receive_data(1.0, gid, 0, data)
    conn = g.conns[gid]
    assert conn.state is State.PREFIX_RECEIVED
    assert not injected(g, g.pull())  # nothing reached charon
    g.handle_timer(10.0)
    assert "first-message deadline" in closes(g)
    assert g.admission.n_pending == 1  # still counted as pending until the shell reports the loss
    g.connection_lost(10.0, gid, 0, None)
    assert (g.admission.n_gateway, g.admission.n_pending, g.admission.per_source) == (0, 0, {})


@pytest.mark.parametrize("version", [1, 2])
def test_well_formed_first_ike_passes(version: int) -> None:
    g, gid = raw_gateway()
    msg = bytearray(ike(exchange=2 if version == 1 else 34))
    msg[17] = version << 4
    frame = NON_ESP_MARKER + bytes(msg)
    g.receive_data(1.0, gid, 0, rfc9329.PREFIX + (len(frame) + 2).to_bytes(2, "big") + frame)
    assert g.conns[gid].state is State.OPEN and g.admission.n_pending == 0
    assert [type(o) for o in g.pull()] == [Steer, Inject]  # steered before charon answers


def child_sa_event(spi_in: int, up: bool = True) -> dict[str, Any]:
    child = {"spi-in": f"{spi_in:08x}", "spi-out": "beef0001", "state": "INSTALLED"}
    sa = {"initiator-spi": SPI_I.hex(), "remote-host": C, "remote-port": "50000",
          "local-host": G, "child-sas": {"c1-gw-1": child}}  # fmt: skip
    return {"up": "yes", "c1-gw": sa} if up else {"c1-gw": sa}


def send_frames(g: Rfc9329Engine, gid: int, now: float, *frames: bytes) -> None:
    g.receive_data(now, gid, 0, b"".join((len(f) + 2).to_bytes(2, "big") + f for f in frames))


def test_esp_first_passes_when_charon_has_its_spi() -> None:
    g, gid = raw_gateway()
    g.vici_state(0.5, True)
    g.vici_event(0.6, "child-updown", child_sa_event(0xC0FFEE01))
    g.receive_data(1.0, gid, 0, rfc9329.PREFIX)
    send_frames(g, gid, 1.0, esp(0xC0FFEE02))  # another SPI: refused
    assert g.conns[gid].state is State.PREFIX_RECEIVED
    send_frames(g, gid, 1.1, esp(0xC0FFEE01))
    assert g.conns[gid].state is State.OPEN and g.conns[gid].sa_seen
    g.vici_event(2.0, "child-updown", child_sa_event(0xC0FFEE01, up=False))
    assert 0xC0FFEE01 not in g.inbound.spis


def test_without_vici_esp_first_passes_but_must_earn_its_keep() -> None:
    """No VICI, no list of charon's SPIs: plausible ESP is admitted, and unless charon
    itself then sends on the connection, the no-SA deadline closes it."""
    g, gid = raw_gateway(no_sa_timeout="30s")
    g.receive_data(1.0, gid, 0, rfc9329.PREFIX)
    send_frames(g, gid, 1.0, esp(0x100))
    assert g.conns[gid].state is State.OPEN
    g.handle_timer(31.0)
    assert closes(g) == ["no IKE SA"]
    g, gid = raw_gateway(no_sa_timeout="30s")
    g.receive_data(1.0, gid, 0, rfc9329.PREFIX)
    send_frames(g, gid, 1.0, esp(0x100))
    g.outbound(2.0, from_charon(G, C, 4500, 50000, esp(0xBEEF0001)))  # charon's own ESP
    g.handle_timer(31.0)
    assert closes(g) == []


def open_gateway(now: float = 1.0, **gw: str) -> tuple[Rfc9329Engine, int]:
    g, gid = raw_gateway(**gw)
    frame = NON_ESP_MARKER + ike()
    g.receive_data(now, gid, 0, rfc9329.PREFIX + (len(frame) + 2).to_bytes(2, "big") + frame)
    g.pull()
    return g, gid


def test_connection_without_an_ike_sa_is_closed_after_no_sa_timeout() -> None:
    g, gid = open_gateway(no_sa_timeout="30s")
    # charon answers IKE_SA_INIT (in the clear): no IKE SA yet
    reply = NON_ESP_MARKER + ike(spi_r=SPI_R, response=True)
    g.outbound(2.0, from_charon(G, C, 4500, 50000, reply))
    g.handle_timer(30.9)
    assert closes(g) == []
    g.handle_timer(31.0)
    assert closes(g) == ["no IKE SA"]
    assert g.events["limit-no-sa"] == 1 and g.conns[gid].drops["no-sa-timeout"] == 1


def test_charon_reporting_the_ike_sa_keeps_the_connection() -> None:
    g, gid = open_gateway()
    g.vici_state(1.5, True)
    sa = {"initiator-spi": SPI_I.hex(), "remote-host": C, "remote-port": "50000",
          "local-host": G, "state": "ESTABLISHED"}  # fmt: skip
    g.vici_event(2.0, "ike-updown", {"up": "yes", "c1-gw": sa})
    g.handle_timer(100.0)
    assert closes(g) == [] and g.conns[gid].state is State.OPEN


def test_collision_loser_spi_leaves_and_the_connection_goes_with_its_sa() -> None:
    """A rekey collision's redundant IKE SA is learnt from the wire (its DELETE) and never
    reported by charon. list-sas is asked after the rekey and again once the grace is over;
    the SPI goes, so when charon later deletes the real SA the connection is retired
    instead of being held open by a dead SPI."""
    g, gid = open_gateway()
    g.vici_state(1.5, True)
    sa = {"initiator-spi": SPI_I.hex(), "remote-host": C, "remote-port": "50000",
          "local-host": G, "state": "ESTABLISHED"}  # fmt: skip
    g.vici_event(2.0, "ike-updown", {"up": "yes", "c1-gw": sa})
    loser = bytes.fromhex("0123456789abcdef")
    frame = NON_ESP_MARKER + ike(exchange=37, np=46, spi_i=loser)
    g.receive_data(3.0, gid, 0, (len(frame) + 2).to_bytes(2, "big") + frame)
    g.vici_event(3.0, "child-rekey", {"c1-gw": sa})
    asked: list[float] = []
    now = 3.0
    while now < 40.0:
        now = max(now, g.get_timer() or 40.0)
        g.handle_timer(now)
        for o in g.pull():
            if isinstance(o, Query) and o.purpose == "reconcile":
                asked.append(now)
                g.sas_listed(now, o.purpose, [{"c1-gw": sa}])
        if loser not in g.conns[gid].entry.ike_spis:
            break
    assert asked == [5.0, 5.0 + UNLISTED_GRACE], asked
    assert g.conns[gid].entry.ike_spis == {SPI_I}
    g.vici_event(now, "ike-updown", {"up": "no", "c1-gw": {**sa, "state": "DELETING"}})
    g.handle_timer(now + 60.0)
    assert closes(g) == ["IKE SA deleted"]


def test_encrypted_ike_from_charon_counts_without_vici_but_not_with_it() -> None:
    protected = NON_ESP_MARKER + ike(exchange=35, spi_r=SPI_R, response=True, np=46)
    g, gid = open_gateway()
    g.outbound(2.0, from_charon(G, C, 4500, 50000, protected))
    g.handle_timer(100.0)
    assert closes(g) == []
    # With VICI up only charon's word counts: an encrypted IKE_AUTH answer may well be
    # AUTHENTICATION_FAILED.
    g, gid = open_gateway()
    g.vici_state(1.5, True)
    g.outbound(2.0, from_charon(G, C, 4500, 50000, protected))
    g.handle_timer(100.0)
    assert closes(g) == ["no IKE SA"]


def test_limits_refuse_and_count() -> None:
    g = make_engine(gateway_config(max_per_source="2", max_pending="3", max_connections="4"), 0)
    assert g.accept(0, G, 4500, C, 1) and g.accept(0, G, 4500, C, 2)
    assert g.accept(0, G, 4500, C, 3) is None  # per source
    assert g.accept(0, G, 4500, "198.18.1.3", 1)
    assert g.accept(0, G, 4500, "198.18.1.4", 1) is None  # pending
    assert g.events == {"limit-per-source": 1, "limit-pending": 1}
    # First messages free the pending slots; the total then bounds.
    for cid in list(g.conns):
        frame = NON_ESP_MARKER + ike(spi_i=cid.to_bytes(8, "big"))
        g.receive_data(0, cid, 0, rfc9329.PREFIX + (len(frame) + 2).to_bytes(2, "big") + frame)
    assert g.admission.n_pending == 0
    assert g.accept(0, G, 4500, "198.18.1.5", 1)
    assert g.accept(0, G, 4500, "198.18.1.6", 1) is None
    assert g.events["limit-connections"] == 1


def test_frame_flood_is_cut() -> None:
    g, gid = open_gateway(max_frame_rate="10")
    frame = NON_ESP_MARKER + ike()
    blob = ((len(frame) + 2).to_bytes(2, "big") + frame) * 12
    g.receive_data(1.1, gid, 0, blob)
    assert closes(g) == ["frame rate limit"]


def test_esp_counts_toward_the_frame_rate_until_charon_has_an_sa_on_the_connection() -> None:
    """A stranger's ESP flood is cut like any flood; the ESP of an SA charon vouches for
    (it sends ESP on the connection) is the tunnel's traffic and is not limited."""
    blob = ((8 + 40 + 2).to_bytes(2, "big") + esp(0xC0FFEE01)) * 12
    g, gid = open_gateway(max_frame_rate="10")
    g.receive_data(1.1, gid, 0, blob)
    assert closes(g) == ["frame rate limit"]
    g, gid = open_gateway(max_frame_rate="10")
    g.outbound(1.05, from_charon(G, C, 4500, 50000, esp(0xABCDEF01)))  # charon's ESP
    g.pull()
    for i in range(5):  # 60 ESP frames a second, at 10 frames/s
        g.receive_data(1.1 + i * 0.2, gid, 0, blob)
    assert closes(g) == []


def test_gateway_peer_stays_steered_until_charon_has_no_sa() -> None:
    g, gid = open_gateway()
    g.vici_state(1.5, True)
    sa = {"remote-host": C, "remote-port": "50000", "initiator-spi": SPI_I.hex(),
          "state": "ESTABLISHED"}  # fmt: skip
    g.vici_event(1.6, "ike-updown", {"up": "yes", "x": sa})
    assert [o for o in g.pull()] == []
    g.connection_lost(2.0, gid, 0, None)
    # Another endpoint of the same address, or an SA still being set up, keeps nothing.
    other = {**sa, "remote-port": "50001"}
    half = {**sa, "state": "CONNECTING"}
    answers = [[{"x": sa, "y": other, "z": half}], [{"y": other, "z": half}]]
    released = []
    now = 2.0
    for _ in range(30):
        now += 5.0
        g.handle_timer(now)
        for o in g.pull():
            if isinstance(o, Query):
                g.sas_listed(now, o.purpose, answers[0] if now < 45 else answers[1])
            elif isinstance(o, Steer):
                released.append((now, o.on, o.port))
        if released:
            break
    assert released and released[0][1:] == (False, 50000) and released[0][0] >= 62.0


# --- reload (each case failed on the old daemon; /work/evidence in the closing note) ------


def steered_after(w: Wire) -> set[bytes]:
    return set(w.steered_c)


def test_reload_fallback_to_tcp_drops_the_fallback_watch() -> None:
    w = Wire(client_config("fallback"))
    assert w.steered_c == set() and "c1-gw" in w.c.fallback.conns
    w.configure(client_config("tcp"))
    assert w.steered_c == {GB} and "c1-gw" not in w.c.fallback.conns
    # The watch is gone, so "no SA" can never un-steer the TCP connection's peer.
    w.sas = []
    w.advance(10 * FALLBACK_POLL)
    assert w.steered_c == {GB} and GB in w.c.client_peers
    assert ("c", "fallback") not in w.queries[-3:]


def test_reload_tcp_to_udp_unsteers() -> None:
    w = Wire(client_config("tcp"))
    assert w.steered_c == {GB}
    ops = w.configure(client_config("udp"))
    assert ops == [plans.UnsteerTcp("c1-gw")]
    assert w.steered_c == set() and w.c.client_peers == {}


def test_reload_added_fallback_connection_is_polled() -> None:
    w = Wire(gateway_config())  # no connections at start
    w.queries.clear()
    w.configure(client_config("fallback"))
    w.advance(FALLBACK_POLL + 0.01)
    assert ("c", "fallback") in w.queries
    # ... and the poll acts: an IKE SA stuck CONNECTING past the timeout switches to TCP.
    w.sas = [{"c1-gw": {"state": "CONNECTING", "initiator-spi": SPI_I.hex()}}]
    w.advance(3.5)
    assert w.steered_c == {GB}


def test_reload_of_a_fallback_connection_on_tcp_keeps_it_on_tcp() -> None:
    """Changing only fallback_timeout of a connection that already fell back must not
    send its live SA's traffic back to UDP (found by the daemon-level reload test)."""
    w = Wire(client_config("fallback"))
    w.sas = [{"c1-gw": {"state": "CONNECTING", "initiator-spi": SPI_I.hex()}}]
    w.advance(3.5)
    assert w.steered_c == {GB}
    w.sas = [{"c1-gw": {"state": "ESTABLISHED", "initiator-spi": SPI_I.hex()}}]
    w.advance(2.0)
    ops = w.configure(client_config("fallback", timeout="9s"))
    assert [type(o) for o in ops] == [plans.WatchFallback]
    assert w.steered_c == {GB}
    w.advance(5.0)
    assert w.steered_c == {GB}  # the SA lives: still TCP
    w.sas = []
    w.advance(2.0)
    assert w.steered_c == set()  # no SA left: back to UDP first


def test_a_connect_that_finishes_after_its_close_is_refused() -> None:
    """Closed while connecting (here: tcpencap stopping): when the connect completes
    afterwards, the engine says so and the shell closes the socket."""
    w = Wire()
    w.c.outbound(w.now, from_charon(C, G, 500, 500, ike()))
    (connect,) = [o for o in w.c.pull() if isinstance(o, Connect)]
    w.c.stop()
    (close,) = w.c.pull()
    assert isinstance(close, Close)
    w.c.connection_lost(w.now, connect.conn_id, connect.generation, close.reason)
    assert not w.c.connected(w.now, connect.conn_id, connect.generation)
    assert w.c.conns == {} and w.c.pull() == []
