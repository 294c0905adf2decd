"""
The egress allowlist against a real engine: only servers on this machine are used.

A tool granted ``127.0.0.1:<port>`` reaches that HTTP server on the host through
the egress proxy; every other port, name or address is refused or unreachable,
including the host's own addresses on the internal network, which would be a
way around the proxy if the firewall rules were missing.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import (
    ResourceLimits,
    SandboxUnavailable,
    ToolCall,
    ToolRegistry,
    ToolSpec,
    tool,
)
from callward.core.gateway import Gateway
from callward.policies import Policy
from callward.sandbox import DockerSandbox, PoolConfig, SandboxImage

pytestmark = pytest.mark.docker

LIMITS = ResourceLimits(wall_seconds=8.0)
SCHEMA = {"type": "object"}

# -- tools: their source runs in the sandbox ------------------------------------------


@tool(version="1.0.0", parameters=SCHEMA)
def fetch(url):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the test's URL
            return {"status": response.status, "body": response.read().decode()}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": ""}
    except OSError as exc:
        return {"status": 0, "body": type(exc).__name__}


@tool(version="1.0.0", parameters=SCHEMA)
def connect(host, port):
    import socket

    try:
        with socket.create_connection((host, port), timeout=2):
            return "connected"
    except OSError as exc:
        return type(exc).__name__


@tool(version="1.0.0", parameters=SCHEMA)
def tunnel(target):
    """Speak HTTP through a CONNECT tunnel of the proxy named by HTTP_PROXY."""
    import os
    import socket
    import urllib.parse

    proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
    with socket.create_connection((proxy.hostname, proxy.port), timeout=5) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        status = sock.recv(4096).split(b"\r\n", 1)[0].decode()
        if " 200 " not in status:
            return {"status": status, "body": ""}
        sock.sendall(b"GET /tunnel HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return {"status": status, "body": data.split(b"\r\n\r\n", 1)[1].decode()}


def spec(function: Callable[..., object]) -> ToolSpec:
    return ToolRegistry().register(function)


def call(name: str, arguments: dict[str, object]) -> ToolCall:
    return ToolCall.create(id=f"c_{secrets.token_hex(4)}", name=name, arguments=arguments,
                           dialect="api")


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from {self.server.server_address[1]}{self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(host: str) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer((host, 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(name="allowed_port")
def _allowed_port() -> Iterator[int]:
    """An HTTP server on the host's loopback: the granted one."""
    yield from _serve("127.0.0.1")


@pytest.fixture(name="other_port")
def _other_port() -> Iterator[int]:
    """Another HTTP server on the host's loopback: never granted."""
    yield from _serve("127.0.0.1")


@pytest.fixture(name="wide_port")
def _wide_port() -> Iterator[int]:
    """An HTTP server on every host address, reachable from the bridges unless blocked."""
    yield from _serve("0.0.0.0")  # noqa: S104 - the point of the test


@pytest.fixture(name="egress_sandbox")
def _egress_sandbox(sandbox_image: SandboxImage) -> Iterator[DockerSandbox]:
    with DockerSandbox(image=sandbox_image) as sandbox:
        yield sandbox


