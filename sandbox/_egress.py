"""
Network egress for granted tools: an internal Docker network and an allowlisting proxy.

A container without an egress grant keeps ``network_mode="none"``. A container
with one joins only an internal network (``docker network create --internal``,
inter-container traffic off), whose one way out is the egress proxy: a small
HTTP ``CONNECT``/absolute-URI proxy run by this process on the network's
gateway address. The proxy runs on the host, not in a container, so a grant of
``127.0.0.1:8080`` means the host's own loopback service.

Invariants:

- An internal network has no route out, but Docker still lets its containers
  reach every address of the host itself (the ``INPUT`` chain): a service bound
  to ``0.0.0.0`` would be a way around the proxy. So the host drops every
  packet from the network's bridge except TCP to the proxy's port (two
  ``iptables`` rules, removed on ``close()``). If the rules cannot be installed
  (no ``iptables``, not root), egress fails closed: ``SandboxUnavailable``.
- The proxy knows which container is calling by its source address on the
  internal network (no ``NET_RAW``/``NET_ADMIN`` in the sandbox, and no
  inter-container traffic, so it cannot be forged) and forwards only to a
  ``host:port`` on that container's own allowlist, matched exactly and in
  lower case; a DNS name is resolved by the host only after it matched.
  Everything else is refused (``403``), logged and counted for the call.
- A lease (container address and allowlist) is removed only by the one who
  took it, so an address reused by a later container never inherits a grant.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets as _random
import select
import shutil
import socket
import socketserver
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import docker
import structlog

from callward.core import SandboxUnavailable
from callward.core.types import is_egress_target
from callward.sandbox._engine import map_docker_errors
from callward.sandbox._limits import OWNER_LABEL, OWNER_PID_LABEL, OWNER_PIDNS_LABEL

log = structlog.get_logger()

NETWORK_LABEL: Final = "callward.egress"
_MAX_HEADER_BYTES: Final = 16 * 1024
_HEADER_SECONDS: Final = 10.0
_CONNECT_SECONDS: Final = 10.0
_IDLE_SECONDS: Final = 300.0
_CHUNK: Final = 65536
_CLOSING_HEADERS: Final = b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(slots=True)
class EgressLease:
    """One container's grant: its address, its allowlist, and what the proxy did for it."""

    address: str
    allowed: frozenset[str]
    forwarded: int = 0
    refused: int = 0
    token: object = field(default_factory=object)


class EgressProxy:
    """
    The allowlisting proxy: one listening socket, a thread per connection.

    Args:
        host: The address to listen on (the internal network's gateway).
        port: 0 for any free port.
    """

    def __init__(self, host: str, port: int = 0) -> None:
        self._leases: dict[str, EgressLease] = {}
        #: Leases whose container's address is learnt at its first connection.
        self._pending: list[tuple[EgressLease, Callable[[], str]]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request, self.client_address[0])

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, port), Handler, bind_and_activate=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="callward-egress-proxy", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def lease(self, address: str, allowed: tuple[str, ...]) -> EgressLease:
        """
        Grant ``allowed`` to the container at ``address`` until ``release``.

        Raises:
            ValueError: A target is not ``host:port``.
        """
        if not all(is_egress_target(t) for t in allowed):
            raise ValueError("an egress allowlist holds host:port targets")
        lease = EgressLease(address, frozenset(allowed))
        with self._lock:
            self._leases[address] = lease
        return lease

    def lease_later(self, allowed: tuple[str, ...], address: Callable[[], str]) -> EgressLease:
        """
        Grant ``allowed`` to a container not started yet; ``address()`` gives its
        address once it runs (asked when an unknown address connects).

        Raises:
            ValueError: A target is not ``host:port``.
        """
        if not all(is_egress_target(t) for t in allowed):
            raise ValueError("an egress allowlist holds host:port targets")
        lease = EgressLease("", frozenset(allowed))
        with self._lock:
            self._pending.append((lease, address))
        return lease

    def release(self, lease: EgressLease) -> None:
        with self._lock:
            if lease.address and self._leases.get(lease.address) is lease:
                del self._leases[lease.address]
            self._pending = [p for p in self._pending if p[0] is not lease]

    def _lease_of(self, source: str) -> EgressLease | None:
        with self._lock:
            lease = self._leases.get(source)
            pending = list(self._pending)
        if lease is not None:
            return lease
        for candidate, address in pending:
            try:
                found = address()
            except SandboxUnavailable:
                continue
            if found != source:
                continue
            with self._lock:
                if any(p[0] is candidate for p in self._pending):
                    self._pending = [p for p in self._pending if p[0] is not candidate]
                    candidate.address = source
                    self._leases[source] = candidate
                    return candidate
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, client: socket.socket, source: str) -> None:
        client.settimeout(_HEADER_SECONDS)
        try:
            head, rest = _read_head(client)
            method, target, version, forward_head = _parse_head(head)
        except (OSError, ValueError):
            _reply(client, b"400 Bad Request")
            return
        lease = self._lease_of(source)
        if lease is None or target not in lease.allowed:
            if lease is not None:
                lease.refused += 1
            log.warning("egress_refused", source=source, target=target[:300],
                        leased=lease is not None)
            _reply(client, b"403 Forbidden")
            return
        host, _, port = target.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=_CONNECT_SECONDS)
        except OSError as exc:
            log.info("egress_connect_failed", target=target, error=type(exc).__name__)
            _reply(client, b"502 Bad Gateway")
            return
        lease.forwarded += 1
        log.info("egress_forwarded", source=source, target=target, method=method)
        with upstream:
            if method == "CONNECT":
                client.sendall(version + b" 200 Connection Established\r\n\r\n")
            else:
                upstream.sendall(forward_head)
            if rest:
                upstream.sendall(rest)
            _splice(client, upstream)


