"""Tests for the configuration model (tcpencap.config): defaults, every key, bad values and
cTCP settings; the parser it reads with has tests/test_confparse.py."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from tcpencap.config import (
    DEFAULT_PATH,
    DEFAULTS_SOURCE,
    ClientConfig,
    Config,
    ConfigError,
    ConnectionConfig,
    GatewayConfig,
    default_config,
    field_defaults,
    load_config,
    parse_config,
)
from tcpencap.confparse import MemoryReader

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "tcpencap.conf"


def cfg_err(text: str, path: str = "/c/t.conf") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, path, MemoryReader({}))
    return info.value


# ---------------------------------------------------------------- model: defaults


def test_defaults():
    c = default_config()
    assert c == Config(
        vici_socket="unix:///var/run/charon.vici",
        status_socket="/run/tcpencap/tcpencap.ctl",
        queue_num=4500,
        inject="raw",
        max_frame=65535,
        log_level="info",
        client=ClientConfig(port=0, port_range=(32768, 60999), connect_timeout=5.0),
        gateway=GatewayConfig(
            listen=(), max_connections=1000, first_message_timeout=5.0, max_buffer=262144
        ),
        connections={},
        source="(defaults)",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.queue_num = 1  # type: ignore[misc]
    assert DEFAULT_PATH == "/etc/strongswan.d/tcpencap.conf"


def test_empty_text_and_foreign_sections_give_defaults():
    c = parse_config("charon {\n  foo = bar\n}\nlibstrongswan {\n x { y = z\n}\n}\n", "/x.conf")
    assert dataclasses.replace(c, source="(defaults)") == default_config()
    assert c.source == "/x.conf"


def test_empty_values_mean_defaults():
    text = 'tcpencap {\n queue_num =\n log_level = ""\n client {\n port_range =\n }\n}\n'
    assert dataclasses.replace(parse_config(text), source="(defaults)") == default_config()


def test_example_config_is_all_defaults():
    text = EXAMPLE.read_text()
    c = parse_config(text, str(EXAMPLE))
    assert dataclasses.replace(c, source="(defaults)") == default_config()
    # uncommenting every "# key = value" line (and the example section) changes nothing
    # but adding the example connection with its defaults
    uncommented = re.sub(r"(?m)^(\s*)# (\S+ (=.*|\{)|\})$", r"\1\2", text)
    assert uncommented != text
    c2 = parse_config(uncommented, str(EXAMPLE))
    assert c2.connections == {"home": ConnectionConfig("home")}
    assert dataclasses.replace(c2, connections={}) == dataclasses.replace(c, connections={})


def test_example_config_mentions_every_key():
    text = EXAMPLE.read_text()
    for cls in (Config, ClientConfig, GatewayConfig, ConnectionConfig):
        for f in dataclasses.fields(cls):
            if f.name in ("source", "name", "client", "gateway", "connections"):
                continue
            assert re.search(rf"(?m)^\s*# {f.name} =", text), f.name


# ---------------------------------------------------------------- model: each key

FULL = """
charon {
    plugins {
        vici {
            socket = unix:///ignored/when/set.vici
        }
    }
}
tcpencap {
    vici_socket = tcp://127.0.0.1:4502
    status_socket = /tmp/t.ctl
    queue_num = 7
    inject = RAW
    max_frame = 1500
    log_level = Debug
    client {
        port = 40000
        port_range = 1024 - 2047
        connect_timeout = 1500ms
    }
    gateway {
        listen = 198.18.0.1:4500, [fd00::0:1]:10000, 0.0.0.0:443
        max_connections = 5
        first_message_timeout = 2m
        max_buffer = 4096
    }
    connections {
        home {
            remote_port = 10000
            transport = fallback
            encapsulation = ctcp
            remote_addrs = 198.18.0.2, FD00:0::2, vpn.example.com, 198.18.0.2
        }
        office {
        }
    }
}
"""


def test_every_key():
    c = parse_config(FULL, "/e/full.conf")
    assert c == Config(
        vici_socket="tcp://127.0.0.1:4502",
        status_socket="/tmp/t.ctl",
        queue_num=7,
        inject="raw",
        max_frame=1500,
        log_level="debug",
        client=ClientConfig(port=40000, port_range=(1024, 2047), connect_timeout=1.5),
        gateway=GatewayConfig(
            listen=(("198.18.0.1", 4500), ("fd00::1", 10000), ("0.0.0.0", 443)),
            max_connections=5,
            first_message_timeout=120.0,
            max_buffer=4096,
        ),
        connections={
            "home": ConnectionConfig(
                "home", 10000, "fallback", "ctcp", ("198.18.0.2", "fd00::2", "vpn.example.com")
            ),
            "office": ConnectionConfig("office", 4500, "tcp", "rfc9329", ()),
        },
        source="/e/full.conf",
    )


@pytest.mark.parametrize(
    "text,seconds",
    [("5", 5.0), ("5s", 5.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("0.25", 0.25)],
)
def test_durations(text: str, seconds: float):
    c = parse_config(f"tcpencap {{\n client {{\n connect_timeout = {text}\n }}\n}}\n")
    assert c.client.connect_timeout == seconds


def test_vici_socket_falls_back_to_charon_setting():
    vici = "charon {\n plugins {\n vici {\n socket = unix:///run/x.vici\n }\n }\n}\n"
    assert parse_config(vici).vici_socket == "unix:///run/x.vici"
    assert (
        parse_config(vici + "tcpencap {\n vici_socket =\n}\n").vici_socket == "unix:///run/x.vici"
    )
    own = vici + "tcpencap {\n vici_socket = unix:///own.vici\n}\n"
    assert parse_config(own).vici_socket == "unix:///own.vici"
    empty = "charon {\n plugins {\n vici {\n socket =\n }\n }\n}\n"
    assert parse_config(empty).vici_socket == "unix:///var/run/charon.vici"
    e = cfg_err("charon {\n plugins {\n vici {\n socket = /no/scheme\n }\n }\n}\n")
    assert (e.line, e.message.split(":")[0]) == (4, "charon.plugins.vici.socket")


def test_settings_from_included_files_report_their_own_file():
    files = {
        "/etc/strongswan.d/tcpencap.conf": "tcpencap {\n include tcpencap.d/*.conf\n}\n",
        "/etc/strongswan.d/tcpencap.d/home.conf": "connections {\n home {\n transport = x\n }\n}\n",
    }
    r = MemoryReader(files)
    with pytest.raises(ConfigError) as info:
        load_config("/etc/strongswan.d/tcpencap.conf", r)
    assert str(info.value) == (
        "/etc/strongswan.d/tcpencap.d/home.conf:3: tcpencap.connections.home.transport: "
        "'x' is not one of tcp|fallback|udp"
    )


def test_load_config_paths(tmp_path: Path):
    # missing default file: defaults; missing explicit file: an error at line 0
    assert load_config(None, MemoryReader({})) == default_config()
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "absent.conf"))
    assert (info.value.path, info.value.line) == (str(tmp_path / "absent.conf"), 0)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path))  # a directory
    p = tmp_path / "t.conf"
    p.write_text("tcpencap {\n queue_num = 9\n}\n")
    c = load_config(str(p))
    assert (c.queue_num, c.source) == (9, str(p))
    dflt = MemoryReader({DEFAULT_PATH: "tcpencap {\n max_frame = 100\n}\n"})
    assert load_config(None, dflt).max_frame == 100
    assert load_config(None, dflt).source == DEFAULT_PATH


# ---------------------------------------------------------------- model: bad values


def test_documented_error_message():
    text = "\n" * 9 + "tcpencap {\n gateway {\n  listen = 1.2.3.4:99999\n }\n}\n"
    e = cfg_err(text, "/etc/strongswan.d/tcpencap.conf")
    assert str(e) == (
        "/etc/strongswan.d/tcpencap.conf:12: tcpencap.gateway.listen: "
        "'1.2.3.4:99999' is not ADDR:PORT with a port 1-65535"
    )


BAD = [
    ("", "vici_socket", "/var/run/charon.vici", "is not unix:///PATH"),
    ("", "vici_socket", "unix://relative", "is not unix:///PATH"),
    ("", "vici_socket", "tcp://localhost:4502", "is not unix:///PATH"),
    ("", "status_socket", "run/x.ctl", "is not an absolute path"),
    ("", "queue_num", "-1", "is not an integer"),
    ("", "queue_num", "65533", "is out of range 0..65532"),  # cTCP's two, the IKE check
    ("", "queue_num", "0x10", "is not an integer"),
    ("", "queue_num", "99999999999999999999", "is not an integer"),
    ("", "inject", "tun", "is not one of raw"),
    ("", "max_frame", "63", "is out of range 64..65535"),
    ("", "max_frame", "65536", "is out of range 64..65535"),
    ("", "log_level", "verbose", "is not one of debug|info|warning|error"),
    ("client", "port", "65536", "is out of range 0..65535"),
    ("client", "port", "abc", "is not an integer"),
    ("client", "port_range", "2000-1000", "is not a port range"),
    ("client", "port_range", "0-1000", "is not a port range"),
    ("client", "port_range", "1000-70000", "is not a port range"),
    ("client", "port_range", "1000", "is not a port range"),
    ("client", "connect_timeout", "0", "is out of range"),
    ("client", "connect_timeout", "2d", "is not a duration"),
    ("client", "connect_timeout", "5 sec", "is not a duration"),
    ("client", "connect_timeout", "-1s", "is not a duration"),
    ("client", "connect_timeout", "25h", "is out of range"),
    ("gateway", "listen", "1.2.3.4", "is not ADDR:PORT"),
    ("gateway", "listen", "1.2.3.4:0", "is not ADDR:PORT"),
    ("gateway", "listen", "example.com:4500", "is not ADDR:PORT"),
    ("gateway", "listen", "::1:4500", "IPv6 in brackets"),
    ("gateway", "listen", "[1.2.3.4]:4500", "IPv6 in brackets"),
    ("gateway", "listen", "[::]:4500,", "is not ADDR:PORT"),
    ("gateway", "listen", "300.1.1.1:4500", "is not ADDR:PORT"),
    ("gateway", "listen", "[::]:4500, [0::0]:4500", "is listed twice"),
    ("gateway", "max_connections", "0", "is out of range"),
    ("gateway", "first_message_timeout", "soon", "is not a duration"),
    ("gateway", "max_buffer", "100", "is out of range"),
    ("connections.c1", "remote_port", "0", "is out of range 1..65535"),
    ("connections.c1", "transport", "tls", "is not one of tcp|fallback|udp"),
    ("connections.c1", "encapsulation", "rfc8229", "is not one of rfc9329|ctcp"),
    ("connections.c1", "remote_addrs", "198.18.0.1/24", "is not an IP address or DNS name"),
    ("connections.c1", "remote_addrs", "%any", "is not an IP address or DNS name"),
    ("connections.c1", "remote_addrs", "1.2.3.4,,5.6.7.8", "is not an IP address or DNS name"),
    ("connections.c1", "remote_addrs", "300.1.1.1", "is not an IP address or DNS name"),
]


def _nest(section: str, body: str) -> tuple[str, int]:
    """``body`` inside tcpencap.SECTION; returns the text and the body's line number."""
    parts = ["tcpencap"] + (section.split(".") if section else [])
    text = "".join(f"{p} {{\n" for p in parts) + body + "\n" + "}\n" * len(parts)
    return "# leading comment\n" + text, len(parts) + 2