class TestWarmEgress:
    def test_a_call_granted_egress_takes_a_warm_container_holding_its_lease(
        self, sandbox_image: SandboxImage, allowed_port: int, other_port: int,
        engine: docker.DockerClient,
    ) -> None:
        """
        A warm container started for one allowlist serves a call granted exactly that
        list: the granted port answers, another port is refused, both counted.
        """
        target = f"127.0.0.1:{allowed_port}"
        mine = {"label": f"callward.pid={os.getpid()}"}
        with DockerSandbox(image=sandbox_image, pool=PoolConfig(size=1)) as sandbox:
            assert sandbox.wait_warm(LIMITS, 1, timeout_seconds=60, egress=(target,))
            ready_before = {c.id for c in engine.containers.list(filters=mine)}
            allowed = sandbox.run(spec(fetch), call("fetch", {"url": f"http://{target}/w"}),
                                  LIMITS, egress=(target,))
            assert sandbox.wait_warm(LIMITS, 1, timeout_seconds=60, egress=(target,))
            refused = sandbox.run(
                spec(fetch), call("fetch", {"url": f"http://127.0.0.1:{other_port}/"}),
                LIMITS, egress=(target,),
            )

        expected = (True, 200, 1, 0, 403, 0, 1)
        assert expected == (
            allowed.usage.container_id in ready_before,
            allowed.value["status"],  # type: ignore[index, call-overload]
            allowed.usage.egress_allowed, allowed.usage.egress_refused,
            refused.value["status"],  # type: ignore[index, call-overload]
            refused.usage.egress_allowed, refused.usage.egress_refused,
        )

    def test_a_warm_container_of_one_allowlist_never_serves_another(
        self, sandbox_image: SandboxImage, allowed_port: int, other_port: int,
        engine: docker.DockerClient,
    ) -> None:
        """Warm containers for one allowlist are not taken by a call with another or none."""
        granted = f"127.0.0.1:{allowed_port}"
        mine = {"label": f"callward.pid={os.getpid()}"}
        with DockerSandbox(image=sandbox_image, pool=PoolConfig(size=2)) as sandbox:
            assert sandbox.wait_warm(LIMITS, 2, timeout_seconds=60, egress=(granted,))
            ready_before = {c.id for c in engine.containers.list(filters=mine)}
            other = sandbox.run(
                spec(fetch), call("fetch", {"url": f"http://127.0.0.1:{other_port}/"}),
                LIMITS, egress=(f"127.0.0.1:{other_port}",),
            )
            none = sandbox.run(spec(connect), call("connect", {"host": "127.0.0.1",
                                                               "port": allowed_port}), LIMITS)

        expected = (False, 200, False)
        assert expected == (
            other.usage.container_id in ready_before,
            other.value["status"],  # type: ignore[index, call-overload]
            none.usage.container_id in ready_before,
        )