def _read_head(client: socket.socket) -> tuple[bytes, bytes]:
    data = bytearray()
    while b"\r\n\r\n" not in data:
        if len(data) > _MAX_HEADER_BYTES:
            raise ValueError("the request head is too long")
        chunk = client.recv(4096)
        if not chunk:
            raise ValueError("the connection ended before the request head")
        data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    return head, rest


def _parse_head(head: bytes) -> tuple[str, str, bytes, bytes]:
    """
    The method, the ``host:port`` target, the HTTP version, and the head to send on.

    ``CONNECT host:port`` tunnels; ``METHOD http://host[:port]/path`` is sent on
    in origin form. Anything else is a ``ValueError``.
    """
    line, _, headers = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise ValueError("not an HTTP/1.x request line")
    method = parts[0].decode("ascii")
    uri = parts[1].decode("ascii")
    if method == "CONNECT":
        return method, _target(uri), parts[2], b""
    if not uri.lower().startswith("http://"):
        raise ValueError("a proxied request names an http:// URI")
    authority, slash, path = uri[len("http://") :].partition("/")
    if "@" in authority:
        raise ValueError("no user information in the URI")
    target = _target(authority if ":" in authority else authority + ":80")
    forward = parts[0] + b" " + (slash + path).encode("ascii") + b" " + parts[2]
    return method, target, parts[2], forward + b"\r\n" + headers + b"\r\n\r\n"


def _target(authority: str) -> str:
    target = authority.strip().lower().rstrip(".")
    host, _, port = target.rpartition(":")
    host = host.rstrip(".")
    target = f"{host}:{port}"
    if not is_egress_target(target):
        raise ValueError("not a host:port target")
    return target


def _reply(client: socket.socket, status: bytes) -> None:
    with contextlib.suppress(OSError):
        client.sendall(b"HTTP/1.1 " + status + _CLOSING_HEADERS)


