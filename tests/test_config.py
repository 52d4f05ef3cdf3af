"""Tests for the strongswan.conf parser (confparse) and the configuration model (config)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from tcpencap.confparse import (
    MAX_INCLUDE_DEPTH,
    MAX_SECTION_DEPTH,
    ConfError,
    FileReader,
    MemoryReader,
    parse,
    parse_file,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "tcpencap.conf"


def err(text: str, path: str = "/c/t.conf", reader: MemoryReader | None = None) -> ConfError:
    with pytest.raises(ConfError) as info:
        parse(text, path, reader or MemoryReader({}))
    return info.value


def cfg_err(text: str, path: str = "/c/t.conf") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, path, MemoryReader({}))
    return info.value


# ---------------------------------------------------------------- parser: syntax


def test_sections_keys_and_locations():
    root = parse("a = b\nsec {\n  x = 1\n  sub {\n    y = 2\n  }\n}\n", "/c/t.conf")
    assert root.value("a") == "b"
    assert root.value("sec.x") == "1"
    assert root.value("sec.sub.y") == "2"
    y = root.get("sec.sub.y")
    assert (y.path, y.line) == ("/c/t.conf", 5)
    sub = root.find("sec.sub")
    assert (sub.name, sub.path, sub.line) == ("sub", "/c/t.conf", 4)
    assert root.get("sec.nope") is None and root.get("nope.x") is None
    assert root.find("sec.x") is None
    assert root.value("missing", "dflt") == "dflt"
    assert dict((k, s.value) for k, s in root.walk()) == {"a": "b", "sec.x": "1", "sec.sub.y": "2"}


def test_comments_and_whitespace():
    text = "# top\n\tsec   {   # opens\n  k = v   # trailing\n  # k = other\n  e =\n}  # done\n"
    root = parse(text)
    assert root.value("sec.k") == "v"
    assert root.value("sec.e") == ""
    assert root.get("sec.e").line == 5


def test_value_runs_to_end_of_line_only():
    root = parse("k = a b  c  \nl = next\n")
    assert root.value("k") == "a b  c"
    assert root.value("l") == "next"
    # an unquoted value never continues on the next line
    assert parse("k =\nl = 1\n").value("k") == ""


def test_quoted_values_and_escapes():
    root = parse(
        'a = "  spaced # not a comment  "\n'
        'b = "q\\"uote \\\\ tab\\tnl\\n"\n'
        'c = "x\\y"\n'
        'd = pre "mid" post # c\n'
        'e = ""\n'
    )
    assert root.value("a") == "  spaced # not a comment  "
    assert root.value("b") == 'q"uote \\ tab\tnl\n'
    assert root.value("c") == "xy"  # unknown escape: the character itself
    assert root.value("d") == "pre mid post"
    assert root.value("e") == ""


def test_multiline_quoted_value_keeps_line_numbers():
    root = parse('a = "one\ntwo\nthree"\nb = "joined \\\nline"\nc = 3\n')
    assert root.value("a") == "one\ntwo\nthree"
    assert root.value("b") == "joined line"
    assert root.get("b").line == 4
    assert root.get("c").line == 6


def test_crlf_line_endings():
    root = parse("s {\r\n  k = v\r\n}\r\n")
    assert root.value("s.k") == "v"
    assert root.get("s.k").line == 2


def test_later_definitions_override_and_sections_merge():
    root = parse(
        "s {\n a = 1\n b = 2\n}\ns {\n a = 3\n t {\n c = 4\n }\n}\ns {\n t {\n d = 5\n }\n}\n"
    )
    assert {k: s.value for k, s in root.walk()} == {
        "s.a": "3",
        "s.b": "2",
        "s.t.c": "4",
        "s.t.d": "5",
    }
    assert root.get("s.a").line == 6  # the latest definition
    assert root.find("s").line == 1  # the first definition
    assert root.find("s.t").line == 7


def test_section_and_key_of_the_same_name_coexist():
    root = parse("x = 1\nx {\n y = 2\n}\n")
    assert root.value("x") == "1" and root.value("x.y") == "2"


def test_section_references_are_recorded():
    root = parse("a {\n}\nb : a, c.d {\n k = v\n}\n")
    assert root.find("b").refs == ("a", "c.d")
    assert root.value("b.k") == "v"
    assert root.find("a").refs == ()


def test_brace_on_next_line_and_names_with_odd_characters():
    root = parse("conn-1_a/b@x\n{\n  k+y = v\n}\n")
    assert root.value("conn-1_a/b@x.k+y") == "v"


# ---------------------------------------------------------------- parser: includes


def test_include_relative_to_including_file():
    files = {
        "/etc/main.conf": "a = 1\ninclude sub/one.conf\nb = 2\n",
        "/etc/sub/one.conf": "c = 3\ninclude two.conf\n",
        "/etc/sub/two.conf": "d = 4\n",
    }
    r = MemoryReader(files)
    root = parse_file("/etc/main.conf", r)
    assert {k: s.value for k, s in root.walk()} == {"a": "1", "b": "2", "c": "3", "d": "4"}
    assert (root.get("d").path, root.get("d").line) == ("/etc/sub/two.conf", 1)
    assert (root.get("c").path, root.get("c").line) == ("/etc/sub/one.conf", 1)


def test_include_inside_section_adds_to_that_section_and_overrides():
    files = {
        "/e/m.conf": "s {\n v = before\n include inc.conf\n}\ninclude other.conf\n",
        "/e/inc.conf": "v = after\nsub {\n o = y\n}\n",
        "/e/other.conf": "s {\n sub {\n o = x\n }\n}\n",
    }
    root = parse_file("/e/m.conf", MemoryReader(files))
    assert root.value("s.v") == "after"
    assert root.value("s.sub.o") == "x"
    assert root.get("s.sub.o").path == "/e/other.conf"
    assert root.get("v") is None


def test_include_glob_in_sorted_order_and_quoted_path():
    files = {
        "/e/m.conf": 'include d/*.conf\ninclude "d/none-*.conf"\n',
        "/e/d/20-b.conf": "k = b\nonly_b = 1\n",
        "/e/d/10-a.conf": "k = a\nonly_a = 1\n",
        "/e/d/x.txt": "k = txt\n",
    }
    root = parse_file("/e/m.conf", MemoryReader(files))
    assert root.value("k") == "b"  # 20-b is read after 10-a
    assert root.value("only_a") == "1" and root.value("only_b") == "1"


def test_include_missing_plain_file_is_an_error_at_the_include_line():
    e = err("a = 1\ninclude nothere.conf\n", "/e/m.conf")
    assert (e.path, e.line) == ("/e/m.conf", 2)
    assert "nothere.conf" in e.message


def test_include_loops_are_caught():
    files = {"/e/a.conf": "include b.conf\n", "/e/b.conf": "x = 1\ninclude a.conf\n"}
    with pytest.raises(ConfError) as info:
        parse_file("/e/a.conf", MemoryReader(files))
    assert (info.value.path, info.value.line) == ("/e/b.conf", 2)
    assert "loop" in info.value.message
    self_loop = {"/e/s.conf": "include *.conf\n"}
    with pytest.raises(ConfError, match="loop"):
        parse_file("/e/s.conf", MemoryReader(self_loop))


def test_include_depth_is_bounded():
    files = {f"/e/{i}.conf": f"include {i + 1}.conf\n" for i in range(MAX_INCLUDE_DEPTH + 5)}
    with pytest.raises(ConfError, match="deeper"):
        parse_file("/e/0.conf", MemoryReader(files))


def test_include_as_a_key_name_is_a_key():
    assert parse("include = 5\n").value("include") == "5"


def test_file_reader_on_real_files(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "main.conf").write_text("include d/*.conf\ns {\n k = main\n}\n")
    (tmp_path / "d" / "a.conf").write_text("s {\n k = a\n j = a\n}\n")
    root = parse_file(str(tmp_path / "main.conf"))
    assert root.value("s.k") == "main" and root.value("s.j") == "a"
    (tmp_path / "bad.conf").write_bytes(b"k = \xff\xfe\n")
    with pytest.raises(ConfError, match="UTF-8"):
        parse_file(str(tmp_path / "bad.conf"))
    with pytest.raises(ConfError) as info:
        parse_file(str(tmp_path / "absent.conf"))
    assert info.value.line == 0


def test_system_strongswan_conf_parses():
    """The installed /etc/strongswan.conf (with its include globs) must parse."""
    root = parse_file("/etc/strongswan.conf", FileReader())
    load = root.get("charon.plugins.vici.load")
    assert load is not None and load.path.endswith("/charon/vici.conf")


# ---------------------------------------------------------------- parser: errors


@pytest.mark.parametrize(
    "text,line,fragment",
    [
        ("s {\n k = v\n", 1, "not closed"),
        ("a = 1\n}\n", 2, "without an open section"),
        ("a = 1\n= 2\n", 2, "expected a name"),
        ("a.b = 1\n", 1, "may not contain '.'"),
        ("s {\n k v\n}\n", 2, "expected '=' or '{'"),
        ("k\n", 1, "expected '=' or '{'"),
        ('a = 1\nb = "open\n\n', 2, "unterminated"),
        ('b = "ends in backslash\\', 1, "unterminated"),
        ("s : {\n}\n", 1, "reference"),
        ("s : a, {\n}\n", 1, "reference"),
        ("include\t\n", 1, "include needs a path"),
        ("x = a { b = 1 }\n}\n", 2, "without an open section"),
    ],
)
def test_syntax_errors_name_file_and_line(text: str, line: int, fragment: str):
    e = err(text)
    assert (e.path, e.line) == ("/c/t.conf", line)
    assert fragment in e.message
    assert str(e) == f"/c/t.conf:{line}: {e.message}"


def test_section_nesting_is_bounded():
    deep = "a {\n" * (MAX_SECTION_DEPTH + 1) + "}\n" * (MAX_SECTION_DEPTH + 1)
    assert "deeper" in err(deep).message
    ok = "a {\n" * MAX_SECTION_DEPTH + "}\n" * MAX_SECTION_DEPTH
    assert parse(ok).find(".".join(["a"] * MAX_SECTION_DEPTH)) is not None


def test_conf_error_str():
    assert str(ConfError("/x/y.conf", 7, "bad thing")) == "/x/y.conf:7: bad thing"
    assert isinstance(ConfigError("p", 1, "m"), ConfError)


# ---------------------------------------------------------------- parser: properties

_NAME = st.text(alphabet="abcxyz_-019/@", min_size=1, max_size=6)
_SYNTAX = st.text(alphabet=' \t\n\r{}=#"\\:,.abincldue*?[]/', max_size=200)


@settings(max_examples=400, deadline=None)
@given(_SYNTAX)
def test_random_text_raises_only_conf_error(text: str):
    try:
        parse(text, "/r/t.conf", MemoryReader({"/r/inc.conf": "k = 1\n"}))
    except ConfError:
        pass
    try:
        parse_config(text, "/r/t.conf", MemoryReader({}))
    except ConfError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_unicode_raises_only_conf_error(text: str):
    try:
        parse_config(text, "/r/t.conf", MemoryReader({"/r/a": "x = 1\n"}))
    except ConfError:
        pass


@st.composite
def _trees(draw, depth=0):
    values = st.text(st.characters(blacklist_characters="\r"), max_size=12)
    keys = draw(st.dictionaries(_NAME, values, max_size=3))
    subs = {}
    if depth < 2:
        subs = draw(st.dictionaries(_NAME, _trees(depth + 1), max_size=2))
    return keys, subs


def _render(tree, indent="") -> str:
    keys, subs = tree
    out = []
    for k, v in keys.items():
        quoted = v.replace("\\", "\\\\").replace('"', '\\"')
        out.append(f'{indent}{k} = "{quoted}"  # c\n')
    for name, sub in subs.items():
        out.append(f"{indent}{name} {{\n{_render(sub, indent + '  ')}{indent}}}\n")
    return "".join(out)


def _flatten(tree, prefix=""):
    keys, subs = tree
    flat = {prefix + k: v for k, v in keys.items()}
    for name, sub in subs.items():
        flat.update(_flatten(sub, prefix + name + "."))
    return flat


@settings(max_examples=150, deadline=None)
@given(_trees())
def test_rendered_trees_parse_back(tree):
    """Every value comes back exactly, newlines, quotes and backslashes included."""
    root = parse(_render(tree))
    assert {k: s.value for k, s in root.walk()} == _flatten(tree)


@settings(max_examples=200, deadline=None)
@given(st.lists(_NAME, min_size=1, max_size=6), st.integers(0, 5))
def test_line_numbers_follow_blank_lines(names, blanks):
    text = "".join(f"{n} = v\n" + "\n" * blanks for n in names)
    root = parse(text)
    for n in set(names):
        last = max(i for i, m in enumerate(names) if m == n)
        assert root.get(n).line == 1 + last * (blanks + 1)


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
