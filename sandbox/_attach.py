"""
A container's stdio over the Docker Engine's attach socket: the stream's framing, and
blocking reads and writes on it with a timeout each.

The Engine sends the output of a container without a terminal as one multiplexed
stream: frames of an 8-byte header (the stream, 1 for stdout and 2 for stderr, then
three zero bytes and the payload's length, big-endian) and the payload; what is written
to the socket is the container's stdin.

Invariants:

- Every payload byte of stdout and stderr is counted as it arrives, never only once
  its frame is whole, so a tool cannot hide a flood in one huge frame.
- Only stdout payload is handed on; stderr is counted and dropped.
- ``close_attached`` closes the connection for real (docker-py's ``SocketIO`` would
  keep the descriptor open, and with it the engine's copy of a flooding container's
  output).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Final

import docker

from callward.core import SandboxUnavailable
from callward.sandbox._engine import map_docker_errors

#: What the host attaches to: stdin, stdout and stderr, as one stream.
ATTACH_PARAMS: Final = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
FRAME_HEADER: Final = struct.Struct(">BxxxL")
STDOUT: Final = 1
RECV_BYTES: Final = 65536


class Demultiplexer:
    """
    Splits the attach stream into stdout and a count of all output, as it arrives.

    It never waits for a whole frame: a header or payload split across reads (even
    byte by byte) is reassembled, and a frame's payload is counted as it comes.
    Where a frame ends is kept from one read to the next, so one stream can carry
    many requests (a session's container, a model worker).
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._stream = 0
        self._left = 0

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """
        The stdout payload in ``data``, and how many payload bytes (stdout and stderr) it held.
        """
        stdout = bytearray()
        counted = 0
        view = memoryview(data)
        while view:
            if self._left == 0:
                need = FRAME_HEADER.size - len(self._header)
                self._header += view[:need]
                view = view[need:]
                if len(self._header) == FRAME_HEADER.size:
                    self._stream, self._left = FRAME_HEADER.unpack(self._header)
                    self._header.clear()
                continue
            part = view[: self._left]
            view = view[len(part) :]
            self._left -= len(part)
            counted += len(part)
            if self._stream == STDOUT:
                stdout += part
        return bytes(stdout), counted


class AttachStream:
    """
    A container's stdin and demultiplexed output over one attach connection.

    Args:
        attached: What docker-py's ``attach_socket`` returned.
        end_input: Half-close after each ``send``, so the runner reads its stdin to
            its end (a single-use container); otherwise stdin stays open for the
            next request (a session's container, a model worker).

    Raises:
        SandboxUnavailable: The connection is not a plain socket.
    """

    def __init__(self, attached: object, *, end_input: bool) -> None:
        self._attached = attached
        self.sock = socket_of(attached)
        self._end_input = end_input
        self._demux = Demultiplexer()

    def send(self, data: bytes, timeout_seconds: float) -> None:
        """
        Write ``data`` to the container's stdin.

        Raises:
            TimeoutError: It could not all be written within ``timeout_seconds``.
            OSError: The container is gone.
        """
        self.sock.settimeout(timeout_seconds)
        self.sock.sendall(data)
        if self._end_input:
            self.sock.shutdown(socket.SHUT_WR)

    def receive(self, timeout_seconds: float) -> tuple[bytes, int] | None:
        """
        The next output: its stdout bytes and how many bytes of output it held; None
        at the stream's end.

        Raises:
            TimeoutError: Nothing came within ``timeout_seconds``.
            OSError: The connection broke.
        """
        self.sock.settimeout(timeout_seconds)
        chunk = self.sock.recv(RECV_BYTES)
        if not chunk:
            return None
        return self._demux.feed(chunk)

    def close(self) -> None:
        """Close the connection for real; never raises for an already broken one."""
        close_attached(self._attached, self.sock)


def attach(client: docker.DockerClient, container_id: str, *, end_input: bool,
           what: str = "the sandbox container") -> AttachStream:
    """
    Attach to a created container's stdio; do it before the start, so that not one
    byte of output can be missed.

    Raises:
        SandboxUnavailable: The engine failed, or gave no plain socket.
    """
    with map_docker_errors(f"attach to {what}"):
        attached = client.api.attach_socket(container_id, params=dict(ATTACH_PARAMS))
    try:
        return AttachStream(attached, end_input=end_input)
    except SandboxUnavailable:
        close = getattr(attached, "close", None)
        if callable(close):
            close()
        raise


def socket_of(attached: object) -> socket.socket:
    """The socket under docker-py's attach object (a ``SocketIO`` on plain connections)."""
    sock = getattr(attached, "_sock", attached)
    if not isinstance(sock, socket.socket):
        raise SandboxUnavailable(
            f"the Docker Engine's attach stream is a {type(sock).__name__}, not a socket"
        )
    return sock


def close_attached(attached: object, sock: socket.socket) -> None:
    """
    Close the attach connection for real.

    docker-py's ``SocketIO`` holds a reference that keeps ``sock.close()`` from
    closing the descriptor; a connection left open stops the engine's copy of
    the output, and with it the kill and removal of a flooding container.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    close = getattr(attached, "close", None)
    if callable(close):
        close()
    sock.close()
