"""The one translation of ResourceLimits into docker-py container options."""

from __future__ import annotations

import pytest

from callward.core import ResourceLimits
from callward.sandbox._limits import (
    GVISOR_HOST_PIDS_MAX,
    ContainerOptions,
    GvisorTaskLimits,
    container_options,
    gvisor_task_limits,
)

MIB = 1 << 20
CONTAINER_TMP = "/tmp"  # noqa: S108 - the container's own tmpfs, not the host's


@pytest.fixture(name="limits")
def fixture_limits() -> ResourceLimits:
    return ResourceLimits(
        wall_seconds=3.0,
        memory_bytes=96 * MIB,
        pids=24,
        cpus=0.25,
        output_bytes=4096,
        tmp_bytes=2 * MIB,
        open_files=48,
    )


@pytest.fixture(name="options")
def fixture_options(limits: ResourceLimits) -> ContainerOptions:
    return container_options(limits, image="sha256:" + "a" * 64, runtime="runc", owner_pid=4242)


class TestContainerOptions:
    def test_every_hardening_flag_is_set(self, options: ContainerOptions) -> None:
        """No network or IPC, read-only root, no capabilities, no new privileges, user nobody."""
        hardening = {
            "network_mode": options["network_mode"],
            "ipc_mode": options["ipc_mode"],
            "read_only": options["read_only"],
            "cap_drop": options["cap_drop"],
            "cap_add": options["cap_add"],
            "security_opt": options["security_opt"],
            "privileged": options["privileged"],
            "user": options["user"],
            "log_config": options["log_config"],
            "tty": options["tty"],
            "stdin_open": options["stdin_open"],
        }

        expected = {
            "network_mode": "none",
            "ipc_mode": "none",
            "read_only": True,
            "cap_drop": ["ALL"],
            "cap_add": [],
            "security_opt": ["no-new-privileges"],
            "privileged": False,
            "user": "65534:65534",
            "log_config": {"type": "none"},
            "tty": False,
            "stdin_open": True,
        }
        assert expected == hardening

    def test_a_session_runner_holds_only_what_it_needs_to_start_calls_as_nobody(
        self, limits: ResourceLimits
    ) -> None:
        """
        A session's PID 1 is root with CAP_SETUID, CAP_SETGID and CAP_KILL alone, and
        is told to run every call as 65534:65534; the rest of the hardening is kept.
        """
        options = container_options(limits, image="sha256:" + "a" * 64, runtime="runc",
                                    owner_pid=4242, session=True)

        expected = ("0:0", ["ALL"], ["SETUID", "SETGID", "KILL"], ["no-new-privileges"],
                    "65534:65534", ["--session"], True)
        assert expected == (
            options["user"], options["cap_drop"], options["cap_add"], options["security_opt"],
            options["environment"]["CALLWARD_CALL_USER"], options["command"],
            options["read_only"],
        )

    def test_gvisor_containers_share_one_bounded_parent_cgroup(self, limits):
        """Every gVisor container sits under /callward-gvisor; runc ones where docker puts them."""
        gvisor = container_options(limits, image="sha256:" + "a" * 64, runtime="runsc",
                                   owner_pid=4242)
        runc = container_options(limits, image="sha256:" + "a" * 64, runtime="runc",
                                 owner_pid=4242)

        expected = ("/callward-gvisor", "")
        assert expected == (gvisor["cgroup_parent"], runc["cgroup_parent"])

    def test_tmp_is_bounded_in_files_too(self, options):
        """The /tmp tmpfs carries nr_inodes: empty files cannot fill the container's memory."""
        assert "nr_inodes=" in options["tmpfs"]["/tmp"]  # noqa: S108 - the container's tmpfs

    def test_limits_come_from_resource_limits(
        self, limits: ResourceLimits, options: ContainerOptions
    ) -> None:
        """Memory (with no swap on top), pids, CPU and open files are the limits' values."""
        actual = (
            options["mem_limit"],
            options["memswap_limit"],
            options["pids_limit"],
            options["nano_cpus"],
            options["ulimits"],
        )

        expected = (
            limits.memory_bytes,
            limits.memory_bytes,
            24,
            250_000_000,
            [{"name": "nofile", "soft": 48, "hard": 48}],
        )
        assert expected == actual

    def test_tmp_is_the_only_writable_path_and_is_bounded(self, options: ContainerOptions) -> None:
        """Only /tmp is writable: a noexec, nosuid, nodev tmpfs of tmp_bytes, the working dir."""
        expected = (
            {CONTAINER_TMP: f"rw,nosuid,nodev,noexec,size={2 * MIB},"
                            "nr_inodes=512,mode=1777"},
            CONTAINER_TMP,
        )
        assert expected == (options["tmpfs"], options["working_dir"])

    def test_nothing_from_the_host_is_mounted_or_passed_through(
        self, options: ContainerOptions
    ) -> None:
        """The options are exactly the known keys: no volumes, mounts, devices or extras."""
        expected = {
            "image",
            "network_mode",
            "ipc_mode",
            "read_only",
            "tmpfs",
            "cap_drop",
            "cap_add",
            "cgroup_parent",
            "security_opt",
            "privileged",
            "user",
            "mem_limit",
            "memswap_limit",
            "pids_limit",
            "nano_cpus",
            "ulimits",
            "oom_score_adj",
            "environment",
            "working_dir",
            "hostname",
            "labels",
            "stdin_open",
            "tty",
            "log_config",
            "runtime",
            "command",
        }
        assert expected == set(options)

    def test_environment_is_minimal(self, options: ContainerOptions) -> None:
        """The host's environment is never passed in; only HOME is set."""
        expected = {"HOME": CONTAINER_TMP}
        assert expected == options["environment"]

    def test_labels_name_callward_and_the_owner_process(self, options: ContainerOptions) -> None:
        """
        Every container is labelled callward, with the owning pid and its PID namespace
        for leftover cleanup.
        """
        expected = {"callward": "1", "callward.pid": "4242", "callward.pidns": ""}
        assert expected == options["labels"]

    def test_image_and_runtime_are_the_callers(self, limits: ResourceLimits) -> None:
        """The image id and the runtime (runc or gVisor's runsc) are passed as given."""
        options = container_options(
            limits, image="sha256:" + "b" * 64, runtime="runsc", owner_pid=1
        )

        expected = ("sha256:" + "b" * 64, "runsc")
        assert expected == (options["image"], options["runtime"])