@pytest.mark.parametrize("section,key,value,reason", BAD)
def test_bad_values(section: str, key: str, value: str, reason: str):
    text, line = _nest(section, f"  {key} = {value}  # comment")
    e = cfg_err(text, "/etc/t.conf")
    dotted = ".".join(["tcpencap"] + ([section] if section else []) + [key])
    assert (e.path, e.line) == ("/etc/t.conf", line)
    assert e.message.startswith(f"{dotted}: '")
    assert reason in e.message
    assert str(e).startswith(f"/etc/t.conf:{line}: {dotted}: ")


def test_list_errors_quote_the_bad_element():
    text, _ = _nest("gateway", "listen = 0.0.0.0:4500, [::]:99999")
    assert "listen: '[::]:99999' is not ADDR:PORT" in cfg_err(text).message
    text, _ = _nest("connections.c", "remote_addrs = 1.2.3.4, bad_name")
    assert "remote_addrs: 'bad_name' is not an IP address" in cfg_err(text).message


@pytest.mark.parametrize(
    "section,body,dotted,reason",
    [
        ("", "queue = 5", "tcpencap.queue", "unknown key"),
        ("", "client = 5", "tcpencap.client", "unknown key (it is a section)"),
        ("", "servers {\n}", "tcpencap.servers", "unknown section"),
        ("client", "listen = 0.0.0.0:1", "tcpencap.client.listen", "unknown key"),
        ("client", "x {\n}", "tcpencap.client.x", "unknown section"),
        ("gateway", "port = 1", "tcpencap.gateway.port", "unknown key"),
        ("connections", "home = 1", "tcpencap.connections.home", "unknown key"),
        (
            "connections.home",
            "remoteport = 1",
            "tcpencap.connections.home.remoteport",
            "unknown key",
        ),
        (
            "connections.home",
            "children {\n}",
            "tcpencap.connections.home.children",
            "unknown section",
        ),
    ],
)
def test_unknown_keys_and_sections(section: str, body: str, dotted: str, reason: str):
    text, line = _nest(section, body)
    e = cfg_err(text, "/etc/t.conf")
    assert (e.path, e.line) == ("/etc/t.conf", line)
    assert e.message == f"{dotted}: {reason}"


