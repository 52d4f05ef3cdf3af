"""A parser for strongSwan's strongswan.conf syntax (see strongswan.conf(5)).

tcpencap keeps its settings next to charon's, in the same format, so an administrator
edits one more file in /etc/strongswan.d and nothing new to learn. The parser is pure:
it takes text and a path, and reads included files only through a ``Reader`` so tests
(and callers) can supply the file system. Every key and section remembers the file and
line that defined it, so the configuration model can point at the offending line.

Supported: ``name { ... }`` sections that merge when repeated, ``key = value`` with the
value running to the end of the line (or to ``#``), ``"quoted"`` values with escapes that
may span lines, ``include PATH`` (shell globs, relative to the including file), section
references ``name : a.b, c { ... }`` (recorded, not resolved), and dotted look-ups.
Later definitions replace earlier ones.
"""

from __future__ import annotations

import glob as _glob
import os
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Protocol

# strongswan.conf(5): names may hold any printable character except these and spaces.
_NAME_STOP = frozenset('.,:{}="#\n\t\r ')
_SPACE = " \t\r"
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
_GLOB_CHARS = frozenset("*?[")

MAX_INCLUDE_DEPTH = 32
MAX_SECTION_DEPTH = 64


class ConfError(ValueError):
    """A configuration error tied to a file and line (line 0: the file as a whole)."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(path, line, message)
        self.path = path
        self.line = line
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class Reader(Protocol):
    """How includes reach files: reading one and expanding a glob pattern."""

    def read(self, path: str) -> str: ...

    def glob(self, pattern: str) -> list[str]: ...


class FileReader:
    """The real file system (UTF-8 text)."""

    def read(self, path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()

    def glob(self, pattern: str) -> list[str]:
        return [p for p in _glob.glob(pattern) if os.path.isfile(p)]


class MemoryReader:
    """Files held in a mapping of path to text; for tests and for callers that stage
    configuration in memory. Paths are normalised, globs match with fnmatch per component."""

    def __init__(self, files: Mapping[str, str]) -> None:
        self.files = {posixpath.normpath(p): t for p, t in files.items()}

    def read(self, path: str) -> str:
        try:
            return self.files[posixpath.normpath(path)]
        except KeyError:
            raise FileNotFoundError(2, "No such file or directory", path) from None

    def glob(self, pattern: str) -> list[str]:
        want = posixpath.normpath(pattern).split("/")
        return [
            p
            for p in self.files
            if len(parts := p.split("/")) == len(want)
            and all(fnmatchcase(a, b) for a, b in zip(parts, want, strict=True))
        ]


@dataclass(slots=True)
class Setting:
    """One ``key = value``; ``path``/``line`` are those of its latest definition."""

    name: str
    value: str
    path: str
    line: int


@dataclass(slots=True)
class Section:
    """A section; ``path``/``line`` are those of its first definition."""

    name: str
    path: str
    line: int
    keys: dict[str, Setting] = field(default_factory=dict)
    sections: dict[str, Section] = field(default_factory=dict)
    refs: tuple[str, ...] = ()

    def find(self, dotted: str) -> Section | None:
        """The subsection at a dotted path (``""`` is this section), or None."""
        sec: Section | None = self
        for part in dotted.split(".") if dotted else ():
            sec = sec.sections.get(part) if sec is not None else None
        return sec

    def get(self, dotted: str) -> Setting | None:
        """The setting at a dotted path such as ``charon.plugins.vici.socket``, or None."""
        head, _, key = dotted.rpartition(".")
        sec = self.find(head)
        return sec.keys.get(key) if sec is not None else None

    def value(self, dotted: str, default: str | None = None) -> str | None:
        s = self.get(dotted)
        return s.value if s is not None else default

    def walk(self, prefix: str = "") -> Iterator[tuple[str, Setting]]:
        """Every setting below this section as (dotted name, setting)."""
        for name, s in self.keys.items():
            yield prefix + name, s
        for name, sec in self.sections.items():
            yield from sec.walk(prefix + name + ".")


def parse(text: str, path: str = "<string>", reader: Reader | None = None) -> Section:
    """Parse strongswan.conf text; ``path`` names it in errors and anchors relative includes."""
    root = Section("", path, 0)
    _Parser(reader or FileReader(), [posixpath.normpath(posixpath.abspath(path))]).parse_into(
        text, path, root
    )
    return root


def parse_file(path: str, reader: Reader | None = None) -> Section:
    """Read and parse a file; a file that cannot be read is a ConfError at line 0."""
    reader = reader or FileReader()
    return parse(_read(reader, path, path, 0), path, reader)


def _read(reader: Reader, path: str, err_path: str, err_line: int) -> str:
    try:
        return reader.read(path)
    except FileNotFoundError:
        raise ConfError(err_path, err_line, f"cannot read {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfError(err_path, err_line, f"cannot read {path}: not UTF-8 ({e.reason})") from None
    except OSError as e:
        raise ConfError(err_path, err_line, f"cannot read {path}: {e.strerror or e}") from None


class _Parser:
    """Recursive descent over one file's text; includes recurse with a fresh _Text."""

    def __init__(self, reader: Reader, stack: list[str]) -> None:
        self.reader = reader
        self.stack = stack  # normalised paths of the files being parsed, outermost first

    def parse_into(self, text: str, path: str, target: Section) -> None:
        t = _Text(text.replace("\r\n", "\n"), path)
        self._body(t, target, depth=0)

    def _body(self, t: _Text, sec: Section, depth: int) -> None:
        """Statements up to the closing brace (depth > 0) or the end of the text."""
        open_line = t.line
        while True:
            t.skip_blank()
            if t.eof():
                if depth:
                    raise ConfError(t.path, open_line, f"section '{sec.name}' is not closed")
                return
            if t.peek() == "}":
                if not depth:
                    raise ConfError(t.path, t.line, "'}' without an open section")
                t.pos += 1
                return
            self._statement(t, sec, depth)

    def _statement(self, t: _Text, sec: Section, depth: int) -> None:
        line = t.line
        name = t.name()
        if not name:
            raise ConfError(t.path, line, f"expected a name, found {t.describe()}")
        if name == "include" and t.peek() in (" ", "\t"):
            t.skip_space()
            if t.peek() not in ("=", "{", ":"):
                self._include(t, sec, line)
                return
        if t.peek() == ".":
            raise ConfError(t.path, line, f"'{name}.': names may not contain '.'")
        t.skip_blank()
        ch = t.peek()
        if ch == "=":
            t.pos += 1
            sec.keys[name] = Setting(name, t.value(), t.path, line)
            return
        refs: tuple[str, ...] = ()
        if ch == ":":
            t.pos += 1
            refs = self._refs(t, line)
            ch = t.peek()
        if ch != "{":
            raise ConfError(
                t.path, line, f"expected '=' or '{{' after '{name}', found {t.describe()}"
            )
        t.pos += 1
        if depth + 1 > MAX_SECTION_DEPTH:
            raise ConfError(t.path, line, f"sections nested deeper than {MAX_SECTION_DEPTH}")
        sub = sec.sections.get(name)
        if sub is None:
            sub = sec.sections[name] = Section(name, t.path, line)
        if refs:
            sub.refs = refs
        self._body(t, sub, depth + 1)

    def _refs(self, t: _Text, line: int) -> tuple[str, ...]:
        """``a.b, c`` after a section name's colon, up to the opening brace."""
        refs: list[str] = []
        while True:
            t.skip_blank()
            start = t.pos
            while not t.eof() and (t.peek() == "." or t.peek() not in _NAME_STOP):
                t.pos += 1
            ref = t.text[start : t.pos]
            if not ref or "" in ref.split("."):
                raise ConfError(t.path, line, f"bad section reference near {t.describe()}")
            refs.append(ref)
            t.skip_blank()
            if t.peek() != ",":
                return tuple(refs)
            t.pos += 1

    def _include(self, t: _Text, sec: Section, line: int) -> None:
        pattern = t.value()
        if not pattern:
            raise ConfError(t.path, line, "include needs a path")
        full = posixpath.join(posixpath.dirname(t.path), pattern)
        if _GLOB_CHARS.isdisjoint(pattern):
            files = [full]  # a plain path must exist; a glob may match nothing
        else:
            try:
                files = sorted(self.reader.glob(full))
            except OSError as e:
                raise ConfError(t.path, line, f"include {pattern}: {e.strerror or e}") from None
        for f in files:
            key = posixpath.normpath(posixpath.abspath(f))
            if key in self.stack:
                raise ConfError(t.path, line, f"include loop: {f} is already being read")
            if len(self.stack) > MAX_INCLUDE_DEPTH:
                raise ConfError(t.path, line, f"includes nested deeper than {MAX_INCLUDE_DEPTH}")
            text = _read(self.reader, f, t.path, line)
            self.stack.append(key)
            try:
                self.parse_into(text, f, sec)
            finally:
                self.stack.pop()


