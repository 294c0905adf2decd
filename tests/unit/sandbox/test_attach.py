"""The attach stream: Docker's framing, split into stdout and a count of all output."""

from __future__ import annotations

import socket
import struct

from callward.sandbox._attach import AttachStream, Demultiplexer


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


class TestDemultiplexer:
    def test_stdout_is_kept_and_stderr_only_counted(self) -> None:
        """stdout payloads are handed on; stdout and stderr payloads both count toward output."""
        demux = Demultiplexer()

        parts = demux.feed(frame(2, b"log line\n") + frame(1, b'{"ok":true}\n'))

        expected = (b'{"ok":true}\n', 21)
        assert expected == parts

    def test_frames_split_anywhere_are_reassembled(self) -> None:
        """A header or payload split across reads, even byte by byte, gives the same result."""
        data = frame(1, b"hello ") + frame(2, b"ignored") + frame(1, b"world")
        demux = Demultiplexer()
        stdout, counted = b"", 0

        for index in range(len(data)):
            part, count = demux.feed(data[index : index + 1])
            stdout, counted = stdout + part, counted + count

        expected = (b"hello world", 18)
        assert expected == (stdout, counted)

    def test_partial_frame_is_counted_as_it_arrives(self) -> None:
        """A frame announcing 1 MiB is counted byte by byte, not after it is whole."""
        demux = Demultiplexer()

        _, counted = demux.feed(struct.pack(">BxxxL", 2, 1 << 20) + b"x" * 50)

        expected = 50
        assert expected == counted


class TestAttachStream:
    def test_a_single_use_stream_ends_stdin_after_the_request(self) -> None:
        """With end_input, the container reads its stdin to its end after the request."""
        host, container = socket.socketpair()
        stream = AttachStream(host, end_input=True)

        stream.send(b'{"a":1}', timeout_seconds=1.0)
        received = container.recv(100), container.recv(100)
        container.sendall(frame(1, b"9\n"))
        container.close()
        output = stream.receive(1.0), stream.receive(1.0)
        stream.close()

        expected = ((b'{"a":1}', b""), ((b"9\n", 2), None))
        assert expected == (received, output)