def test_unknown_keys_are_caught_even_when_empty():
    text, line = _nest("gateway", "typo =")
    assert cfg_err(text).line == line


def test_tcpencap_must_be_a_section_and_references_are_rejected():
    e = cfg_err("a = 1\ntcpencap = yes\n")
    assert (e.line, e.message) == (2, "tcpencap: must be a section, not a key")
    e = cfg_err("base {\n}\ntcpencap {\n connections {\n c : base {\n }\n }\n}\n")
    assert e.line == 5 and "references" in e.message


def test_max_buffer_must_hold_a_frame():
    text = "tcpencap {\n max_frame = 4096\n gateway {\n  max_buffer = 4097\n }\n}\n"
    e = cfg_err(text)
    assert e.line == 4 and e.message.startswith("tcpencap.gateway.max_buffer: 4097 is smaller")
    ok = text.replace("4097", "4098")
    assert parse_config(ok).gateway.max_buffer == 4098


def test_later_definition_wins_in_the_model():
    text = "tcpencap {\n queue_num = 99999\n}\ntcpencap {\n queue_num = 3\n}\n"
    assert parse_config(text).queue_num == 3


# ---------------------------------------------------------------- cTCP settings


def test_ctcp_listen_and_remote_port_default():
    text = """tcpencap {
  gateway {
    listen = 0.0.0.0:4500
    ctcp_listen = 198.18.0.1:10000, [::]:10001
  }
  connections {
    cisco {
      encapsulation = ctcp
    }
    cisco2 {
      encapsulation = CTCP
      remote_port = 443
    }
    ietf {
    }
  }
}
"""
    c = parse_config(text)
    assert c.gateway.ctcp_listen == (("198.18.0.1", 10000), ("::", 10001))
    assert c.gateway.listen == (("0.0.0.0", 4500),)
    assert c.connections["cisco"].remote_port == 10000
    assert c.connections["cisco2"].remote_port == 443
    assert c.connections["ietf"].remote_port == 4500
    assert default_config().gateway.ctcp_listen == ()


