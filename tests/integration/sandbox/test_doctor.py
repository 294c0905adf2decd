"""The sandbox doctor against the real engine: every limit proven live by its probe."""

from __future__ import annotations

import pytest

from callward.sandbox import diagnose

pytestmark = pytest.mark.docker


class TestDoctor:
    def test_every_check_holds_on_runc(self) -> None:
        """On this machine the engine, cgroups, image and every runc limit probe pass."""
        checks = diagnose(("runc",))

        failed = [c.to_json() for c in checks if c.status != "ok"]
        names = {c.name for c in checks}
        expected = ([], {"runc.memory", "runc.pids", "runc.wall_clock", "runc.output",
                         "runc.disk", "runc.open_files", "runc.network"})
        assert expected == (failed, names & expected[1])

    def test_an_unregistered_runtime_fails_with_its_fix(self) -> None:
        """A runtime dockerd does not know fails its check and says how to register it."""
        checks = diagnose(("nosuch",))  # type: ignore[arg-type]

        (runtime_check,) = [c for c in checks if c.name == "runtime.nosuch"]
        expected = ("fail", "not registered with dockerd")
        assert expected == (runtime_check.status, runtime_check.detail)
