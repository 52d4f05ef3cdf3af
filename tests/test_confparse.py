"""Tests for the strongswan.conf parser (tcpencap.confparse): syntax, includes, errors with
their file and line, and properties on random text."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.config import ConfigError, parse_config
from tcpencap.confparse import (
    MAX_INCLUDE_DEPTH,
    MAX_SECTION_DEPTH,
    ConfError,
    FileReader,
    MemoryReader,
    parse,
    parse_file,
)


def err(text: str, path: str = "/c/t.conf", reader: MemoryReader | None = None) -> ConfError:
    with pytest.raises(ConfError) as info:
        parse(text, path, reader or MemoryReader({}))
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
