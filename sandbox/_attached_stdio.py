"""
A service container's stdin, stdout and stderr over its Engine API attach socket, read
and written on the running event loop.

The Engine sends a container without a terminal as one multiplexed stream: frames of an
8-byte header (the stream, 1 for stdout and 2 for stderr, then the payload's length,
big-endian) and the payload; what is written to the socket is the container's stdin.
Reading it here, in the caller's process, spares each message the relay through a
``docker start --attach`` process and its pipes.

Invariants:

- Stdout comes out as whole lines, in order; a line longer than ``MAX_LINE_BYTES`` is
  dropped whole and reported as None in its place, so memory held for one line stays
  bounded.
- Stderr never mixes into stdout: each frame goes to ``on_stderr``.
- The end of the stream (the container stopped, or the socket closed) ends ``lines``;
  a truncated frame ends it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Final

from callward.core import SandboxUnavailable
from callward.sandbox._attach import FRAME_HEADER, STDOUT

#: The longest stdout line kept (an MCP message); longer ones are dropped whole.
MAX_LINE_BYTES: Final = 16 << 20
_STDERR: Final = 2
_READ_BYTES: Final = 1 << 16


class AttachedStdio:
    """
    One attach connection to a running service container, on the running loop.

    Use ``open``; ``close`` it when done (the container's stdin then ends).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_stderr: Callable[[bytes], None]) -> None:
        self._reader = reader
        self._writer = writer
        self._on_stderr = on_stderr

    @classmethod
    async def open(cls, sock: socket.socket, *,
                   on_stderr: Callable[[bytes], None]) -> AttachedStdio:
        """
        ``sock``, connected to the Engine's attach endpoint, on the running loop.

        Raises:
            SandboxUnavailable: ``sock`` is a TLS connection (an engine over TCP), which
                the loop cannot read as a plain socket.
        """
        if isinstance(sock, ssl.SSLSocket):
            raise SandboxUnavailable("a service's stdio is attached over the local Engine "
                                     "socket; a TLS connection to the Engine is not supported")
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock, limit=_READ_BYTES)
        return cls(reader, writer, on_stderr)

    async def lines(self) -> AsyncIterator[bytes | None]:
        """Each line the service writes to stdout, without its newline (None: too long)."""
        pending = bytearray()
        dropping = False
        async for stream, payload in self._frames():
            if stream == _STDERR:
                self._on_stderr(payload)
                continue
            if stream != STDOUT:
                continue
            start = 0
            while True:
                end = payload.find(b"\n", start)
                segment = payload[start:] if end < 0 else payload[start:end]
                if not dropping and len(pending) + len(segment) > MAX_LINE_BYTES:
                    dropping = True
                    pending.clear()
                elif not dropping:
                    pending += segment
                if end < 0:
                    break
                yield None if dropping else bytes(pending)
                pending.clear()
                dropping = False
                start = end + 1
        if dropping:
            yield None
        elif pending:
            yield bytes(pending)

    async def _frames(self) -> AsyncIterator[tuple[int, bytes]]:
        """Each frame's stream and payload, the payload in pieces of at most 64 KiB."""
        while True:
            try:
                header = await self._reader.readexactly(FRAME_HEADER.size)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            stream, left = FRAME_HEADER.unpack(header)
            while left:
                try:
                    piece = await self._reader.read(min(left, _READ_BYTES))
                except ConnectionError:
                    return
                if not piece:
                    return
                left -= len(piece)
                yield stream, piece

    async def write(self, data: bytes) -> None:
        """
        Write ``data`` to the service's stdin, waiting while the connection is full.

        Raises:
            ConnectionError: The connection is closed.
        """
        if self._writer.is_closing():
            raise ConnectionResetError("the service's attach connection is closed")
        self._writer.write(data)
        await self._writer.drain()

    def close(self) -> None:
        """End the service's stdin and close the connection; never raises."""
        with contextlib.suppress(OSError, RuntimeError):
            if self._writer.can_write_eof():
                self._writer.write_eof()
        self._writer.close()
