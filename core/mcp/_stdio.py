"""
The stdio of ``callward mcp serve`` as pipes of the running event loop, for the SDK's
``stdio_server``.

The SDK's own stdio transport reads each line and writes and flushes each answer on a
worker thread, three thread hops per ``tools/call`` on the path of every answer. Here
the loop reads and writes the pipes itself; the SDK still frames, parses and answers
every message (``stdio_server`` is handed these two streams).

Invariants:

- While serving, fd 0 reads the null device and fd 1 writes to stderr, as under the
  SDK's transport: a tool or library that prints cannot tear a frame on the wire.
  Both are pointed back at the wire on exit.
- Only pipes and sockets are served this way (what an MCP client spawns a server
  with); anything else (a terminal, a file) is left to the SDK's own transport
  (``loop_stdio`` yields None), so a shared terminal is never made non-blocking.
- A line longer than ``MAX_LINE_BYTES`` is dropped whole and handed on as an empty
  line, which the SDK treats as the malformed message it is; memory held for one
  line stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import stat
from collections.abc import AsyncIterator
from typing import Final

import structlog

log = structlog.get_logger()

#: The longest line read from the client (a tools/call's arguments are at most 1 MiB).
MAX_LINE_BYTES: Final = 16 << 20
_NEWLINE: Final = b"\n"


class LoopLines:
    """The client's lines, read from a pipe on the running loop, as text."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def __aiter__(self) -> LoopLines:
        return self

    async def __anext__(self) -> str:
        line = await self._next_line()
        if line is None:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")

    async def _next_line(self) -> bytes | None:
        dropped = 0
        while True:
            try:
                line = await self._reader.readuntil(_NEWLINE)
            except asyncio.LimitOverrunError as over:
                # Drop what is buffered of the long line, then read on to its end.
                dropped += await _discard(self._reader, over.consumed)
                continue
            except asyncio.IncompleteReadError as end:  # the client closed: a last partial line
                if not end.partial and not dropped:
                    return None
                line = end.partial
            if dropped:
                log.warning("mcp_stdio_line_too_long", bytes=dropped + len(line),
                            max_bytes=MAX_LINE_BYTES)
                return b""
            return line


async def _discard(reader: asyncio.StreamReader, count: int) -> int:
    data = await reader.readexactly(max(1, count))
    return len(data)


class _WriteFlow(asyncio.Protocol):
    """The writing pipe's flow control: ``drain`` waits while the pipe is full."""

    def __init__(self) -> None:
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost: Exception | None = None

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or BrokenPipeError("the client closed the stdio pipe")
        self._writable.set()

    async def drain(self) -> None:
        await self._writable.wait()
        if self._lost is not None:
            raise self._lost


class LoopWriter:
    """Text written to a pipe on the running loop; ``flush`` waits until the pipe takes it."""

    def __init__(self, transport: asyncio.WriteTransport, flow: _WriteFlow) -> None:
        self._transport = transport
        self._flow = flow

    async def write(self, text: str) -> None:
        if self._transport.is_closing():
            raise BrokenPipeError("the client closed the stdio pipe")
        self._transport.write(text.encode("utf-8"))

    async def flush(self) -> None:
        await self._flow.drain()


def _is_pipe_or_socket(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


@contextlib.asynccontextmanager
async def loop_stdio() -> AsyncIterator[tuple[LoopLines, LoopWriter] | None]:
    """
    Fd 0 and 1 as the running loop's pipes, claimed for the wire while serving; None
    when either is not a pipe or a socket (then serve with the SDK's own transport).
    """
    if not (_is_pipe_or_socket(0) and _is_pipe_or_socket(1)):
        yield None
        return
    loop = asyncio.get_running_loop()
    wire_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    wire_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    wires = ((os.fdopen(wire_in, "rb", buffering=0), 0),
             (os.fdopen(wire_out, "wb", buffering=0), 1))
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, 0)
        os.dup2(2, 1)
    finally:
        os.close(null)
    transports: list[asyncio.BaseTransport] = []
    try:
        reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), wires[0][0])
        transports.append(read_transport)
        write_transport, flow = await loop.connect_write_pipe(_WriteFlow, wires[1][0])
        transports.append(write_transport)
        yield LoopLines(reader), LoopWriter(write_transport, flow)
    finally:
        for wire, fd in wires:
            with contextlib.suppress(OSError, ValueError):
                os.set_blocking(wire.fileno(), True)  # the loop made it non-blocking
                os.dup2(wire.fileno(), fd)  # fd points at the wire again
        for transport in transports:
            transport.close()  # closes its wire
        for wire, _fd in wires[len(transports):]:
            wire.close()
