"""Unit tests of the TLS and PROXY v2 additions outside the stream front: the settings
(tls_handshake_timeout, gateway tls_listen/tls_cert/tls_key/proxy_protocol_from, per
connection tls/tls_ca/tls_pin/tls_sni), the reload plan of TLS listeners, and the engine's
admission of a proxy's connections and its front_refused/front_failed reports."""

from __future__ import annotations

import logging
import struct
from typing import Any

import pytest

from tcpencap.config import ConfigError, default_config, parse_config
from tcpencap.core import reload as plans
from tcpencap.core.outputs import Close, Connect
from tcpencap.core.rfc9329_engine import Rfc9329Engine, State
from tcpencap.wire.ike import NON_ESP_MARKER
from tcpencap.wire.packet import addr_bytes, build_udp_packet

PATH = "/etc/strongswan.d/tcpencap.conf"
CERT, KEY = "/etc/tcpencap/gw.crt", "/etc/tcpencap/gw.key"
PIN_HEX = "".join(f"{i:02X}" for i in range(0xA0, 0xC0))  # 32 octets, 64 hex digits
PIN = bytes.fromhex(PIN_HEX)
C, G = "198.18.1.2", "198.19.0.2"


# --- helpers ------------------------------------------------------------------------------


def text_of(section: str, *lines: str) -> str:
    """``lines`` (one key each) inside tcpencap.SECTION, each on its own line."""
    parts = ["tcpencap"] + (section.split(".") if section else [])
    head = "".join(f"{' ' * i}{p} {{\n" for i, p in enumerate(parts))
    body = "".join(f"{' ' * len(parts)}{line}\n" for line in lines)
    tail = "".join(f"{' ' * i}}}\n" for i in reversed(range(len(parts))))
    return "# a comment first\n" + head + body + tail


