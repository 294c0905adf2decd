"""The sandbox doctor against the real engine: every limit proven live by its probe."""

from __future__ import annotations

import pytest

from callward.sandbox import Runtime, diagnose

pytestmark = pytest.mark.docker


class TestDoctor:
    @pytest.mark.parametrize("runtime", ["runc", "runsc"])
    def test_every_check_holds(self, runtime: Runtime) -> None:
        """
        On this machine the engine, cgroups, image and every limit probe pass, on runc
        and on gVisor, the fork bomb ending as pids_limit on both.
        """
        checks = diagnose((runtime,))

        failed = [c.to_json() for c in checks if c.status != "ok"]
        names = {c.name for c in checks}
        probes = {f"{runtime}.{probe}" for probe in ("memory", "pids", "wall_clock", "output",
                                                     "disk", "open_files", "network")}
        expected = ([], probes)
        assert expected == (failed, names & probes)

    def test_an_unregistered_runtime_fails_with_its_fix(self) -> None:
        """A runtime dockerd does not know fails its check and says how to register it."""
        checks = diagnose(("nosuch",))  # type: ignore[arg-type]

        (runtime_check,) = [c for c in checks if c.name == "runtime.nosuch"]
        expected = ("fail", "not registered with dockerd")
        assert expected == (runtime_check.status, runtime_check.detail)
