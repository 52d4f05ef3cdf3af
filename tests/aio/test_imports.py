"""The asyncio shells import in one direction: the daemon (the composition root) imports
the shells, a shell imports the core and the adapters, and no import among tcpencap/aio's
modules goes round in a circle (issue 24: daemon <-> tcp, connect, status, tcp_front).
Imports under TYPE_CHECKING count: a circle for the type checker is a circle for a reader.
ruff's TID251 (tcpencap/aio/ruff.toml) bans importing the daemon; this test also catches
a circle that does not pass through it."""

from __future__ import annotations

import ast
from pathlib import Path

AIO = Path(__file__).resolve().parents[2] / "tcpencap" / "aio"
PREFIX = "tcpencap.aio."


def aio_imports(path: Path) -> set[str]:
    """The tcpencap.aio modules ``path`` imports (anywhere in the file)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tcpencap.aio":
                found.update(f"{PREFIX}{a.name}" for a in node.names)
            elif node.module.startswith(PREFIX):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PREFIX))
    return found


def graph() -> dict[str, set[str]]:
    files = sorted(AIO.glob("*.py"))
    assert len(files) > 10, f"no aio modules under {AIO}"  # a wrong path would pass vacuously
    return {f"{PREFIX}{p.stem}": aio_imports(p) for p in files}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``edges`` (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_aio_module_imports_the_daemon() -> None:
    importers = sorted(m for m, deps in graph().items() if f"{PREFIX}daemon" in deps)
    assert importers == []


def test_the_aio_modules_import_without_a_circle() -> None:
    assert cycle(graph()) is None


def test_the_check_sees_a_circle() -> None:
    """The old shape, daemon -> tcp -> daemon (under TYPE_CHECKING), is found."""
    old = {"daemon": {"tcp", "status"}, "tcp": {"tcp_front", "daemon"}, "status": set()}
    assert cycle(old) == ["daemon", "tcp", "daemon"]
    assert cycle({"a": {"b"}, "b": set()}) is None