def line_of(text: str, key: str) -> int:
    """The 1-based line on which ``key`` is set."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith(f"{key} ="):
            return n
    raise AssertionError(f"{key} not in the text")


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, PATH)
    return info.value


def gateway(*lines: str) -> Any:
    return parse_config(text_of("gateway", *lines), PATH)


def tls_gateway(*lines: str) -> Any:
    return gateway(f"tls_cert = {CERT}", f"tls_key = {KEY}", *lines)


def connection(*lines: str) -> Any:
    return parse_config(text_of("connections.c", f"remote_addrs = {G}", *lines), PATH).connections[
        "c"
    ]


# --- configuration: accepted values ---------------------------------------------------------


def test_defaults_have_no_tls_and_no_proxies() -> None:
    cfg = default_config()
    assert cfg.tls_handshake_timeout == 5.0
    g = cfg.gateway
    assert (g.tls_listen, g.tls_cert, g.tls_key, g.proxy_protocol_from) == ((), "", "", ())
    c = connection()
    assert (c.tls, c.tls_ca, c.tls_pin, c.tls_sni) == (False, "", None, "")
    assert parse_config("tcpencap {\n}\n").tls_handshake_timeout == 5.0


@pytest.mark.parametrize("value,seconds", [("5", 5.0), ("500ms", 0.5), ("2m", 120.0)])
def test_tls_handshake_timeout_is_a_duration(value: str, seconds: float) -> None:
    cfg = parse_config(text_of("", f"tls_handshake_timeout = {value}"), PATH)
    assert cfg.tls_handshake_timeout == seconds


def test_tls_listen_with_cert_and_key() -> None:
    g = tls_gateway("tls_listen = 0.0.0.0:443, [0::0]:443, 198.19.0.2:8443").gateway
    assert g.tls_listen == (("0.0.0.0", 443), ("::", 443), ("198.19.0.2", 8443))
    assert (g.tls_cert, g.tls_key) == (CERT, KEY)
    assert g.listen == ()


def test_cert_and_key_alone_are_accepted() -> None:
    """A certificate without a TLS listener is harmless (read at the next reload)."""
    g = tls_gateway().gateway
    assert (g.tls_listen, g.tls_cert, g.tls_key) == ((), CERT, KEY)


def test_proxy_protocol_from_is_normalised_and_deduplicated() -> None:
    g = gateway(
        "proxy_protocol_from = 127.0.0.1, 10.1.2.3/8, 10.0.0.0/8, ::1, 2001:db8::7/32,"
        " 127.0.0.1/32, 198.18.0.0/15"
    ).gateway
    assert g.proxy_protocol_from == (
        "127.0.0.1/32",
        "10.0.0.0/8",
        "::1/128",
        "2001:db8::/32",
        "198.18.0.0/15",
    )


@pytest.mark.parametrize(
    "listen,tls_listen",
    [
        ("198.18.0.1:443", "198.18.0.2:443"),  # other address
        ("0.0.0.0:443", "[::]:443"),  # other family
        ("[::]:4500", "[::]:443"),  # other port
        ("0.0.0.0:4500", "0.0.0.0:443"),
    ],
)
def test_tls_listen_may_share_a_port_or_an_address(listen: str, tls_listen: str) -> None:
    g = tls_gateway(f"listen = {listen}", f"tls_listen = {tls_listen}").gateway
    assert len(g.tls_listen) == 1 and len(g.listen) == 1
    g = tls_gateway(f"ctcp_listen = {listen}", f"tls_listen = {tls_listen}").gateway
    assert len(g.tls_listen) == 1 and len(g.ctcp_listen) == 1


@pytest.mark.parametrize(
    "value",
    [
        "sha256:" + ":".join(PIN_HEX[i : i + 2] for i in range(0, 64, 2)),  # openssl's form
        "SHA256:" + PIN_HEX.lower(),
        PIN_HEX,
        PIN_HEX.lower(),
        ":".join(PIN_HEX[i : i + 2] for i in range(0, 64, 2)).lower(),
    ],
    ids=["openssl", "prefix-lower", "hex", "hex-lower", "colons"],
)
def test_tls_pin_forms(value: str) -> None:
    c = connection("tls = yes", f"tls_pin = {value}")
    assert c.tls_pin == PIN and len(c.tls_pin) == 32


def test_tls_connection_settings() -> None:
    c = connection(
        "tls = yes", "tls_ca = /etc/tcpencap/ca.pem", "tls_sni = vpn.example.com", "tls_pin ="
    )
    assert (c.tls, c.tls_ca, c.tls_sni, c.tls_pin) == (
        True,
        "/etc/tcpencap/ca.pem",
        "vpn.example.com",
        None,
    )
    assert connection("tls = on", "encapsulation = rfc9329").tls is True
    assert connection("tls = no").tls is False


def test_empty_tls_settings_without_tls_are_no_settings() -> None:
    c = connection("tls = no", "tls_ca =", "tls_pin =", "tls_sni =")
    assert (c.tls, c.tls_ca, c.tls_pin, c.tls_sni) == (False, "", None, "")
    assert connection("encapsulation = ctcp", "tls = no").tls is False


# --- configuration: refused values ----------------------------------------------------------

TLS_LISTEN = ("tls_listen = 0.0.0.0:443",)
OK_GW = (f"tls_cert = {CERT}", f"tls_key = {KEY}")
BAD_PINS = [
    "sha256:ABCD",
    PIN_HEX[:-1],
    PIN_HEX + "0",
    "ZZ" + PIN_HEX[2:],
    "sha1:" + PIN_HEX,
    "sha256:" + PIN_HEX[:40],
    PIN_HEX[:32] + " " + PIN_HEX[32:],
]

# (section, lines, the key whose line is reported, fragment of the message)
BAD = [
    ("", ("tls_handshake_timeout = 0",), "tls_handshake_timeout", "'0' is out of range"),
    ("", ("tls_handshake_timeout = soon",), "tls_handshake_timeout", "is not a duration"),
    ("gateway", ("tls_listen = 1.2.3.4", *OK_GW), "tls_listen", "'1.2.3.4' is not ADDR:PORT"),
    (
        "gateway",
        ("tls_listen = 0.0.0.0:443, 0.0.0.0:443", *OK_GW),
        "tls_listen",
        "is listed twice",
    ),
    (
        "gateway",
        (*TLS_LISTEN, f"tls_key = {KEY}"),
        "tls_listen",
        "tls_listen: needs tcpencap.gateway.tls_cert",
    ),
    (
        "gateway",
        (*TLS_LISTEN, f"tls_cert = {CERT}"),
        "tls_listen",
        "tls_listen: needs tcpencap.gateway.tls_key",
    ),
    ("gateway", TLS_LISTEN, "tls_listen", "tls_listen: needs tcpencap.gateway.tls_cert"),
    (
        "gateway",
        (*TLS_LISTEN, "tls_cert =", f"tls_key = {KEY}"),
        "tls_listen",
        "needs tcpencap.gateway.tls_cert",
    ),
    (
        "gateway",
        (*TLS_LISTEN, "tls_cert = gw.crt", f"tls_key = {KEY}"),
        "tls_cert",
        "'gw.crt' is not an absolute path",
    ),
    (
        "gateway",
        (*TLS_LISTEN, f"tls_cert = {CERT}", "tls_key = ./gw.key"),
        "tls_key",
        "'./gw.key' is not an absolute path",
    ),
    ("gateway", ("tls_key = key.pem",), "tls_key", "is not an absolute path"),
    (
        "gateway",
        ("proxy_protocol_from = haproxy",),
        "proxy_protocol_from",
        "'haproxy' is not an address or network",
    ),
    (
        "gateway",
        ("proxy_protocol_from = 10.0.0.0/33",),
        "proxy_protocol_from",
        "'10.0.0.0/33' is not an address or network",
    ),
    (
        "gateway",
        ("proxy_protocol_from = 127.0.0.1, nope",),
        "proxy_protocol_from",
        "'nope' is not an address or network",
    ),
    (
        "gateway",
        ("proxy_protocol_from = 127.0.0.1,,10.0.0.1",),
        "proxy_protocol_from",
        "'' is not an address or network",
    ),
    (
        "gateway",
        ("proxy_protocol_from = 300.0.0.1",),
        "proxy_protocol_from",
        "'300.0.0.1' is not an address or network",
    ),
    ("connections.c", ("tls = maybe",), "tls", "'maybe' is not yes or no"),
    ("connections.c", ("tls = yes", "tls_ca = ca.pem"), "tls_ca", "is not an absolute path"),
    *[
        ("connections.c", ("tls = yes", f"tls_pin = {p}"), "tls_pin", "is not a SHA-256")
        for p in BAD_PINS
    ],
    (
        "connections.c",
        ("tls = yes", "tls_sni = 198.19.0.2"),
        "tls_sni",
        "'198.19.0.2' is an address; SNI takes a DNS name",
    ),
    (
        "connections.c",
        ("tls = yes", "tls_sni = 2001:db8::1"),
        "tls_sni",
        "SNI takes a DNS name",
    ),
    (
        "connections.c",
        ("tls = yes", "tls_sni = bad_name.example"),
        "tls_sni",
        "is not an IP address or DNS name",
    ),
    (
        "connections.c",
        ("encapsulation = ctcp", "tls = yes"),
        "tls",
        "tls: TLS is for RFC 9329, not cTCP",
    ),
    (
        "connections.c",
        ("tls = yes", "encapsulation = CTCP"),
        "tls",
        "tls: TLS is for RFC 9329, not cTCP",
    ),
    ("connections.c", ("tls_ca = /etc/ca.pem",), "tls_ca", "tls_ca: needs tls = yes"),
    ("connections.c", (f"tls_pin = {PIN_HEX}",), "tls_pin", "tls_pin: needs tls = yes"),
    ("connections.c", ("tls_sni = vpn.example",), "tls_sni", "tls_sni: needs tls = yes"),
    (
        "connections.c",
        ("tls = no", "tls_sni = vpn.example"),
        "tls_sni",
        "tls_sni: needs tls = yes",
    ),
    (
        "connections.c",
        ("encapsulation = ctcp", "tls_ca = /etc/ca.pem"),
        "tls_ca",
        "tls_ca: needs tls = yes",
    ),
]


def _bad_id(case: tuple[str, tuple[str, ...], str, str]) -> str:
    return f"{case[0] or 'top'}:{'|'.join(case[1])}"


@pytest.mark.parametrize("section,lines,key,fragment", BAD, ids=[_bad_id(b) for b in BAD])
def test_bad_tls_settings_name_file_line_and_key(
    section: str, lines: tuple[str, ...], key: str, fragment: str
) -> None:
    if section.startswith("connections"):
        lines = (f"remote_addrs = {G}", *lines)
    text = text_of(section, *lines)
    e = config_error(text)
    dotted = ".".join(["tcpencap"] + ([section] if section else []) + [key])
    assert (e.path, e.line) == (PATH, line_of(text, key))
    assert e.message.startswith(f"{dotted}: "), e.message
    assert fragment in e.message, e.message
    assert str(e).startswith(f"{PATH}:{e.line}: {dotted}: ")


@pytest.mark.parametrize(
    "other,listen,tls_listen",
    [
        ("listen", "198.19.0.2:443", "198.19.0.2:443"),  # the same endpoint
        ("listen", "0.0.0.0:443", "198.19.0.2:443"),  # a wildcard of the family
        ("listen", "198.19.0.2:443", "0.0.0.0:443"),
        ("listen", "[fd00::1]:443", "[::]:443"),
        ("listen", "[::]:443", "[fd00::1]:443"),
        ("listen", "[fd00::1]:443", "[FD00:0::1]:443"),  # the same, spelled otherwise
        ("ctcp_listen", "198.19.0.2:443", "198.19.0.2:443"),
        ("ctcp_listen", "0.0.0.0:443", "198.19.0.2:443"),
        ("ctcp_listen", "[::]:10000", "[::1]:10000"),
    ],
)
def test_tls_listen_must_not_overlap_another_listener(
    other: str, listen: str, tls_listen: str
) -> None:
    text = text_of(
        "gateway",
        f"{other} = 198.18.9.9:1, {listen}",
        f"tls_listen = 198.18.9.9:2, {tls_listen}",
        *OK_GW,
    )
    e = config_error(text)
    assert e.line == line_of(text, "tls_listen")
    assert e.message.startswith("tcpencap.gateway.tls_listen: '"), e.message
    shown = tls_listen.replace("FD00:0::1", "fd00::1")
    assert f"'{shown}' is also a plain or cTCP listener" in e.message


@pytest.mark.parametrize(
    "lines,key",
    [
        (("tls_ca =", "tls_sni = vpn.example"), "tls_sni"),
        (("tls_ca =", f"tls_pin = {PIN_HEX}"), "tls_pin"),
        (("tls_pin =", "tls_sni = vpn.example"), "tls_sni"),
        (("tls_sni = vpn.example", "tls_ca ="), "tls_sni"),
    ],
)
def test_a_set_tls_key_needs_tls_even_beside_an_empty_one(lines: tuple[str, ...], key: str) -> None:
    text = text_of("connections.c", f"remote_addrs = {G}", "tls = no", *lines)
    e = config_error(text)
    assert e.line == line_of(text, key)
    assert e.message == f"tcpencap.connections.c.{key}: needs tls = yes"


# --- reload plan ----------------------------------------------------------------------------


def intent(*lines: str) -> plans.Intent:
    return plans.intent_of(tls_gateway(*lines))


def test_intent_carries_the_tls_listeners() -> None:
    i = intent("listen = 0.0.0.0:4500", "tls_listen = 0.0.0.0:443, [::]:443")
    assert i.tls_listen == (("0.0.0.0", 443), ("::", 443))
    assert i.listen == (("0.0.0.0", 4500),)
    assert plans.Listen("h", 1) == plans.Listen("h", 1, False) != plans.Listen("h", 1, True)


def test_adding_a_tls_listener_listens_with_tls() -> None:
    old = intent("listen = 0.0.0.0:4500")
    new = intent("listen = 0.0.0.0:4500", "tls_listen = 0.0.0.0:443, [::]:443")
    ops = plans.plan(old, new)
    assert ops == [plans.Listen("0.0.0.0", 443, True), plans.Listen("::", 443, True)]
    assert [plans.describe(o) for o in ops] == [
        "listening on 0.0.0.0:443 (TLS)",
        "listening on [::]:443 (TLS)",
    ]
    # the first start: everything from nothing
    ops = plans.plan(plans.Intent(restart_only=new.restart_only), new)
    assert ops == [
        plans.Listen("0.0.0.0", 4500, False),
        plans.Listen("0.0.0.0", 443, True),
        plans.Listen("::", 443, True),
    ]
    assert plans.describe(ops[0]) == "listening on 0.0.0.0:4500"


def test_removing_a_tls_listener_stops_it() -> None:
    old = intent("listen = 0.0.0.0:4500", "tls_listen = 0.0.0.0:443, [::]:443")
    new = intent("listen = 0.0.0.0:4500", "tls_listen = [::]:443")
    ops = plans.plan(old, new)
    assert ops == [plans.StopListening("0.0.0.0", 443)]
    assert plans.describe(ops[0]) == "stopped listening on 0.0.0.0:443"
    assert plans.plan(new, intent()) == [
        plans.StopListening("0.0.0.0", 4500),
        plans.StopListening("::", 443),
    ]


def test_unchanged_tls_listeners_give_no_operation() -> None:
    lines = ("listen = 0.0.0.0:4500", "tls_listen = 198.19.0.2:443, [::]:443")
    assert plans.plan(intent(*lines), intent(*lines)) == []
    # the certificate is the front's business (re-read on reload), not a listener change
    other_cert = plans.intent_of(
        gateway(*lines, "tls_cert = /etc/other.crt", "tls_key = /etc/other.key")
    )
    assert plans.plan(intent(*lines), other_cert) == []
    # nor is the order of the list
    reordered = intent(lines[0], "tls_listen = [::]:443, 198.19.0.2:443")
    assert plans.plan(intent(*lines), reordered) == []


@pytest.mark.parametrize(
    "before,after,tls",
    [
        ("listen", "tls_listen", True),
        ("tls_listen", "listen", False),
    ],
)
def test_an_endpoint_that_changes_kind_stops_before_it_listens(
    before: str, after: str, tls: bool
) -> None:
    old = intent(f"{before} = 198.19.0.2:443")
    new = intent(f"{after} = 198.19.0.2:443")
    ops = plans.plan(old, new)
    assert ops == [plans.StopListening("198.19.0.2", 443), plans.Listen("198.19.0.2", 443, tls)]
    assert plans.describe(ops[1]).endswith(" (TLS)") is tls


TF = (True, False)


def test_moves_among_other_changes_keep_one_socket_per_endpoint() -> None:
    old = intent(
        "listen = 0.0.0.0:4500, 198.19.0.2:443, [::]:4500",
        "tls_listen = 198.19.0.2:8443, [::]:443",
    )
    new = intent(
        "listen = 0.0.0.0:4500, 198.19.0.2:8443, 198.19.0.2:9000",
        "tls_listen = 198.19.0.2:443, [::]:443, [::]:8443",
    )
    ops = plans.plan(old, new)
    moved = [("198.19.0.2", 443), ("198.19.0.2", 8443)]
    for h, p in moved:
        stop = ops.index(plans.StopListening(h, p))
        (start,) = [i for i, o in enumerate(ops) if o in (plans.Listen(h, p, t) for t in TF)]
        assert stop < start
    assert plans.Listen("198.19.0.2", 443, True) in ops
    assert plans.Listen("198.19.0.2", 8443, False) in ops
    assert plans.Listen("198.19.0.2", 9000, False) in ops
    assert plans.Listen("::", 8443, True) in ops
    # [::]:4500 is gone, and only after everything new listens
    assert ops[-1] == plans.StopListening("::", 4500)
    # each endpoint is stopped and opened at most once; kept ones are untouched
    stops = [(o.host, o.port) for o in ops if isinstance(o, plans.StopListening)]
    starts = [(o.host, o.port) for o in ops if isinstance(o, plans.Listen)]
    assert sorted(stops) == sorted([*moved, ("::", 4500)])
    assert len(starts) == len(set(starts)) == 4
    assert ("0.0.0.0", 4500) not in stops + starts and ("::", 443) not in stops + starts
    assert len(ops) == 7


# --- engine: a proxy's connections and the front's reports ---------------------------------


def gw_engine(now: float = 0.0, **gw: str) -> Rfc9329Engine:
    lines = [f"listen = {G}:4500", *(f"{k} = {v}" for k, v in gw.items())]
    return Rfc9329Engine(gateway(*lines), now)


def ike_sa_init() -> bytes:
    """An IKEv2 IKE_SA_INIT request header (initiator SPI set, responder SPI zero)."""
    body = struct.pack("!BBH", 0, 0, 40) + b"x" * 36  # one payload (SA), the last
    head = bytes.fromhex("1122334455667788") + bytes(8)
    return head + struct.pack("!BBBBII", 33, 0x20, 34, 0x08, 0, 28 + len(body)) + body


def first_ike(e: Rfc9329Engine, conn_id: int, now: float = 0.0) -> None:
    """The prefix and a well-formed IKE_SA_INIT: the connection is no longer pending."""
    frame = NON_ESP_MARKER + ike_sa_init()
    e.receive_data(now, conn_id, 0, b"IKETCP" + (len(frame) + 2).to_bytes(2, "big") + frame)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_admit_proxied_takes_pending_slots(caplog: pytest.LogCaptureFixture) -> None:
    g = gw_engine(max_pending="2", max_connections="10")
    assert g.admit_proxied(0.0, "127.0.0.1:40001") is True
    assert g.admit_proxied(0.0, "127.0.0.1:40002") is True
    assert g.admission.n_proxied == 2
    with caplog.at_level(logging.WARNING, logger="tcpencap"):
        assert g.admit_proxied(0.0, "127.0.0.1:40003") is False
    assert g.admission.n_proxied == 2  # a refusal takes no slot
    assert g.events == {"limit-pending": 1}
    (line,) = warnings(caplog)
    assert "127.0.0.1:40003" in line and "2 connections without a first message" in line
    g.proxied_done()
    assert g.admission.n_proxied == 1
    assert g.admit_proxied(0.0, "127.0.0.1:40004") is True
    assert g.admission.n_proxied == 2 and g.pull() == []


def test_admit_proxied_counts_pending_gateway_connections_too() -> None:
    g = gw_engine(max_pending="2", max_connections="10")
    assert g.accept(0.0, G, 4500, C, 50000) is not None  # pending: no first message yet
    assert g.admit_proxied(0.0, "p1") is True
    assert g.admit_proxied(0.0, "p2") is False
    assert g.events == {"limit-pending": 1}


def test_admit_proxied_is_bounded_by_max_connections() -> None:
    g = gw_engine(max_pending="10", max_connections="2")
    gid = g.accept(0.0, G, 4500, C, 50000)
    assert gid is not None
    first_ike(g, gid)
    assert (g.admission.n_gateway, g.admission.n_pending) == (1, 0)
    assert g.admit_proxied(0.0, "p1") is True  # 1 + 0 < 2
    assert g.admit_proxied(0.0, "p2") is False  # 1 + 1 >= 2
    assert g.events == {"limit-connections": 1}
    assert g.admission.n_proxied == 1


def test_admit_proxied_reports_the_connection_limit_first() -> None:
    g = gw_engine(max_pending="1", max_connections="1")
    assert g.admit_proxied(0.0, "p1") is True
    assert g.admit_proxied(0.0, "p2") is False
    assert g.events == {"limit-connections": 1}


def test_admit_proxied_refusals_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    g = gw_engine(max_pending="1")
    assert g.admit_proxied(10.0, "p0")
    with caplog.at_level(logging.WARNING, logger="tcpencap"):
        for i in range(5):
            assert g.admit_proxied(10.0 + i * 0.1, f"p{i + 1}") is False
        assert len(warnings(caplog)) == 1
        assert g.admit_proxied(11.5, "late") is False
    assert g.events == {"limit-pending": 6}
    assert [("p1" in w, "late" in w) for w in warnings(caplog)] == [(True, False), (False, True)]


def test_accept_counts_proxied_connections_as_pending() -> None:
    g = gw_engine(max_pending="2", max_connections="10", max_per_source="10")
    assert g.admit_proxied(0.0, "p1") and g.admit_proxied(0.0, "p2")
    assert g.accept(0.0, G, 4500, C, 50000) is None
    assert g.events == {"limit-pending": 1}
    assert (g.admission.n_gateway, g.admission.n_pending, g.conns) == (0, 0, {})
    # the header arrived: the proxied slot becomes the client's own connection
    g.proxied_done()
    gid = g.accept(0.0, G, 4500, C, 50001)
    assert gid is not None and g.conns[gid].state is not State.CLOSING
    assert (g.admission.n_gateway, g.admission.n_pending, g.admission.n_proxied) == (1, 1, 1)
    assert g.accept(0.0, G, 4500, C, 50002) is None
    assert g.events == {"limit-pending": 2}


def test_proxied_done_gives_the_slot_back() -> None:
    g = gw_engine(max_pending="1")
    for _ in range(3):
        assert g.admit_proxied(0.0, "p") is True
        assert g.admit_proxied(0.0, "q") is False
        g.proxied_done()
        assert g.admission.n_proxied == 0
    assert g.accept(0.0, G, 4500, C, 50000) is not None


def test_front_refused_counts_and_logs_under_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = gw_engine()
    with caplog.at_level(logging.WARNING, logger="tcpencap"):
        g.front_refused(5.0, "proxy-untrusted", "198.18.7.7:40000", "a PROXY header from outside")
        g.front_refused(5.2, "proxy-untrusted", "198.18.7.8:40000", "again")
        g.front_refused(5.3, "proxy-missing", "127.0.0.1:40001", "no PROXY header")
    assert g.events == {"proxy-untrusted": 2, "proxy-missing": 1}
    lines = warnings(caplog)
    assert len(lines) == 2  # the second proxy-untrusted was within the second
    assert "198.18.7.7:40000" in lines[0] and "a PROXY header from outside" in lines[0]
    assert "127.0.0.1:40001" in lines[1] and "no PROXY header" in lines[1]
    assert g.pull() == [] and g.conns == {}
    assert (g.admission.n_gateway, g.admission.n_pending, g.admission.n_proxied) == (0, 0, 0)


def test_front_failed_counts_logs_and_closes_a_gateway_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = gw_engine()
    gid = g.accept(1.0, G, 4500, C, 50000)
    assert gid is not None
    g.pull()
    with caplog.at_level(logging.WARNING, logger="tcpencap"):
        g.front_failed(2.0, gid, 0, "tls-handshake", "alert unknown ca")
    conn = g.conns[gid]
    assert conn.drops == {"tls-handshake": 1}
    assert g.events == {"tls-handshake": 1}
    (line,) = warnings(caplog)
    assert "alert unknown ca" in line and f"conn {gid} " in line
    (close,) = g.pull()
    assert isinstance(close, Close) and (close.conn_id, close.reason) == (gid, "tls-handshake")
    assert conn.state is State.CLOSING
    # a second failure is counted, but the connection is closed once
    g.front_failed(2.1, gid, 0, "tls-handshake", "again")
    assert conn.drops == {"tls-handshake": 2} and g.pull() == []
    # the shell reports the loss: the slots come back
    g.connection_lost(2.2, gid, 0, None)
    assert (g.admission.n_gateway, g.admission.n_pending, g.admission.per_source) == (0, 0, {})


@pytest.mark.parametrize("which", ["stale-generation", "unknown-id"])
def test_front_failed_on_a_stale_connection_does_nothing(
    which: str, caplog: pytest.LogCaptureFixture
) -> None:
    g = gw_engine()
    gid = g.accept(1.0, G, 4500, C, 50000)
    assert gid is not None
    g.pull()
    conn_id, generation = (gid, 1) if which == "stale-generation" else (gid + 100, 0)
    with caplog.at_level(logging.WARNING, logger="tcpencap"):
        g.front_failed(2.0, conn_id, generation, "tls-handshake", "late")
    assert warnings(caplog) == []
    assert g.events == {} and g.conns[gid].drops == {}
    assert g.pull() == [] and g.conns[gid].state is not State.CLOSING


def test_front_failed_closes_a_client_connection() -> None:
    cfg = parse_config(
        text_of("connections.c1-gw", f"remote_addrs = {G}", "transport = tcp", "tls = yes"),
        PATH,
    )
    c = Rfc9329Engine(cfg, 100.0)
    c.apply(
        100.0,
        plans.plan(plans.Intent(restart_only=plans.restart_only(cfg)), plans.intent_of(cfg)),
    )
    c.pull()
    packet = build_udp_packet(
        addr_bytes(C), addr_bytes(G), 4500, 4500, NON_ESP_MARKER + ike_sa_init()
    )
    c.outbound(100.0, packet)
    (connect,) = [o for o in c.pull() if isinstance(o, Connect)]
    assert c.connected(100.1, connect.conn_id, connect.generation)
    c.pull()
    c.front_failed(100.2, connect.conn_id, connect.generation + 1, "tls-verify", "stale")
    assert c.pull() == [] and c.events == {}
    c.front_failed(100.2, connect.conn_id, connect.generation, "tls-verify", "bad certificate")
    outs = c.pull()
    assert [(type(o), o.conn_id, o.reason) for o in outs if isinstance(o, Close)] == [
        (Close, connect.conn_id, "tls-verify")
    ]
    assert c.conns[connect.conn_id].drops == {"tls-verify": 1}
    assert c.events == {"tls-verify": 1}


def test_a_listener_moving_to_an_overlapping_address_stops_first() -> None:
    """0.0.0.0:4500 (plain) -> 127.0.0.1:4500 (TLS): the kernel refuses the new bind while
    the wildcard socket exists, so the old one must close first."""
    old = plans.Intent(listen=(("0.0.0.0", 4500),))
    new = plans.Intent(tls_listen=(("127.0.0.1", 4500),))
    assert plans.plan(old, new) == [
        plans.StopListening("0.0.0.0", 4500),
        plans.Listen("127.0.0.1", 4500, True),
    ]
    other_port = plans.Intent(tls_listen=(("127.0.0.1", 4443),))
    assert plans.plan(old, other_port) == [
        plans.Listen("127.0.0.1", 4443, True),
        plans.StopListening("0.0.0.0", 4500),
    ]
