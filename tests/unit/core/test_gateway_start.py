"""A gateway's start proof: what the probe's findings mean, and what a start records."""

from __future__ import annotations

import json

import pytest

from callward.core import SandboxUnavailable
from callward.core.gateway._start import (
    PROBE_LIMITS,
    StartFacts,
    judge,
    probe_runtime,
)
from callward.core.testing import StubRunner, failed_execution, kinds, ok_execution

HARDENED = {
    "uid": 65534, "gid": 65534, "cap_eff": "0000000000000000", "no_new_privs": "1",
    "root_writable": False, "interfaces": ["lo"], "network": "refused",
    "tmp_bytes": PROBE_LIMITS.tmp_bytes, "memory_bytes": PROBE_LIMITS.memory_bytes,
}


def probe_answer(facts: dict) -> StubRunner:  # type: ignore[type-arg]
    return StubRunner(ok_execution(facts))


class TestJudge:
    def test_a_hardened_sandbox_has_no_finding(self):
        """Every protection in force: nothing to report."""
        assert () == judge(HARDENED, PROBE_LIMITS)

    @pytest.mark.parametrize(("change", "finding"), [
        ({"uid": 0}, "the tool runs as root"),
        ({"cap_eff": "00000000a80425fb"}, "the tool holds capabilities"),
        ({"no_new_privs": "0"}, "no-new-privileges is not set"),
        ({"root_writable": True}, "the root filesystem is writable"),
        ({"interfaces": ["eth0", "lo"]}, "a network interface other than loopback is present"),
        ({"network": "connected"}, "a connection left the sandbox"),
        ({"tmp_bytes": 64 * 1024 * 1024}, "/tmp is not bounded to the limit"),  # noqa: S108
        ({"memory_bytes": 9223372036854771712}, "the memory limit is not the one set"),
    ])
    def test_each_missing_protection_is_named(self, change, finding):
        """A protection missing from inside the sandbox is named in plain words."""
        assert (finding,) == judge({**HARDENED, **change}, PROBE_LIMITS)

    def test_a_memory_limit_the_runtime_does_not_show_is_not_a_finding(self):
        """gVisor shows no cgroup files: the memory limit is then left to the host."""
        assert () == judge({**HARDENED, "memory_bytes": None}, PROBE_LIMITS)

    def test_a_probe_that_does_not_answer_fails(self):
        """A probe that ends in anything but a value is a failed start."""
        runner = StubRunner(failed_execution("timeout"))

        result = probe_runtime(runner, "runc")

        assert ("the probe ended timeout",) == result.failures


class TestProveStart:
    def test_a_proven_start_writes_gateway_started(self, make_gateway, store):
        """The record names the runtimes, the probe's findings and the digests."""
        gateway = make_gateway(probe_answer(HARDENED))

        gateway.prove_start(StartFacts(config_sha256="c" * 64, runtimes=("runc",)))

        body = json.loads(store.last().body_json)
        expected = (["gateway.started"], ["runc"], [True], False, "c" * 64)
        assert expected == (kinds(store), body["runtimes"], [p["ok"] for p in body["probes"]],
                            body["unsafe_skip_probes"], body["config_sha256"])

    def test_a_failed_probe_refuses_the_start_and_records_why(self, make_gateway, store):
        """A writable root refuses to serve: sandbox_unavailable, gateway.start_refused."""
        gateway = make_gateway(probe_answer({**HARDENED, "root_writable": True}))

        with pytest.raises(SandboxUnavailable) as refused:
            gateway.prove_start(StartFacts(config_sha256="c" * 64, runtimes=("runc",)))

        body = json.loads(store.last().body_json)
        expected = ("sandbox_unavailable", ["gateway.start_refused"],
                    ["the root filesystem is writable"])
        assert expected == (refused.value.kind, kinds(store),
                            body["probes"][0]["failures"])

    def test_skipping_the_probes_is_recorded(self, make_gateway, store, runner):
        """--unsafe-skip-probes runs nothing and says so in gateway.started."""
        gateway = make_gateway()

        gateway.prove_start(StartFacts(config_sha256="c" * 64, runtimes=("runc",)),
                            unsafe_skip_probes=True)

        body = json.loads(store.last().body_json)
        expected = ([], True, [])
        assert expected == (body["probes"], body["unsafe_skip_probes"], runner.calls)
