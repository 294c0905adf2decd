"""
The sandbox image, built offline and found again by digest.

Two layers, and nothing pulled from a registry:

1. ``callward/base:bookworm``: a Debian root filesystem made by ``debootstrap``
   (minbase plus ``python3``) from the host's apt mirror, trimmed (no package
   caches, no documentation, no setuid bits) and ``docker import``-ed. Built
   once per engine; kept while it exists.
2. ``callward/sandbox:<tag>``: the base plus the runner, built by the classic
   builder with the network off. The tag is the first 16 hex digits of
   SHA-256 over the runner's source and the base image id, so a changed runner
   or a rebuilt base gives a new tag and an existing tag never means other bytes.

The digest a gateway records is the sandbox image id, and containers are
created from that id, never from the tag.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import docker
import docker.errors
import structlog

from callward.core import SandboxUnavailable, Sha256Hex
from callward.sandbox._engine import (
    BUILD_IMAGE_REMEDIATION,
    ClientFactory,
    client_from_env,
    map_docker_errors,
)

log = structlog.get_logger()

SUITE: Final = "bookworm"
BASE_REPOSITORY: Final = "callward/base"
BASE_IMAGE: Final = f"{BASE_REPOSITORY}:{SUITE}"
SANDBOX_REPOSITORY: Final = "callward/sandbox"
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"
RUNNER_IN_IMAGE: Final = "/opt/callward/runner.py"
_TAG_HEX_DIGITS: Final = 16
_BUILD_COMMAND_SECONDS: Final = 1800
_IMAGE_ID: Final = re.compile(r"\Asha256:([0-9a-f]{64})\Z")
_TRIMMED: Final = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
)
_DOCKERFILE: Final = f"""\
FROM {BASE_IMAGE}
COPY runner.py {RUNNER_IN_IMAGE}
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8 \\
    PYTHONDONTWRITEBYTECODE=1
