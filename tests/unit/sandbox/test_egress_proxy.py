"""The egress proxy on loopback (no Docker): parsing, allowlists, leases, counting."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from callward.sandbox._egress import EgressProxy, _parse_head


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(name="upstream")
def _upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture(name="proxy")
def _proxy() -> Iterator[EgressProxy]:
    proxy = EgressProxy("127.0.0.1")
    yield proxy
    proxy.close()


def through(proxy: EgressProxy, head: bytes) -> bytes:
    """Send one request head through the proxy and read everything it answers."""
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data


def get(port: int, host: str = "127.0.0.1") -> bytes:
    return f"GET http://{host}:{port}/p HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()


class TestParseHead:
    def test_connect_names_its_target(self) -> None:
        """CONNECT host:port is a tunnel to exactly that target."""
        method, target, _version, _head = _parse_head(b"CONNECT Example.COM:443 HTTP/1.1\r\nA: b")

        assert ("CONNECT", "example.com:443") == (method, target)

    def test_an_absolute_uri_is_sent_on_in_origin_form(self) -> None:
        """GET http://h:p/x becomes GET /x to h:p; no port means 80."""
        _m, target, _v, head = _parse_head(b"GET http://h.internal/x?y HTTP/1.1\r\nHost: h")

        expected = ("h.internal:80", b"GET /x?y HTTP/1.1\r\nHost: h\r\n\r\n")
        assert expected == (target, head)

    @pytest.mark.parametrize("head", [
        b"GET /relative HTTP/1.1",
        b"GET https://h:443/ HTTP/1.1",
        b"GET http://user@h:80/ HTTP/1.1",
        b"CONNECT h HTTP/1.1",
        b"CONNECT [::1]:80 HTTP/1.1",
        b"GARBAGE",
    ])
    def test_anything_else_is_refused(self, head: bytes) -> None:
        """Origin form, other schemes, user info, no port, IPv6 and garbage are refused."""
        with pytest.raises(ValueError, match=r"request|URI|target|port"):
            _parse_head(head)


class TestEgressProxy:
    def test_an_allowed_target_is_forwarded_and_counted(
        self, proxy: EgressProxy, upstream: int
    ) -> None:
        """A leased source reaches a target on its list."""
        lease = proxy.lease("127.0.0.1", (f"127.0.0.1:{upstream}",))

        answer = through(proxy, get(upstream))

        expected = (True, 1, 0)
        assert expected == (answer.endswith(b"hello /p"), lease.forwarded, lease.refused)

    def test_a_target_off_the_list_is_refused_and_counted(
        self, proxy: EgressProxy, upstream: int
    ) -> None:
        """Same host, another port, or another name for it: 403, counted."""
        lease = proxy.lease("127.0.0.1", (f"127.0.0.1:{upstream}",))

        answers = [through(proxy, get(upstream + 1)), through(proxy, get(upstream, "localhost"))]

        expected = ([b"HTTP/1.1 403"] * 2, 0, 2)
        assert expected == ([a[:12] for a in answers], lease.forwarded, lease.refused)

    def test_a_source_without_a_lease_gets_nothing(self, proxy: EgressProxy, upstream: int) -> None:
        """No lease, no egress."""
        assert through(proxy, get(upstream)).startswith(b"HTTP/1.1 403")

    def test_a_released_lease_no_longer_forwards(self, proxy: EgressProxy, upstream: int) -> None:
        """After release the address is a stranger again."""
        proxy.release(proxy.lease("127.0.0.1", (f"127.0.0.1:{upstream}",)))

        assert through(proxy, get(upstream)).startswith(b"HTTP/1.1 403")

    def test_releasing_an_old_lease_keeps_a_newer_one_for_the_address(
        self, proxy: EgressProxy, upstream: int
    ) -> None:
        """An address reused by a later container keeps that container's lease."""
        old = proxy.lease("127.0.0.1", ())
        proxy.lease("127.0.0.1", (f"127.0.0.1:{upstream}",))
        proxy.release(old)

        assert through(proxy, get(upstream)).endswith(b"hello /p")

    def test_a_later_lease_is_bound_at_the_first_connection(
        self, proxy: EgressProxy, upstream: int
    ) -> None:
        """A service's lease learns its address when it first connects."""
        lease = proxy.lease_later((f"127.0.0.1:{upstream}",), lambda: "127.0.0.1")

        answer = through(proxy, get(upstream))

        expected = (True, "127.0.0.1")
        assert expected == (answer.endswith(b"hello /p"), lease.address)

    def test_connect_tunnels_to_an_allowed_target(self, proxy: EgressProxy, upstream: int) -> None:
        """CONNECT answers 200 and then carries bytes both ways."""
        proxy.lease("127.0.0.1", (f"127.0.0.1:{upstream}",))
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(f"CONNECT 127.0.0.1:{upstream} HTTP/1.1\r\n\r\n".encode())
            status = sock.recv(4096)
            sock.sendall(b"GET /t HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk

        expected = (True, True)
        assert expected == (b" 200 " in status, data.endswith(b"hello /t"))