class TestEgressAllowlist:
    def test_an_allowed_host_port_is_reached_through_the_proxy(
        self, egress_sandbox: DockerSandbox, allowed_port: int
    ) -> None:
        """The granted 127.0.0.1:port answers, and the forward is counted."""
        target = f"127.0.0.1:{allowed_port}"
        execution = egress_sandbox.run(spec(fetch), call("fetch", {"url": f"http://{target}/x"}),
                                       LIMITS, egress=(target,))

        expected = ({"status": 200, "body": f"hello from {allowed_port}/x"}, 1, 0)
        assert expected == (execution.value, execution.usage.egress_allowed,
                            execution.usage.egress_refused)

    def test_a_connect_tunnel_to_an_allowed_target_works(
        self, egress_sandbox: DockerSandbox, allowed_port: int
    ) -> None:
        """CONNECT (what HTTPS uses) to the granted target tunnels bytes both ways."""
        target = f"127.0.0.1:{allowed_port}"
        execution = egress_sandbox.run(spec(tunnel), call("tunnel", {"target": target}), LIMITS,
                                       egress=(target,))

        expected = f"hello from {allowed_port}/tunnel"
        assert expected == execution.value["body"]  # type: ignore[index, call-overload]

    def test_another_port_on_the_same_host_is_refused_and_counted(
        self, egress_sandbox: DockerSandbox, allowed_port: int, other_port: int
    ) -> None:
        """Same host, other port: 403 from the proxy, counted as refused."""
        execution = egress_sandbox.run(
            spec(fetch), call("fetch", {"url": f"http://127.0.0.1:{other_port}/"}), LIMITS,
            egress=(f"127.0.0.1:{allowed_port}",),
        )

        expected = (403, 0, 1)
        assert expected == (execution.value["status"],  # type: ignore[index, call-overload]
                            execution.usage.egress_allowed, execution.usage.egress_refused)

    def test_a_dns_name_not_on_the_list_is_refused(
        self, egress_sandbox: DockerSandbox, allowed_port: int
    ) -> None:
        """localhost is 127.0.0.1 but not on the list: names are matched, not resolved first."""
        execution = egress_sandbox.run(
            spec(fetch), call("fetch", {"url": f"http://localhost:{allowed_port}/"}), LIMITS,
            egress=(f"127.0.0.1:{allowed_port}",),
        )

        expected = (403, 1)
        assert expected == (execution.value["status"],  # type: ignore[index, call-overload]
                            execution.usage.egress_refused)

    @pytest.mark.parametrize("host", ["8.8.8.8", "1.1.1.1", "172.17.0.1"])
    def test_a_raw_socket_around_the_proxy_fails(
        self, egress_sandbox: DockerSandbox, allowed_port: int, wide_port: int, host: str
    ) -> None:
        """
        A direct connection, to the outside or to the host's docker0 address where a
        server listens on every address, does not get through.
        """
        execution = egress_sandbox.run(
            spec(connect), call("connect", {"host": host, "port": wide_port}), LIMITS,
            egress=(f"127.0.0.1:{allowed_port}",),
        )

        assert "connected" != execution.value

    def test_the_host_side_of_the_internal_network_is_closed_but_for_the_proxy(
        self, egress_sandbox: DockerSandbox, allowed_port: int, wide_port: int
    ) -> None:
        """The network's gateway address is the host: only the proxy's port answers there."""
        target = f"127.0.0.1:{allowed_port}"
        probe = egress_sandbox.run(spec(fetch), call("fetch", {"url": f"http://{target}/"}),
                                   LIMITS, egress=(target,))
        del probe
        network = egress_sandbox.backend._egress
        assert network is not None
        gateway, proxy_port = network.proxy.address  # type: ignore[union-attr]
        direct = egress_sandbox.run(
            spec(connect), call("connect", {"host": gateway, "port": wide_port}), LIMITS,
            egress=(target,),
        )
        to_proxy = egress_sandbox.run(
            spec(connect), call("connect", {"host": gateway, "port": proxy_port}), LIMITS,
            egress=(target,),
        )

        expected = (False, "connected")
        assert expected == (direct.value == "connected", to_proxy.value)

    def test_a_tool_without_a_grant_has_no_network_at_all(
        self, egress_sandbox: DockerSandbox, allowed_port: int
    ) -> None:
        """Beside granted calls, an ungranted one still cannot even reach the proxy."""
        target = f"127.0.0.1:{allowed_port}"
        egress_sandbox.run(spec(fetch), call("fetch", {"url": f"http://{target}/"}), LIMITS,
                           egress=(target,))
        network = egress_sandbox.backend._egress
        assert network is not None
        gateway, proxy_port = network.proxy.address  # type: ignore[union-attr]
        execution = egress_sandbox.run(
            spec(connect), call("connect", {"host": gateway, "port": proxy_port}), LIMITS
        )

        assert "connected" != execution.value

    def test_session_mode_with_egress_counts_per_call(
        self, egress_sandbox: DockerSandbox, allowed_port: int, other_port: int
    ) -> None:
        """In a session's container, each call's forwards and refusals are its own."""
        target = f"127.0.0.1:{allowed_port}"
        placed = {"isolation": "session", "principal": "alice", "session_id": "s1"}
        first = egress_sandbox.run(spec(fetch), call("fetch", {"url": f"http://{target}/"}),
                                   LIMITS, egress=(target,), **placed)  # type: ignore[arg-type]
        second = egress_sandbox.run(
            spec(fetch), call("fetch", {"url": f"http://127.0.0.1:{other_port}/"}), LIMITS,
            egress=(target,), **placed,  # type: ignore[arg-type]
        )

        expected = ((200, 1, 0), (403, 0, 1), first.usage.container_id)
        assert expected == (
            (first.value["status"], first.usage.egress_allowed, first.usage.egress_refused),  # type: ignore[index, call-overload]
            (second.value["status"], second.usage.egress_allowed, second.usage.egress_refused),  # type: ignore[index, call-overload]
            second.usage.container_id,
        )

    def test_gvisor_with_egress_fails_closed(
        self, sandbox_image: SandboxImage, allowed_port: int
    ) -> None:
        """runsc is registered with --network=none: egress there is refused, nothing runs."""
        with DockerSandbox(image=sandbox_image, runtime="runsc") as sandbox, \
                pytest.raises(SandboxUnavailable, match="network=none"):
            sandbox.run(spec(fetch), call("fetch", {"url": "http://x/"}), LIMITS,
                        egress=(f"127.0.0.1:{allowed_port}",))

    def test_close_removes_the_network_and_the_firewall_rules(
        self, sandbox_image: SandboxImage, engine: docker.DockerClient, allowed_port: int
    ) -> None:
        """After close(), the internal network and its INPUT rules are gone."""
        target = f"127.0.0.1:{allowed_port}"
        with DockerSandbox(image=sandbox_image) as sandbox:
            sandbox.run(spec(fetch), call("fetch", {"url": f"http://{target}/"}), LIMITS,
                        egress=(target,))
            network = sandbox.backend._egress
            assert network is not None
            name = network.name
            bridge = "br-" + engine.networks.get(name).id[:12]
        rules = os.popen("iptables -S INPUT").read()  # noqa: S605 - a fixed command

        expected = ([], False)
        assert expected == (engine.networks.list(names=[name]), bridge in rules)


