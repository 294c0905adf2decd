"""DockerSandbox without an engine: construction, and the attach-stream demultiplexer."""

from __future__ import annotations

import struct

import pytest

from callward.sandbox import DockerSandbox
from callward.sandbox._docker import _Demultiplexer


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


class TestDockerSandboxConstruction:
    def test_constructor_does_no_io(self) -> None:
        """A sandbox on an engine that does not exist constructs without error: no I/O yet."""
        sandbox = DockerSandbox(base_url="unix:///nonexistent.sock", runtime="runsc")

        expected = DockerSandbox
        assert expected is type(sandbox)

    def test_base_url_and_client_factory_exclude_each_other(self) -> None:
        """Two ways to name the engine at once is a programming error."""
        with pytest.raises(ValueError, match="not both"):
            DockerSandbox(base_url="unix:///x.sock", client_factory=lambda: None)


class TestDemultiplexer:
    def test_stdout_is_kept_and_stderr_only_counted(self) -> None:
        """stdout payloads are kept; stdout and stderr payloads both count toward output."""
        demux = _Demultiplexer(cap=100)

        demux.feed(frame(2, b"log line\n") + frame(1, b'{"ok":true}\n'))

        expected = (b'{"ok":true}\n', 21)
        assert expected == (bytes(demux.stdout), demux.output_bytes)

    def test_frames_split_anywhere_are_reassembled(self) -> None:
        """A header or payload split across reads, even byte by byte, gives the same result."""
        data = frame(1, b"hello ") + frame(2, b"ignored") + frame(1, b"world")
        demux = _Demultiplexer(cap=100)

        for index in range(len(data)):
            demux.feed(data[index : index + 1])

        expected = (b"hello world", 18)
        assert expected == (bytes(demux.stdout), demux.output_bytes)

    def test_stdout_is_cut_at_the_cap_but_counted_past_it(self) -> None:
        """No more than the cap is held, while the count shows how far past it the tool went."""
        demux = _Demultiplexer(cap=4)

        demux.feed(frame(1, b"0123456789"))

        expected = (b"0123", 10)
        assert expected == (bytes(demux.stdout), demux.output_bytes)

    def test_partial_frame_is_counted_as_it_arrives(self) -> None:
        """A frame announcing 1 MiB is counted byte by byte, not after it is whole."""
        demux = _Demultiplexer(cap=10)

        demux.feed(struct.pack(">BxxxL", 2, 1 << 20) + b"x" * 50)

        expected = 50
        assert expected == demux.output_bytes
