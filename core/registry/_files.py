"""
Tool files and modules: a ``.py`` file read once (``ToolFile``), or imported, for
the ``@tool`` functions it defines.
"""

from __future__ import annotations

import importlib.util
import linecache
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from callward.core._canonical import canonical_sha256, sha256_hex
from callward.core.errors import ConfigurationError
from callward.core.registry._spec import marked_functions, spec_from_function
from callward.core.types import Sha256Hex, ToolSpec


@dataclass(frozen=True, slots=True)
class ToolFile:
    """
    A tool file as it was read once: its text, its digest and the tools defined by it.

    The tools are built from ``text``, never from the file again, so what was
    digested is what runs even if the file changes afterwards.
    """

    path: Path
    text: str
    sha256: Sha256Hex
    specs: tuple[ToolSpec, ...]


def read_tool_file(path: Path) -> ToolFile:
    """
    Read a ``.py`` file once and build a ``ToolSpec`` for each of its ``@tool`` functions.

    The text is compiled under a pseudo file name held in ``linecache``, so the
    source of each tool comes from the bytes read here, not from a later read of
    the file. Importing the file runs its module code in this process, as the
    configuration's tool files do.

    Raises:
        ConfigurationError: The file is missing, unreadable, fails to import or has no tools.
    """
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"tool file {path} cannot be read ({type(exc).__name__})"
                                 ) from exc
    digest = sha256_hex(data)
    filename = f"<callward tool file {digest[:16]} {path.name}>"
    module_name = f"callward_tools_{digest[:16]}"
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    module = types.ModuleType(module_name)
    module.__file__ = filename
    sys.modules[module_name] = module  # dataclasses and inspect look the module up
    try:
        exec(compile(text, filename, "exec"), module.__dict__)  # noqa: S102 - a trusted operator's tool file, as import would run it
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigurationError(
            f"tool file {path} failed to import: {type(exc).__name__}"
        ) from exc
    functions = marked_functions(module)
    if not functions:
        raise ConfigurationError(f"{path} defines no @tool function")
    return ToolFile(path, text, digest, tuple(spec_from_function(f) for f in functions))


def load_module_from_path(path: Path) -> object:
    """
    Import a tool file as a module of its own (its name from the resolved path).

    Raises:
        ConfigurationError: The file cannot be imported, or its module code fails.
    """
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
