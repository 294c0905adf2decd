"""
The MCP SDK client's transport to an upstream server in a service container: the
container's stdio over the Engine API attach socket (``callward.sandbox.AttachedStdio``),
read and written on the client's event loop, with no ``docker`` process relaying it.

It does what the SDK's ``stdio_client`` does with a subprocess's pipes: each stdout
line is validated as a JSON-RPC message (``mcp_types``) and handed to the session, a
line that is not one (or is over 16 MiB) as the error it is; each message sent is one
line of the SDK's own JSON. The server's stderr is logged, never read as messages.
Leaving the transport ends the server's stdin; removing the container is its
``StdioService``'s job.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import anyio
import anyio.to_thread
import mcp_types as types
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.shared.message import SessionMessage

if TYPE_CHECKING:
    from callward.sandbox import StdioService

log = structlog.get_logger()

#: What the transport yields: the session's messages (or errors) in, its messages out.
Streams = tuple[MemoryObjectReceiveStream[SessionMessage | Exception],
                MemoryObjectSendStream[SessionMessage]]

#: How much of one stderr frame of the server's is logged.
_STDERR_LOGGED_BYTES: Final = 4096


@contextlib.asynccontextmanager
async def container_stdio(service: StdioService, *, server: str) -> AsyncIterator[Streams]:
    """
    The SDK client's transport (an async context manager, as ``Client`` takes one) to the
    MCP server ``server`` that ``service`` runs: attached and started on entry.

    Raises:
        SandboxUnavailable: The Engine could not attach to or start the container.
    """
    # The sandbox loads docker; only a configured stdio upstream needs it.
    from callward.sandbox import AttachedStdio  # noqa: PLC0415

    def log_stderr(data: bytes) -> None:
        log.warning("mcp_upstream_stderr", server=server,
                    text=data[:_STDERR_LOGGED_BYTES].decode("utf-8", "replace"),
                    bytes=len(data))

    sock = await anyio.to_thread.run_sync(service.attach)
    attached = await AttachedStdio.open(sock, on_stderr=log_stderr)
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    async def read() -> None:
        async with read_writer:
            async for line in attached.lines():
                try:
                    await read_writer.send(_message_of(line, server))
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return  # the session is gone

    async def write() -> None:
        async with write_reader:
            async for message in write_reader:
                data = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                try:
                    await attached.write(data.encode() + b"\n")
                except OSError:  # the container is gone: the session sees the end
                    await read_writer.aclose()
                    return

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(read)
        tasks.start_soon(write)
        try:
            yield read_stream, write_stream
        finally:
            attached.close()
            tasks.cancel_scope.cancel()


def _message_of(line: bytes | None, server: str) -> SessionMessage | Exception:
    """One stdout line of ``server``'s as a message, or as the error it is."""
    if line is None:
        log.warning("mcp_upstream_line_too_long", server=server)
        return ValueError(f"the MCP server {server} wrote a line over 16 MiB")
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:
        log.warning("mcp_upstream_line_malformed", server=server, bytes=len(line))
        return exc