USER 65534:65534
WORKDIR /tmp
ENTRYPOINT ["/usr/bin/python3", "-I", "-S", "{RUNNER_IN_IMAGE}"]
"""


@dataclass(frozen=True, slots=True)
class SandboxImage:
    """
    A sandbox image present in the engine.

    Attributes:
        tag: ``callward/sandbox:<16 hex>``, derived from the runner and the base image.
        digest: The image id without its ``sha256:`` prefix; what the audit log records.
    """

    tag: str
    digest: Sha256Hex

    def __post_init__(self) -> None:
        if not self.tag.startswith(f"{SANDBOX_REPOSITORY}:"):
            raise ValueError(f"a sandbox image tag starts with {SANDBOX_REPOSITORY}:")
        if not re.fullmatch(r"[0-9a-f]{64}", self.digest):
            raise ValueError("an image digest is 64 lower-case hex digits")

    @property
    def image_id(self) -> str:
        """The id containers are created from: ``sha256:<digest>``."""
        return f"sha256:{self.digest}"


def runner_source() -> bytes:
    """The bytes of the in-container runner, as shipped in this package."""
    return (importlib.resources.files("callward.sandbox") / "image" / "runner.py").read_bytes()


def sandbox_tag(runner: bytes, base_image_id: str) -> str:
    """The tag of the sandbox image made of ``runner`` on top of ``base_image_id``."""
    digest = hashlib.sha256(runner + base_image_id.encode("ascii")).hexdigest()
    return f"{SANDBOX_REPOSITORY}:{digest[:_TAG_HEX_DIGITS]}"


def expected_image_tag(*, client_factory: ClientFactory = client_from_env) -> str:
    """
    The tag the sandbox image has for this runner and the engine's base image.

    Looks only; never builds.

    Raises:
        SandboxUnavailable: The engine cannot be reached, or has no base image yet.
    """
    with map_docker_errors("look up the base image"):
        base_id = _image_id(client_factory(), BASE_IMAGE)
    if base_id is None:
        raise SandboxUnavailable(
            f"the base image {BASE_IMAGE} is not in the Docker Engine",
            remediation=BUILD_IMAGE_REMEDIATION,
        )
    return sandbox_tag(runner_source(), base_id)


def find_image(client: docker.DockerClient) -> SandboxImage:
    """
    The sandbox image for this runner, which must already exist.

    Raises:
        SandboxUnavailable: The engine failed, or the base or sandbox image is missing.
    """
    tag = expected_image_tag(client_factory=lambda: client)
    with map_docker_errors("look up the sandbox image"):
        image_id = _image_id(client, tag)
    if image_id is None:
        raise SandboxUnavailable(
            f"the sandbox image {tag} is not in the Docker Engine",
            remediation=BUILD_IMAGE_REMEDIATION,
        )
    return SandboxImage(tag=tag, digest=_digest(image_id))


def ensure_image(
    *, client_factory: ClientFactory = client_from_env, rebuild: bool = False
) -> SandboxImage:
    """
    Return the sandbox image, building what is missing; quick when both layers exist.

    Args:
        client_factory: Makes the Docker client (``DOCKER_HOST`` etc. by default).
        rebuild: Build both layers again even if they exist (a fresh debootstrap).

    Raises:
        SandboxUnavailable: The engine failed, or the build could not complete
            (debootstrap needs root and the apt mirror).
    """
    runner = runner_source()
    with map_docker_errors("build the sandbox image"):
        client = client_factory()
        base_id = None if rebuild else _image_id(client, BASE_IMAGE)
        if base_id is None:
            base_id = _build_base(client, apt_mirror())
        else:
            log.info("base_image_found", image=BASE_IMAGE, image_id=base_id)
        tag = sandbox_tag(runner, base_id)
        image_id = None if rebuild else _image_id(client, tag)
        if image_id is None:
            image_id = _build_runner_layer(client, tag, runner)
        else:
            log.info("sandbox_image_found", tag=tag, image_id=image_id)
    return SandboxImage(tag=tag, digest=_digest(image_id))


def apt_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """
    The host's Debian mirror: the first non-security URI in its apt sources.

    Reads ``sources.list`` and ``sources.list.d/*.list`` (one-line style) and
    ``sources.list.d/*.sources`` (deb822 style); falls back to ``DEFAULT_MIRROR``.
    """
    files = [apt_dir / "sources.list"]
    listing = apt_dir / "sources.list.d"
    if listing.is_dir():
        files += sorted(p for p in listing.iterdir() if p.suffix in {".list", ".sources"})
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if words[:1] == ["deb"]:
                uris = words[1:2]
            elif words[:1] == ["URIs:"]:
                uris = words[1:]
            else:
                continue
            for uri in uris:
                if uri.startswith(("http://", "https://")) and "security" not in uri:
                    return uri.rstrip("/")
    return DEFAULT_MIRROR


def _image_id(client: docker.DockerClient, name: str) -> str | None:
    try:
        image = client.images.get(name)
    except docker.errors.ImageNotFound:
        return None
    return str(image.id)


def _digest(image_id: str) -> Sha256Hex:
    match = _IMAGE_ID.match(image_id)
    if match is None:
        raise SandboxUnavailable(f"the engine gave an image id that is not sha256: {image_id!r}")
    return Sha256Hex(match.group(1))


def _build_base(client: docker.DockerClient, mirror: str) -> str:
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise SandboxUnavailable(
            "debootstrap is not installed, so the base image cannot be built",
            remediation="run scripts/ensure-engine.sh (installs debootstrap), "
            "then `callward sandbox build-image`",
        )
    if os.geteuid() != 0:
        raise SandboxUnavailable(
            "building the base image needs root (debootstrap)",
            remediation="run `callward sandbox build-image` as root once",
        )
    workdir = Path(tempfile.mkdtemp(prefix="callward-rootfs-"))
    try:
        _debootstrap_and_import(client, debootstrap, mirror, workdir)
    finally:
        if _unmount_below(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            # Deleting through a leftover mount (/proc, a bind-mounted /dev)
            # would delete the host's files: keep the directory instead.
            log.error("base_image_workdir_kept", path=str(workdir), reason="mounts below it")
    base_id = _image_id(client, BASE_IMAGE)
    if base_id is None:
        raise SandboxUnavailable(f"the engine did not keep the imported image {BASE_IMAGE}")
    log.info("base_image_built", image=BASE_IMAGE, image_id=base_id)
    return base_id


def _debootstrap_and_import(
    client: docker.DockerClient, debootstrap: str, mirror: str, workdir: Path
) -> None:
    retry = f"check that the apt mirror {mirror} answers, then run `callward sandbox build-image`"
    rootfs = workdir / "rootfs"
    log.info("base_image_debootstrap_started", suite=SUITE, mirror=mirror)
    _run(
        [debootstrap, "--variant=minbase", "--include=python3", SUITE, str(rootfs), mirror],
        what="debootstrap",
        remediation=retry,
    )
    _trim(rootfs)
    archive = workdir / "rootfs.tar"
    _run(
        [
            "tar",
            "--numeric-owner",
            "--one-file-system",
            "-C",
            str(rootfs),
            "-cf",
            str(archive),
            ".",
        ],
        what="tar",
        remediation=retry,
    )
    log.info("base_image_import_started", image=BASE_IMAGE, bytes=archive.stat().st_size)
    client.api.import_image(src=str(archive), repository=BASE_REPOSITORY, tag=SUITE)


def _run(argv: list[str], *, what: str, remediation: str) -> None:
    """Run one build command (an argument list, never a shell string) or raise."""
    try:
        done = subprocess.run(  # noqa: S603 - fixed argument lists; the mirror comes from apt's own files
            argv, capture_output=True, check=False, timeout=_BUILD_COMMAND_SECONDS
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxUnavailable(
            f"{what} could not run ({type(exc).__name__})", remediation=remediation
        ) from exc
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace")[-2000:]
        log.error(
            "base_image_command_failed", command=what, exit_code=done.returncode, stderr_tail=tail
        )
        raise SandboxUnavailable(
            f"{what} failed with exit code {done.returncode}", remediation=remediation
        )


def _unmount_below(directory: Path) -> bool:
    """
    Unmount anything a failed debootstrap left mounted below ``directory``.

    Returns:
        Whether nothing is mounted below it any more, so it is safe to delete.
    """
    prefix = f"{directory}/"

    def mounted() -> list[str]:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            return [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]

    for point in sorted(mounted(), key=len, reverse=True):
        subprocess.run(  # noqa: S603 - a fixed command on a path read from /proc
            ["umount", "--lazy", point],  # noqa: S607 - umount from PATH, as debootstrap uses it
            check=False,
            capture_output=True,
        )
    return not mounted()


def _trim(rootfs: Path) -> None:
    """Drop package caches and documentation, and clear every setuid and setgid bit."""
    for relative in _TRIMMED:
        directory = rootfs / relative
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    for parent, dirs, names in os.walk(rootfs):
        dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(parent, d))]
        for name in names:
            path = os.path.join(parent, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID))


def _build_runner_layer(client: docker.DockerClient, tag: str, runner: bytes) -> str:
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as archive:
        for name, data in (("Dockerfile", _DOCKERFILE.encode("utf-8")), ("runner.py", runner)):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            member.mode = 0o644
            archive.addfile(member, io.BytesIO(data))
    context.seek(0)
    log.info("sandbox_image_build_started", tag=tag)
    image, _logs = client.images.build(
        fileobj=context,
        custom_context=True,
        tag=tag,
        network_mode="none",
        pull=False,
        rm=True,
        forcerm=True,
        labels={"callward.runner.sha256": hashlib.sha256(runner).hexdigest()},
    )
    image_id = str(image.id)
    log.info("sandbox_image_built", tag=tag, image_id=image_id)
    return image_id
