"""The sandbox image's name, digest and apt mirror: everything _image decides without an engine."""

from __future__ import annotations

from pathlib import Path

import pytest

import callward.sandbox
from callward.core import Sha256Hex
from callward.sandbox import SandboxImage
from callward.sandbox._image import DEFAULT_MIRROR, apt_mirror, runner_source, sandbox_tag

BASE_ID = "sha256:" + "0" * 64


class TestSandboxTag:
    def test_tag_is_16_hex_digits_under_callward_sandbox(self) -> None:
        """The tag is callward/sandbox:<16 hex digits>."""
        tag = sandbox_tag(b"runner", BASE_ID)

        expected = ("callward/sandbox", 16)
        assert expected == (tag.split(":")[0], len(tag.split(":")[1]))

    def test_tag_changes_with_the_runner_and_with_the_base(self) -> None:
        """A changed runner or a rebuilt base gives a new tag; the same inputs the same tag."""
        tags = {
            sandbox_tag(b"runner", BASE_ID),
            sandbox_tag(b"runner 2", BASE_ID),
            sandbox_tag(b"runner", "sha256:" + "1" * 64),
        }

        expected = (3, sandbox_tag(b"runner", BASE_ID))
        assert expected == (len(tags), sandbox_tag(b"runner", BASE_ID))

    def test_runner_source_is_the_shipped_runner(self) -> None:
        """The bytes hashed into the tag are the runner file the package ships."""
        shipped = Path(callward.sandbox.__file__).parent / "image" / "runner.py"

        expected = shipped.read_bytes()
        assert expected == runner_source()


class TestSandboxImage:
    def test_image_id_is_the_prefixed_digest(self) -> None:
        """Containers are created from sha256:<digest>, the digest the audit log records."""
        image = SandboxImage(tag="callward/sandbox:0123456789abcdef", digest=Sha256Hex("a" * 64))

        expected = "sha256:" + "a" * 64
        assert expected == image.image_id

    @pytest.mark.parametrize(
        ("tag", "digest"),
        [
            ("other/image:1", "a" * 64),
            ("callward/sandbox:1", "sha256:" + "a" * 64),
            ("callward/sandbox:1", "A" * 64),
        ],
    )
    def test_invalid_image_cannot_exist(self, tag: str, digest: str) -> None:
        """A tag outside callward/sandbox or a digest that is not bare hex is refused."""
        with pytest.raises(ValueError, match=r"sandbox image tag|image digest"):
            SandboxImage(tag=tag, digest=Sha256Hex(digest))


class TestAptMirror:
    def test_deb822_sources_give_the_first_non_security_uri(self, tmp_path: Path) -> None:
        """Debian 12's deb822 .sources files are read; the security archive is skipped."""
        (tmp_path / "sources.list.d").mkdir()
        (tmp_path / "sources.list.d" / "debian.sources").write_text(
            "Types: deb\n"
            "URIs: http://security.debian.org/debian-security\n"
            "Suites: bookworm-security\n\n"
            "Types: deb\n"
            "URIs: http://mirror.example/debian/\n"
            "Suites: bookworm\n"
        )

        expected = "http://mirror.example/debian"
        assert expected == apt_mirror(tmp_path)

    def test_one_line_sources_list_with_options(self, tmp_path: Path) -> None:
        """A classic 'deb [options] URI suite' line gives its URI."""
        (tmp_path / "sources.list").write_text(
            "# a comment\n"
            "deb [arch=amd64 signed-by=/k.gpg] https://deb.example/debian bookworm main\n"
        )

        expected = "https://deb.example/debian"
        assert expected == apt_mirror(tmp_path)

    def test_no_sources_falls_back_to_deb_debian_org(self, tmp_path: Path) -> None:
        """Without apt sources, the default Debian mirror is used."""
        expected = DEFAULT_MIRROR
        assert expected == apt_mirror(tmp_path / "missing")