class _Text:
    """A cursor over one file's text that counts lines as it goes."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.pos = 0
        self.line = 1

    def eof(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def describe(self) -> str:
        ch = self.peek()
        return "end of file" if not ch else "end of line" if ch == "\n" else repr(ch)

    def _advance(self) -> str:
        ch = self.text[self.pos]
        self.pos += 1
        if ch == "\n":
            self.line += 1
        return ch

    def skip_space(self) -> None:
        while self.peek() and self.peek() in _SPACE:
            self.pos += 1

    def skip_comment(self) -> None:
        while self.peek() and self.peek() != "\n":
            self.pos += 1

    def skip_blank(self) -> None:
        """Spaces, newlines and comments."""
        while (ch := self.peek()) and (ch in _SPACE or ch in "\n#"):
            if ch == "#":
                self.skip_comment()
            else:
                self._advance()

    def name(self) -> str:
        start = self.pos
        while self.peek() and self.peek() not in _NAME_STOP:
            self.pos += 1
        return self.text[start : self.pos]

    def value(self) -> str:
        """From after ``=`` to the end of the line or a ``#``; quoted parts are kept as
        written (escapes applied, newlines allowed), unquoted ends are trimmed."""
        self.skip_space()
        parts: list[str] = []
        tail = 0  # trailing unquoted whitespace in parts, trimmed at the end
        while (ch := self.peek()) and ch != "\n":
            if ch == "#":
                self.skip_comment()
                break
            if ch == '"':
                parts.append(self._quoted())
                tail = 0
            else:
                parts.append(ch)
                self.pos += 1
                tail = tail + 1 if ch in _SPACE else 0
        if tail:
            del parts[-tail:]
        return "".join(parts)

    def _quoted(self) -> str:
        start_line = self.line
        self.pos += 1  # opening quote
        out: list[str] = []
        while True:
            if self.eof():
                raise ConfError(self.path, start_line, "unterminated quoted string")
            ch = self._advance()
            if ch == '"':
                return "".join(out)
            if ch == "\\":
                if self.eof():
                    raise ConfError(self.path, start_line, "unterminated quoted string")
                esc = self._advance()
                if esc != "\n":  # backslash-newline continues the line
                    out.append(_ESCAPES.get(esc, esc))
            else:
                out.append(ch)
