"""tcpencap.conf text for the tests of its settings, and the configurations it parses to:
one key per line inside a section, as an administrator writes it."""

from __future__ import annotations

from typing import Any

import pytest

from tcpencap.config import ConfigError, parse_config

PATH = "/etc/strongswan.d/tcpencap.conf"
CERT, KEY = "/etc/tcpencap/gw.crt", "/etc/tcpencap/gw.key"
PIN_HEX = "".join(f"{i:02X}" for i in range(0xA0, 0xC0))  # 32 octets, 64 hex digits
PIN = bytes.fromhex(PIN_HEX)
C, G = "198.18.1.2", "198.19.0.2"


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
