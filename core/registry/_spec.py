"""
A tool is a Python function marked with ``@tool``: its ``ToolSpec`` (JSON Schema,
version, limits, labels) and the digest over all of them.

The function's source (decorators removed) is what runs in the sandbox, so a
tool must be self-contained: it imports what it needs inside its body. The
digest covers name, version, description, source, schema and limits, so any
change to what would run gives a new digest. The preimage (``spec_preimage``)
is what the registry database stores, and ``spec_from_preimage`` checks it
against its digest when it is read back.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from callward.core._canonical import (
    TOOL_DIGEST_DOMAIN,
    JSONValue,
    canonical_bytes,
    canonical_loads,
    canonical_sha256,
)
from callward.core.errors import ConfigurationError
from callward.core.types import ResourceLimits, Sha256Hex, ToolSpec, is_tool_name

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


def spec_preimage(spec: ToolSpec) -> dict[str, JSONValue]:
    """
    Everything a function tool's digest covers, as JSON; ``spec_from_preimage`` inverts it.

    Raises:
        ConfigurationError: A model tool: its digest covers weights, which this does not hold.
    """
    if spec.model is not None:
        raise ConfigurationError(f"{spec.ref} is a model tool; the configuration's "
                                 "models_as_tools registers it, not a tool file")
    return {
        "name": spec.name,
        "version": spec.version,
        "description": spec.description,
        "source": spec.source,
        "entrypoint": spec.entrypoint,
        "parameters": spec.parameters,
        "parameter_order": list(spec.parameter_order),
        "limits": spec.limits.to_json(),
        "labels": list(spec.labels),
        **({"secrets": list(spec.secrets)} if spec.secrets else {}),
    }


def tool_preimage_digest(preimage: Mapping[str, JSONValue]) -> Sha256Hex:
    """The digest of a tool's preimage (see ``spec_preimage``)."""
    return canonical_sha256(dict(preimage), domain=TOOL_DIGEST_DOMAIN)


def spec_from_preimage(preimage_json: bytes, digest: str) -> ToolSpec:
    """
    Rebuild a stored ``ToolSpec`` and check that it still has the digest it was stored with.

    Raises:
        ConfigurationError: The bytes are not a tool preimage, or their digest differs
            (the stored snapshot was changed after it was loaded).
    """
    try:
        raw = canonical_loads(preimage_json)
        if not isinstance(raw, dict):
            raise TypeError("not an object")  # noqa: TRY301 - one boundary below
        limits = raw["limits"]
        if not isinstance(limits, dict):
            raise TypeError("limits is not an object")  # noqa: TRY301 - one boundary below
        spec = ToolSpec(
            name=str(raw["name"]),
            version=str(raw["version"]),
            description=str(raw["description"]),
            source=str(raw["source"]),
            entrypoint=str(raw["entrypoint"]),
            parameters_json=canonical_bytes(raw["parameters"]),
            digest=tool_preimage_digest(raw),
            limits=ResourceLimits(**limits),
            labels=tuple(str(label) for label in raw["labels"]),
            parameter_order=tuple(str(p) for p in raw["parameter_order"]),
            secrets=tuple(str(name) for name in raw.get("secrets", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"a stored tool snapshot is not a tool ({type(exc).__name__})") from exc
    if spec.digest != digest:
        raise ConfigurationError(
            f"the stored snapshot of {spec.ref} does not have the digest it was loaded with",
            remediation="the registry database was changed outside callward; load the tool again",
        )
    return spec


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
    digest = tool_preimage_digest(
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
        }
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


def marked_functions(module: object) -> list[Callable[..., Any]]:
    """The functions of a module marked with ``@tool``, in definition order."""
    return [
        value
        for value in vars(module).values()
        if callable(value) and isinstance(getattr(value, _MARK, None), _ToolMark)
    ]