def _splice(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes or both are idle for ``_IDLE_SECONDS``."""
    peers = {a: b, b: a}
    open_reads = [a, b]
    while open_reads:
        ready, _, _ = select.select(open_reads, [], [], _IDLE_SECONDS)
        if not ready:
            return
        for sock in ready:
            try:
                data = sock.recv(_CHUNK)
            except OSError:
                return
            if not data:
                open_reads.remove(sock)
                with contextlib.suppress(OSError):
                    peers[sock].shutdown(socket.SHUT_WR)
                continue
            try:
                peers[sock].sendall(data)
            except OSError:
                return


class EgressNetwork:
    """
    One internal Docker network, its host firewall rules and its proxy.

    Made on first use by a ``DockerSandbox`` with an egress grant, removed by
    ``close()``. Constructing it does no I/O.
    """

    def __init__(self, client: docker.DockerClient) -> None:
        self._client = client
        self.name = f"callward-egress-{os.getpid()}-{_random.token_hex(4)}"
        self._rules: list[list[str]] = []
        self._network_id = ""
        self.proxy: EgressProxy | None = None

    def open(self) -> None:
        """
        Create the network, install the firewall rules, start the proxy.

        Raises:
            SandboxUnavailable: The engine, the firewall or the proxy failed; nothing is left.
        """
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        with map_docker_errors("create the egress network"):
            network = self._client.networks.create(
                self.name,
                driver="bridge",
                internal=True,
                options={"com.docker.network.bridge.enable_icc": "false"},
                labels={OWNER_LABEL: "1", OWNER_PID_LABEL: str(os.getpid()),
                        OWNER_PIDNS_LABEL: _pid_namespace(), NETWORK_LABEL: "1"},
            )
            self._network_id = str(network.id)
            network.reload()
            config = network.attrs["IPAM"]["Config"][0]
        gateway = str(ipaddress.ip_address(config["Gateway"]))
        bridge = "br-" + self._network_id[:12]
        self.proxy = EgressProxy(gateway)
        port = str(self.proxy.address[1])
        iptables = shutil.which("iptables")
        if iptables is None:
            raise SandboxUnavailable(
                "egress needs iptables to keep the internal network from reaching the host",
                remediation="install iptables and run callward as root, or grant no egress",
            )
        # Inserted at the top in this order: the ACCEPT ends up above the DROP.
        self._insert(iptables, ["INPUT", "-i", bridge, "-j", "DROP"])
        self._insert(iptables, ["INPUT", "-i", bridge, "-p", "tcp", "-d", gateway,
                                "--dport", port, "-j", "ACCEPT"])
        log.info("egress_network_opened", network=self.name, gateway=gateway, port=port)

    def _insert(self, iptables: str, rule: list[str]) -> None:
        try:
            # An argument list of our own (the bridge name, the gateway, a port): no shell.
            subprocess.run([iptables, "-w", "-I", *rule], check=True,  # noqa: S603
                           capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise SandboxUnavailable(
                "egress could not install the firewall rule that keeps the internal "
                f"network from the host ({type(exc).__name__})",
                remediation="run callward as root with iptables, or grant no egress",
            ) from exc
        self._rules.append([iptables, "-w", "-D", *rule])

    @property
    def proxy_url(self) -> str:
        if self.proxy is None:
            raise SandboxUnavailable("the egress proxy is not running")
        return self.proxy.url

    def lease(self, address: str, allowed: tuple[str, ...]) -> EgressLease:
        """A lease on the proxy for the container at ``address``."""
        if self.proxy is None:
            raise SandboxUnavailable("the egress proxy is not running")
        return self.proxy.lease(address, allowed)

    def release(self, lease: EgressLease) -> None:
        if self.proxy is not None:
            self.proxy.release(lease)

    def lease_container(self, container_id: str, allowed: tuple[str, ...]) -> EgressLease:
        """A lease for a container created but not started (its address comes later)."""
        if self.proxy is None:
            raise SandboxUnavailable("the egress proxy is not running")
        return self.proxy.lease_later(allowed, lambda: self.address_of(container_id))

    def address_of(self, container_id: str) -> str:
        """
        The container's address on this network.

        Raises:
            SandboxUnavailable: The engine failed, or the container is not on the network.
        """
        with map_docker_errors("inspect the sandbox container's network"):
            networks = self._client.api.inspect_container(container_id)["NetworkSettings"][
                "Networks"
            ]
        address = (networks.get(self.name) or {}).get("IPAddress") or ""
        if not address:
            raise SandboxUnavailable("the sandbox container has no address on the egress network")
        return str(address)

    def close(self) -> None:
        """Stop the proxy, remove the rules and the network; never raises."""
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        for rule in reversed(self._rules):
            try:
                subprocess.run(rule, check=True, capture_output=True, timeout=30)  # noqa: S603
            except (OSError, subprocess.SubprocessError):
                log.exception("egress_rule_remove_failed", rule=" ".join(rule[3:]))
        self._rules.clear()
        if self._network_id:
            try:
                with map_docker_errors("remove the egress network"):
                    self._client.api.remove_network(self._network_id)
            except SandboxUnavailable:
                log.exception("egress_network_remove_failed", network=self.name)
            self._network_id = ""


def _pid_namespace() -> str:
    """This process's PID namespace (``pid:[inode]``), so a sweeper elsewhere leaves it be."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