POLICY = """
version: 1
default: deny
rules:
  - {id: anyone, effect: allow, principals: ["*"], tools: ["*"]}
tools:
  fetch:
    egress: ["127.0.0.1:PORT"]
"""


class TestEgressThroughTheGateway:
    def test_the_policy_grant_is_audited_with_the_counts(
        self, tmp_path: Path, sandbox_image: SandboxImage, allowed_port: int, other_port: int
    ) -> None:
        """
        The policy's egress reaches the sandbox; call.authorized names the targets and
        call.completed counts what the proxy forwarded and refused.
        """
        registry = ToolRegistry()
        registry.register(fetch)
        registry.register(connect)
        audit = SQLiteAuditStore(tmp_path / "audit.db", FileSigner.load_or_create(tmp_path / "k"))
        audit.open()
        sandbox = DockerSandbox(image=sandbox_image)
        policy = Policy.from_text(POLICY.replace("PORT", str(allowed_port)))
        with Gateway(registry=registry, policy=policy, runner=sandbox, audit=audit,
                     closers=(audit.close, sandbox.close)) as gateway:
            ok = gateway.handle(call("fetch", {"url": f"http://127.0.0.1:{allowed_port}/"}),
                                principal="alice")
            refused = gateway.handle(call("fetch", {"url": f"http://127.0.0.1:{other_port}/"}),
                                     principal="alice")
            ungranted = gateway.handle(call("connect", {"host": "127.0.0.1",
                                                        "port": allowed_port}),
                                       principal="alice")
            bodies = [audit.get(r.receipt.seq).body for r in (ok, refused)]
            authorized = audit.get(int(bodies[0]["authorized_seq"])).body  # type: ignore[arg-type]

        expected = ([f"127.0.0.1:{allowed_port}"], {"allowed": 1, "refused": 0},
                    {"allowed": 0, "refused": 1}, "ConnectionRefusedError")
        assert expected == (authorized["decision"]["egress"],  # type: ignore[index, call-overload]
                            bodies[0]["usage"]["egress"],  # type: ignore[index, call-overload]
                            bodies[1]["usage"]["egress"],  # type: ignore[index, call-overload]
                            ungranted.content)



class TestLeftoverNetworks:
    def test_an_egress_network_of_a_dead_process_is_swept(
        self, sandbox_image: SandboxImage, engine: docker.DockerClient
    ) -> None:
        """remove_leftovers() removes egress networks whose owner is gone, not live ones."""
        dead = engine.networks.create(
            f"callward-egress-test-{secrets.token_hex(4)}", internal=True,
            labels={"callward": "1", "callward.pid": "0", "callward.egress": "1"},
        )
        alive = engine.networks.create(
            f"callward-egress-test-{secrets.token_hex(4)}", internal=True,
            labels={"callward": "1", "callward.pid": "1", "callward.egress": "1"},
        )
        try:
            with DockerSandbox(image=sandbox_image) as sandbox:
                sandbox.remove_leftovers()
            left = {n.id for n in engine.networks.list(names=[dead.name, alive.name])}
        finally:
            for network in (dead, alive):
                with contextlib.suppress(docker.errors.NotFound):
                    network.remove()

        expected = {alive.id}
        assert expected == left
