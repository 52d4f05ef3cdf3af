"""Opening VICI sessions to charon (blocking; callers run them in a thread)."""

from __future__ import annotations

import socket
from typing import Any

import vici


def open_socket(uri: str, timeout: float | None = 5.0) -> socket.socket:
    """Connect to charon's VICI socket given as ``unix:///path`` or ``tcp://host:port``."""
    if uri.startswith("unix://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = uri[len("unix://") :]
    elif uri.startswith("tcp://"):
        host, _, port = uri[len("tcp://") :].rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout)
        return sock
    else:
        raise ValueError(f"unsupported VICI socket URI {uri!r}")
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


def open_session(uri: str, timeout: float | None = 5.0) -> vici.Session:
    return vici.Session(sock=open_socket(uri, timeout))


def text(value: Any) -> Any:
    """VICI returns bytes everywhere; decode recursively for logs and comparisons."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list):
        return [text(v) for v in value]
    if isinstance(value, dict):
        return {k: text(v) for k, v in value.items()}
    return value
