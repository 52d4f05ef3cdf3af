"""The TLS and PROXY v2 settings (tls_handshake_timeout, gateway
tls_listen/tls_cert/tls_key/proxy_protocol_from, per connection tls/tls_ca/tls_pin/tls_sni):
what is accepted, and what is refused with its file, line and key."""

from __future__ import annotations

import pytest

from tcpencap.config import default_config, parse_config
from tests.config_text import (
    CERT,
    KEY,
    PATH,
    PIN,
    PIN_HEX,
    G,
    config_error,
    connection,
    gateway,
    line_of,
    text_of,
    tls_gateway,
)

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
