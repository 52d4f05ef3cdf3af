"""tcpencap.aio.control: the root-only control socket (one command, one JSON reply) and the
Prometheus endpoint, served on a unix socket in a temporary directory and on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tcpencap.aio.control import query_status, start_control, start_metrics
from tcpencap.metrics import render

STATUS = {"pid": 1, "connections": [{"id": 1, "peer": "198.19.0.2"}] * 100}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def with_control(path: str, body: Any, reloads: list[int] | None = None) -> Any:
    async def reload() -> dict[str, Any]:
        if reloads is not None:
            reloads.append(1)
        return {"reloaded": True}

    server = await start_control(path, lambda: STATUS, reload)
    try:
        return await body()
    finally:
        server.close()
        await server.wait_closed()


def test_status_and_reload_are_answered_in_json(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "tcpencap.sock")  # the directory is made
    reloads: list[int] = []

    async def body() -> tuple[Any, ...]:
        return (
            await query_status(path),
            await query_status(path, command="reload"),
            await query_status(path, command="frobnicate"),
        )

    status, reload, unknown = run(with_control(path, body, reloads))
    assert status == STATUS  # a reply longer than a stream line limit arrives whole
    assert reload == {"reloaded": True} and reloads == [1]
    assert unknown == {"error": "unknown command 'frobnicate'"}


def test_the_socket_is_for_root_only_and_replaces_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "tcpencap.sock"
    path.write_text("left by a crashed daemon")
    old = os.umask(0o022)
    try:

        async def body() -> int:
            return os.stat(path).st_mode

        mode = run(with_control(str(path), body))
        assert os.umask(0o022) == 0o022  # the daemon's umask is given back
    finally:
        os.umask(old)
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) & 0o077 == 0


def test_a_client_that_says_nothing_is_dropped_and_others_are_served(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")

    async def body() -> Any:
        silent_r, silent_w = await asyncio.open_unix_connection(path)
        answer = await query_status(path)
        silent_w.close()
        return answer

    assert run(with_control(path, body)) == STATUS


async def http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


METRICS_STATUS = {
    "uptime": 3.0,
    "connections": [{"side": "gateway", "state": "OPEN", "frames_in": 4}],
}
METRICS_TOTALS = {"frames_in": 3}


def metrics_server_run(*requests: bytes) -> list[bytes]:
    async def main() -> list[bytes]:
        server = await start_metrics("127.0.0.1", 0, lambda: METRICS_STATUS, lambda: METRICS_TOTALS)
        port = server.sockets[0].getsockname()[1]
        try:
            return [await http(port, r) for r in requests]
        finally:
            server.close()
            await server.wait_closed()

    return run(main())


def test_get_metrics_is_the_prometheus_text() -> None:
    (reply,) = metrics_server_run(b"GET /metrics?x=1 HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.0 200 OK"
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert body == render(METRICS_STATUS, METRICS_TOTALS).encode()
    assert b"tcpencap_frames_in_total 7" in body  # live and closed connections


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST /metrics HTTP/1.0\r\n\r\n",
        b"GET /metricsx HTTP/1.0\r\n\r\n",
    ],
)
def test_anything_else_is_not_found(request_line: bytes) -> None:
    (reply,) = metrics_server_run(request_line)
    assert reply.startswith(b"HTTP/1.0 404 Not Found\r\n") and reply.endswith(
        b"\r\n\r\nnot found\n"
    )


def test_a_half_request_gets_no_answer() -> None:
    (reply,) = metrics_server_run(b"GET /metrics HTTP/1.0\r\n")  # then EOF: no blank line
    assert reply == b""


def test_query_status_reads_the_reply_to_its_end(tmp_path: Path) -> None:
    path = str(tmp_path / "fake.sock")
    reply = {"big": "x" * 300_000}

    async def main() -> Any:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            assert await r.readline() == b"status\n"
            w.write(json.dumps(reply).encode() + b"\n")
            await w.drain()
            w.close()

        server = await asyncio.start_unix_server(serve, path=path)
        try:
            return await query_status(path)
        finally:
            server.close()

    assert run(main()) == reply
