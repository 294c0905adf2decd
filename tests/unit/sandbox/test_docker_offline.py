"""DockerSandbox and its backend without an engine: construction and refusals do no I/O."""

from __future__ import annotations

import pytest

from callward.core import ResourceLimits, SandboxUnavailable
from callward.sandbox import DockerSandbox
from callward.sandbox._docker import DockerBackend


def no_engine() -> object:
    raise AssertionError("the engine was asked")


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


class TestDockerBackendOffline:
    def test_egress_on_gvisor_is_refused_before_the_engine_is_asked(self) -> None:
        """gVisor is registered with --network=none: egress there fails closed, nothing starts."""
        backend = DockerBackend(client_factory=no_engine, runtime="runsc")  # type: ignore[arg-type]

        with pytest.raises(SandboxUnavailable, match="network=none"):
            backend.open(ResourceLimits(), egress=("example.org:443",))

    def test_a_backend_for_another_runtime_shares_engine_and_pool(self) -> None:
        """on_runtime() makes a backend of the other runtime on the same engine, without I/O."""
        backend = DockerBackend(client_factory=no_engine, runtime="runc")  # type: ignore[arg-type]

        other = backend.on_runtime("runsc")

        expected = (DockerBackend, backend._client_factory, backend._pool_config)
        assert expected == (type(other), other._client_factory, other._pool_config)
