"""
A service's stdio over the Engine's attach socket (`AttachedStdio`), against the other
end of a socket pair that speaks the Engine's multiplexed stream.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct

import pytest

from callward.core import SandboxUnavailable
from callward.sandbox import AttachedStdio
from callward.sandbox._attached_stdio import MAX_LINE_BYTES

STDOUT, STDERR = 1, 2


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def read_lines(engine_sends: bytes) -> tuple[list[bytes | None], list[bytes]]:
    """What ``lines`` yields, and what reached ``on_stderr``, for one stream."""
    ours, engine = socket.socketpair()
    errors: list[bytes] = []

    async def read() -> list[bytes | None]:
        attached = await AttachedStdio.open(ours, on_stderr=errors.append)
        loop = asyncio.get_running_loop()
        sender = loop.run_in_executor(None, _send_and_close, engine, engine_sends)
        lines = [line async for line in attached.lines()]
        await sender
        attached.close()
        return lines

    return asyncio.run(read()), errors


def _send_and_close(engine: socket.socket, data: bytes) -> None:
    engine.sendall(data)
    engine.close()


class TestLines:
    def test_lines_split_across_frames_come_out_whole_and_in_order(self):
        stream = (frame(STDOUT, b'{"a":') + frame(STDOUT, b'1}\n{"b"') + frame(STDOUT, b":2}\n"))
        assert read_lines(stream) == ([b'{"a":1}', b'{"b":2}'], [])

    def test_stderr_goes_to_its_callback_never_into_the_lines(self):
        stream = (frame(STDOUT, b"one") + frame(STDERR, b"warning: x\n")
                  + frame(STDOUT, b"\ntwo\n"))
        assert read_lines(stream) == ([b"one", b"two"], [b"warning: x\n"])

    def test_a_frame_larger_than_one_read_is_read_whole(self):
        big = b"x" * (3 << 20)
        assert read_lines(frame(STDOUT, big + b"\n"))[0] == [big]

    def test_an_overlong_line_is_dropped_whole_and_the_next_is_read(self):
        chunk = b"y" * (1 << 20)
        stream = b"".join(frame(STDOUT, chunk) for _ in range(MAX_LINE_BYTES // len(chunk) + 1))
        stream += frame(STDOUT, b"tail of the long one\nnext\n")
        assert read_lines(stream)[0] == [None, b"next"]

    def test_a_last_line_without_newline_is_kept(self):
        assert read_lines(frame(STDOUT, b"done\nlast"))[0] == [b"done", b"last"]

    def test_a_truncated_frame_ends_the_lines_with_what_arrived(self):
        stream = frame(STDOUT, b"done\nla") + struct.pack(">BxxxL", STDOUT, 10) + b"st"
        assert read_lines(stream)[0] == [b"done", b"last"]


class TestWrite:
    def test_writes_reach_the_engine_and_close_ends_the_services_stdin(self):
        ours, engine = socket.socketpair()

        async def exchange() -> None:
            attached = await AttachedStdio.open(ours, on_stderr=lambda _data: None)
            await attached.write(b'{"jsonrpc":"2.0"}\n')
            attached.close()
            await asyncio.sleep(0)

        asyncio.run(exchange())
        received = b""
        while chunk := engine.recv(65536):
            received += chunk
        engine.close()
        assert received == b'{"jsonrpc":"2.0"}\n'


class TestOpen:
    def test_a_tls_connection_to_the_engine_is_refused_clearly(self):
        context = ssl.create_default_context()
        with socket.socket() as plain, context.wrap_socket(
                plain, server_hostname="engine.example", do_handshake_on_connect=False) as tls:

            async def open_it() -> None:
                await AttachedStdio.open(tls, on_stderr=lambda _data: None)

            with pytest.raises(SandboxUnavailable, match="TLS"):
                asyncio.run(open_it())
