"""
The SDK client's transport to a containerized upstream (`container_stdio`), against the
other end of a socket pair that plays the Engine's attach stream.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import anyio
import mcp_types as types
from mcp.shared.message import SessionMessage
from structlog.testing import capture_logs

from callward.core.mcp._container_stdio import container_stdio


class FakeAttachableService:
    """Stands in for a `StdioService`: `attach` hands over our end of a socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.attached = 0

    def attach(self) -> socket.socket:
        self.attached += 1
        return self._sock


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def test_messages_errors_and_stderr_each_go_their_way():
    ours, engine = socket.socketpair()
    service = FakeAttachableService(ours)
    note = {"jsonrpc": "2.0", "method": "notifications/message",
            "params": {"level": "info", "data": "hi"}}

    async def exchange() -> tuple[list[Any], bytes]:
        async with container_stdio(service, server="notes") as (read_stream, write_stream):  # type: ignore[arg-type]
            engine.sendall(frame(1, json.dumps(note).encode() + b"\n")
                           + frame(2, b"a warning on stderr\n")
                           + frame(1, b"not json\n"))
            seen = [await read_stream.receive(), await read_stream.receive()]
            ping = types.JSONRPCRequest(jsonrpc="2.0", id=7, method="ping")
            await write_stream.send(SessionMessage(ping))
            sent = await anyio.to_thread.run_sync(engine.recv, 65536)
        return seen, sent

    with capture_logs() as logs:
        (message, error), sent = anyio.run(exchange)

    assert service.attached == 1
    assert isinstance(message, SessionMessage)
    assert message.message.model_dump(by_alias=True, exclude_unset=True) == note
    assert isinstance(error, ValueError)
    assert json.loads(sent) == {"jsonrpc": "2.0", "id": 7, "method": "ping"}
    assert sent.endswith(b"\n")
    assert engine.recv(65536) == b""  # leaving the transport ended the server's stdin
    engine.close()
    events = {entry["event"]: entry for entry in logs}
    assert events["mcp_upstream_stderr"]["text"] == "a warning on stderr\n"
    assert events["mcp_upstream_line_malformed"]["server"] == "notes"
