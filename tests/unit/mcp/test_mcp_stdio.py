"""
The loop's own stdio for `mcp serve` (`callward.core.mcp._stdio`), in child processes:
it claims fds 0 and 1, which this test process must keep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import mcp_types as types
from mcp import Client, StdioServerParameters

from callward.core.mcp._stdio import MAX_LINE_BYTES

#: Echoes the byte length of each line it reads, printing stray output meanwhile.
ECHO = textwrap.dedent("""
    import asyncio, os, sys
    from callward.core.mcp._stdio import loop_stdio

    async def main():
        async with loop_stdio() as wire:
            if wire is None:
                print("fallback", flush=True)
                return
            lines, out = wire
            async for line in lines:
                print("stray print", flush=True)        # fd 1 is stderr while serving
                os.write(1, b"stray write\\n")
                await out.write(f"{len(line)} {line[:1]!r}\\n")
                await out.flush()
        os.write(1, f"restored blocking={os.get_blocking(1)}\\n".encode())

    asyncio.run(main())
""")

#: A server of the SDK on ``stdio_server`` over the loop's stdio, as ``mcp serve`` runs.
SDK_SERVER = textwrap.dedent("""
    import anyio, mcp_types as types
    from typing import cast
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server
    from callward.core.mcp._stdio import loop_stdio

    async def list_tools(ctx, params):
        return types.ListToolsResult(tools=[types.Tool(
            name="size", input_schema={"type": "object"})])

    async def call_tool(ctx, params):
        text = str(len(params.arguments["blob"]))
        return types.CallToolResult(content=[types.TextContent(text=text)])

    async def main():
        server = Server("size", on_list_tools=list_tools, on_call_tool=call_tool)
        async with loop_stdio() as wire:
            assert wire is not None, "a client's pipes must take the loop's path"
            async with stdio_server(cast(anyio.AsyncFile[str], wire[0]),
                                    cast(anyio.AsyncFile[str], wire[1])) as (r, w):
                await server.run(r, w, server.create_initialization_options())

    anyio.run(main)
""")


def _echo(stdin: bytes | Path) -> subprocess.CompletedProcess[bytes]:
    if isinstance(stdin, Path):
        with stdin.open("rb") as file:
            return subprocess.run([sys.executable, "-c", ECHO], stdin=file,
                                  capture_output=True, timeout=60, check=True)
    return subprocess.run([sys.executable, "-c", ECHO], input=stdin, capture_output=True,
                          timeout=60, check=True)


class TestLoopStdio:
    def test_lines_longer_than_asyncio_default_limit_arrive_whole(self):
        small, large = b"a" * 10, b"b" * (3 << 20)
        done = _echo(small + b"\n" + large + b"\n" + b"c")
        assert done.stdout.splitlines() == [
            b"11 'a'", f"{len(large) + 1} 'b'".encode(), b"1 'c'", b"restored blocking=True"]

    def test_stray_output_goes_to_stderr_never_to_the_wire(self):
        done = _echo(b"x\ny\n")
        assert b"stray" not in done.stdout
        assert done.stderr.count(b"stray print\n") == 2
        assert done.stderr.count(b"stray write\n") == 2

    def test_an_overlong_line_is_dropped_whole_and_the_next_one_is_read(self):
        overlong = b"{" * (MAX_LINE_BYTES + 5)
        done = _echo(b"first\n" + overlong + b"\nnext\n")
        assert done.stdout.splitlines() == [
            b"6 'f'", b"0 ''", b"5 'n'", b"restored blocking=True"]
        assert b"mcp_stdio_line_too_long" in done.stderr

    def test_an_overlong_last_line_without_newline_is_dropped(self):
        done = _echo(b"first\n" + b"z" * (MAX_LINE_BYTES + 1))
        assert done.stdout.splitlines() == [b"6 'f'", b"0 ''", b"restored blocking=True"]

    def test_a_file_on_stdin_is_left_to_the_sdk_transport(self, tmp_path: Path):
        given = tmp_path / "lines.jsonl"
        given.write_bytes(b"x\n")
        assert _echo(given).stdout == b"fallback\n"

    def test_the_sdk_client_calls_through_it_with_two_mebibytes_of_arguments(self):
        blob = "q" * (2 << 20)

        async def call() -> types.CallToolResult:
            server = StdioServerParameters(command=sys.executable, args=["-c", SDK_SERVER])
            async with Client(server, read_timeout_seconds=60) as client:
                assert [tool.name for tool in (await client.list_tools()).tools] == ["size"]
                result = await client.call_tool("size", {"blob": blob})
                again = await client.call_tool("size", {"blob": "ok"})
                assert isinstance(again.content[0], types.TextContent)
                assert again.content[0].text == "2"
                return result

        result = anyio.run(call)
        assert not result.is_error
        assert isinstance(result.content[0], types.TextContent)
        assert json.loads(result.content[0].text) == len(blob)
