"""Build the man pages tcpencap(8) and tcpencap.conf(5) into a directory.

tcpencap.conf(5) lists every key as strongswan.conf(5) does: the dotted key, its default in
brackets, its meaning. Nothing of that is written here a second time: the keys are the fields
of the settings dataclasses in tcpencap/config.py, the defaults come from their
``field_defaults()``, and the meanings are the comments of configs/tcpencap.conf (which
tests/test_config.py holds to the same keys and defaults). A key missing from either side
stops the build. The prose around the list is docs/man/tcpencap.conf.5.in.

Usage: python3 docs/man/build_manpages.py OUTDIR
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tcpencap import __version__  # noqa: E402
from tcpencap.config import (  # noqa: E402
    ClientConfig,
    Config,
    ConnectionConfig,
    GatewayConfig,
    field_defaults,
)

EXAMPLE_CONF = ROOT / "configs" / "tcpencap.conf"
HERE = Path(__file__).resolve().parent
CONNECTION = "<conn>"  # how the man page names a swanctl connection's section
# Fields that are not keys: sections of their own, and what the reader fills in itself.
NOT_KEYS = {"client", "gateway", "connections", "source", "name"}
SECTIONS: tuple[tuple[str, type], ...] = (
    ("tcpencap", Config),
    ("tcpencap.client", ClientConfig),
    ("tcpencap.gateway", GatewayConfig),
    (f"tcpencap.connections.{CONNECTION}", ConnectionConfig),
)


@dataclass
class Entry:
    """One key of the page: its dotted name, its default as written in the file, its meaning."""

    key: str
    default: str
    meaning: str


def code_defaults() -> dict[str, str]:
    """Every key of the code, dotted, with its default as one writes it in the file."""
    out: dict[str, str] = {}
    for prefix, model in SECTIONS:
        defaults = field_defaults(model)
        for f in fields(model):
            if f.name not in NOT_KEYS:
                out[f"{prefix}.{f.name}"] = format_value(defaults[f.name])
    return out


def format_value(value: Any) -> str:
    """A default in the file's syntax: yes/no, durations in s or ms, port ranges LOW-HIGH,
    lists comma separated, nothing for an empty value."""
    if value is None or value == () or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):  # every float setting is a duration in seconds
        return f"{value:g}s" if value >= 1 else f"{value * 1000:g}ms"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}-{value[1]}"
    return str(value)


def example_meanings(text: str) -> tuple[dict[str, str], list[str]]:
    """The meaning of each key from the comments of configs/tcpencap.conf, and the keys in
    the file's order. A key line without a comment of its own shares the one above it
    (e.g. source_prefix_v4 and source_prefix_v6)."""
    meanings: dict[str, str] = {}
    order: list[str] = []
    path: list[str] = []
    pending: list[str] = []
    shared = ""
    for raw in text.splitlines():
        line = raw.strip()
        opened = re.fullmatch(r"(?:# )?(\w+) \{", line)
        key = re.fullmatch(r"# (\w+) =.*", line)
        if opened:
            name = opened.group(1)
            path.append(CONNECTION if path[-1:] == ["connections"] else name)
            pending = []
        elif line in ("}", "# }"):
            path.pop()
            pending = []
        elif key:
            if pending:
                shared = " ".join(pending)
                pending = []
            dotted = ".".join([*path, key.group(1)])
            meanings[dotted] = shared
            order.append(dotted)
        elif line.startswith("#") and path:
            pending.append(line.lstrip("# ").strip())
    return meanings, order


def entries() -> list[Entry]:
    """The page's keys in the example file's order; a key missing on either side is an error."""
    defaults = code_defaults()
    meanings, order = example_meanings(EXAMPLE_CONF.read_text())
    missing = sorted(set(defaults) - set(meanings))
    extra = sorted(set(meanings) - set(defaults))
    if missing or extra:
        raise SystemExit(
            f"{EXAMPLE_CONF}: keys of the code without a comment there: {missing}; "
            f"keys there that the code does not have: {extra}"
        )
    return [Entry(k, defaults[k], meanings[k]) for k in order]


def roff_text(text: str) -> str:
    """Plain text as a roff paragraph: backslashes escaped, no line starting a request."""
    text = text.replace("\\", "\\e")
    return re.sub(r"(?m)^([.'])", r"\\&\1", text)


def settings_section() -> str:
    """The list of keys as strongswan.conf(5) writes it."""
    out = []
    for e in entries():
        out.append(f'.TP\n.BR {e.key} " [{roff_text(e.default)}]"\n{roff_text(e.meaning)}\n')
    return "\n".join(out)


def build(outdir: Path) -> list[Path]:
    """Write tcpencap.8 and tcpencap.conf.5 into ``outdir``."""
    outdir.mkdir(parents=True, exist_ok=True)
    pages = {
        "tcpencap.8": (HERE / "tcpencap.8.in").read_text(),
        "tcpencap.conf.5": (HERE / "tcpencap.conf.5.in")
        .read_text()
        .replace("@SETTINGS@\n", settings_section()),
    }
    written = []
    for name, text in pages.items():
        target = outdir / name
        target.write_text(text.replace("@VERSION@", __version__))
        written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for page in build(Path(sys.argv[1])):
        print(page)
