"""
The tool registry: a tool is a Python function, its JSON Schema, a version and
a digest over all of them.

The function's source (decorators removed) is what runs in the sandbox, so a
tool must be self-contained: it imports what it needs inside its body. The
digest covers name, version, description, source, schema and limits, so any
change to what would run gives a new digest.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from callward.core._canonical import (
    TOOL_DIGEST_DOMAIN,
    JSONValue,
    canonical_bytes,
    canonical_sha256,
)
from callward.core.errors import ConfigurationError, UnknownTool
from callward.core.types import ResourceLimits, ToolSpec, is_tool_name

log = structlog.get_logger()

F = TypeVar("F", bound=Callable[..., Any])

_MARK: Final = "__callward_tool__"


@dataclass(frozen=True, slots=True)
class _ToolMark:
    version: str
    parameters: Mapping[str, JSONValue]
    description: str | None
    limits: ResourceLimits
    labels: tuple[str, ...]
    secrets: tuple[str, ...] = ()


def tool(
    *,
    version: str,
    parameters: Mapping[str, JSONValue],
    description: str | None = None,
    limits: ResourceLimits | None = None,
    labels: tuple[str, ...] = (),
    secrets: tuple[str, ...] = (),
) -> Callable[[F], F]:
    """
    Mark a function as a callward tool. The function is returned unchanged.

    Args:
        version: The tool's version (``name@version`` in the registry).
        parameters: The JSON Schema (2020-12) of its keyword arguments.
        description: For the model; defaults to the docstring's first paragraph.
        limits: The tool's default resource limits; the policy may set others.
        labels: Free-form labels for policy (e.g. ``egress``).
        secrets: Names of host secrets the tool needs (e.g. ``("GITHUB_TOKEN",)``);
            each must be granted by the policy, and reaches only this tool's executions.

    Example::

        @tool(version="1.0.0", parameters={
            "type": "object",
            "properties": {"x": {"type": "integer"}},
            "required": ["x"],
            "additionalProperties": False,
        })
        def square(x: int) -> int:
            return x * x
    """

    def mark(function: F) -> F:
        setattr(
            function,
            _MARK,
            _ToolMark(version, parameters, description, limits or ResourceLimits(), labels,
                      tuple(secrets)),
        )
        return function

    return mark


def function_source(function: Callable[..., Any]) -> str:
    """
    The source of a module-level function without its decorators, dedented.

    Raises:
        ConfigurationError: The source is unavailable or the object is not a plain function.
    """
    try:
        text = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError) as exc:
        raise ConfigurationError(
            f"the source of tool {getattr(function, '__name__', '?')} cannot be read"
        ) from exc
    module = ast.parse(text)
    if len(module.body) != 1 or not isinstance(module.body[0], ast.FunctionDef):
        raise ConfigurationError("a tool is one plain (not async) function")
    definition = module.body[0]
    lines = text.splitlines(keepends=True)
    return "".join(lines[definition.lineno - 1 :])


def _description(function: Callable[..., Any], given: str | None) -> str:
    if given is not None:
        return given
    doc = inspect.getdoc(function) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


def spec_from_function(function: Callable[..., Any]) -> ToolSpec:
    """
    Build the ``ToolSpec`` of a function marked with ``@tool``.

    Raises:
        ConfigurationError: Not marked, a bad name, or a schema that is not valid 2020-12.
    """
    mark = getattr(function, _MARK, None)
    if not isinstance(mark, _ToolMark):
        raise ConfigurationError(f"{function!r} is not marked with @tool")
    name = function.__name__
    if not is_tool_name(name):
        raise ConfigurationError(f"tool name {name!r} is not ASCII snake_case")
    schema = dict(mark.parameters)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ConfigurationError(
            f"the parameters schema of tool {name} is not valid JSON Schema 2020-12 "
            f"(at {exc.json_path})"
        ) from exc
    if schema.get("type") != "object":
        raise ConfigurationError(f"the parameters schema of tool {name} must have type object")
    properties = schema.get("properties", {})
    order = tuple(properties) if isinstance(properties, Mapping) else ()
    source = function_source(function)
    description = _description(function, mark.description)
    digest = canonical_sha256(
        {
            "name": name,
            "version": mark.version,
            "description": description,
            "source": source,
            "entrypoint": name,
            "parameters": schema,
            "parameter_order": list(order),
            "limits": mark.limits.to_json(),
            "labels": list(mark.labels),
            # Only when declared, so the digests of tools without secrets stay the same.
            **({"secrets": list(mark.secrets)} if mark.secrets else {}),
        },
        domain=TOOL_DIGEST_DOMAIN,
    )
    return ToolSpec(
        name=name,
        version=mark.version,
        description=description,
        source=source,
        entrypoint=name,
        parameters_json=canonical_bytes(schema),
        digest=digest,
        limits=mark.limits,
        labels=tuple(mark.labels),
        parameter_order=order,
        secrets=mark.secrets,
    )


def _load_module_from_path(path: Path) -> object:
    module_name = f"callward_tools_{canonical_sha256(str(path.resolve()))[:16]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"tool file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # inspect.getsource needs the module registered
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigurationError(
            f"tool file {path} failed to import: {type(exc).__name__}"
        ) from exc
    return module


class ToolRegistry:
    """
    The tools the gateway knows, by name. An unknown name is denied, never guessed.
    """

    def __init__(self) -> None:
        self._tools: dict[str, ToolSpec] = {}

    def register(self, function: Callable[..., Any]) -> ToolSpec:
        """
        Register a function marked with ``@tool``.

        Raises:
            ConfigurationError: The tool is invalid, or another tool has the name.
        """
        spec = spec_from_function(function)
        return self.add(spec)

    def add(self, spec: ToolSpec) -> ToolSpec:
        """Register a ready ``ToolSpec``; a second tool of the same name is refused."""
        if spec.name in self._tools and self._tools[spec.name].digest != spec.digest:
            raise ConfigurationError(f"two different tools are named {spec.name}")
        self._tools[spec.name] = spec
        log.info("tool_registered", tool=spec.ref, digest=spec.digest)
        return spec

    def load(self, source: str | Path) -> tuple[ToolSpec, ...]:
        """
        Register every ``@tool`` function of a Python file or an importable module.

        Args:
            source: A path to a ``.py`` file, or ``module:dotted.name``.

        Raises:
            ConfigurationError: The file cannot be imported or holds no tools.
        """
        text = str(source)
        if text.startswith("module:"):
            try:
                module: object = importlib.import_module(text.removeprefix("module:"))
            except ImportError as exc:
                raise ConfigurationError(f"tool module {text} cannot be imported") from exc
        else:
            path = Path(text)
            if not path.is_file():
                raise ConfigurationError(f"tool file {path} does not exist")
            module = _load_module_from_path(path)
        functions = [
            value
            for value in vars(module).values()
            if callable(value) and isinstance(getattr(value, _MARK, None), _ToolMark)
        ]
        if not functions:
            raise ConfigurationError(f"{text} defines no @tool function")
        return tuple(self.register(function) for function in functions)

    def get(self, name: str) -> ToolSpec | None:
        """The tool of that exact name, or None. Names are compared byte for byte."""
        return self._tools.get(name)

    def require(self, name: str) -> ToolSpec:
        """
        The tool of that name.

        Raises:
            UnknownTool: No tool has that name.
        """
        spec = self._tools.get(name)
        if spec is None:
            raise UnknownTool(len(name))
        return spec

    def parameter_order(self, name: str) -> tuple[str, ...] | None:
        spec = self._tools.get(name)
        return None if spec is None else spec.parameter_order

    def __iter__(self) -> Iterator[ToolSpec]:
        return iter(sorted(self._tools.values(), key=lambda spec: spec.name))

    def __len__(self) -> int:
        return len(self._tools)