@pytest.mark.parametrize(
    "listen,ctcp",
    [
        ("198.18.0.1:10000", "198.18.0.1:10000"),
        ("0.0.0.0:10000", "198.18.0.1:10000"),
        ("[fd00::1]:10000", "[::]:10000"),
    ],
)
def test_ctcp_listen_must_not_overlap_listen(listen: str, ctcp: str):
    text = f"tcpencap {{\n gateway {{\n  listen = {listen}\n  ctcp_listen = {ctcp}\n }}\n}}\n"
    err = cfg_err(text)
    assert err.line == 4
    assert "tcpencap.gateway.ctcp_listen:" in err.message
    assert "is also in tcpencap.gateway.listen" in err.message


@pytest.mark.parametrize(
    "listen,ctcp",
    [
        ("198.18.0.1:10000", "198.18.0.2:10000"),
        ("0.0.0.0:10000", "[::]:10000"),
        ("[::]:1", "[::]:2"),
    ],
)
def test_ctcp_listen_may_share_port_with_other_addresses(listen: str, ctcp: str):
    text = f"tcpencap {{\n gateway {{\n  listen = {listen}\n  ctcp_listen = {ctcp}\n }}\n}}\n"
    assert len(parse_config(text).gateway.ctcp_listen) == 1


def test_ctcp_listen_bad_values():
    err = cfg_err("tcpencap {\n gateway {\n  ctcp_listen = 1.2.3.4\n }\n}\n")
    assert "tcpencap.gateway.ctcp_listen: '1.2.3.4' is not ADDR:PORT" in err.message


