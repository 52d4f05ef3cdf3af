"""vici_bridge.session: VICI sessions to charon over a unix or TCP socket, and the decoding
of VICI's bytes. The far end is a fake charon that speaks the VICI wire format (a length,
a packet type, a VICI message) for one command."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vici.protocol import Message, Packet

from vici_bridge.session import open_session, open_socket, text


class FakeCharon:
    """Answers one ``version`` request on ``server`` (a listening socket), then closes."""

    def __init__(self, server: socket.socket) -> None:
        self.server = server
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            assert chunk, "the session closed early"
            data += chunk
        return data

    def _serve(self) -> None:
        self.server.settimeout(10.0)
        conn, _ = self.server.accept()
        with conn:
            (length,) = struct.unpack("!I", self._recv(conn, 4))
            self.requests.append(self._recv(conn, length))
            reply = bytes([Packet.CMD_RESPONSE]) + Message.serialize(
                {"daemon": "charon", "version": "6.0.0"}
            )
            conn.sendall(struct.pack("!I", len(reply)) + reply)


@pytest.fixture
def unix_charon(tmp_path: Path) -> Iterator[tuple[str, FakeCharon]]:
    path = tmp_path / "charon.vici"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    charon = FakeCharon(server)
    yield f"unix://{path}", charon
    charon.thread.join(10.0)
    server.close()


@pytest.fixture(params=["127.0.0.1", "::1"])
def tcp_charon(request: pytest.FixtureRequest) -> Iterator[tuple[str, FakeCharon]]:
    host = request.param
    server = socket.create_server(
        (host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET
    )
    charon = FakeCharon(server)
    shown = f"[{host}]" if ":" in host else host
    yield f"tcp://{shown}:{server.getsockname()[1]}", charon
    charon.thread.join(10.0)
    server.close()


def ask_version(uri: str) -> dict:
    session = open_session(uri, timeout=5.0)
    try:
        return session.request("version")
    finally:
        session.transport.close()


def test_a_session_over_a_unix_socket_speaks_to_charon(unix_charon) -> None:
    uri, charon = unix_charon
    assert text(ask_version(uri)) == {"daemon": "charon", "version": "6.0.0"}
    charon.thread.join(10.0)
    assert charon.requests == [Packet.request("version")]


def test_a_session_over_tcp_speaks_to_charon(tcp_charon) -> None:
    uri, charon = tcp_charon
    assert text(ask_version(uri))["daemon"] == "charon"
    charon.thread.join(10.0)
    assert charon.requests == [Packet.request("version")]


def test_the_socket_carries_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        with open_socket(f"unix://{path}", timeout=2.5) as sock:
            assert sock.gettimeout() == 2.5
        with open_socket(f"unix://{path}", timeout=None) as sock:
            assert sock.gettimeout() is None  # the event session blocks for events


def test_no_charon_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        open_socket(f"unix://{tmp_path / 'absent.vici'}")


def test_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported VICI socket URI 'http://x'"):
        open_socket("http://x")


VICI = st.recursive(
    st.binary(max_size=8) | st.integers() | st.none(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)


@given(VICI)
def test_text_decodes_every_bytes_value_and_keeps_the_shape(value) -> None:
    def same_shape(raw, decoded) -> bool:
        if isinstance(raw, bytes):
            return decoded == raw.decode(errors="replace")
        if isinstance(raw, list):
            return (
                isinstance(decoded, list)
                and len(raw) == len(decoded)
                and all(same_shape(r, d) for r, d in zip(raw, decoded, strict=True))
            )
        if isinstance(raw, dict):
            return decoded.keys() == raw.keys() and all(same_shape(raw[k], decoded[k]) for k in raw)
        return decoded is raw

    assert same_shape(value, text(value))


def test_text_of_charons_bytes() -> None:
    assert text({"ike": {"state": b"ESTABLISHED", "spis": [b"\x01", b"\xff"]}}) == {
        "ike": {"state": "ESTABLISHED", "spis": ["\x01", "\ufffd"]}
    }