class TestGvisorTaskLimits:
    def test_gvisor_keeps_the_pids_limit_in_its_own_kernel(self, limits: ResourceLimits) -> None:
        """
        Under runsc the tool's pids become RLIMIT_NPROC inside the sandbox (plus the
        runner's watch and one task for it to see), the runner is told the limit, and the
        host's pids limit is sized for gVisor's sentry.
        """
        options = container_options(limits, image="sha256:" + "b" * 64, runtime="runsc",
                                    owner_pid=1)

        expected = (
            [{"name": "nofile", "soft": 48, "hard": 48}, {"name": "nproc", "soft": 26, "hard": 26}],
            {"HOME": CONTAINER_TMP, "CALLWARD_TASK_LIMIT": "24", "CALLWARD_TMP_INODES": "512"},
            gvisor_task_limits(24).host_pids,
        )
        assert expected == (options["ulimits"], options["environment"], options["pids_limit"])

    def test_runc_keeps_the_pids_limit_in_the_host_cgroup(self, options: ContainerOptions) -> None:
        """Under runc the pids controller keeps the limit: no nproc (it is per host user)."""
        expected = ([{"name": "nofile", "soft": 48, "hard": 48}], 24)
        assert expected == (options["ulimits"], options["pids_limit"])

    @pytest.mark.parametrize(("pids", "host_pids"), [(4, 352), (16, 928), (64, 3232),
                                                     (4096, GVISOR_HOST_PIDS_MAX)])
    def test_the_host_limit_grows_with_the_guest_and_is_capped(
        self, pids: int, host_pids: int
    ) -> None:
        """The host's limit is 64 + 48 per guest task, never above GVISOR_HOST_PIDS_MAX."""
        assert gvisor_task_limits(pids) == GvisorTaskLimits(guest_nproc=pids + 2,
                                                            host_pids=host_pids)