def test_fallback_timeout_per_connection():
    cfg = parse_config(
        "tcpencap {\n connections {\n  a {\n   transport = fallback\n"
        "   fallback_timeout = 3s\n  }\n  b {\n  }\n }\n}\n"
    )
    assert cfg.connections["a"].transport == "fallback"
    assert cfg.connections["a"].fallback_timeout == 3.0
    assert cfg.connections["b"].fallback_timeout == 5.0


def test_ctcp_timers_default_and_override():
    g = default_config().gateway
    assert (g.ctcp_handshake_timeout, g.ctcp_no_sa_timeout) == (3.0, 60.0)
    text = "tcpencap {\n gateway {\n  ctcp_handshake_timeout = 500ms\n"
    text += "  ctcp_no_sa_timeout = 2s\n }\n}\n"
    g = parse_config(text).gateway
    assert (g.ctcp_handshake_timeout, g.ctcp_no_sa_timeout) == (0.5, 2.0)
    with pytest.raises(ConfigError):
        parse_config("tcpencap {\n gateway {\n  ctcp_no_sa_timeout = 0\n }\n}\n")


def _empty_keys(model: type, skip: tuple[str, ...] = ()) -> str:
    """Every field of a settings dataclass as ``key =`` (an empty value means the default)."""
    return "".join(f"{f.name} =\n" for f in dataclasses.fields(model) if f.name not in skip)


def test_every_key_set_empty_gives_the_dataclass_defaults():
    """The defaults are written once, in the dataclasses: reading a key that is set empty
    must give its field's default, for every field of every section. A default written
    again in the reader (and changed in one place only) fails here, and so does a field
    the reader does not know (an unknown key)."""
    text = (
        "tcpencap {\n"
        + _empty_keys(Config, skip=("client", "gateway", "connections", "source"))
        + "client {\n" + _empty_keys(ClientConfig) + "}\n"
        + "gateway {\n" + _empty_keys(GatewayConfig) + "}\n"
        + "connections {\n c {\n" + _empty_keys(ConnectionConfig, skip=("name",)) + " }\n}\n"
        + "}\n"
    )  # fmt: skip
    c = parse_config(text)
    assert dataclasses.replace(c, connections={}, source=DEFAULTS_SOURCE) == default_config()
    assert c.connections == {"c": ConnectionConfig(name="c")}
    assert field_defaults(GatewayConfig)["max_buffer"] == GatewayConfig().max_buffer
    assert field_defaults(Config)["client"] == ClientConfig()
