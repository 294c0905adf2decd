"""The sandbox contract: what a backend reports, and which classes keep which protocol."""

from __future__ import annotations

import pytest

from callward.core import Placement, ToolRunner
from callward.core.protocols import PlacingToolRunner
from callward.sandbox import (
    DockerSandbox,
    ModelToolRunner,
    ModelWorkers,
    RawExecution,
    Sandbox,
    SandboxBackend,
)
from callward.sandbox._docker import DockerBackend
from callward.sandbox._engine import client_from_env
from callward.sandbox.base import Observation, session_container_key


class TestRawExecution:
    def test_output_bytes_cannot_be_less_than_stdout(self) -> None:
        """output_bytes counts stdout, so a RawExecution that says less cannot exist."""
        with pytest.raises(ValueError, match="at least len"):
            RawExecution(stdout=b"12345", output_bytes=2, wall_seconds=0.1, exit_code=0)


class TestObservation:
    def test_connection_counts_are_not_negative(self) -> None:
        """An observation cannot claim fewer than no connections."""
        with pytest.raises(ValueError, match="negative"):
            Observation("c" * 64, egress_refused=-1)


class TestSessionKey:
    def test_a_session_is_its_principal_and_id_together(self) -> None:
        """Two principals with one session id, or one principal with two, never share."""
        keys = {session_container_key("alice", "s1"), session_container_key("bob", "s1"),
                session_container_key("alice", "s2"),
                session_container_key("alice", "s1")}

        expected = 3
        assert expected == len(keys)


class TestPlacement:
    def test_an_invalid_placement_cannot_exist(self) -> None:
        """Isolation and runtime are closed sets; secrets and egress are checked names."""
        for fields, problem in (({"isolation": "container"}, "isolation"),
                                ({"runtime": "kata"}, "runtime"),
                                ({"secrets": ("lower",)}, "secret names"),
                                ({"egress": ("no-port",)}, "host:port")):
            with pytest.raises(ValueError, match=problem):
                Placement(**fields)  # type: ignore[arg-type]

    def test_only_the_default_placement_runs_anywhere(self) -> None:
        """Call isolation with no runtime, secret or egress: any runner may take it."""
        placements = (Placement(principal="alice"), Placement(runtime="runc"),
                      Placement(isolation="session", principal="alice"),
                      Placement(secrets=("T",)), Placement(egress=("example.org:443",)))

        expected = [True, False, False, False, False]
        assert expected == [placement.anywhere for placement in placements]


class TestProtocols:
    def test_backends_and_sandboxes_satisfy_their_protocols(self) -> None:
        """DockerBackend is a SandboxBackend; DockerSandbox and Sandbox place calls."""
        backend: SandboxBackend = DockerBackend(client_factory=client_from_env)
        runners: list[ToolRunner] = [DockerSandbox(), Sandbox(backend)]

        expected = [True, True]
        assert expected == [isinstance(runner, PlacingToolRunner) for runner in runners]

    def test_every_wrapping_runner_places_calls_one_way(self) -> None:
        """The model-tool runner places calls through the same run_placed(Placement)."""
        runner = ModelToolRunner(ModelWorkers({}, memory_budget_bytes=1), {}, DockerSandbox())

        expected = True
        assert expected == isinstance(runner, PlacingToolRunner)
