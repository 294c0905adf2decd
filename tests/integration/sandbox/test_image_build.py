"""The offline sandbox image, as the engine holds it."""

from __future__ import annotations

import doctest
import hashlib

import docker
import pytest
from structlog.testing import capture_logs

import callward.sandbox
from callward.core import SandboxUnavailable
from callward.sandbox import SandboxImage, ensure_image, expected_image_tag
from callward.sandbox._image import runner_source

pytestmark = pytest.mark.docker


def unreachable_client() -> docker.DockerClient:
    return docker.DockerClient(base_url="unix:///nonexistent.sock", version="1.41")


class TestEnsureImage:
    def test_existing_image_is_found_not_rebuilt(self, sandbox_image: SandboxImage) -> None:
        """A second ensure_image() finds both layers and builds nothing."""
        with capture_logs() as logs:
            image = ensure_image()

        expected = (sandbox_image, ["base_image_found", "sandbox_image_found"])
        assert expected == (image, [entry["event"] for entry in logs])

    def test_expected_tag_is_the_built_images_tag(self, sandbox_image: SandboxImage) -> None:
        """expected_image_tag() names the image ensure_image() built, without building."""
        expected = sandbox_image.tag
        assert expected == expected_image_tag()

    def test_image_runs_the_runner_as_nobody(
        self, sandbox_image: SandboxImage, engine: docker.DockerClient
    ) -> None:
        """The image's entrypoint is the shipped runner, run as 65534 in /tmp."""
        config = engine.images.get(sandbox_image.image_id).attrs["Config"]

        expected = (
            ["/usr/bin/python3", "-I", "-S", "/opt/callward/runner.py"],
            "65534:65534",
            "/tmp",  # noqa: S108 - the container's working directory
            hashlib.sha256(runner_source()).hexdigest(),
        )
        assert expected == (
            config["Entrypoint"],
            config["User"],
            config["WorkingDir"],
            config["Labels"]["callward.runner.sha256"],
        )

    def test_unreachable_engine_is_sandbox_unavailable(self) -> None:
        """Neither building nor looking up works without an engine: SandboxUnavailable."""
        with pytest.raises(SandboxUnavailable) as building:
            ensure_image(client_factory=unreachable_client)
        with pytest.raises(SandboxUnavailable) as looking:
            expected_image_tag(client_factory=unreachable_client)

        expected = ("sandbox_unavailable", "sandbox_unavailable")
        assert expected == (building.value.kind, looking.value.kind)


class TestPackageExample:
    def test_docstring_example_runs(self, sandbox_image: SandboxImage) -> None:
        """The example in callward.sandbox's docstring runs and gives what it shows."""
        with capture_logs():
            failed, attempted = doctest.testmod(callward.sandbox, report=False)

        expected = (0, True)
        assert expected == (failed, attempted > 0)
